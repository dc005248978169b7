"""The argparse option groups the commands share.

Every ``watch``/``push`` flag is a field of :class:`uploader.config.options.WatchOptions`,
built here from the field's declaration (its kind, group and help, which shows the
field's default). The commands hand the parsed flags, as a mapping, to
:func:`uploader.config.resolve.resolve`, once. With
:func:`uploader.config.options.to_argv` this parser is the one pair that turns options
into a command line and back (the worker process the training side starts goes through it).
"""

from __future__ import annotations

import argparse
from typing import Any

from uploader.config.hparams import StoreLocation
from uploader.config.options import PATTERNS, WATCH_KEYS, WatchOptions, flag_name, option_of
from uploader.daemon.layouts import CHECKPOINT_PATTERNS, TEMPORARY_PATTERNS
from uploader.daemon.status import STATUS_FILE
from uploader.errors import AuthError, ConfigError, ContainerNotFoundError, ExitCode
from uploader.transfer.store import ObjectStore

__all__ = [
    "Formatter",
    "EXIT_CODES",
    "add_store_options",
    "add_watch_options",
    "add_output_options",
    "open_store",
    "PUSH_IMPLIES",
]

#: The "exit codes:" block at the end of every command's --help.
EXIT_CODES = ExitCode.help_text()


class Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


def add_store_options(p: argparse.ArgumentParser, to: bool = True) -> None:
    g = p.add_argument_group("store (a URI, hparams flags, or a config file; flags win)")
    if to:
        g.add_argument(
            "--to",
            metavar="URI",
            help="destination, e.g. s3://bucket/prefix?endpoint=http://127.0.0.1:9000, "
            "azure://container/prefix, gs://bucket/prefix, file:///abs/dir; the same as the "
            "positional URI (default: from --config)",
        )
    g.add_argument(
        "--config", metavar="FILE", help="TOML file with [store] and [watch] tables (default: none)"
    )
    g.add_argument(
        "--provider",
        help="libcloud provider: s3, azure_blobs, google_storage, local, minio ... (default: from the URI)",
    )
    g.add_argument(
        "--container",
        help="bucket or container; local: an absolute directory, or a folder of the "
        "directory named by --key-environ ('.' for that directory) (default: from the URI)",
    )
    g.add_argument(
        "--key-environ",
        metavar="VAR",
        help="name of the environment variable holding the access key (for local: the base "
        "directory that a relative --container is in) (default: none for s3://, which uses the "
        "AWS credential chain; AZURE_STORAGE_ACCOUNT for azure://)",
    )
    g.add_argument(
        "--secret-environ",
        metavar="VAR",
        help="name of the environment variable holding the secret "
        "(default: none for s3://, the AWS credential chain; for azure://, $AZURE_STORAGE_KEY "
        "if set, else azure-identity's chain)",
    )
    g.add_argument(
        "--host", help="endpoint host of an S3-compatible server or emulator (default: provider's)"
    )
    g.add_argument("--port", type=int, help="endpoint port (default: provider's)")
    g.add_argument("--region", help="region (default: provider's)")
    g.add_argument(
        "--extra-init-kwargs",
        metavar="JSON",
        help="further driver arguments as a JSON object, e.g. '{\"secure\": false}' (default: none)",
    )
    g.add_argument(
        "--ca-bundle",
        metavar="PEM",
        help="PEM file of the CA certificates that the endpoint's certificate is checked "
        "against, for a private CA (default: $AWS_CA_BUNDLE, $SSL_CERT_FILE or "
        "$REQUESTS_CA_BUNDLE, else the system's trust store)",
    )
    g.add_argument(
        "--insecure-skip-tls-verify",
        action="store_true",
        default=None,
        help="do NOT check the endpoint's TLS certificate (anyone on the path can read and "
        "change the data); a warning says so at start (default: off: always checked)",
    )
    g.add_argument(
        "--prefix",
        help="object name prefix; overrides the URI's path (default: the URI's path)",
    )
    g.add_argument(
        "--sas-environ",
        metavar="VAR",
        help="Azure: name of the environment variable holding a SAS token, appended to "
        "every request (default: none: account key or azure-identity's chain)",
    )
    g.add_argument(
        "--encryption-scope",
        metavar="SCOPE",
        help="Azure: the encryption scope of new blobs (default: the container's)",
    )
    g.add_argument(
        "--kms-key-name",
        metavar="KEY",
        help="GCS: the Cloud KMS key of new objects, projects/P/locations/L/keyRings/R/"
        "cryptoKeys/K (default: the bucket's)",
    )
    s3 = p.add_argument_group("S3 credentials and object options")
    s3.add_argument(
        "--profile",
        help="profile of ~/.aws/config and ~/.aws/credentials to take credentials from "
        "(default: $AWS_PROFILE, else botocore's chain: environment, files, SSO, "
        "web identity, container, instance metadata)",
    )
    s3.add_argument(
        "--sse",
        choices=("AES256", "aws:kms", "aws:kms:dsse"),
        help="server-side encryption of new objects (default: the bucket's)",
    )
    s3.add_argument(
        "--sse-kms-key-id", metavar="KEY", help="KMS key for --sse aws:kms (default: AWS's)"
    )
    s3.add_argument(
        "--storage-class",
        metavar="CLASS",
        help="storage class of new objects, e.g. STANDARD_IA (default: the bucket's)",
    )
    s3.add_argument(
        "--acl",
        metavar="ACL",
        help="canned ACL of new objects, e.g. bucket-owner-full-control (default: none)",
    )


#: What ``push`` implies (it exits when idle and follows no parent): no flags of its own.
PUSH_IMPLIES = ("exit_when_idle", "parent_pid")


def add_watch_options(p: argparse.ArgumentParser, push: bool = False) -> None:
    """RUN_DIR, the store, and one flag per :class:`WatchOptions` field, as the field
    declares it (push: not the flags of :data:`PUSH_IMPLIES`)."""
    d = WatchOptions()
    facts = {
        "temporary": PATTERNS.show(TEMPORARY_PATTERNS),
        "checkpoint_names": PATTERNS.show(d.pointer_pattern or CHECKPOINT_PATTERNS),
        "status_file": STATUS_FILE,
    }
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory to upload from")
    p.add_argument(
        "uri",
        metavar="URI",
        nargs="?",
        help="destination, e.g. s3://bucket/prefix, as --to takes it (default: --to, else "
        "from --config)",
    )
    add_store_options(p)
    groups: dict[str, Any] = {}
    for key in WATCH_KEYS:
        if push and key in PUSH_IMPLIES:
            continue
        opt = option_of(key)
        if opt.group not in groups:
            groups[opt.group] = p.add_argument_group(opt.group)
        kwargs = dict(opt.kind.argparse)
        if opt.metavar:
            kwargs["metavar"] = opt.metavar
        text = opt.help.format(default=opt.kind.show(getattr(d, key)), **facts)
        groups[opt.group].add_argument(flag_name(key), help=text, **kwargs)
    add_output_options(p)


def add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="log line format on stderr (default: text)",
    )
    g.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only (default: off)"
    )
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging (default: off)")
    g.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars even on a terminal (default: bars on a terminal)",
    )


# -- the store ---------------------------------------------------------------------------
def open_store(loc: StoreLocation, **options: Any) -> ObjectStore:
    """The store, with a missing container or refused credentials as a ConfigError."""
    try:
        return loc.hparams.initialize_object(**options)
    except (ContainerNotFoundError, AuthError) as exc:
        raise ConfigError(str(exc)) from None
