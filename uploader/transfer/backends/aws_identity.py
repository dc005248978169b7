"""Who the S3 adapter signs as: AWS credentials from botocore's chain, taken fresh per request.

:class:`AwsIdentity` holds one credentials object and hands out a frozen
``(key, secret, token)`` triple right before each request or part is signed
(:meth:`AwsIdentity.frozen`); temporary credentials refresh themselves ahead of
their expiry (botocore refreshes within 15 minutes of it, and blocks for it within
10). Two ways to find them:

* Named variables: when ``key_environ`` / ``secret_environ`` are given (flags, URI,
  config file, ``ObjectStoreHparams``), the key and secret are read from those
  variables. When they are the standard ``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` is sent with them when set.
* Otherwise botocore's default chain, in its order: environment variables (with
  ``AWS_SESSION_TOKEN`` and ``AWS_CREDENTIAL_EXPIRATION``), assume-role and web identity
  profiles, SSO, ``credential_process``, the shared credentials and config files, web
  identity from ``AWS_ROLE_ARN`` + ``AWS_WEB_IDENTITY_TOKEN_FILE``, container
  credentials (ECS, EKS Pod Identity) and the instance metadata service (IMDSv2).
  ``AWS_PROFILE`` or the ``profile`` option picks a profile (an explicit ``profile``
  option also turns the environment-variable keys off, as in the AWS CLI).

botocore is imported only here, and only when an S3 store takes the default chain or a
profile (keys named by key_environ/secret_environ need none). It has no public
way to force a refresh: :meth:`AwsIdentity.refresh` builds a fresh resolver, which
is what the adapter does once when the store answers that the token expired.

:meth:`AwsIdentity.describe` names the source ("web identity, role
arn:aws:iam::1:role/train, expires 14:05Z"), never a secret; every key, secret and
token handed out is registered with :func:`uploader.redact.register_secret` first.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any, NamedTuple

from uploader.errors import AuthError, ConfigError
from uploader.redact import redact, register_secret
from uploader.transfer.backends.identity import Identity
from uploader.transfer.settings import StoreSettings

__all__ = ["AwsIdentity", "Frozen", "EXPIRED_CODES", "is_expired_answer"]

#: Error codes that say the credentials (not the permissions) are stale.
EXPIRED_CODES = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidToken",
        "RequestExpired",
        "TokenRefreshRequired",
    }
)

_STANDARD = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

_SOURCES = {
    "env": "environment",
    "explicit": "environment",
    "shared-credentials-file": "shared credentials file",
    "config-file": "shared config file",
    "assume-role": "assume role",
    "assume-role-with-web-identity": "web identity",
    "sso": "SSO",
    "custom-process": "credential_process",
    "container-role": "container credentials",
    "iam-role": "instance metadata",
    "boto-config": "boto config file",
    "ec2-credentials-file": "EC2 credentials file",
    "login": "aws login",
}


class Frozen(NamedTuple):
    """One consistent set of credentials, to sign one request with."""

    key: str
    secret: str
    token: str | None


def is_expired_answer(status: int, code: str | None, message: str) -> bool:
    """Whether a refusal says the credentials went stale (refresh and retry once)."""
    if code in EXPIRED_CODES:
        return True
    text = message.lower()
    return status in (400, 403) and "expired" in text and ("token" in text or "signature" in text)


class _Static(NamedTuple):
    """Keys named by the store's settings: what botocore's ``Credentials`` offers here,
    without importing botocore (a tenth of a second of every start) for keys at hand."""

    access_key: str
    secret_key: str
    token: str | None
    method: str = "env"

    def get_frozen_credentials(self) -> _Static:
        return self


class AwsIdentity(Identity):
    """The credentials an S3 store signs with (see the module docstring).

    Args:
        settings: the store's settings: ``key_environ`` / ``secret_environ`` (named
            variables), ``extra["profile"]`` (a profile of the shared files).
        session_factory: builds the botocore session (tests).
    """

    def __init__(self, settings: StoreSettings, session_factory: Any = None) -> None:
        super().__init__()
        self.settings = settings
        self.profile: str | None = settings.extra.get("profile") or None
        self._session_factory = session_factory
        self._last: tuple[str, str | None] | None = None
        self.named = settings.key_environ is not None or settings.secret_environ is not None
        if self.named and self.profile:
            raise ConfigError(
                f"profile {self.profile!r} and key_environ/secret_environ both name the "
                "credentials; keep one (the profile, or the variables)"
            )
        self._creds = self._resolve()
        self._source = self._describe_source()
        try:
            self.frozen()  # fail now, not at the first upload
        except AuthError as exc:
            raise ConfigError(str(exc)) from None

    # -- finding them -------------------------------------------------------------------
    def _resolve(self) -> Any:
        if self.named:
            return self._from_named()
        try:
            session = self._new_session()
            creds = session.get_credentials()
        except Exception as exc:  # botocore raises many types; all mean "not usable"
            raise ConfigError(
                redact(
                    f"AWS credentials could not be loaded ({type(exc).__name__}: "
                    f"{str(exc)[:300]}); {self._hint()}"
                )
            ) from None
        if creds is None:
            raise ConfigError(f"no AWS credentials found. {self._hint()}")
        return creds

    def _new_session(self) -> Any:
        if self._session_factory is not None:
            return self._session_factory(self.profile)
        import botocore.session

        session = botocore.session.Session(profile=self.profile)
        if not session.get_config_variable("region"):
            # STS (assume-role, web identity) needs a region; the store's, else us-east-1.
            session.set_config_variable("region", self.settings.region or "us-east-1")
        return session

    def _hint(self) -> str:
        where = f"profile {self.profile!r}" if self.profile else "the default chain"
        return (
            f"Looked in {where}: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY(/AWS_SESSION_TOKEN), "
            "AWS_PROFILE and ~/.aws/credentials / ~/.aws/config (assume-role, SSO, "
            "credential_process), AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE, container "
            "credentials and instance metadata. Export the keys, set AWS_PROFILE (or "
            "--profile), or name the variables with key_environ/secret_environ; "
            "'ckpt-uploader check URI' shows what is found"
        )

    def _from_named(self) -> Any:
        key, secret = self.settings.credentials()
        if not key or not secret:
            raise ConfigError(
                f"provider {self.settings.provider!r} needs both an access key and a secret: "
                "set key_environ and secret_environ (or name neither, for the AWS chain)"
            )
        token = None
        if (self.settings.key_environ, self.settings.secret_environ) == _STANDARD:
            token = os.environ.get("AWS_SESSION_TOKEN") or None
        return _Static(key, secret, token)

    # -- using them -----------------------------------------------------------------------
    def frozen(self) -> Frozen:
        """The credentials to sign the next request with (refreshed if close to expiry)."""
        creds = self._creds
        try:
            ro = creds.get_frozen_credentials()
        except Exception as exc:
            raise AuthError(
                redact(
                    f"refreshing the AWS credentials ({self._source}) failed: "
                    f"{type(exc).__name__}: {str(exc)[:300]}"
                )
            ) from None
        if not ro.access_key or not ro.secret_key:
            raise ConfigError(f"the AWS credentials from {self._source} are empty")
        if (ro.access_key, ro.token) != self._last:
            for value in (ro.access_key, ro.secret_key, ro.token):
                register_secret(value)
            self._last = (ro.access_key, ro.token)
        return Frozen(ro.access_key, ro.secret_key, ro.token or None)

    def _renew_locked(self) -> None:
        """A fresh resolver: botocore has no public call to force a refresh."""
        self._creds = self._resolve()
        self._source = self._describe_source()

    @property
    def temporary(self) -> bool:
        """Whether the credentials carry a session token (so may expire)."""
        return bool(self.frozen().token)

    def expires(self) -> _dt.datetime | None:
        """When the current credentials expire, where known."""
        expiry = getattr(self._creds, "_expiry_time", None)
        return expiry if isinstance(expiry, _dt.datetime) else None

    # -- saying which -------------------------------------------------------------------
    def describe(self) -> str:
        """The source of the credentials in words, with their expiry; never a secret."""
        text = self._source
        expiry = self.expires()
        if expiry is not None:
            text += f", expires {expiry.astimezone(_dt.timezone.utc):%Y-%m-%d %H:%MZ}"
        return text

    def _describe_source(self) -> str:
        st = self.settings
        if self.named:
            names = f"${st.key_environ} / ${st.secret_environ}"
            return f"environment variables {names}" + (
                " with $AWS_SESSION_TOKEN" if getattr(self._creds, "token", None) else ""
            )
        method = str(getattr(self._creds, "method", "") or "")
        source = _SOURCES.get(method, method or "unknown source")
        profile = self.profile or os.environ.get("AWS_PROFILE")
        role = self._role_arn(profile)
        if method in ("assume-role", "assume-role-with-web-identity", "sso") and role:
            source += f", role {role}"
        if method == "env" and os.environ.get("AWS_SESSION_TOKEN"):
            source += " (with session token)"
        if method in (
            "shared-credentials-file",
            "config-file",
            "assume-role",
            "sso",
            "custom-process",
        ):
            source += f", profile {profile or 'default'}"
        return source

    def _role_arn(self, profile: str | None) -> str | None:
        if os.environ.get("AWS_ROLE_ARN") and not self.profile:
            return os.environ["AWS_ROLE_ARN"]
        try:
            session = self._new_session()
            cfg = session.full_config.get("profiles", {}).get(profile or "default", {})
        except Exception:
            return None
        arn = cfg.get("role_arn") or cfg.get("sso_role_name")
        return str(arn) if arn else None
