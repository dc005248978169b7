"""Checks of store settings that need no store: TLS options, and the LOCAL store's root.

In Composer and libcloud the LOCAL driver's key is a base directory and the container a
folder in it; an absolute container is used as it is. :func:`local_root` resolves the
directory that is the store's root, reading the base directory from
``extra_init_kwargs["key"]`` or from the variable ``key_environ`` names.
"""

from __future__ import annotations

import os
from typing import Any

from uploader.errors import ConfigError
from uploader.transfer.tls import CA_BUNDLE_OPTION, INSECURE_OPTION

__all__ = ["check_tls", "check_local", "local_root"]


def check_tls(extra: dict[str, Any]) -> None:
    """``ca_bundle`` is a path; ``insecure_skip_tls_verify`` a real boolean (so that a
    string such as "false" never turns verification off)."""
    bundle = extra.get(CA_BUNDLE_OPTION)
    if bundle is not None and (not isinstance(bundle, str) or not bundle.strip()):
        raise ConfigError(
            f"{CA_BUNDLE_OPTION} must be the path of a PEM file of CA certificates, "
            f"e.g. /etc/ssl/private-ca.pem, not {bundle!r}"
        )
    insecure = extra.get(INSECURE_OPTION, False)
    if not isinstance(insecure, bool):
        raise ConfigError(
            f"{INSECURE_OPTION} must be true or false (a JSON/TOML boolean), not {insecure!r}"
        )
    if insecure and bundle is not None:
        raise ConfigError(
            f"{CA_BUNDLE_OPTION} and {INSECURE_OPTION} contradict each other; keep "
            f"{CA_BUNDLE_OPTION} (certificates checked against it)"
        )


def check_local(container: str, key_environ: str | None, extra: Any) -> None:
    """An absolute container, or a base directory (the key) and a folder inside it."""
    key = extra.get("key") if isinstance(extra, dict) else None
    if key is not None:
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(
                "extra_init_kwargs['key'] for 'local' must be the base directory "
                'as a non-empty path, e.g. {"key": "/data/ckpts"}'
            )
        if key_environ is not None:
            raise ConfigError(
                f"the local base directory is given twice: by key_environ "
                f"({key_environ}) and by extra_init_kwargs['key']; keep one"
            )
    if os.path.isabs(container):
        return  # used as is, whatever the key says (as libcloud joins them)
    if key is None and key_environ is None:
        raise ConfigError(
            f"local container {container!r} is relative; give an absolute "
            "directory (e.g. file:///data/bucket), or name the base directory it is a "
            "folder of: key_environ=VAR with VAR=/data exported, or "
            "extra_init_kwargs={'key': '/data'} ('.' is the base directory itself)"
        )
    if ".." in container.replace("\\", "/").split("/"):
        raise ConfigError(
            f"local container {container!r} contains '..'; name a folder inside "
            "the base directory, or give an absolute directory"
        )


def local_root(container: str, key_environ: str | None, extra: dict[str, Any]) -> str:
    """The directory that is the LOCAL store's root, resolved.

    An absolute container is the root itself. A relative one is a folder of the base
    directory (libcloud LOCAL's key: ``extra["key"]``, or the value of the variable
    ``key_environ`` names), read now; ``"."`` is the base directory itself. The base
    directory must exist: ConfigError otherwise.
    """
    if os.path.isabs(container):
        return container
    check_local(container, key_environ, extra)  # the fields may have changed since
    key = extra.get("key")
    if key is not None:
        base, source = str(key), "extra_init_kwargs['key']"
    else:
        var = key_environ
        assert var is not None  # check_local() requires a key for a relative container
        value = os.environ.get(var)
        if value is None or not value.strip():
            raise ConfigError(
                f"environment variable {var} (named by key_environ) is "
                f"{'not set' if value is None else 'empty'}; for provider 'local' it holds "
                f"the base directory that container {container!r} is a folder of: "
                f"export {var}=/path/to/dir"
            )
        base, source = value, f"${var} (named by key_environ)"
    if not os.path.isabs(base):
        raise ConfigError(
            f"the local base directory {base!r} from {source} must be an absolute path, "
            "e.g. /data/ckpts"
        )
    if not os.path.isdir(base):
        raise ConfigError(
            f"the local base directory {base} from {source} does not exist (or is not "
            f"a directory); create it "
            f"(mkdir -p {base}) or point {source.split(' ')[0]} at an existing directory "
            "(--create-container creates only the container folder inside it)"
        )
    return os.path.normpath(os.path.join(base, container))
