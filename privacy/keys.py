"""Key material for a deployment: the consortium CA, the server certificate, institution keys.

The consortium operator keeps a private CA that signs the SuperLink's TLS certificate; each
university pins that CA (``--root-certificates``) instead of trusting the system store. Each
institution authenticates its SuperNode with its own EC key pair on a NIST curve, in the
OpenSSH format that Flower's node authentication reads (Flower refuses Ed25519 there).

Private keys are written with mode 0600, atomically (a temporary file renamed into place, so a
crash never leaves half a key), never overwritten unless asked, and never logged.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared_models.atomic import write_atomic_many, write_bytes_atomic
from shared_models.errors import EduflError

logger = logging.getLogger(__name__)

#: P-384 is the curve Flower's own node-authentication examples use; any NIST curve would do.
CURVE = ec.SECP384R1()
DEFAULT_ADDRESSES = ("127.0.0.1", "localhost")
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.pem", "ca.key", "server.pem", "server.key"
_NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class KeyMaterialError(EduflError, ValueError):
    """Key files are missing, unreadable, of the wrong kind, or would be overwritten."""


@dataclass(frozen=True)
class ConsortiumKeys:
    """Where `init_consortium_keys` wrote the CA and the server's certificate and key."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, keys_dir: Path) -> ConsortiumKeys:
        """The standard file names inside ``keys_dir`` (nothing is read or checked)."""
        return cls(
            keys_dir / CA_CERT, keys_dir / CA_KEY, keys_dir / SERVER_CERT, keys_dir / SERVER_KEY
        )


@dataclass(frozen=True)
class InstitutionKeys:
    """An institution's node-authentication key pair: ``KEYS/NAME`` and ``KEYS/NAME.pub``."""

    private_key: Path
    public_key: Path


def check_name(name: str) -> str:
    """Return ``name`` if it is usable as an institution name and a file name."""
    if not _NAME.match(name):
        raise KeyMaterialError(
            f"institution name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def init_consortium_keys(
    keys_dir: Path,
    addresses: Sequence[str] = DEFAULT_ADDRESSES,
    *,
    valid_days: int = 825,
    force: bool = False,
) -> ConsortiumKeys:
    """Create a consortium CA and a server certificate it signs, valid for ``addresses``.

    Args:
        keys_dir: Folder to write ``ca.pem``, ``ca.key``, ``server.pem``, ``server.key`` into.
        addresses: Host names and IP addresses nodes will use to reach the SuperLink; each
            becomes a subject alternative name (TLS checks the address against them).
        valid_days: Validity of both certificates (825 days: the longest browsers accept).
        force: Replace existing files; every institution then needs the new ``ca.pem``.
    """
    if not addresses:
        raise KeyMaterialError("give at least one --address the SuperLink will be reached at")
    paths = ConsortiumKeys.in_dir(keys_dir)
    _refuse_overwrite([paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key], force)
    sans = [_general_name(a) for a in addresses]
    now = dt.datetime.now(dt.UTC)
    until = now + dt.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edufl consortium CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signing_certs=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(CURVE)
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, addresses[0])])
    server_cert = (
        _builder(server_name, ca_name, server_key.public_key(), now, until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signing_certs=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )

    keys_dir.mkdir(parents=True, exist_ok=True)
    write_private(paths.ca_key, _pem_private(ca_key))
    write_private(paths.server_key, _pem_private(server_key))
    write_public(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    write_public(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    logger.info("wrote consortium CA and server certificate for %s in %s", addresses, keys_dir)
    return paths


def init_institution_keys(keys_dir: Path, name: str, *, force: bool = False) -> InstitutionKeys:
    """Create an institution's node-authentication key pair (NIST P-384, OpenSSH format).

    The private key ``KEYS/NAME`` stays at the institution (``--auth-supernode-private-key``);
    the public key ``KEYS/NAME.pub`` is what the consortium operator enrols.
    """
    check_name(name)
    paths = InstitutionKeys(keys_dir / name, keys_dir / f"{name}.pub")
    _refuse_overwrite([paths.private_key, paths.public_key], force)
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),  # the SuperNode reads it unattended, without a passphrase
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    keys_dir.mkdir(parents=True, exist_ok=True)
    write_private(paths.private_key, private)
    write_public(paths.public_key, public + f" edufl:{name}\n".encode())
    logger.info("wrote node-authentication key pair for %s in %s", name, keys_dir)
    return paths


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Read an institution's public key and check Flower's node authentication accepts it."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except FileNotFoundError:
        raise KeyMaterialError(f"{path}: no such public key file") from None
    except (ValueError, UnsupportedAlgorithm, NotImplementedError) as exc:
        # cryptography raises NotImplementedError for a compressed EC point.
        raise KeyMaterialError(f"{path}: not an OpenSSH public key ({exc})") from None
    _check_nist(key, path)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def load_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read an institution's private key and check Flower's node authentication accepts it."""
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyMaterialError(f"{path}: no such private key file") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The exception text could quote key bytes; say only what is wrong.
        raise KeyMaterialError(
            f"{path}: not an unencrypted OpenSSH private key; create one with "
            "`edufl client keys init`"
        ) from None
    _check_nist(key.public_key(), path)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def public_key_line(key: ec.EllipticCurvePublicKey) -> str:
    """The key as one OpenSSH line without comment: ``ecdsa-sha2-nistp384 AAAA...``."""
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def write_private(path: Path, data: bytes) -> None:
    """Write secret bytes atomically with mode 0600 (created so, never widened then narrowed)."""
    write_bytes_atomic(path, data, mode=0o600, durable=True)


def write_public(path: Path, data: bytes) -> None:
    """Write non-secret bytes (certificates, public keys) atomically with mode 0644."""
    write_bytes_atomic(path, data, mode=0o644, durable=True)


def write_files_atomic(files: Mapping[Path, tuple[bytes, int]]) -> None:
    """Write files that belong together, each ``path: (bytes, mode)``, all or none.

    Every file is complete under its temporary name, created with its mode, before any is
    renamed into place (``shared_models.atomic.write_atomic_many``).
    """

    def writer(data: bytes) -> Callable[[Path], object]:
        return lambda tmp: tmp.write_bytes(data)

    write_atomic_many(
        {path: writer(data) for path, (data, _) in files.items()},
        modes={path: mode for path, (_, mode) in files.items()},
        durable=True,
    )


def _refuse_overwrite(paths: Sequence[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise KeyMaterialError(
            f"refusing to overwrite existing key material: {', '.join(existing)}; "
            "pass --force to replace it (nodes holding the old files will stop working)"
        )


def _check_nist(key: object, path: Path) -> None:
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NIST_CURVES):
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        raise KeyMaterialError(
            f"{path}: Flower's node authentication needs an EC key on a NIST curve "
            f"(P-256, P-384, P-521), not {kind}; create one with `edufl client keys init`"
        )


def _general_name(address: str) -> x509.GeneralName:
    host = address.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host):
        raise KeyMaterialError(
            f"--address {address!r} is neither an IP address nor a DNS name "
            "(give the host only, without a port)"
        )
    return x509.DNSName(host)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # Backdated a little so that a node whose clock runs slightly behind still accepts it.
        .not_valid_before(not_before - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
    )


def _key_usage(*, signing_certs: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signing_certs,
        crl_sign=signing_certs,
        encipher_only=False,
        decipher_only=False,
    )


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),  # the SuperLink reads it unattended at start
    )
