"""Object store providers: the libcloud names, the adapter family each belongs to, and
the URI schemes that name them.

Example::

    provider_family("minio")      # "s3"
    _SCHEMES["gs"]                # "google_storage"
"""

from __future__ import annotations

import difflib
import ipaddress

from uploader.errors import ConfigError

__all__ = ["KNOWN_PROVIDERS", "SCHEMES", "provider_family", "is_loopback"]

# Providers by the libcloud name (lower case), grouped by the adapter that serves them.
_S3_FAMILY = {
    "s3",
    "minio",
    "digitalocean_spaces",
    "scaleway",
    "ovh",
    "backblaze_b2_s3",
    "s3_rgw",
    "s3_rgw_outscale",
    "aurora",
    "kakao",
    "linode",
    "wasabi",
} | {
    "s3_us_east_2",
    "s3_us_west",
    "s3_us_west_2",
    "s3_us_gov_west",
    "s3_us_gov_east",
    "s3_cn_north",
    "s3_cn_northwest",
    "s3_eu_west",
    "s3_eu_west2",
    "s3_eu_central",
    "s3_eu_north_1",
    "s3_ap_south",
    "s3_ap_southeast",
    "s3_ap_southeast2",
    "s3_ap_northeast",
    "s3_ap_northeast1",
    "s3_ap_northeast2",
    "s3_ap_northeast3",
    "s3_sa_east",
    "s3_sa_east2",
    "s3_ca_central",
    "s3_me_south",
}
_AZURE = {"azure_blobs"}
_GCS = {"google_storage"}
_LOCAL = {"local"}
KNOWN_PROVIDERS = frozenset(_S3_FAMILY | _AZURE | _GCS | _LOCAL)

SCHEMES = {
    "s3": "s3",
    "s3a": "s3",
    "azure": "azure_blobs",
    "az": "azure_blobs",
    "gs": "google_storage",
    "gcs": "google_storage",
    "file": "local",
}


def provider_family(provider: str) -> str:
    """``s3``, ``azure``, ``gcs`` or ``local`` for a libcloud provider name."""
    p = provider.lower()
    if p in _S3_FAMILY:
        return "s3"
    if p in _AZURE:
        return "azure"
    if p in _GCS:
        return "gcs"
    if p in _LOCAL:
        return "local"
    raise ConfigError(_unknown_provider(provider))


def _unknown_provider(provider: str) -> str:
    close = difflib.get_close_matches(provider.lower(), sorted(KNOWN_PROVIDERS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"unknown object store provider {provider!r}.{hint} Use a libcloud provider name "
        "such as 's3', 'minio', 'azure_blobs', 'google_storage' or 'local'."
    )


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    h = host.strip("[]")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False
