"""StoreSettings: what a backend needs to know about its store, already resolved.

``uploader.config`` parses URIs and options and validates them into an
``ObjectStoreHparams``; its ``store_settings()`` resolves that into a
:class:`StoreSettings` (the provider family, whether TLS is used, the extra
keyword arguments without ``secure``). Backends and the store take only this
object, so nothing under ``uploader.transfer`` imports ``uploader.config``.

TLS trust (``ca_bundle``, ``insecure_skip_tls_verify``) is carried as given;
:meth:`StoreSettings.trust` resolves it with :mod:`uploader.transfer.tls` when a
backend is built (the environment's CA variables are read then).

Credentials are carried as the NAMES of the environment variables that hold
them. :meth:`StoreSettings.credentials` reads the values when a backend is
built and registers them with :func:`uploader.redact.register_secret`, so they
are masked in every log line and message; they are never stored on the
settings, so no repr can show them.

Example::

    settings = StoreSettings(provider="local", family="local", container="/tmp/bucket")
    store = ObjectStore(settings, create_container=True)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from uploader.errors import ConfigError
from uploader.redact import register_secret
from uploader.transfer.tls import TLSTrust, resolve_trust

__all__ = ["FAMILIES", "SettingsSource", "StoreSettings", "resolve_settings"]

#: The backend families: one adapter each.
FAMILIES = frozenset({"s3", "azure", "gcs", "local"})


@dataclass(frozen=True)
class StoreSettings:
    """One store, resolved: which adapter, which container, where its credentials live.

    provider: the libcloud provider name (``s3``, ``minio``, ``azure_blobs`` ...).
    family: the adapter that serves it: ``s3``, ``azure``, ``gcs`` or ``local``.
    container: the bucket or container; for ``local``, an absolute directory (the
        config layer resolves libcloud's "key is the base directory" form into one).
    key_environ / secret_environ: names of the environment variables holding the
        access key and the secret (never the values).
    host / port / region: an endpoint override and the region, where given.
    secure: whether TLS is used.
    ca_bundle: a PEM file of the CAs to trust (None: the environment's, else the default).
    insecure_skip_tls_verify: no certificate verification (asked for by this name only).
    extra: further keyword arguments: the backend's own (``timeout``,
        ``content_md5``) and the libcloud driver's (``project`` ...). Read-only.
    """

    provider: str
    family: str
    container: str
    key_environ: str | None = None
    secret_environ: str | None = None
    host: str | None = None
    port: int | None = None
    region: str | None = None
    secure: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)
    ca_bundle: str | None = None
    insecure_skip_tls_verify: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(
                f"unknown backend family {self.family!r}; use one of {', '.join(sorted(FAMILIES))}"
            )
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    def trust(self, endpoint: str) -> TLSTrust:
        """What ``endpoint``'s certificate is checked against (see :mod:`uploader.transfer.tls`);
        a missing bundle is a ConfigError. The insecure warning is given only under TLS."""
        insecure = self.insecure_skip_tls_verify and self.secure
        return resolve_trust(self.ca_bundle, insecure, endpoint)

    def credentials(self) -> tuple[str | None, str | None]:
        """Read the key and secret from the named environment variables.

        The values are registered as secrets (masked from then on in every message
        and log line). Azure needs at least the key; for S3 and GCS, naming none means
        the cloud's own chain (:mod:`uploader.transfer.backends.aws_identity`,
        :mod:`uploader.transfer.backends.gcp_identity`).
        """
        values: list[str | None] = []
        for name, var in (
            ("key_environ", self.key_environ),
            ("secret_environ", self.secret_environ),
        ):
            if var is None:
                values.append(None)
                continue
            value = os.environ.get(var)
            if value is None:
                raise ConfigError(
                    f"environment variable {var} (named by {name}) is not set; "
                    f"export it before starting, e.g. export {var}=..."
                )
            if not value.strip():
                raise ConfigError(
                    f"environment variable {var} (named by {name}) is empty; "
                    "set it to the credential"
                )
            register_secret(value)
            values.append(value)
        if self.family == "azure" and values[0] is None:
            raise ConfigError(
                f"provider {self.provider!r} needs credentials: set key_environ and "
                "secret_environ to the names of the environment variables that hold them"
            )
        return values[0], values[1]


@runtime_checkable
class SettingsSource(Protocol):
    """Anything that resolves to settings, such as ``ObjectStoreHparams``."""

    def store_settings(self) -> StoreSettings: ...


def resolve_settings(source: StoreSettings | SettingsSource) -> StoreSettings:
    """``source`` itself when it is settings, else what it resolves to."""
    if isinstance(source, StoreSettings):
        return source
    if isinstance(source, SettingsSource):
        return source.store_settings()
    raise ConfigError(
        f"a store needs ObjectStoreHparams or StoreSettings, not {type(source).__name__}"
    )
