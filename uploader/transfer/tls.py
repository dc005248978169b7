"""TLS trust: which certificates a store's endpoint must present, and what a failure says.

Certificates are always verified. What is trusted, first match wins:

1. the ``ca_bundle`` option (``extra_init_kwargs={"ca_bundle": PATH}``, the URI
   parameter ``?ca_bundle=PATH``, ``--ca-bundle PATH``, or ``ca_bundle`` in a config
   file's ``[store]`` table): a PEM file of the CA certificates to trust;
2. the first of the environment variables :data:`CA_ENVIRON` that is set
   (``AWS_CA_BUNDLE``, ``SSL_CERT_FILE``, ``REQUESTS_CA_BUNDLE``);
3. the default trust store: the system's for S3 (``ssl.create_default_context``),
   certifi's for the backends sent through libcloud (Azure, Google Cloud Storage).

A bundle replaces the default trust store rather than adding to it, as it does for the
AWS CLI and requests. Verification is turned off only by the option named
``insecure_skip_tls_verify`` (``--insecure-skip-tls-verify``), and a warning says so
when the store is opened.

A certificate the endpoint presents that is not trusted (self-signed, signed by an
unknown CA, expired, issued for another host name) is a :class:`uploader.errors.TLSError`:
a configuration error (exit 2), never retried, whose message names the endpoint, the
reason, and the option that trusts a private CA.

Example::

    trust = resolve_trust(settings.ca_bundle, settings.insecure_skip_tls_verify, "s3 at host")
    conn = http.client.HTTPSConnection(host, port, context=trust.context())
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass

from uploader.errors import ConfigError, TLSError

__all__ = [
    "CA_BUNDLE_OPTION",
    "CA_ENVIRON",
    "INSECURE_OPTION",
    "TLSTrust",
    "resolve_trust",
    "tls_failure",
]

log = logging.getLogger("uploader.transfer.tls")

#: The option (an ``extra_init_kwargs`` key, URI parameter and config key) naming a CA bundle.
CA_BUNDLE_OPTION = "ca_bundle"
#: The option that turns certificate verification off; nothing else does.
INSECURE_OPTION = "insecure_skip_tls_verify"
#: Environment variables naming a CA bundle, in the order they are consulted.
CA_ENVIRON = ("AWS_CA_BUNDLE", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")

_HOW_TO_TRUST = (
    "to trust a private CA, pass its PEM bundle with ca_bundle (--ca-bundle PATH, "
    "?ca_bundle=PATH in the URI, extra_init_kwargs={'ca_bundle': PATH}, or ca_bundle in "
    "the config file's [store]) or set AWS_CA_BUNDLE"
)
#: What OpenSSL says when the other end answers a TLS hello with something else (plain HTTP).
_NOT_TLS = ("WRONG_VERSION_NUMBER", "wrong version number", "record layer failure", "HTTP_REQUEST")
_warned: set[str] = set()
_warned_lock = threading.Lock()


@dataclass(frozen=True)
class TLSTrust:
    """What one store's endpoint is checked against.

    ca_bundle: the PEM file of trusted CAs; None for the default trust store.
    source: where it came from, for messages (``ca_bundle option``, ``$AWS_CA_BUNDLE``,
        ``the default trust store``).
    verify: False only when ``insecure_skip_tls_verify`` asked for it.
    """

    ca_bundle: str | None
    source: str
    verify: bool = True

    def context(self) -> ssl.SSLContext:
        """An SSL context for ``http.client`` that checks the certificate and host name."""
        if not self.verify:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        try:
            return ssl.create_default_context(cafile=self.ca_bundle)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"the CA bundle {self.ca_bundle} (from {self.source}) cannot be loaded "
                f"({exc}); it must be a readable PEM file of CA certificates"
            ) from None

    def requests_verify(self) -> bool | str | None:
        """The ``verify`` a requests session takes: the bundle, False when insecure, or
        None to keep the library's default trust store."""
        if not self.verify:
            return False
        return self.ca_bundle


def resolve_trust(ca_bundle: str | None, insecure: bool, endpoint: str) -> TLSTrust:
    """The trust for ``endpoint`` (named in the insecure warning); see the module docstring.

    A named bundle must be a readable file: ConfigError otherwise, before any request.
    """
    if insecure:
        _warn_insecure(endpoint)
        return TLSTrust(None, f"{INSECURE_OPTION} (no verification)", verify=False)
    if ca_bundle is not None:
        return TLSTrust(
            _checked_file(ca_bundle, f"the {CA_BUNDLE_OPTION} option"), "the ca_bundle option"
        )
    for var in CA_ENVIRON:
        value = os.environ.get(var)
        if value:
            return TLSTrust(_checked_file(value, f"${var}"), f"${var}")
    return TLSTrust(None, "the default trust store")


def _checked_file(path: str, source: str) -> str:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise ConfigError(
            f"the CA bundle {path} named by {source} does not exist or is not a file; "
            "give the path of a PEM file of the CA certificates to trust"
        )
    if not os.access(path, os.R_OK):
        raise ConfigError(f"the CA bundle {path} named by {source} is not readable")
    return os.path.abspath(path)


def _warn_insecure(endpoint: str) -> None:
    with _warned_lock:
        if endpoint in _warned:
            return
        _warned.add(endpoint)
    log.warning(
        "TLS certificates of %s are NOT verified (%s): anyone on the network path can "
        "read and change checkpoints and see the request signatures; %s instead",
        endpoint,
        INSECURE_OPTION,
        _HOW_TO_TRUST,
    )
    try:  # urllib3 would otherwise warn on every request; this warning says it once
        import urllib3

        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    except ImportError:  # pragma: no cover - requests (and so urllib3) comes with libcloud
        pass


def _ssl_errors(exc: BaseException) -> ssl.SSLError | None:
    """The ssl error at the root of ``exc`` (requests and urllib3 wrap it several deep)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLError):
            return e
        for nxt in (e.__cause__, e.__context__, getattr(e, "reason", None), *e.args):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return None


def tls_failure(exc: BaseException, endpoint: str, trust: TLSTrust) -> TLSError | None:
    """The TLSError for ``exc`` when a TLS handshake with ``endpoint`` failed for a reason
    retrying cannot fix (the certificate, or an endpoint that does not speak TLS); None
    for anything else, which keeps its usual handling (a connection reset mid-handshake
    stays transient)."""
    err = _ssl_errors(exc)
    if err is None or isinstance(err, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return None
    if isinstance(err, ssl.SSLCertVerificationError):
        reason = str(err.verify_message or err.reason or err).rstrip(".")
        hint = _HOW_TO_TRUST
        if "mismatch" in reason:
            hint = (
                "connect by a host name the certificate was issued for (or reissue it for "
                f"this one); {hint}"
            )
        elif "expired" in reason or "not yet valid" in reason:
            hint = f"renew the endpoint's certificate (and check this host's clock); {hint}"
        return TLSError(
            f"the TLS certificate of {endpoint} was not accepted: {reason} (checked "
            f"against {trust.ca_bundle or 'the default trust store'}, from {trust.source}); "
            f"{hint}"
        )
    text = f"{err.reason or ''} {err}"
    if any(w in text for w in _NOT_TLS):
        return TLSError(
            f"{endpoint} does not answer TLS ({err.reason or err}); if it serves plain "
            "HTTP, give an http:// endpoint (or extra_init_kwargs={'secure': False})"
        )
    return None  # anything else (a record damaged in transit ...) is for the retrier
