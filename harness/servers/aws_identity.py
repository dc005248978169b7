"""Where AWS credentials come from, on loopback: moto with IAM authentication on, and
small servers that speak the real credential protocols.

* :func:`start_moto_iam`: ``moto_server`` set up while it still accepts anything (a
  bucket, an IAM user ``uploader`` allowed everything, a user ``nodelete`` denied
  ``s3:DeleteObject``, a role ``train``), then switched to checking every request
  (``POST /moto-api/reset-auth 0``): keys, secrets and session tokens must be real
  (moto does not check expiry). :meth:`MotoIam.assume_role` mints temporary
  credentials with moto's STS.
* :class:`WebIdentitySTS`: the ``AssumeRoleWithWebIdentity`` action of STS's query
  protocol (``AWS_ENDPOINT_URL_STS``). moto refuses that unsigned call once IAM
  authentication is on, so this stub checks the token against the one it was given
  and answers with credentials moto's STS minted.
* :class:`ContainerCredentials`: the ECS / EKS Pod Identity endpoint
  (``AWS_CONTAINER_CREDENTIALS_FULL_URI`` + ``AWS_CONTAINER_AUTHORIZATION_TOKEN``): every
  answer is a fresh set from moto's STS, expiring ``lifetime`` seconds later.
* :class:`IMDSv2`: the instance metadata service, token first (``PUT
  /latest/api/token``); a GET without the token is refused with 401.

Each stub records what it handed out (``issued``: the access keys, in order).

Example::

    moto = start_moto_iam(tmp_path)
    with ContainerCredentials(moto, token="t0k") as stub:
        os.environ["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = stub.url
        os.environ["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = "t0k"
"""

from __future__ import annotations

import datetime as _dt
import json
import secrets
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from harness.servers.net import answers_http, find_binary, free_port, spawn, stop_group, wait_ready
from harness.servers.stub import Served

__all__ = [
    "ACCOUNT",
    "ContainerCredentials",
    "IMDSv2",
    "MotoIam",
    "WebIdentitySTS",
    "start_moto_iam",
]

ACCOUNT = "123456789012"
BUCKET = "ckpts"
_ALLOW_ALL = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}
_NO_DELETE = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Action": "*", "Resource": "*"},
        {"Effect": "Deny", "Action": "s3:DeleteObject", "Resource": "*"},
    ],
}
_TRUST = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"},
        {
            "Effect": "Allow",
            "Principal": {"Federated": "*"},
            "Action": "sts:AssumeRoleWithWebIdentity",
        },
    ],
}


class MotoIam:
    """moto_server with IAM authentication on (see the module docstring)."""

    def __init__(self, proc: Any, port: int, workdir: Path) -> None:
        self.proc = proc
        self.host = "127.0.0.1"
        self.port = port
        self.workdir = workdir
        #: user name -> (access key, secret)
        self.users: dict[str, tuple[str, str]] = {}
        self.role_arn = f"arn:aws:iam::{ACCOUNT}:role/train"
        self.bucket = BUCKET

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self, service: str, user: str = "uploader", **creds: str) -> Any:
        import boto3

        key, secret = self.users.get(user, ("any", "any"))
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=creds.get("key", key),
            aws_secret_access_key=creds.get("secret", secret),
            aws_session_token=creds.get("token"),
        )

    def assume_role(self, seconds: int = 900, name: str = "ckpt") -> dict[str, Any]:
        """Temporary credentials for role ``train``, minted by moto's STS:
        ``{"key", "secret", "token", "expiration"}``."""
        c = self.client("sts").assume_role(
            RoleArn=self.role_arn, RoleSessionName=name, DurationSeconds=seconds
        )["Credentials"]
        return {
            "key": c["AccessKeyId"],
            "secret": c["SecretAccessKey"],
            "token": c["SessionToken"],
            "expiration": c["Expiration"],
        }

    def uri(self, prefix: str = "", bucket: str = BUCKET, port: int | None = None) -> str:
        path = f"/{prefix.strip('/')}" if prefix.strip("/") else ""
        return f"s3://{bucket}{path}?endpoint=http://{self.host}:{port or self.port}"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_group(proc, 10.0)


