"""The fleet CA in a folder: client certificates for devices and the revocation list the broker reads.

The folder holds ``ca.crt`` and ``ca.key`` (made here when both are missing), ``issued.txt`` (one
line per certificate issued: serial in hex and username, like OpenSSL's index) and ``crl.pem``, the
certificate revocation list that the broker's certificate listener names with ``crlfile``. The CRL
is rewritten, signed by the CA, whenever a device is revoked, and exists (empty) as soon as the CA
does, because Mosquitto will not start on a ``crlfile`` that is missing.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devices.provision import replace_file
from edge_runtime.errors import InvalidInputError

ISSUED, CRL = "issued.txt", "crl.pem"
CA_DAYS, CERT_DAYS = 3650, 825
CRL_DAYS = 3650      # a CRL past its nextUpdate makes OpenSSL refuse every client certificate


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _save_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def load_or_create(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key in ``ca_dir``; a new P-256 CA when the folder has neither."""
    crt, key_path = ca_dir / "ca.crt", ca_dir / "ca.key"
    if crt.exists() != key_path.exists():
        raise InvalidInputError(f"{ca_dir}: needs both ca.crt and ca.key to sign device certificates "
                                f"(found only {crt.name if crt.exists() else key_path.name})")
    if crt.exists():
        try:
            cert = x509.load_pem_x509_certificate(crt.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except ValueError as exc:
            raise InvalidInputError(f"{ca_dir}: ca.crt or ca.key is not a PEM certificate/key: {exc}") from None
    else:
        ca_dir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeops fleet CA")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(_now() - dt.timedelta(minutes=5))
                .not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        _save_key(key, key_path)
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if not (ca_dir / CRL).exists():
        _write_crl(ca_dir, cert, key, [])
    return cert, key


def issue(ca_dir: Path, username: str, cert_path: Path, key_path: Path) -> int:
    """A client certificate whose CN is ``username`` (the broker's ``use_identity_as_username``); its serial."""
    ca, ca_key = load_or_create(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    serial = x509.random_serial_number()
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, username)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _save_key(key, key_path)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with open(ca_dir / ISSUED, "a") as f:
        f.write(f"{serial:x} {username}\n")
    return serial


def revoke(ca_dir: Path, username: str) -> list[int]:
    """Add every certificate issued to ``username`` that is not revoked yet to the CRL; their serials."""
    serials = _issued_serials(ca_dir, username)
    if serials is None:
        return []
    ca, ca_key = load_or_create(ca_dir)
    revoked = revoked_serials(ca_dir)
    new = [s for s in serials if s not in revoked]
    if new:
        _write_crl(ca_dir, ca, ca_key, sorted(revoked) + new)
    return new


def _issued_serials(ca_dir: Path, username: str) -> list[int] | None:
    """The serials of the certificates issued to ``username`` (None when the CA issued none at all)."""
    issued = ca_dir / ISSUED
    if not issued.exists():
        return None
    lines = (line.split(" ", 1) for line in issued.read_text().splitlines() if line)
    return [int(s, 16) for s, user in lines if user == username]


def revoked_serials(ca_dir: Path) -> set[int]:
    """The serials the CRL in ``ca_dir`` lists."""
    path = ca_dir / CRL
    if not path.exists():
        return set()
    return {r.serial_number for r in x509.load_pem_x509_crl(path.read_bytes())}


def _write_crl(ca_dir: Path, ca: x509.Certificate, ca_key, serials: list[int]) -> None:
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(_now())
               .next_update(_now() + dt.timedelta(days=CRL_DAYS)))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(_now()).build())
    replace_file(ca_dir / CRL, builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), 0o644)
