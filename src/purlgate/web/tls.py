"""TLS for the web side: the configured pair, or a self-signed one made once (demos).

The self-signed pair is made in a private folder renamed into place, so a crash
mid-write leaves no truncated file for every later start to trust, and instances
starting together on a shared data_dir all load the one pair published first; a damaged
certificate or key found at start is one line naming the files.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from purlgate.config import WebConfig
from purlgate.core.files import AtomicFile
from purlgate.errors import ConfigError


def tls_context(config: WebConfig, data_dir: Path, public_base_url: str) -> ssl.SSLContext | None:
    if config.tls_cert is not None and config.tls_key is not None:
        cert, key = config.tls_cert, config.tls_key
    elif config.self_signed:
        cert, key = self_signed_pair(data_dir / "web-tls", urlsplit(public_base_url).hostname)
    else:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        what = ("damaged, or not a matching certificate and key"
                if isinstance(exc, ssl.SSLError) else exc.strerror or str(exc))
        hint = (" (delete both to have a new pair made)" if config.self_signed else "")
        raise ConfigError(f"web TLS: cannot load {cert} / {key}: {what}{hint}") from exc
    return context


def self_signed_pair(folder: Path, host: str | None) -> tuple[Path, Path]:
    """A self-signed certificate for the links' host (made once, key 0600)."""
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    folder.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    if host and host != "localhost":
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host or "localhost")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(key, hashes.SHA256()))
    # Made in a private folder renamed into place: instances starting together on a
    # shared data_dir publish one pair (a rename onto a folder with files fails), and
    # every one of them loads that pair.
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.{os.urandom(4).hex()}")
    staging.mkdir(mode=0o700)
    try:
        for name, data, mode in (
                (key_path.name, key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()), 0o600),
                (cert_path.name, cert.public_bytes(serialization.Encoding.PEM), 0o644)):
            with AtomicFile(staging / name, mode=mode) as out:
                out.file.write(data)
                out.commit()
        if folder.exists() and not (cert_path.is_file() and key_path.is_file()):
            shutil.rmtree(folder)  # a pair an older release never finished: ours replaces it
        with contextlib.suppress(OSError):  # EEXIST / ENOTEMPTY: another was first
            staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cert_path, key_path