def start_moto_iam(workdir: Path) -> MotoIam:
    """moto_server on a free port, set up, then checking every request's credentials."""
    import boto3

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / "moto-iam.log"
    proc = spawn([find_binary("moto_server"), "-H", "127.0.0.1", "-p", str(port)], log, cwd=workdir)
    if not wait_ready(proc, "moto_server", log, lambda: answers_http("127.0.0.1", port), 20.0):
        stop_group(proc, 5.0)
        raise RuntimeError(f"moto_server did not answer on port {port}")
    moto = MotoIam(proc, port, workdir)
    kw: dict[str, Any] = {
        "endpoint_url": moto.endpoint,
        "region_name": "us-east-1",
        "aws_access_key_id": "setup",
        "aws_secret_access_key": "setup",
    }
    iam = boto3.client("iam", **kw)
    for user, policy in (("uploader", _ALLOW_ALL), ("nodelete", _NO_DELETE)):
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(policy))
        k = iam.create_access_key(UserName=user)["AccessKey"]
        moto.users[user] = (k["AccessKeyId"], k["SecretAccessKey"])
    iam.create_role(RoleName="train", AssumeRolePolicyDocument=json.dumps(_TRUST))
    iam.put_role_policy(RoleName="train", PolicyName="p", PolicyDocument=json.dumps(_ALLOW_ALL))
    boto3.client("s3", **kw).create_bucket(Bucket=BUCKET)
    req = urllib.request.Request(
        f"{moto.endpoint}/moto-api/reset-auth",
        data=b"0",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
        resp.read()
    return moto


# -- credential endpoints ----------------------------------------------------------------
class _Stub(Served):
    """A threaded loopback HTTP server whose handler calls ``self.answer``."""

    def __init__(self) -> None:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def _go(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, ctype, data = stub.answer(self.command, self.path, self.headers, body)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = _go

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.issued: list[str] = []
        self.requests = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, str, bytes]:
        raise NotImplementedError

    def _mint(self, moto: MotoIam, lifetime: float) -> dict[str, Any]:
        creds = moto.assume_role()
        creds["expiration"] = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(seconds=lifetime)
        with self._lock:
            self.issued.append(creds["key"])
            self.requests += 1
        return creds


def _iso(t: _dt.datetime) -> str:
    return t.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class WebIdentitySTS(_Stub):
    """STS ``AssumeRoleWithWebIdentity`` (query protocol, XML answers).

    Args:
        moto: the moto whose STS mints the credentials handed out.
        token: the web identity token to accept (anything else is InvalidIdentityToken).
        lifetime: seconds until the handed-out credentials expire.
    """

    def __init__(self, moto: MotoIam, token: str, lifetime: float = 3600.0) -> None:
        super().__init__()
        self.moto, self.token, self.lifetime = moto, token, lifetime
        self.url = f"http://127.0.0.1:{self.port}"

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, str, bytes]:
        form = {k: v[0] for k, v in parse_qs(body.decode() or path.partition("?")[2]).items()}
        if form.get("Action") != "AssumeRoleWithWebIdentity":
            return _sts_error(400, "InvalidAction", f"unsupported action {form.get('Action')}")
        if form.get("WebIdentityToken") != self.token:
            return _sts_error(400, "InvalidIdentityToken", "The web identity token is not valid")
        if form.get("RoleArn") != self.moto.role_arn:
            return _sts_error(
                403, "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity"
            )
        c = self._mint(self.moto, self.lifetime)
        xml = (
            '<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
            "<AssumeRoleWithWebIdentityResult><Credentials>"
            f"<AccessKeyId>{c['key']}</AccessKeyId><SecretAccessKey>{c['secret']}</SecretAccessKey>"
            f"<SessionToken>{c['token']}</SessionToken><Expiration>{_iso(c['expiration'])}</Expiration>"
            "</Credentials><AssumedRoleUser>"
            f"<Arn>arn:aws:sts::{ACCOUNT}:assumed-role/train/{form.get('RoleSessionName', 's')}</Arn>"
            "<AssumedRoleId>AROA:s</AssumedRoleId></AssumedRoleUser>"
            "<SubjectFromWebIdentityToken>system:serviceaccount:train:uploader</SubjectFromWebIdentityToken>"
            "</AssumeRoleWithWebIdentityResult><ResponseMetadata><RequestId>stub</RequestId>"
            "</ResponseMetadata></AssumeRoleWithWebIdentityResponse>"
        )
        return 200, "text/xml", xml.encode()


def _sts_error(status: int, code: str, message: str) -> tuple[int, str, bytes]:
    xml = (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>'
        f"<Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>"
        "<RequestId>stub</RequestId></ErrorResponse>"
    )
    return status, "text/xml", xml.encode()


class ContainerCredentials(_Stub):
    """The container credentials endpoint (ECS / EKS Pod Identity): a GET with the
    authorization token answered with fresh credentials expiring ``lifetime`` s later."""

    def __init__(self, moto: MotoIam, token: str, lifetime: float = 50.0) -> None:
        super().__init__()
        self.moto, self.token, self.lifetime = moto, token, lifetime
        self.url = f"http://127.0.0.1:{self.port}/v1/credentials"

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, str, bytes]:
        if headers.get("Authorization") != self.token:
            return 401, "application/json", b'{"message": "unauthorized"}'
        c = self._mint(self.moto, self.lifetime)
        return 200, "application/json", _creds_json(c, role=False)


def _creds_json(c: dict[str, Any], role: bool) -> bytes:
    body: dict[str, Any] = {
        "AccessKeyId": c["key"],
        "SecretAccessKey": c["secret"],
        "Token": c["token"],
        "Expiration": _iso(c["expiration"]),
    }
    if role:
        body.update(
            Code="Success", Type="AWS-HMAC", LastUpdated=_iso(_dt.datetime.now(_dt.timezone.utc))
        )
    else:
        body["RoleArn"] = f"arn:aws:iam::{ACCOUNT}:role/train"
    return json.dumps(body).encode()


class IMDSv2(_Stub):
    """The instance metadata service, version 2: a session token from ``PUT
    /latest/api/token`` first, then the role's credentials (401 without the token)."""

    def __init__(self, moto: MotoIam, role: str = "train", lifetime: float = 3600.0) -> None:
        super().__init__()
        self.moto, self.role, self.lifetime = moto, role, lifetime
        self.url = f"http://127.0.0.1:{self.port}/"
        self._tokens: set[str] = set()
        self.refused = 0

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, str, bytes]:
        if method == "PUT" and path == "/latest/api/token":
            if not headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                return 400, "text/plain", b"missing ttl"
            token = secrets.token_urlsafe(24)
            self._tokens.add(token)
            return 200, "text/plain", token.encode()
        if headers.get("X-aws-ec2-metadata-token") not in self._tokens:
            self.refused += 1
            return 401, "text/plain", b"Unauthorized"
        base = "/latest/meta-data/iam/security-credentials/"
        if path == base:
            return 200, "text/plain", self.role.encode()
        if path == base + self.role:
            return 200, "application/json", _creds_json(self._mint(self.moto, self.lifetime), True)
        return 404, "text/plain", b"Not Found"
