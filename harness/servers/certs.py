"""Certificates for TLS servers on loopback: a private CA and leaf certificates, good or bad.

Made with the ``cryptography`` package (EC P-256 keys, so a set takes milliseconds).
:func:`make_certs` writes into a directory:

* ``ca.pem`` / ``ca.key``: a private certificate authority;
* ``leaf.pem`` / ``leaf.key``: signed by the CA for ``localhost`` only (a client that
  connects to ``127.0.0.1`` sees the wrong host name);
* ``expired.pem`` / ``expired.key``: signed by the CA for ``localhost`` and ``127.0.0.1``,
  valid until yesterday;
* ``self.pem`` / ``self.key``: self-signed for ``localhost`` and ``127.0.0.1``.

Example::

    certs = make_certs(tmp / "certs")
    start_rclone_s3(data, extra_args=["--cert", str(certs.leaf), "--key", str(certs.leaf_key)])
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Certs", "make_certs"]


@dataclass(frozen=True)
class Certs:
    """Paths of the files :func:`make_certs` wrote."""

    ca: Path
    leaf: Path
    leaf_key: Path
    expired: Path
    expired_key: Path
    self_signed: Path
    self_signed_key: Path


def make_certs(directory: Path) -> Certs:
    """Write a private CA and its leaf certificates into ``directory`` (see the module)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, cert: x509.Certificate, k: ec.EllipticCurvePrivateKey) -> Path:
        (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{stem}.key").write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return directory / f"{stem}.pem"

    def issue(
        subject: str,
        k: ec.EllipticCurvePrivateKey,
        issuer: x509.Name,
        signer: ec.EllipticCurvePrivateKey,
        sans: list[x509.GeneralName],
        ca: bool = False,
        days: tuple[int, int] = (-1, 30),
    ) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=days[0]))
            .not_valid_after(now + dt.timedelta(days=days[1]))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            b = b.add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            b = b.add_extension(
                x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False
            )
        else:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            b = b.add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        return b.sign(signer, hashes.SHA256())

    localhost = x509.DNSName("localhost")
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    ca_key = key()
    ca_name = name("ckpt-uploader test CA")
    ca = write("ca", issue("ckpt-uploader test CA", ca_key, ca_name, ca_key, [], ca=True), ca_key)
    k = key()
    leaf = write("leaf", issue("localhost", k, ca_name, ca_key, [localhost]), k)
    k = key()
    expired = write(
        "expired",
        issue("localhost", k, ca_name, ca_key, [localhost, loopback], days=(-30, -1)),
        k,
    )
    k = key()
    self_signed = write(
        "self", issue("localhost", k, name("localhost"), k, [localhost, loopback]), k
    )
    return Certs(
        ca=ca,
        leaf=leaf,
        leaf_key=directory / "leaf.key",
        expired=expired,
        expired_key=directory / "expired.key",
        self_signed=self_signed,
        self_signed_key=directory / "self.key",
    )
