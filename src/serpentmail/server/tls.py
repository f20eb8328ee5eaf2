"""TLS contexts for the listeners, and the self-signed certificate of the embedded default.

The certificate is made once (``data_dir/tls``) with ``cryptography`` when no ``[tls]`` cert
is configured, so STARTTLS and implicit TLS work out of the box. Clients that verify will
refuse it, as they should; real deployments configure a real certificate.
"""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path

from ..config import Config


def ensure_self_signed(tls_dir: Path, hostname: str) -> tuple[Path, Path]:
    cert_path = tls_dir / "cert.pem"
    key_path = tls_dir / "key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    tmp_key = key_path.with_suffix(".tmp")
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.replace(tmp_key, key_path)
    tmp_cert = cert_path.with_suffix(".tmp")
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp_cert, cert_path)
    return cert_path, key_path


def server_context(cfg: Config) -> ssl.SSLContext:
    """The server-side TLS context: TLS 1.2+, the configured or self-signed certificate."""
    if cfg.tls.cert and cfg.tls.key:
        cert, key = cfg.tls.cert, cfg.tls.key
    else:
        cert, key = ensure_self_signed(cfg.data_dir / "tls", cfg.hostname)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def client_context(verify: bool = False) -> ssl.SSLContext:
    """Outbound TLS: opportunistic STARTTLS does not verify unless asked (RFC 7435)."""
    ctx = ssl.create_default_context()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
