"""The GCE metadata server, on loopback: where GCE, GKE Workload Identity and Cloud Run
hand a workload its Google access tokens.

:class:`MetadataServer` speaks the protocol google-auth uses (``compute_engine``):

* every request must carry ``Metadata-Flavor: Google`` (else 403, as the real one);
  every answer carries it back (google-auth's detection checks it);
* ``GET /`` answers 200: the "is there a metadata server" ping on ``GCE_METADATA_IP``;
* ``GET /computeMetadata/v1/instance/service-accounts/default/?recursive=true`` (the
  account is ``default`` or its email, in every path): the
  account's email, aliases and scopes;
* ``GET .../service-accounts/default/email`` and ``/computeMetadata/v1/project/project-id``;
* ``GET .../service-accounts/default/token``: a fresh access token each time, valid for
  ``lifetime`` seconds (``{"access_token", "expires_in", "token_type": "Bearer"}``).

It records the tokens it handed out (``issued``, in order). Point google-auth at it with
both ``GCE_METADATA_HOST`` and ``GCE_METADATA_IP`` set to :attr:`MetadataServer.host`
(google-auth reads ``GCE_METADATA_HOST`` when it is first imported).

:class:`OAuthTokenEndpoint` is the token endpoint a service account key file names
(``token_uri``): it checks the signed JWT google-auth sends with the key's public half,
over HTTPS with a certificate of the test CA. :func:`write_service_account_key` writes
such a key file.

Example::

    with MetadataServer(email="train@proj.iam.gserviceaccount.com") as mds:
        env = {"GCE_METADATA_HOST": mds.host, "GCE_METADATA_IP": mds.host}
"""

from __future__ import annotations

import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from harness.servers.stub import Served

__all__ = ["MetadataServer", "OAuthTokenEndpoint", "write_service_account_key"]

_SA = "/computeMetadata/v1/instance/service-accounts/default/"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"

_ACCOUNTS = "/computeMetadata/v1/instance/service-accounts/"


class MetadataServer(Served):
    """A threaded loopback GCE metadata server (see the module docstring).

    Args:
        email: the service account the tokens belong to.
        project: the project id it answers.
        lifetime: seconds each token is valid for (``expires_in``).
    """

    def __init__(
        self,
        email: str = "ckpt-train@ckpt-proj.iam.gserviceaccount.com",
        project: str = "ckpt-proj",
        lifetime: int = 3599,
    ) -> None:
        self.email = email
        self.project = project
        self.lifetime = lifetime
        self.issued: list[str] = []
        self.refused = 0
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                status, ctype, body = stub.answer(self.path, self.headers)
                self.send_response(status)
                self.send_header("Metadata-Flavor", "Google")
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        """``host:port``, the value of ``GCE_METADATA_HOST`` and ``GCE_METADATA_IP``."""
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables that send google-auth here."""
        return {"GCE_METADATA_HOST": self.host, "GCE_METADATA_IP": self.host}

    def answer(self, target: str, headers: Any) -> tuple[int, str, bytes]:
        if headers.get("Metadata-Flavor") != "Google":
            with self._lock:
                self.refused += 1
            return 403, "text/html", b"Missing Metadata-Flavor:Google header.\n"
        path = urlsplit(target).path
        # An account is named "default" or by its email, as on the real server.
        for alias in ("default", self.email):
            if path.startswith(f"{_ACCOUNTS}{alias}/"):
                path = path.replace(f"{_ACCOUNTS}{alias}/", _SA, 1)
        if path == "/":
            return 200, "application/text", b"computeMetadata/\n"
        if path == _SA:
            info = {
                "aliases": ["default"],
                "email": self.email,
                "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
            }
            return 200, "application/json", json.dumps(info).encode()
        if path == _SA + "email":
            return 200, "application/text", self.email.encode()
        if path == "/computeMetadata/v1/project/project-id":
            return 200, "application/text", self.project.encode()
        if path == _SA + "token":
            token = f"ya29.stub{len(self.issued)}-{secrets.token_urlsafe(24)}"
            with self._lock:
                self.issued.append(token)
            body = {"access_token": token, "expires_in": self.lifetime, "token_type": "Bearer"}
            return 200, "application/json", json.dumps(body).encode()
        return 404, "text/html", b"Not Found\n"


def write_service_account_key(path: Path, email: str, token_uri: str) -> Any:
    """Write a service account key file (a fresh RSA key, as the console's JSON download)
    whose tokens come from ``token_uri``; return the private key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": email.split("@")[1].split(".")[0],
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": email,
        "client_id": "1" * 21,
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(info))
    return key


class OAuthTokenEndpoint(Served):
    """Google's OAuth 2.0 token endpoint for service accounts, over HTTPS on loopback.

        ``POST /token`` with ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`` and
        ``assertion=JWT``: the JWT's RS256 signature is checked against ``public_key``, its
        ``iss`` against ``email``, its ``aud`` against Google's token endpoint (what google-auth
    signs for, wherever the key file sends it), its ``scope`` for storage; the answer is a
        fresh access token valid ``lifetime`` seconds. Anything else: 400 ``invalid_grant``.
        Tokens handed out are recorded (``issued``).

        Args:
            email: the service account allowed to sign assertions.
            public_key: its RSA public key.
            cert / key: the PEM certificate (for ``localhost``) and key the server presents.
    """

    def __init__(
        self, email: str, public_key: Any, cert: Path, key: Path, lifetime: int = 3599
    ) -> None:
        import ssl

        self.email = email
        self.public_key = public_key
        self.lifetime = lifetime
        self.issued: list[str] = []
        self.refused = 0
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - the http.server name
                length = int(self.headers.get("Content-Length") or 0)
                status, body = stub.answer(self.rfile.read(length))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}/token"

    def answer(self, body: bytes) -> tuple[int, bytes]:
        import base64

        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        try:
            assert form.get("grant_type") == "urn:ietf:params:oauth:grant-type:jwt-bearer"
            head, payload, sig = form["assertion"].split(".")

            def unb64(text: str) -> bytes:
                return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

            self.public_key.verify(
                unb64(sig), f"{head}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
            claims = json.loads(unb64(payload))
            assert claims["iss"] == self.email and claims["aud"] == GOOGLE_TOKEN_AUDIENCE
            assert "devstorage" in claims["scope"]
        except Exception:
            with self._lock:
                self.refused += 1
            return 400, b'{"error": "invalid_grant", "error_description": "Invalid JWT"}'
        token = f"ya29.sa{len(self.issued)}-{secrets.token_urlsafe(24)}"
        with self._lock:
            self.issued.append(token)
        answer = {"access_token": token, "expires_in": self.lifetime, "token_type": "Bearer"}
        return 200, json.dumps(answer).encode()
