"""Key material: the consortium CA, the server certificate, institutions' node keys."""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from flwr.cli.supernode.register import try_load_public_key

from privacy.keys import (
    KeyMaterialError,
    init_consortium_keys,
    init_institution_keys,
    load_node_private_key,
    load_node_public_key,
)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """A umask that would leave new files world-readable: key files must not rely on it."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_names_every_given_address(tmp_path: Path) -> None:
    keys = init_consortium_keys(tmp_path, ["127.0.0.1", "flower.uni.example", "::1"])
    sans = _cert(keys.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert sans.value.get_values_for_type(x509.DNSName) == ["flower.uni.example"]


def test_default_addresses_are_loopback_ip_and_localhost(tmp_path: Path) -> None:
    keys = init_consortium_keys(tmp_path)
    sans = _cert(keys.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert sans.value.get_values_for_type(x509.DNSName) == ["localhost"]


def test_server_certificate_is_signed_by_the_consortium_ca_and_is_no_ca_itself(
    tmp_path: Path,
) -> None:
    keys = init_consortium_keys(tmp_path)
    ca, server = _cert(keys.ca_cert), _cert(keys.server_cert)
    server.verify_directly_issued_by(ca)  # raises when the signature does not verify
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # ... and a CA from another run does not vouch for it.
    other = init_consortium_keys(tmp_path / "other")
    with pytest.raises(InvalidSignature):
        server.verify_directly_issued_by(_cert(other.ca_cert))


def test_server_key_matches_its_certificate(tmp_path: Path) -> None:
    keys = init_consortium_keys(tmp_path)
    key = serialization.load_pem_private_key(keys.server_key.read_bytes(), password=None)
    assert key.public_key() == _cert(keys.server_cert).public_key()


@pytest.mark.usefixtures("permissive_umask")
def test_private_keys_are_written_0600_and_public_files_0644(tmp_path: Path) -> None:
    consortium = init_consortium_keys(tmp_path / "consortium")
    institution = init_institution_keys(tmp_path / "uni", "uni-a")
    for secret in (consortium.ca_key, consortium.server_key, institution.private_key):
        assert _mode(secret) == 0o600, secret
    for public in (consortium.ca_cert, consortium.server_cert, institution.public_key):
        assert _mode(public) == 0o644, public
    leftovers = [p.name for p in tmp_path.rglob(".*")]
    assert leftovers == [], "temporary files were left behind"


def test_institution_key_pair_is_an_openssh_nist_ec_pair_flower_accepts(tmp_path: Path) -> None:
    keys = init_institution_keys(tmp_path, "uni-a")
    assert keys.private_key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert keys.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    # What `flwr supernode register` and `flower-supernode` themselves do with the files.
    assert try_load_public_key(keys.public_key)
    private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key() == load_node_public_key(keys.public_key)
    assert load_node_private_key(keys.private_key).curve.name == "secp384r1"


def test_existing_keys_are_not_overwritten_without_force(tmp_path: Path) -> None:
    consortium = init_consortium_keys(tmp_path)
    institution = init_institution_keys(tmp_path, "uni-a")
    ca_before, node_before = consortium.ca_key.read_bytes(), institution.private_key.read_bytes()

    with pytest.raises(KeyMaterialError, match="--force"):
        init_consortium_keys(tmp_path)
    with pytest.raises(KeyMaterialError, match="--force"):
        init_institution_keys(tmp_path, "uni-a")
    assert consortium.ca_key.read_bytes() == ca_before
    assert institution.private_key.read_bytes() == node_before

    init_consortium_keys(tmp_path, force=True)
    init_institution_keys(tmp_path, "uni-a", force=True)
    assert consortium.ca_key.read_bytes() != ca_before
    assert institution.private_key.read_bytes() != node_before


def test_a_key_flower_would_refuse_is_refused_at_enrolment(tmp_path: Path) -> None:
    ed_key = ed25519.Ed25519PrivateKey.generate().public_key()
    ed_path = tmp_path / "ed.pub"
    ed_path.write_bytes(
        ed_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(KeyMaterialError, match="NIST curve"):
        load_node_public_key(ed_path)
    (tmp_path / "junk.pub").write_text("not a key\n")
    with pytest.raises(KeyMaterialError, match="not an OpenSSH public key"):
        load_node_public_key(tmp_path / "junk.pub")


@pytest.mark.parametrize("address", ["127.0.0.1:8000", "bad host", "https://x.org"])
def test_address_that_is_no_host_is_refused(tmp_path: Path, address: str) -> None:
    with pytest.raises(KeyMaterialError, match="--address"):
        init_consortium_keys(tmp_path, [address])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["", "../evil", "a b", "-x", "x" * 65])
def test_institution_name_must_be_a_plain_file_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(KeyMaterialError, match="institution name"):
        init_institution_keys(tmp_path, name)
