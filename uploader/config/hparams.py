"""ObjectStoreHparams: which store, which container, and where the credentials live.

To prevent accidental leakage of API keys, secrets are never fields: the
hparams name the environment variables that hold them (``key_environ``,
``secret_environ``), and their values are read only when the store is built.

The transfer layer never sees these hparams: :meth:`ObjectStoreHparams.store_settings`
resolves them into a :class:`uploader.transfer.settings.StoreSettings`, which is
what the backends take.

A URI is a second way in, mapping onto the same fields::

    s3://bucket/prefix                      AWS S3 (?region=, else the provider's default);
                                            credentials from the AWS chain (?profile=)
    s3://bucket/prefix?sse=aws:kms&sse_kms_key_id=alias/ckpt&storage_class=STANDARD_IA
                                            ... what new objects carry (also acl=)
    s3://bucket/prefix?endpoint=http://127.0.0.1:9000   an S3-compatible server
    s3://bucket/prefix?endpoint=https://minio.lan:9000&ca_bundle=/etc/ssl/lan-ca.pem
                                            ... behind a private CA
    azure://container/prefix                Azure Blob Storage (?endpoint= for Azurite)
    gs://bucket/prefix                      Google Cloud Storage
    file:///abs/dir?prefix=p                a local directory as the bucket (libcloud LOCAL)

A reading command (``pull``, ``ls``, ``verify``) takes the URI that ``push`` wrote to
with ``/latest``, ``/rank_N/NAME`` or an object path appended, for every scheme: the
path is split at its first ``latest`` or ``rank_N`` component (:func:`split_target`),
and what comes before is the store and prefix exactly as ``push`` named them (for
``file://``, the same directory)::

    s3://bucket/exp/latest                  store s3://bucket, prefix exp, target latest
    file:///data/bucket/exp/rank_0/ep3.pt   container /data/bucket/exp, target rank_0/ep3.pt

For ``local``, libcloud's (and Composer's) convention works too: the key is the
base directory and the container a folder in it, ``"."`` being the base itself::

    os.environ["OBJECT_STORE_KEY"] = "/data/remote_dir"
    ObjectStoreHparams(provider="local", key_environ="OBJECT_STORE_KEY", container=".")

For S3, naming no variables means botocore's credential chain (environment with
session token, ``AWS_PROFILE`` or ``extra_init_kwargs={"profile": ...}``, SSO,
credential_process, web identity, container credentials, instance metadata); see
:mod:`uploader.transfer.backends.aws_identity`. For GCS, naming none means google-auth's
chain (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's application default credentials,
the metadata server); see :mod:`uploader.transfer.backends.gcp_identity`.

Example::

    hp = ObjectStoreHparams(provider="s3", container="ckpts",
                            key_environ="AWS_ACCESS_KEY_ID",
                            secret_environ="AWS_SECRET_ACCESS_KEY")
    store = hp.initialize_object()
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from uploader.config.local import check_local, check_tls, local_root
from uploader.config.providers import KNOWN_PROVIDERS, SCHEMES, is_loopback, provider_family
from uploader.errors import ConfigError
from uploader.transfer.backends.azure_identity import AZURE_OPTIONS, validate_azure_options
from uploader.transfer.backends.encryption import (
    ENCRYPTION_OPTIONS,
    validate_encryption_options,
)
from uploader.transfer.backends.s3options import S3_OPTIONS, validate_s3_options
from uploader.transfer.settings import StoreSettings
from uploader.transfer.store import ObjectStore
from uploader.transfer.tls import CA_BUNDLE_OPTION, INSECURE_OPTION

__all__ = [
    "ObjectStoreHparams",
    "StoreLocation",
    "parse_uri",
    "split_target",
    "provider_family",
    "is_loopback",
    "KNOWN_PROVIDERS",
]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: The path components where what a reading command names starts (see split_target).
_TARGET_START = re.compile(r"^(latest|rank_\d+)$")


@dataclass
class ObjectStoreHparams:
    """Where checkpoints go. Fields follow the seed API exactly.

    provider: the libcloud provider name (``s3``, ``azure_blobs``, ``google_storage``,
        ``local``, ``minio`` ...).
    container: the container or bucket. For ``local`` (libcloud LOCAL), either an
        absolute directory, or a folder of the base directory that the key names
        (``"."``: the base directory itself); see :meth:`local_root`.
    key_environ / secret_environ: names of the environment variables holding the
        access key and secret. Never the values themselves. For S3, leave both unset
        for the AWS credential chain. For ``local`` the key is
        the base directory (given by variable, or as ``extra_init_kwargs["key"]``).
    host / port: an endpoint override, e.g. an S3-compatible server. Plain HTTP is
        used on loopback, or when ``extra_init_kwargs={"secure": False}`` asks for it.
    region: the region, where the provider has them.
    extra_init_kwargs: further keyword arguments: ``secure``, ``ca_bundle`` (a PEM file
        of the CAs to trust), ``insecure_skip_tls_verify`` (no certificate checks; warned
        about), ``timeout`` (seconds per request), Azure's ``content_md5``, for S3
        ``profile``, ``sse``, ``sse_kms_key_id``, ``storage_class`` and ``acl``, and any
        the libcloud driver takes.
    """

    provider: str
    container: str
    key_environ: str | None = None
    secret_environ: str | None = None
    host: str | None = None
    port: int | None = None
    region: str | None = None
    extra_init_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        """Check the fields without touching the network or reading secrets."""
        if not isinstance(self.provider, str) or not self.provider.strip():
            raise ConfigError("provider is empty; name a libcloud provider such as 's3' or 'local'")
        self.provider = self.provider.strip().lower()
        family = provider_family(self.provider)
        if not isinstance(self.container, str) or not self.container.strip():
            raise ConfigError(
                "container is empty; name the bucket (or, for 'local', an absolute "
                "directory, or '.' with the base directory as the key) to upload into"
            )
        if family == "local":
            self._validate_local()
        elif "/" in self.container or "\\" in self.container:
            raise ConfigError(
                f"container {self.container!r} contains a slash; put the path "
                "inside the bucket in the object name prefix instead"
            )
        for name in ("key_environ", "secret_environ"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not _ENV_NAME.match(value)):
                raise ConfigError(
                    f"{name} must be the NAME of an environment variable "
                    f"(letters, digits, underscore), not a value"
                )
        if self.port is not None:
            try:
                port = int(self.port)
            except (TypeError, ValueError):
                raise ConfigError(f"port {self.port!r} is not a number; give 1-65535") from None
            if not 1 <= port <= 65535:
                raise ConfigError(f"port {port} is out of range; give 1-65535")
            self.port = port
        if self.host is not None and (
            not isinstance(self.host, str) or not self.host.strip() or "/" in self.host
        ):
            raise ConfigError(
                f"host {self.host!r} must be a host name or address "
                "without scheme or path (use --port for the port)"
            )
        if not isinstance(self.extra_init_kwargs, dict):
            raise ConfigError(
                "extra_init_kwargs must be a mapping (a JSON object on the command line)"
            )
        self._validate_tls()
        validate_s3_options(self.extra_init_kwargs, family)
        validate_encryption_options(self.extra_init_kwargs, family)
        validate_azure_options(self.extra_init_kwargs, family)
        for bad in ("key", "secret"):
            # For 'local' the key is the base directory (libcloud's LOCAL), not a secret.
            if bad in self.extra_init_kwargs and not (bad == "key" and family == "local"):
                raise ConfigError(
                    f"extra_init_kwargs may not contain {bad!r}: credentials come "
                    "only from the environment variables named by key_environ "
                    "and secret_environ"
                )

    def _validate_tls(self) -> None:
        check_tls(self.extra_init_kwargs)

    def _validate_local(self) -> None:
        check_local(self.container, self.key_environ, self.extra_init_kwargs)

    def local_root(self) -> str:
        """For ``local``: the directory that is the store's root, resolved (see
        :func:`uploader.config.local.local_root`)."""
        if self.family != "local":
            raise ConfigError(
                f"provider {self.provider!r} is not 'local'; it has no root directory"
            )
        return local_root(self.container, self.key_environ, self.extra_init_kwargs)

    @property
    def family(self) -> str:
        return provider_family(self.provider)

    @property
    def secure(self) -> bool:
        """TLS unless asked otherwise by name, or the endpoint is on loopback (and no TLS
        option, ``ca_bundle`` or ``insecure_skip_tls_verify``, says TLS is meant)."""
        if "secure" in self.extra_init_kwargs:
            return bool(self.extra_init_kwargs["secure"])
        if self.extra_init_kwargs.get(CA_BUNDLE_OPTION) or self.extra_init_kwargs.get(
            INSECURE_OPTION
        ):
            return True
        return not is_loopback(self.host)

    # -- resolution -----------------------------------------------------------------------
    def store_settings(self) -> StoreSettings:
        """The resolved settings a backend takes (family, TLS, extra arguments)."""
        tls_keys = ("secure", CA_BUNDLE_OPTION, INSECURE_OPTION)
        extra = {k: v for k, v in self.extra_init_kwargs.items() if k not in tls_keys}
        container, key_environ = self.container, self.key_environ
        if self.family == "local":
            # The key is the base directory, consumed here: the backend takes the root,
            # and the path is not a credential (so it is never masked as one).
            container, key_environ = self.local_root(), None
            extra.pop("key", None)
        return StoreSettings(
            provider=self.provider,
            family=self.family,
            container=container,
            key_environ=key_environ,
            secret_environ=self.secret_environ,
            host=self.host,
            port=self.port,
            region=self.region,
            secure=self.secure,
            extra=extra,
            ca_bundle=self.extra_init_kwargs.get(CA_BUNDLE_OPTION),
            insecure_skip_tls_verify=bool(self.extra_init_kwargs.get(INSECURE_OPTION, False)),
        )

    def credentials(self) -> tuple[str | None, str | None]:
        """Read the key and secret from the named environment variables."""
        return self.store_settings().credentials()

    def __repr__(self) -> str:  # the default repr is safe too; keep it explicit
        inner = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"ObjectStoreHparams({inner})"

    # -- construction -------------------------------------------------------------------
    def initialize_object(self, **options: Any) -> ObjectStore:
        """Resolve the settings and open the store. ``options`` go to
        :class:`uploader.transfer.store.ObjectStore` (part_size, concurrency,
        download_part_size, retry, create_container, check, backend)."""
        return ObjectStore(self, **options)

    @classmethod
    def from_uri(cls, uri: str, **overrides: Any) -> ObjectStoreHparams:
        """Hparams for a URI; the prefix part is dropped (see :func:`parse_uri`)."""
        return parse_uri(uri, **overrides).hparams

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class StoreLocation:
    """A parsed URI: the store and the object name prefix inside it, as ``push`` names
    them; ``target``: what a reading command named below the prefix (``latest``,
    ``rank_0/ep3.pt``), empty unless the URI was parsed with ``split_target``."""

    hparams: ObjectStoreHparams
    prefix: str
    target: str = ""

    @property
    def name(self) -> str:
        """The prefix and the target joined: the object name (or prefix) asked for."""
        return join_key(self.prefix, self.target)


def join_key(prefix: str, name: str) -> str:
    prefix = prefix.strip("/")
    name = name.lstrip("/")
    return f"{prefix}/{name}" if prefix and name else (prefix or name)


def listing_prefix(prefix: str) -> str:
    """What to list for the objects under ``prefix``: ``"a/b/"``, or ``""`` for the root
    (so that ``a/b`` does not also match ``a/bc/...``)."""
    base = join_key(prefix, "")
    return base + "/" if base else ""


def split_target(path: str) -> tuple[str, str]:
    """``"exp/rank_0/ep3.pt"`` -> ``("exp", "rank_0/ep3.pt")``: the path split at its
    first ``latest`` or ``rank_N`` component; ``("exp", "")`` when it has none."""
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        if _TARGET_START.match(part):
            return "/".join(parts[:i]), "/".join(parts[i:])
    return "/".join(parts), ""


def parse_uri(uri: str, *, split_target: bool = False, **overrides: Any) -> StoreLocation:
    """Parse ``scheme://container/prefix[?endpoint=..&region=..&key_environ=..&ca_bundle=..]``.

    ``split_target`` (for a reading command): a ``latest`` or ``rank_N`` component and
    what follows it are the location's ``target``, not part of the container or prefix
    (see :func:`split_target`). ``overrides`` (any hparams field not None) refine what
    the URI says.
    """
    if not isinstance(uri, str) or "://" not in uri:
        raise ConfigError(
            f"malformed store URI {uri!r}; expected e.g. s3://bucket/prefix, "
            "azure://container/prefix, gs://bucket/prefix or file:///abs/dir"
        )
    try:
        parts = urlsplit(uri)
    except ValueError as exc:  # e.g. an unbalanced '[' in the host part
        raise ConfigError(f"malformed store URI {uri!r} ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigError(
            f"unsupported URI scheme {scheme!r} in {uri!r}; use one of "
            "s3://, azure://, gs://, file://"
        )
    provider = SCHEMES[scheme]
    target = ""
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    kw: dict[str, Any] = {"provider": provider}
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"file URI {uri!r} names a host; use file:///absolute/path")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ConfigError(f"file URI {uri!r} needs an absolute path: file:///abs/dir")
        root = path.rstrip("/") or "/"
        # The whole path is the container; prefixes go through ?prefix= for local stores.
        prefix = query.pop("prefix", "")
        if split_target:
            before, target = _split(path, uri)
            if target and prefix:
                raise ConfigError(
                    f"{uri!r} names a path below the container and a ?prefix= too; append "
                    f"/{target} to the prefix instead: file:///{before}?prefix={prefix}/{target}"
                )
            if target:
                root = "/" + before  # the directory push named
            else:
                prefix, target = _split(prefix, uri)
        kw["container"] = root
    else:
        if not parts.netloc:
            raise ConfigError(
                f"URI {uri!r} names no container; expected {scheme}://container/prefix"
            )
        if "@" in parts.netloc:
            raise ConfigError(
                "credentials must not be written into the URI; name environment "
                "variables with key_environ / secret_environ instead"
            )
        kw["container"] = unquote(parts.netloc)
        prefix = unquote(parts.path).strip("/")
        if split_target:
            prefix, target = _split(prefix, uri)
    if ".." in prefix.split("/"):
        raise ConfigError(f"object name prefix {prefix!r} contains '..'; use a plain path")
    endpoint = query.pop("endpoint", None)
    extra: dict[str, Any] = {}
    if endpoint:
        try:
            ep = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
        except ValueError as exc:
            raise ConfigError(f"malformed endpoint {endpoint!r} ({exc})") from None
        if ep.scheme not in ("", "http", "https"):
            raise ConfigError(
                f"endpoint {endpoint!r} must be http://host:port or https://host:port"
            )
        if not ep.hostname:
            raise ConfigError(f"endpoint {endpoint!r} names no host")
        kw["host"] = ep.hostname
        try:
            if ep.port:
                kw["port"] = ep.port
        except ValueError:
            raise ConfigError(f"endpoint {endpoint!r} has a bad port; give 1-65535") from None
        if ep.scheme == "http":
            extra["secure"] = False
        elif ep.scheme == "https":
            extra["secure"] = True
    if CA_BUNDLE_OPTION in query:
        extra[CA_BUNDLE_OPTION] = query.pop(CA_BUNDLE_OPTION)
    for name in ("region", "key_environ", "secret_environ"):
        if name in query:
            kw[name] = query.pop(name) or None
    for name in (*S3_OPTIONS, *AZURE_OPTIONS, *ENCRYPTION_OPTIONS):
        if name in query:
            extra[name] = query.pop(name) or None
    if query:
        raise ConfigError(
            f"unknown URI parameter(s) {', '.join(sorted(query))} in {uri!r}; accepted: "
            "endpoint, region, key_environ, secret_environ, ca_bundle, prefix (file://), "
            f"for s3:// {', '.join(S3_OPTIONS)}, for azure:// "
            f"{', '.join(AZURE_OPTIONS)}, encryption_scope, for gs:// kms_key_name"
        )
    # s3:// and gs:// name no variables: botocore's and google-auth's chains find the
    # credentials (google-auth reads $GOOGLE_APPLICATION_CREDENTIALS itself). azure://
    # names the account variable; the key, when no variable is named, is
    # $AZURE_STORAGE_KEY if set, else azure-identity's chain (azure_identity.py).
    if provider == "azure_blobs":
        kw.setdefault("key_environ", "AZURE_STORAGE_ACCOUNT")
    for k, v in overrides.items():
        if v is None:
            continue
        if k == "extra_init_kwargs":
            extra.update(v)
        else:
            kw[k] = v
    kw["extra_init_kwargs"] = extra
    return StoreLocation(ObjectStoreHparams(**kw), prefix, target)


def _split(path: str, uri: str) -> tuple[str, str]:
    before, target = split_target(path)
    if ".." in target.split("/"):
        raise ConfigError(f"{target!r} in {uri!r} contains '..'; use a plain path")
    return before, target
