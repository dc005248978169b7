"""Who the Azure adapter is: a shared key, a SAS, or Microsoft Entra tokens.

:class:`AzureIdentity` decides once, when a store is opened, how requests are
authorised. The storage account's name always comes from the variable ``key_environ``
names (``AZURE_STORAGE_ACCOUNT`` when none is named). Then, first match wins:

1. ``sas_environ`` names a variable: its shared access signature goes into the query
   of every request (nothing is signed). A SAS whose signed expiry (``se``) has passed
   is refused at start-up; one that expires while running is refused by the store, and
   the error says to issue a new one.
2. ``secret_environ`` names a variable: its account key signs every request (Shared
   Key), as before.
3. Neither is named but ``$AZURE_STORAGE_KEY`` is set: that account key (what
   ``azure://`` URIs always used).
4. Otherwise azure-identity's ``DefaultAzureCredential``, restricted to the sources a
   headless uploader can use, in its order: environment (``AZURE_CLIENT_ID`` +
   ``AZURE_TENANT_ID`` + ``AZURE_CLIENT_SECRET`` or ``AZURE_CLIENT_CERTIFICATE_PATH``),
   workload identity (``AZURE_FEDERATED_TOKEN_FILE`` + ``AZURE_CLIENT_ID`` +
   ``AZURE_TENANT_ID``, as AKS injects them), managed identity, the Azure CLI login.
   ``AZURE_AUTHORITY_HOST`` moves the token endpoint (sovereign clouds).

Tokens are asked for the scope :data:`STORAGE_SCOPE` and handed out per request by
:meth:`AzureIdentity.token`, replaced ahead of their expiry (within
:data:`REFRESH_MARGIN`, or half the token's life if that is shorter, by the identity's
clock). When the store refuses a token the adapter calls :meth:`AzureIdentity.refresh`
and sends the request once more. A refresh builds a new credential, so no cache can
hand back the refused token. Token requests trust the store's CA bundle
(``ca_bundle``) too.

azure-identity is an optional dependency (``pip install 'ckpt-uploader[azure]'``),
imported only here and only when the chain is used. :meth:`AzureIdentity.describe`
names the source, never a secret; the key, the SAS (and its signature) and every token
are registered with :func:`uploader.redact.register_secret` before use.
"""

from __future__ import annotations

import base64
import datetime as _dt
import logging
import os
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, quote

from uploader.errors import AuthError, ConfigError
from uploader.redact import redact, register_secret
from uploader.transfer.backends.identity import Identity
from uploader.transfer.settings import StoreSettings
from uploader.transfer.tls import TLSTrust

__all__ = [
    "ACCOUNT_ENV",
    "AZURE_OPTIONS",
    "KEY_ENV",
    "REFRESH_MARGIN",
    "STORAGE_SCOPE",
    "AzureIdentity",
    "validate_azure_options",
]

log = logging.getLogger(__name__)

#: The OAuth scope tokens are asked for: Azure Storage data access.
STORAGE_SCOPE = "https://storage.azure.com/.default"
#: A token is replaced this long before it expires (at most half its life).
REFRESH_MARGIN = _dt.timedelta(minutes=5)
#: Where the account name and key are read when no variable is named.
ACCOUNT_ENV = "AZURE_STORAGE_ACCOUNT"
KEY_ENV = "AZURE_STORAGE_KEY"

#: Azure-only store options (URI parameters, flags, ``[store]`` keys, ``extra`` keys).
AZURE_OPTIONS = ("sas_environ",)

_INSTALL = "pip install 'ckpt-uploader[azure]'"
_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: DefaultAzureCredential sources a daemon cannot use (interactive, IDE caches).
_EXCLUDED = {
    "exclude_shared_token_cache_credential": True,
    "exclude_visual_studio_code_credential": True,
    "exclude_powershell_credential": True,
    "exclude_developer_cli_credential": True,
    "exclude_interactive_browser_credential": True,
    "exclude_broker_credential": True,
}


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


