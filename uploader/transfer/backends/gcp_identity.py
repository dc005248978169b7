"""Who the GCS adapter is: Google credentials from google-auth, a bearer token per request.

:class:`GcpIdentity` decides once, when a store is opened, how requests are
authorised, and hands out a bearer token right before each request
(:meth:`GcpIdentity.token`), refreshed ahead of its expiry (within
:data:`REFRESH_MARGIN` of it, by the identity's clock). Three ways:

* HMAC keys: ``key_environ`` names a variable holding an access id starting with
  ``GOOG`` and ``secret_environ`` the HMAC secret. libcloud signs each request (no
  token, nothing expires).
* A key file named by variables: ``secret_environ`` names a variable holding the path
  of a JSON credentials file (``key_environ``, if given, the service account email,
  checked against the file). Any file google-auth reads: a service account key,
  ``external_account`` (workload identity federation), ``impersonated_service_account``,
  ``authorized_user``. A PEM or P12 key (not JSON) is still signed by libcloud as before.
* Otherwise google-auth's default chain (``google.auth.default()``), in its order:
  ``GOOGLE_APPLICATION_CREDENTIALS`` (any of the file types above), gcloud's
  application default credentials file (``gcloud auth application-default login``,
  with ``--impersonate-service-account`` too), then the metadata server (GCE, GKE
  Workload Identity, Cloud Run; ``GCE_METADATA_HOST`` / ``GCE_METADATA_IP`` move it).

Token requests (OAuth, STS, IAM credentials) go through ``requests`` with the store's
TLS trust, so ``ca_bundle`` applies to them too. When the store answers 401 the
adapter calls :meth:`GcpIdentity.refresh` and sends the request once more.

google-auth is an optional dependency (``pip install 'ckpt-uploader[gcs]'``), imported
only here and only when a GCS store uses tokens. :meth:`GcpIdentity.describe` names the
source ("metadata server, service account x@p.iam.gserviceaccount.com, token expires
2026-12-07 14:05Z"), never a token; every token handed out is registered with
:func:`uploader.redact.register_secret` first.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from uploader.errors import AuthError, ConfigError
from uploader.redact import redact, register_secret
from uploader.transfer.backends.identity import Identity
from uploader.transfer.settings import StoreSettings
from uploader.transfer.tls import TLSTrust

__all__ = ["GCS_SCOPE", "REFRESH_MARGIN", "GcpIdentity"]

log = logging.getLogger(__name__)

#: The OAuth scope tokens are asked for: objects and buckets, not IAM policies.
GCS_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
#: A token is replaced this long before it expires.
REFRESH_MARGIN = _dt.timedelta(minutes=5)

_INSTALL = "pip install 'ckpt-uploader[gcs]'"


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


class GcpIdentity(Identity):
    """How a GCS store authorises its requests (see the module docstring).

    Args:
        settings: the store's settings: ``key_environ`` / ``secret_environ`` (named
            variables), ``extra["project"]``.
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
        #: ``(access id, secret)`` when libcloud signs with HMAC keys or a PEM/P12 key.
        self.signed: tuple[str, str] | None = None
        self.project: str | None = settings.extra.get("project") or None
        self._creds: Any = None
        self._origin = ""
        self._last: str | None = None
        self._session: Any = None
        if settings.key_environ or settings.secret_environ:
            self._from_named()
        else:
            self._from_chain()
        if self._creds is not None:
            try:
                self.token()  # fail now, not at the first upload
            except AuthError as exc:
                raise ConfigError(str(exc)) from None

    @property
    def bearer(self) -> bool:
        """Whether requests carry a bearer token (else libcloud signs them)."""
        return self._creds is not None

    # -- finding them -------------------------------------------------------------------
    def _from_named(self) -> None:
        st = self.settings
        key, secret = st.credentials()
        if key and key.startswith("GOOG"):
            if not secret:
                raise ConfigError(
                    f"HMAC access id in ${st.key_environ} needs its secret: set secret_environ"
                )
            self.signed = (key, secret)
            self._origin = f"HMAC key ${st.key_environ} / ${st.secret_environ}"
            return
        if not secret:
            raise ConfigError(
                f"${st.key_environ} names a service account but no key file: set "
                "secret_environ to the variable holding the key file's path (or name neither "
                "variable, for google-auth's default chain)"
            )
        if not os.path.isfile(secret):
            raise ConfigError(
                f"${st.secret_environ} should hold the path of a key file, but no file is "
                "there; export the path of the JSON key (or name neither variable, for "
                "google-auth's default chain)"
            )
        if not _is_json(secret):
            if not key:
                raise ConfigError(
                    f"the key in ${st.secret_environ} is not JSON: a PEM or P12 key needs "
                    "the service account email in the variable named by key_environ"
                )
            self.signed = (key, secret)  # libcloud signs its own JWT with a PEM/P12 key
            self._origin = f"service account {key}, PEM/P12 key file ${st.secret_environ}"
            return
        auth = _google_auth()
        try:
            creds, project = auth.load_credentials_from_file(secret, scopes=[GCS_SCOPE])
        except Exception as exc:
            raise ConfigError(
                redact(
                    f"the key file in ${st.secret_environ} could not be read "
                    f"({type(exc).__name__}: {str(exc)[:300]}); export the path of a service "
                    "account key or another google-auth credentials file"
                )
            ) from None
        email = getattr(creds, "service_account_email", None)
        if key and email and email != "default" and key != email:
            raise ConfigError(
                f"${st.key_environ} names service account {key} but the key file in "
                f"${st.secret_environ} is for {email}; make them agree (or drop key_environ)"
            )
        self._creds = creds
        self.project = self.project or project
        self._origin = f"key file ${st.secret_environ}"

    def _from_chain(self) -> None:
        auth = _google_auth()
        from google.auth.exceptions import DefaultCredentialsError

        try:
            creds, project = auth.default(scopes=[GCS_SCOPE])
        except DefaultCredentialsError as exc:
            raise ConfigError(
                redact(f"no Google credentials found ({str(exc)[:300]}). {self.hint()}")
            ) from None
        except Exception as exc:
            raise ConfigError(
                redact(
                    f"Google credentials could not be loaded ({type(exc).__name__}: "
                    f"{str(exc)[:300]}). {self.hint()}"
                )
            ) from None
        self._creds = creds
        self.project = self.project or project
        if _kind(creds) == "metadata":
            self._origin = "metadata server"
        elif os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            self._origin = "file $GOOGLE_APPLICATION_CREDENTIALS"
        else:
            self._origin = "gcloud application default credentials"

    @staticmethod
    def hint() -> str:
        return (
            "Looked in $GOOGLE_APPLICATION_CREDENTIALS, gcloud's application default "
            "credentials (gcloud auth application-default login) and the metadata server "
            "(GCE, GKE Workload Identity). Export GOOGLE_APPLICATION_CREDENTIALS=KEY.json, "
            "log in with gcloud, or name HMAC key variables with key_environ/secret_environ; "
            "'ckpt-uploader check URI' shows what is found"
        )

    # -- using them ---------------------------------------------------------------------
    def _transport(self) -> Any:
        """A google-auth request callable over ``requests``, with the store's TLS trust."""
        if self._session is None:
            import requests
            from google.auth.transport.requests import Request

            verify = self._trust.requests_verify()

            class _Trusting(Request):  # type: ignore[misc]
                # Per request: requests lets $REQUESTS_CA_BUNDLE override session.verify.
                def __call__(self, *args: Any, **kwargs: Any) -> Any:
                    if verify is not None:
                        kwargs.setdefault("verify", verify)
                    return super().__call__(*args, **kwargs)

            session = requests.Session()
            self._session = (session, _Trusting(session))
        return self._session[1]

    def _stale(self) -> bool:
        creds = self._creds
        if not creds.token:
            return True
        expiry = creds.expiry
        if expiry is None:
            return False
        if expiry.tzinfo is None:  # google-auth keeps naive UTC times
            expiry = expiry.replace(tzinfo=_dt.timezone.utc)
        return bool(self.clock() >= expiry - REFRESH_MARGIN)

    def _refresh_locked(self) -> None:
        try:
            self._creds.refresh(self._transport())
        except Exception as exc:
            text = str(exc)
            hint = ""
            if "CERTIFICATE_VERIFY_FAILED" in text:
                hint = (
                    "; the token endpoint's certificate is not trusted: name its CA with "
                    "the ca_bundle option (or fix the system's trust store)"
                )
            raise AuthError(
                redact(
                    f"getting a Google access token ({self._origin}) failed: "
                    f"{type(exc).__name__}: {text[:300]}{hint}"
                )
            ) from None
        token = self._creds.token
        if not token:
            raise AuthError(f"the Google credentials from {self._origin} gave no access token")
        register_secret(token)

    def token(self) -> str:
        """The bearer token for the next request (a new one when close to expiry)."""
        if self._creds is None:
            raise AuthError("this store signs with keys, not bearer tokens")
        with self._lock:
            if self._stale():
                self._refresh_locked()
                self.refreshes += self._last is not None
            token = str(self._creds.token)
            if token != self._last:
                register_secret(token)
                if self._last is not None:
                    log.info("Google access token renewed (%s)", self.describe())
                self._last = token
            return token

    def _renew_locked(self) -> None:
        """Get a new token now: the store refused the current one."""
        self._refresh_locked()

    def expires(self) -> _dt.datetime | None:
        """When the current token expires, where known."""
        expiry = getattr(self._creds, "expiry", None)
        if not isinstance(expiry, _dt.datetime):
            return None
        return expiry if expiry.tzinfo else expiry.replace(tzinfo=_dt.timezone.utc)

    # -- saying which -------------------------------------------------------------------
    def describe(self) -> str:
        """The source of the credentials in words, with the token's expiry; never a token."""
        if self._creds is None:
            return self._origin
        creds = self._creds
        kind = _kind(creds)
        email = getattr(creds, "service_account_email", None)
        parts = [self._origin]
        if kind == "external":
            audience = getattr(creds, "_audience", None) or getattr(creds, "audience", None)
            parts.append("workload identity federation" + (f", {audience}" if audience else ""))
            target = getattr(creds, "service_account_email", None)
            if target:
                parts.append(f"impersonating {target}")
        elif kind == "impersonated":
            target = getattr(creds, "_target_principal", None) or email
            parts.append(f"impersonating service account {target}")
        elif kind == "user":
            account = getattr(creds, "account", None)
            parts.append("user credentials" + (f" of {account}" if account else ""))
        elif email:
            parts.append(f"service account {email}")
        expiry = self.expires()
        if expiry is not None:
            parts.append(f"token expires {expiry.astimezone(_dt.timezone.utc):%Y-%m-%d %H:%MZ}")
        return ", ".join(parts)

    def close(self) -> None:
        if self._session is not None:
            self._session[0].close()


def _google_auth() -> Any:
    try:
        import google.auth
    except ImportError:
        raise ConfigError(
            "Google Cloud Storage with token credentials needs google-auth: run "
            f"{_INSTALL} (or name HMAC key variables with key_environ/secret_environ)"
        ) from None
    return google.auth


def _kind(creds: Any) -> str:
    """What sort of google-auth credentials these are, by their module."""
    module = type(creds).__module__
    if module.startswith("google.auth.compute_engine"):
        return "metadata"
    if module in ("google.auth.identity_pool", "google.auth.aws", "google.auth.pluggable"):
        return "external"
    if module.startswith("google.auth.external_account"):
        return "external"
    if module == "google.auth.impersonated_credentials":
        return "impersonated"
    if module == "google.oauth2.credentials":
        return "user"
    return "service account"


def _is_json(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True
