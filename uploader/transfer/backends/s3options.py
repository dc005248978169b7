"""The S3-only store options: the credentials profile and what every new object carries.

They come from URI parameters (``?sse=aws:kms&storage_class=STANDARD_IA``), flags
(``--sse``, ``--sse-kms-key-id``, ``--storage-class``, ``--acl``, ``--profile``) or the
``[store]`` table, and travel in ``extra_init_kwargs`` / ``StoreSettings.extra`` under
these names (:data:`S3_OPTIONS`):

* ``profile``: the profile of the shared AWS files to take credentials from.
* ``sse``: server-side encryption, ``AES256`` or ``aws:kms`` (``aws:kms:dsse`` too).
* ``sse_kms_key_id``: the KMS key for ``aws:kms`` (its id, ARN or alias).
* ``storage_class``: ``STANDARD``, ``STANDARD_IA``, ``INTELLIGENT_TIERING`` ...
* ``acl``: a canned ACL such as ``bucket-owner-full-control``.

:func:`object_headers` turns them into the headers the AWS CLI sends with PutObject
and CreateMultipartUpload (``x-amz-server-side-encryption``,
``x-amz-server-side-encryption-aws-kms-key-id``, ``x-amz-storage-class``,
``x-amz-acl``); UploadPart and CompleteMultipartUpload carry none of them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from uploader.errors import ConfigError

__all__ = ["S3_OPTIONS", "SSE_VALUES", "object_headers", "validate_s3_options"]

#: The option names, as URI parameters, ``[store]`` keys and ``extra_init_kwargs`` keys.
S3_OPTIONS = ("profile", "sse", "sse_kms_key_id", "storage_class", "acl")
SSE_VALUES = ("AES256", "aws:kms", "aws:kms:dsse")
_ACLS = (
    "private",
    "public-read",
    "public-read-write",
    "authenticated-read",
    "aws-exec-read",
    "bucket-owner-read",
    "bucket-owner-full-control",
)
_WORD = re.compile(r"^[A-Za-z0-9_.:/+=,@-]+$")
_HEADERS = {
    "sse": "x-amz-server-side-encryption",
    "sse_kms_key_id": "x-amz-server-side-encryption-aws-kms-key-id",
    "storage_class": "x-amz-storage-class",
    "acl": "x-amz-acl",
}


def validate_s3_options(extra: Mapping[str, Any], family: str) -> None:
    """Raise ConfigError, naming the option, for a value S3 would refuse or misread."""
    given = [k for k in S3_OPTIONS if extra.get(k) is not None]
    if given and family != "s3":
        raise ConfigError(
            f"option(s) {', '.join(given)} apply to S3 stores only, not to {family}; remove them"
        )
    for k in given:
        value = extra[k]
        if not isinstance(value, str) or not _WORD.match(value):
            raise ConfigError(f"{k} must be a plain word such as an S3 value, not {value!r}")
    sse = extra.get("sse")
    if sse is not None and sse not in SSE_VALUES:
        raise ConfigError(f"sse {sse!r} is not known; use one of {', '.join(SSE_VALUES)}")
    if extra.get("sse_kms_key_id") is not None and not str(sse or "").startswith("aws:kms"):
        raise ConfigError("sse_kms_key_id needs sse=aws:kms (add ?sse=aws:kms or --sse aws:kms)")
    acl = extra.get("acl")
    if acl is not None and acl not in _ACLS:
        raise ConfigError(f"acl {acl!r} is not a canned ACL; use one of {', '.join(_ACLS)}")
    cls = extra.get("storage_class")
    if cls is not None and cls != cls.upper():
        raise ConfigError(f"storage_class {cls!r} is written in capitals, e.g. STANDARD_IA")


def object_headers(extra: Mapping[str, Any]) -> dict[str, str]:
    """The headers that PutObject and CreateMultipartUpload carry for these options."""
    return {h: str(extra[k]) for k, h in _HEADERS.items() if extra.get(k) is not None}