class AzureIdentity(Identity):
    """How an Azure store authorises its requests (see the module docstring).

    Args:
        settings: the store's settings: ``key_environ`` / ``secret_environ`` and
            ``extra["sas_environ"]`` (named variables).
        trust: the TLS trust of the store, used for token requests too.
        clock: the current time, timezone-aware (tests move it forward).
    """

    def __init__(
        self,
        settings: StoreSettings,
        trust: TLSTrust,
        clock: Callable[[], _dt.datetime] = _utcnow,
    ) -> None:
        super().__init__()
        self.settings = settings
        self._trust = trust
        self.clock = clock
        #: ``shared key``, ``sas`` or ``token``.
        self.mode = ""
        #: The account key (Shared Key mode).
        self.key: str | None = None
        #: The SAS's query parameters (SAS mode).
        self.sas: dict[str, str] = {}
        self.sas_expiry: _dt.datetime | None = None
        self._origin = ""
        self._cred: Any = None
        self._token: str | None = None
        self._expires: _dt.datetime | None = None
        self._fetched: _dt.datetime | None = None
        self.sas_environ: str | None = settings.extra.get("sas_environ") or None
        self.account = self._account()
        if self.sas_environ:
            self._from_sas(self.sas_environ)
        elif settings.secret_environ:
            self._from_key(settings.secret_environ, named=True)
        elif os.environ.get(KEY_ENV, "").strip():
            self._from_key(KEY_ENV, named=False)
        else:
            self._from_chain()

    @property
    def bearer(self) -> bool:
        """Whether requests carry a bearer token."""
        return self.mode == "token"

    # -- finding them -------------------------------------------------------------------
    def _account(self) -> str:
        var = self.settings.key_environ or ACCOUNT_ENV
        value = (os.environ.get(var) or "").strip()
        if not value:
            how = "named by key_environ" if self.settings.key_environ else "the default"
            raise ConfigError(
                f"Azure needs the storage account name: environment variable {var} ({how}) "
                f"is not set; export {var}=ACCOUNT (or name another variable with key_environ)"
            )
        return value

    def _from_key(self, var: str, named: bool) -> None:
        if self.settings.secret_environ:
            _, key = self.settings.credentials()  # registers it; errors if unset
        else:
            key = os.environ[var].strip()
            register_secret(key)
        assert key is not None
        try:
            base64.b64decode(key, validate=True)
        except ValueError:
            raise ConfigError(
                f"the Azure account key in ${var} is not base64; copy the key exactly as the "
                "portal shows it"
            ) from None
        self.key = key
        self.mode = "shared key"
        self._origin = f"account {self.account}, shared key ${var}"

    def _from_sas(self, var: str) -> None:
        if self.settings.secret_environ:
            raise ConfigError(
                f"both sas_environ ({var}) and secret_environ ({self.settings.secret_environ}) "
                "are named; name one: a SAS or the account key"
            )
        raw = (os.environ.get(var) or "").strip()
        if not raw:
            raise ConfigError(
                f"environment variable {var} (named by sas_environ) is not set or empty; "
                f"export {var}='sv=...&sig=...' (the SAS token, without the URL)"
            )
        register_secret(raw)
        text = raw.split("?", 1)[1] if "?" in raw else raw
        register_secret(text)
        params = dict(parse_qsl(text, keep_blank_values=True))
        sig = params.get("sig")
        if not sig or not params.get("sv"):
            raise ConfigError(
                f"${var} does not hold a SAS token (it needs sv= and sig=); export the query "
                "part of the SAS URL, e.g. 'sv=2022-11-02&ss=b&srt=sco&sp=rwdlac&se=...&sig=...'"
            )
        for form in (sig, quote(sig, safe=""), quote(sig)):
            register_secret(form)
        self.sas = params
        self.mode = "sas"
        self.sas_expiry = _parse_time(params.get("se"))
        if self.sas_expiry is not None and self.sas_expiry <= self.clock():
            raise AuthError(self.sas_expired())
        self._origin = f"account {self.account}, SAS ${var}"

    def sas_expired(self) -> str:
        """What to say when the SAS has expired."""
        when = f" at {self.sas_expiry:%Y-%m-%d %H:%MZ}" if self.sas_expiry else ""
        return (
            f"the SAS in ${self.sas_environ} expired{when}; issue a new SAS (az storage "
            "container generate-sas ... --expiry ...) and export it in that variable"
        )

    def _from_chain(self) -> None:
        if not self.settings.secure:
            raise ConfigError(
                "no account key or SAS is configured, and Azure accepts Microsoft Entra "
                "tokens over HTTPS only: use an https:// endpoint, or export "
                f"{KEY_ENV} (or name a SAS variable with sas_environ) for a plain-HTTP "
                "emulator"
            )
        self.mode = "token"
        self._origin = f"account {self.account}, Microsoft Entra token"
        self._cred = self._new_credential()
        try:
            self.token()  # fail now, not at the first upload
        except AuthError as exc:
            raise ConfigError(str(exc)) from None

    def _new_credential(self) -> Any:
        try:
            from azure.identity import DefaultAzureCredential
        except ImportError:
            raise ConfigError(
                "Azure without an account key or SAS needs azure-identity for Microsoft "
                f"Entra tokens: run {_INSTALL} (or export {KEY_ENV}, or name a SAS variable "
                "with sas_environ)"
            ) from None
        kwargs: dict[str, Any] = dict(_EXCLUDED)
        verify = self._trust.requests_verify()
        if isinstance(verify, str):
            kwargs["connection_verify"] = verify
        elif verify is False:
            kwargs["connection_verify"] = False
        if os.environ.get("AZURE_AUTHORITY_HOST"):
            # A private authority (sovereign cloud, a proxy): no discovery round trip to
            # the public cloud's instance metadata.
            kwargs["disable_instance_discovery"] = True
        return DefaultAzureCredential(**kwargs)

    @staticmethod
    def hint() -> str:
        return (
            f"Looked for ${KEY_ENV}, AZURE_CLIENT_ID + AZURE_TENANT_ID with "
            "AZURE_CLIENT_SECRET or AZURE_CLIENT_CERTIFICATE_PATH, workload identity "
            "(AZURE_FEDERATED_TOKEN_FILE), managed identity, az login. Export one, or name "
            "a SAS variable with sas_environ"
        )

    # -- using them ---------------------------------------------------------------------
    def _margin(self) -> _dt.timedelta:
        if self._expires is None or self._fetched is None:
            return REFRESH_MARGIN
        return min(REFRESH_MARGIN, (self._expires - self._fetched) / 2)

    def _stale(self) -> bool:
        if self._token is None:
            return True
        if self._expires is None:
            return False
        return bool(self.clock() >= self._expires - self._margin())

    def _fetch_locked(self, fresh: bool) -> None:
        if fresh:
            old, self._cred = self._cred, self._new_credential()
            _close(old)
        try:
            got = self._cred.get_token(STORAGE_SCOPE)
        except Exception as exc:
            text = " ".join(str(exc).split())  # azure-identity's report spans lines
            if "failed to retrieve a token" in text:
                raise AuthError(
                    redact(
                        f"no Microsoft Entra token for Azure Storage. {self.hint()}; "
                        f"'ckpt-uploader check URI' shows what is found. azure-identity "
                        f"tried: {text[:1200]}"
                    )
                ) from None
            hint = ""
            if "CERTIFICATE_VERIFY_FAILED" in text:
                hint = (
                    "; the token endpoint's certificate is not trusted: name its CA with "
                    "the ca_bundle option (or fix the system's trust store)"
                )
            raise AuthError(
                redact(
                    f"getting a Microsoft Entra token for Azure Storage failed: "
                    f"{type(exc).__name__}: {text[:1200]}{hint}"
                )
            ) from None
        token = str(got.token)
        if not token:
            raise AuthError("the Azure credential chain gave no access token")
        register_secret(token)
        self._fetched = self.clock()
        self._expires = _dt.datetime.fromtimestamp(int(got.expires_on), _dt.timezone.utc)
        if self._token is not None and token != self._token:
            log.info("Azure access token renewed (%s)", self.describe())
        self._token = token

    def token(self) -> str:
        """The bearer token for the next request (a new one when close to expiry)."""
        if self._cred is None:
            raise AuthError("this Azure store does not use bearer tokens")
        with self._lock:
            if self._stale():
                renewing = self._token is not None
                self._fetch_locked(fresh=renewing)
                self.refreshes += renewing
            assert self._token is not None
            return self._token

    def _renew_locked(self) -> None:
        """Get a new token now: the store refused the current one."""
        self._fetch_locked(fresh=True)

    def expires(self) -> _dt.datetime | None:
        """When the current token (or the SAS) expires, where known."""
        return self._expires if self.bearer else self.sas_expiry

    # -- saying which -------------------------------------------------------------------
    def describe(self) -> str:
        """The source of the credentials in words, with the expiry; never a secret."""
        parts = [self._origin]
        if self.bearer:
            source = _source(self._cred)
            if source:
                parts.append(source)
        expiry = self.expires()
        if expiry is not None:
            what = "token" if self.bearer else "SAS"
            parts.append(f"{what} expires {expiry.astimezone(_dt.timezone.utc):%Y-%m-%d %H:%MZ}")
        return ", ".join(parts)

    def close(self) -> None:
        _close(self._cred)


