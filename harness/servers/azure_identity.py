"""A Microsoft Entra (Azure AD) token endpoint on loopback, and account SAS tokens.

:class:`EntraTokenEndpoint` speaks the part of the OAuth 2.0 / OpenID protocol that
msal (under azure-identity's ``ClientSecretCredential`` and
``WorkloadIdentityCredential``) uses, over HTTPS with a certificate of the test CA:

* ``GET /{tenant}/v2.0/.well-known/openid-configuration``: the tenant's metadata
  (msal's tenant discovery), naming the token endpoint below;
* ``POST /{tenant}/oauth2/v2.0/token`` with ``grant_type=client_credentials``, the
  ``client_id``, and either the ``client_secret`` or a ``client_assertion`` (the
  federated token a workload identity reads from its file), for a scope of Azure
  Storage: a fresh access token valid ``lifetime`` seconds. Anything else: 400/401
  with an AAD-shaped error.

The access tokens are JWTs with the claims Azure Storage (and Azurite's ``--oauth
basic``) checks: ``aud`` ``https://storage.azure.com``, ``iss``
``https://sts.windows.net/{tenant}/``, ``nbf``, ``exp``. They are signed with a key
only this stub knows: Azurite in basic mode does not check signatures. With
``expired=True`` the tokens it hands out are already past their ``exp`` (while
``expires_in`` still promises an hour), as a store would see a token revoked or a
clock gone wrong. Tokens handed out are recorded (``issued``).

Point azure-identity at it with ``AZURE_AUTHORITY_HOST`` = :attr:`authority` and
:meth:`EntraTokenEndpoint.env` (tenant, client id and secret).

:func:`account_sas` signs an account SAS with an account key, per the documented
string-to-sign (version 2020-12-06 and later).
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import hmac
import json
import secrets
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from harness.servers.stub import Served

__all__ = ["STORAGE_AUDIENCE", "EntraTokenEndpoint", "account_sas"]

STORAGE_AUDIENCE = "https://storage.azure.com"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class EntraTokenEndpoint(Served):
    """A threaded HTTPS Microsoft Entra token endpoint (see the module docstring).

    Args:
        cert / key: the PEM certificate (for ``localhost``) and key it presents.
        tenant / client_id / client_secret: the one application it knows.
        lifetime: seconds each token is valid for.
        expired: hand out tokens whose ``exp`` has already passed.
    """

    def __init__(
        self,
        cert: Path,
        key: Path,
        tenant: str = "72f988bf-0000-4000-8000-2d7cd011db47",
        client_id: str = "5f0e9a1c-0000-4000-8000-c4a1b2d3e4f5",
        client_secret: str = "entra-client-secret-do-not-print",
        lifetime: int = 3600,
        expired: bool = False,
    ) -> None:
        self.tenant = tenant
        self.client_id = client_id
        self.client_secret = client_secret
        self.lifetime = lifetime
        self.expired = expired
        self.issued: list[str] = []
        self.assertions: list[str] = []
        self.refused = 0
        self._signing_key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                self._send(*stub.get(urlsplit(self.path).path))

            def do_POST(self) -> None:  # noqa: N802 - the http.server name
                length = int(self.headers.get("Content-Length") or 0)
                self._send(*stub.post(urlsplit(self.path).path, self.rfile.read(length)))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def authority(self) -> str:
        """The value of ``AZURE_AUTHORITY_HOST``."""
        return f"https://localhost:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables of a service principal with a client secret, sent here."""
        return {
            "AZURE_AUTHORITY_HOST": self.authority,
            "AZURE_TENANT_ID": self.tenant,
            "AZURE_CLIENT_ID": self.client_id,
            "AZURE_CLIENT_SECRET": self.client_secret,
        }

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        if path == f"/{self.tenant}/v2.0/.well-known/openid-configuration":
            base = f"{self.authority}/{self.tenant}"
            return 200, {
                "issuer": f"{base}/v2.0",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                ],
                "tenant_region_scope": "WW",
            }
        return 404, {"error": "invalid_tenant", "error_description": f"no tenant at {path}"}

    def _refuse(self, status: int, error: str, text: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.refused += 1
        return status, {"error": error, "error_description": text, "error_codes": [7000215]}

    def post(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if path != f"/{self.tenant}/oauth2/v2.0/token":
            return self._refuse(404, "invalid_request", f"no token endpoint at {path}")
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if form.get("grant_type") != "client_credentials":
            return self._refuse(400, "unsupported_grant_type", "client_credentials only")
        if form.get("client_id") != self.client_id:
            return self._refuse(400, "unauthorized_client", "unknown application")
        if "client_assertion" in form:
            with self._lock:
                self.assertions.append(form["client_assertion"])
        elif form.get("client_secret") != self.client_secret:
            return self._refuse(401, "invalid_client", "AADSTS7000215: Invalid client secret")
        if f"{STORAGE_AUDIENCE}/.default" not in form.get("scope", "").split():
            return self._refuse(400, "invalid_scope", "a storage scope is expected")
        now = int(time.time())
        exp = now - 600 if self.expired else now + self.lifetime
        token = self._jwt(
            {
                "aud": STORAGE_AUDIENCE,
                "iss": f"https://sts.windows.net/{self.tenant}/",
                "iat": now - 5,
                "nbf": now - 5 if not self.expired else now - 3600,
                "exp": exp,
                "appid": self.client_id,
                "tid": self.tenant,
                "oid": "0b1c2d3e-0000-4000-8000-000000000001",
                "sub": "0b1c2d3e-0000-4000-8000-000000000001",
                "jti": secrets.token_hex(8),
            }
        )
        with self._lock:
            self.issued.append(token)
        answer = {
            "token_type": "Bearer",
            "expires_in": self.lifetime,
            "ext_expires_in": self.lifetime,
            "access_token": token,
        }
        return 200, answer

    def _jwt(self, claims: dict[str, Any]) -> str:
        head = _b64url(json.dumps({"typ": "JWT", "alg": "HS256"}).encode())
        payload = _b64url(json.dumps(claims).encode())
        mac = hmac.new(self._signing_key, f"{head}.{payload}".encode(), hashlib.sha256)
        return f"{head}.{payload}.{_b64url(mac.digest())}"


def account_sas(
    account: str,
    key: str,
    expiry: _dt.datetime,
    permissions: str = "rwdlac",
    version: str = "2020-12-06",
) -> str:
    """An account SAS for the blob service (``ss=b``, ``srt=sco``), HTTPS only, signed
    with the account ``key`` (base64): the query string, without ``?``."""
    se = expiry.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    fields = {"sp": permissions, "ss": "b", "srt": "sco", "st": "", "se": se, "sip": ""}
    fields.update({"spr": "https", "sv": version})
    to_sign = "\n".join(
        [
            account,
            fields["sp"],
            fields["ss"],
            fields["srt"],
            fields["st"],
            fields["se"],
            fields["sip"],
            fields["spr"],
            fields["sv"],
            "",  # encryption scope
            "",
        ]
    )
    sig = base64.b64encode(
        hmac.new(base64.b64decode(key), to_sign.encode(), hashlib.sha256).digest()
    ).decode()
    query = {k: v for k, v in fields.items() if v}
    return urlencode(query, quote_via=quote) + "&sig=" + quote(sig, safe="")
