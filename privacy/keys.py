"""Key material for a deployment: the consortium CA, the server certificate, institution keys.

The consortium operator keeps a private CA that signs the SuperLink's TLS certificate; each
university pins that CA (``--root-certificates``) instead of trusting the system store. Each
institution authenticates its SuperNode with its own EC key pair on a NIST curve, in the
OpenSSH format that Flower's node authentication reads (Flower refuses Ed25519 there).

Private keys are written with mode 0600, atomically (a temporary file renamed into place, so a
crash never leaves half a key), never overwritten unless asked, and never logged.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
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
#: The CA outlives several server certificates, so institutions keep their ca.pem on renewal.
CA_VALID_DAYS = 3650
#: `edufl server start` warns this many days before the server certificate expires.
EXPIRY_WARNING_DAYS = 30
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
    ca_valid_days: int = CA_VALID_DAYS,
    force: bool = False,
) -> ConsortiumKeys:
    """Create a consortium CA and a server certificate it signs, valid for ``addresses``.

    Args:
        keys_dir: Folder to write ``ca.pem``, ``ca.key``, ``server.pem``, ``server.key`` into.
        addresses: Host names and IP addresses nodes will use to reach the SuperLink; each
            becomes a subject alternative name (TLS checks the address against them).
        valid_days: Validity of the server certificate (825 days: the longest browsers accept);
            `renew_server_certificate` makes the next one from the same CA.
        ca_valid_days: Validity of the CA; at least ``valid_days``, so that the server
            certificate can be renewed several times while institutions keep their ``ca.pem``.
        force: Replace existing files; every institution then needs the new ``ca.pem``.
    """
    if not addresses:
        raise KeyMaterialError("give at least one --address the SuperLink will be reached at")
    paths = ConsortiumKeys.in_dir(keys_dir)
    _refuse_overwrite([paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key], force)
    for address in addresses:  # a bad address is refused before anything is written
        _general_name(address)
    now = dt.datetime.now(dt.UTC)
    until = now + dt.timedelta(days=valid_days)
    ca_until = now + dt.timedelta(days=max(ca_valid_days, valid_days))

    ca_key = ec.generate_private_key(CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edufl consortium CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, ca_until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signing_certs=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key, server_cert = _server_certificate(ca_cert, ca_key, addresses, now, until)

    _private_dir(keys_dir)
    write_private(paths.ca_key, _pem_private(ca_key))
    write_private(paths.server_key, _pem_private(server_key))
    write_public(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    write_public(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    logger.info("wrote consortium CA and server certificate for %s in %s", addresses, keys_dir)
    return paths


def renew_server_certificate(
    keys_dir: Path,
    addresses: Sequence[str] | None = None,
    *,
    valid_days: int = 825,
    now: dt.datetime | None = None,
) -> ConsortiumKeys:
    """Replace ``server.pem`` and ``server.key`` with a new pair signed by the existing CA.

    Institutions keep their ``ca.pem``: the new certificate chains to the same CA. The new
    certificate never outlives the CA (it is cut at the CA's end, with a warning).

    Args:
        keys_dir: The folder `init_consortium_keys` wrote (it needs ``ca.pem`` and ``ca.key``).
        addresses: Subject alternative names; None keeps those of the current ``server.pem``.
        valid_days: Validity of the new certificate.
        now: The issue time (tests); the current time when None.

    Raises:
        KeyMaterialError: the CA files are missing or unreadable, or the CA has expired.
    """
    paths = ConsortiumKeys.in_dir(keys_dir)
    ca_cert = load_certificate(paths.ca_cert)
    try:
        ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyMaterialError(
            f"{paths.ca_key}: no CA private key; renewal needs the CA key `edufl server keys "
            "init` wrote (bring it back from where it is kept offline)"
        ) from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyMaterialError(f"{paths.ca_key}: not an unencrypted PEM private key") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise KeyMaterialError(f"{paths.ca_key}: not an EC private key")
    if addresses is None:
        try:
            sans = load_certificate(paths.server_cert).extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            )
        except x509.ExtensionNotFound:
            raise KeyMaterialError(
                f"{paths.server_cert}: names no address; pass --address"
            ) from None
        addresses = [str(v) for v in sans.value.get_values_for_type(x509.IPAddress)]
        addresses += sans.value.get_values_for_type(x509.DNSName)
    if not addresses:
        raise KeyMaterialError("give at least one --address the SuperLink will be reached at")
    now = now or dt.datetime.now(dt.UTC)
    ca_end = ca_cert.not_valid_after_utc
    if ca_end <= now:
        raise KeyMaterialError(
            f"{paths.ca_cert}: the consortium CA expired on {ca_end:%Y-%m-%d}; make a new one "
            f"with `edufl server keys init --dir {keys_dir} --force` and give every institution "
            "the new ca.pem"
        )
    until = now + dt.timedelta(days=valid_days)
    if until > ca_end:
        logger.warning(
            "the new server certificate ends with the CA on %s, not in %d days",
            f"{ca_end:%Y-%m-%d}",
            valid_days,
        )
        until = ca_end
    server_key, server_cert = _server_certificate(ca_cert, ca_key, addresses, now, until)
    write_files_atomic(
        {
            paths.server_key: (_pem_private(server_key), 0o600),
            paths.server_cert: (server_cert.public_bytes(serialization.Encoding.PEM), 0o644),
        }
    )
    logger.info("renewed the server certificate for %s until %s", addresses, f"{until:%Y-%m-%d}")
    return paths


def load_certificate(path: Path) -> x509.Certificate:
    """Read a PEM certificate."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise KeyMaterialError(f"{path}: no such certificate file") from None
    except ValueError:
        raise KeyMaterialError(f"{path}: not a PEM certificate") from None


def check_server_certificate(
    keys_dir: Path, *, now: dt.datetime | None = None, warn_days: int = EXPIRY_WARNING_DAYS
) -> str | None:
    """A warning when ``server.pem`` expires within ``warn_days``; None when it is fine.

    Raises:
        KeyMaterialError: the certificate has expired (or is not valid yet); the message gives
            the renew command. Nodes would otherwise retry a refused TLS handshake for ever.
    """
    path = keys_dir / SERVER_CERT
    cert = load_certificate(path)
    now = now or dt.datetime.now(dt.UTC)
    renew = f"`edufl server keys renew --dir {keys_dir}`"
    end = cert.not_valid_after_utc
    if end <= now:
        raise KeyMaterialError(
            f"{path}: the server certificate expired on {end:%Y-%m-%d %H:%M} UTC; nodes would "
            f"refuse it. Renew it with {renew} (institutions keep their ca.pem)"
        )
    if cert.not_valid_before_utc > now:
        raise KeyMaterialError(
            f"{path}: the server certificate is valid only from "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this machine's clock"
        )
    left = end - now
    if left <= dt.timedelta(days=warn_days):
        return (
            f"the server certificate {path} expires on {end:%Y-%m-%d} ({left.days} day(s) "
            f"left); renew it with {renew}"
        )
    return None


def fingerprint(public_key: str) -> str:
    """OpenSSH's fingerprint of a public key line: ``SHA256:`` and the unpadded base64 digest."""
    parts = public_key.split()
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (IndexError, ValueError):
        raise KeyMaterialError("not an OpenSSH public key line (type and base64 blob)") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


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
    _private_dir(keys_dir)
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


def _private_dir(path: Path) -> None:
    """Create ``path`` as 0700 (a key folder), narrowing an existing folder edufl made wider."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)


def _server_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    addresses: Sequence[str],
    now: dt.datetime,
    until: dt.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new server key and its certificate for ``addresses``, signed by the CA."""
    sans = [_general_name(a) for a in addresses]
    server_key = ec.generate_private_key(CURVE)
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, addresses[0])])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    server_cert = (
        _builder(server_name, ca_cert.subject, server_key.public_key(), now, until)
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
    return server_key, server_cert


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
