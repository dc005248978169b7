"""Configuration: command-line flags and an optional TOML file, merged into hparams.

The store is named three ways, which combine: ``--to URI``; the
ObjectStoreHparams fields as flags (``--provider``, ``--container``,
``--key-environ``, ``--secret-environ``, ``--host``, ``--port``, ``--region``,
``--extra-init-kwargs JSON``), which also refine a URI; or ``--config FILE``.
Flags override the file. Credentials are never configuration values: only the
names of the environment variables that hold them.

A config file::

    [store]
    uri = "s3://ckpts/exp1?endpoint=http://127.0.0.1:9000"   # or the fields below
    # provider = "s3"
    # container = "ckpts"
    # key_environ = "MY_KEY_VAR"            # S3: unset for the AWS credential chain
    # secret_environ = "MY_SECRET_VAR"
    # host = "127.0.0.1"
    # port = 9000
    # region = "us-east-1"
    # extra_init_kwargs = { secure = false }
    # ca_bundle = "/etc/ssl/private-ca.pem"   # the CAs a private endpoint's certificate is checked against
    # profile = "train"                     # S3: a profile of ~/.aws/config (else the AWS chain)
    # sse = "aws:kms"                       # S3: AES256 or aws:kms (+ sse_kms_key_id)
    # storage_class = "STANDARD_IA"         # S3; acl = "bucket-owner-full-control"
    # sas_environ = "AZURE_STORAGE_SAS_TOKEN" # Azure: the variable holding a SAS token
    # encryption_scope = "ckptscope"        # Azure: the encryption scope of new blobs
    # kms_key_name = "projects/p/locations/l/keyRings/r/cryptoKeys/k"  # GCS: CMEK of new objects
    # prefix = "exp1"

    [watch]
    keep_local = 3
    drain_timeout = 600
    include = ["*.pt", "*.safetensors"]
    bwlimit = "200M"

Keys of ``[watch]`` are the fields of :class:`uploader.config.options.WatchOptions`
(the long option names with ``_`` for ``-``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from uploader.config.hparams import ObjectStoreHparams, StoreLocation, join_key, parse_uri
from uploader.errors import ConfigError
from uploader.transfer.backends.azure_identity import AZURE_OPTIONS
from uploader.transfer.backends.encryption import ENCRYPTION_OPTIONS
from uploader.transfer.backends.s3options import S3_OPTIONS
from uploader.transfer.tls import CA_BUNDLE_OPTION, INSECURE_OPTION

__all__ = [
    "STORE_FIELDS",
    "TLS_KEYS",
    "load_config_file",
    "store_location",
    "parse_bytes",
    "parse_extra_kwargs",
]

STORE_FIELDS = (
    "provider",
    "container",
    "key_environ",
    "secret_environ",
    "host",
    "port",
    "region",
    "extra_init_kwargs",
)
#: [store] keys (and flags) that go into extra_init_kwargs under the same name: TLS trust,
#: for S3 the credentials profile and what new objects carry, for Azure the SAS variable.
TLS_KEYS = (CA_BUNDLE_OPTION, INSECURE_OPTION, *S3_OPTIONS, *AZURE_OPTIONS, *ENCRYPTION_OPTIONS)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)?\s*$", re.I)


def load_config_file(path: str | None) -> dict[str, dict[str, Any]]:
    """Read a TOML config file into ``{"store": {...}, "watch": {...}}``."""
    if not path:
        return {"store": {}, "watch": {}}
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(
                "reading --config needs Python 3.11+ or the 'tomli' package; "
                "pip install tomli, or pass the options as flags"
            ) from None
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist; check the --config path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {p} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    unknown = set(data) - {"store", "watch"}
    if unknown:
        raise ConfigError(
            f"config file {p}: unknown section(s) {', '.join(sorted(unknown))}; "
            "use [store] and [watch]"
        )
    store = dict(data.get("store", {}))
    for secret in ("key", "secret", "password", "access_key", "secret_key"):
        if secret in store:
            raise ConfigError(
                f"config file {p}: [store] {secret} is not accepted; credentials come only "
                "from environment variables named by key_environ / secret_environ"
            )
    known = set(STORE_FIELDS) | {"uri", "prefix", *TLS_KEYS}
    bad = set(store) - known
    if bad:
        raise ConfigError(
            f"config file {p}: unknown [store] key(s) {', '.join(sorted(bad))}; "
            f"known: {', '.join(sorted(known))}"
        )
    return {"store": store, "watch": dict(data.get("watch", {}))}


def parse_extra_kwargs(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--extra-init-kwargs is not valid JSON ({exc.msg}); e.g. '{{\"secure\": false}}'"
        ) from None
    if not isinstance(value, dict):
        raise ConfigError("--extra-init-kwargs must be a JSON object, e.g. '{\"secure\": false}'")
    return value


def store_location(
    uri: str | None,
    flags: dict[str, Any],
    file_store: dict[str, Any] | None = None,
    prefix: str | None = None,
    *,
    split_target: bool = False,
) -> StoreLocation:
    """Merge URI, config-file [store] and flags (highest priority) into a StoreLocation.

    ``flags`` holds the STORE_FIELDS given on the command line (None when absent);
    ``prefix`` (the --prefix flag) replaces the store prefix, not a target the URI names
    below it (``split_target``, see :func:`uploader.config.hparams.parse_uri`).
    """
    file_store = _tls_into_extra(dict(file_store or {}))
    flags = _tls_into_extra(dict(flags))
    uri = uri or file_store.pop("uri", None)
    file_prefix = file_store.pop("prefix", None)
    merged: dict[str, Any] = {k: v for k, v in file_store.items() if v is not None}
    for k in STORE_FIELDS:
        if flags.get(k) is not None:
            if k == "extra_init_kwargs" and isinstance(merged.get(k), dict):
                merged[k] = {**merged[k], **flags[k]}
            else:
                merged[k] = flags[k]
    if uri:
        loc = parse_uri(uri, split_target=split_target, **merged)
    else:
        if not merged.get("provider") or not merged.get("container"):
            raise ConfigError(
                "no store given: pass --to URI (e.g. s3://bucket/prefix or file:///abs/dir), "
                "or --provider and --container, or --config FILE with a [store] section"
            )
        if merged.get("extra_init_kwargs") is None:
            merged.pop("extra_init_kwargs", None)
        loc = StoreLocation(ObjectStoreHparams(**merged), "")
    final_prefix = prefix if prefix is not None else (file_prefix or loc.prefix)
    final_prefix = join_key(final_prefix or "", "")
    if ".." in final_prefix.split("/"):
        raise ConfigError(f"prefix {final_prefix!r} contains '..'; use a plain path")
    return StoreLocation(loc.hparams, final_prefix.strip("/"), loc.target)


def _tls_into_extra(store: dict[str, Any]) -> dict[str, Any]:
    """``store`` with its TLS keys (``ca_bundle = ...``) moved into ``extra_init_kwargs``,
    where the hparams carry them; a value given there too must agree."""
    moved = {k: store.pop(k) for k in TLS_KEYS if store.get(k) is not None}
    for k in TLS_KEYS:
        store.pop(k, None)
    if not moved:
        return store
    extra = dict(store.get("extra_init_kwargs") or {})
    for k, v in moved.items():
        if k in extra and extra[k] != v:
            raise ConfigError(
                f"{k} is given twice, as {v!r} and in extra_init_kwargs as {extra[k]!r}; keep one"
            )
        extra[k] = v
    store["extra_init_kwargs"] = extra
    return store


def parse_bytes(text: str | int | float | None, what: str = "--bwlimit") -> int:
    """``"200M"`` -> 209715200 (K, M, G, T are powers of 1024); 0 or None means no limit."""
    if text is None:
        return 0
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"{what} {text!r} is not a size; e.g. 500K, 200M, 1G (bytes per second)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)