def validate_azure_options(extra: dict[str, Any], family: str) -> None:
    """Raise ConfigError, naming the option, for an Azure option given elsewhere or a
    value that is not a variable name."""
    given = [k for k in AZURE_OPTIONS if extra.get(k) is not None]
    if given and family != "azure":
        raise ConfigError(
            f"option(s) {', '.join(given)} apply to Azure stores only, not to {family}; remove them"
        )
    var = extra.get("sas_environ")
    if var is not None and (not isinstance(var, str) or not _VAR.match(var)):
        raise ConfigError(
            f"sas_environ names an environment variable, e.g. AZURE_STORAGE_SAS_TOKEN, not "
            f"{var!r}: the SAS itself never goes into the configuration"
        )


def _close(cred: Any) -> None:
    if cred is not None:
        try:
            cred.close()
        except Exception:  # noqa: S110 - closing is best effort
            pass


def _source(cred: Any) -> str:
    """Which source of DefaultAzureCredential answered, in words."""
    used = getattr(cred, "_successful_credential", None)
    if used is None:
        return ""
    name = type(used).__name__
    env = os.environ
    if name == "EnvironmentCredential":
        inner = type(getattr(used, "_credential", None)).__name__
        kind = "certificate" if "Certificate" in inner else "client secret"
        return (
            f"service principal {env.get('AZURE_CLIENT_ID', '?')} ({kind}) in tenant "
            f"{env.get('AZURE_TENANT_ID', '?')}"
        )
    if name == "WorkloadIdentityCredential":
        return (
            f"workload identity, client {env.get('AZURE_CLIENT_ID', '?')} in tenant "
            f"{env.get('AZURE_TENANT_ID', '?')}, token file $AZURE_FEDERATED_TOKEN_FILE"
        )
    if name == "ManagedIdentityCredential":
        client = env.get("AZURE_CLIENT_ID")
        return "managed identity" + (f" {client}" if client else " (system-assigned)")
    if name == "AzureCliCredential":
        return "Azure CLI login"
    return name


def _parse_time(text: str | None) -> _dt.datetime | None:
    """A SAS time (``2026-12-07T14:05:00Z``, or a date), timezone-aware; None if absent."""
    if not text:
        return None
    try:
        when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=_dt.timezone.utc)
