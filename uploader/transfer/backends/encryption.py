"""Encryption that every new object carries on GCS and Azure (S3's options are in
:mod:`uploader.transfer.backends.s3options`).

Buckets whose policy demands a customer-managed key, or an Azure account whose
containers demand an encryption scope, refuse uploads without them:

* ``kms_key_name`` (GCS): the Cloud KMS key of new objects,
  ``projects/P/locations/L/keyRings/R/cryptoKeys/K``, sent as
  ``x-goog-encryption-kms-key-name`` with every object upload.
* ``encryption_scope`` (Azure): the account's encryption scope of new blobs, sent as
  ``x-ms-encryption-scope`` with Put Blob, Put Block and Put Block List (service
  version 2019-02-02 and later, which is then the version asked for).

They come from URI parameters (``gs://b/p?kms_key_name=...``), flags
(``--kms-key-name``, ``--encryption-scope``) or the ``[store]`` table, and travel in
``extra_init_kwargs`` / ``StoreSettings.extra`` under these names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from uploader.errors import ConfigError

__all__ = [
    "ENCRYPTION_OPTIONS",
    "AZURE_SCOPE_VERSION",
    "encryption_headers",
    "validate_encryption_options",
]

#: Option name -> (the store family it applies to, the header new objects carry).
ENCRYPTION_OPTIONS: dict[str, tuple[str, str]] = {
    "kms_key_name": ("gcs", "x-goog-encryption-kms-key-name"),
    "encryption_scope": ("azure", "x-ms-encryption-scope"),
}
#: The first Azure Blob service version that takes ``x-ms-encryption-scope``.
AZURE_SCOPE_VERSION = "2019-02-02"
_KMS_KEY = re.compile(r"^projects/[^/\s]+/locations/[^/\s]+/keyRings/[^/\s]+/cryptoKeys/[^/\s]+$")
_SCOPE = re.compile(r"^[A-Za-z0-9]{3,63}$")


def validate_encryption_options(extra: Mapping[str, Any], family: str) -> None:
    """Raise ConfigError, naming the option, for one given to another kind of store or
    with a value the store would refuse."""
    for name, (where, _) in ENCRYPTION_OPTIONS.items():
        value = extra.get(name)
        if value is None:
            continue
        if family != where:
            raise ConfigError(
                f"option {name} applies to {'GCS' if where == 'gcs' else 'Azure'} stores "
                f"only, not to {family}; remove it"
            )
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be text, not {value!r}")
    key = extra.get("kms_key_name")
    if key is not None and not _KMS_KEY.match(key):
        raise ConfigError(
            f"kms_key_name {key!r} is not a Cloud KMS key name; give "
            "projects/PROJECT/locations/LOCATION/keyRings/RING/cryptoKeys/KEY"
        )
    scope = extra.get("encryption_scope")
    if scope is not None and not _SCOPE.match(scope):
        raise ConfigError(
            f"encryption_scope {scope!r} is not an Azure encryption scope name (3-63 "
            "letters and digits)"
        )


def encryption_headers(extra: Mapping[str, Any], family: str) -> dict[str, str]:
    """The headers new objects of a ``family`` store carry for these options."""
    return {
        header: str(extra[name])
        for name, (where, header) in ENCRYPTION_OPTIONS.items()
        if where == family and extra.get(name) is not None
    }
