"""Key lifecycle: the CA outlives the server certificate, renewal, expiry warning and refusal."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509

from privacy.keys import (
    KeyMaterialError,
    check_server_certificate,
    fingerprint,
    init_consortium_keys,
    init_institution_keys,
    renew_server_certificate,
)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_the_ca_outlives_the_server_certificate(tmp_path: Path) -> None:
    keys = init_consortium_keys(tmp_path)
    ca, server = _cert(keys.ca_cert), _cert(keys.server_cert)
    assert ca.not_valid_after_utc - server.not_valid_after_utc > dt.timedelta(days=365 * 7)


def test_renewal_keeps_the_ca_and_the_addresses(tmp_path: Path) -> None:
    keys = init_consortium_keys(tmp_path, ["127.0.0.1", "flower.uni.example"], valid_days=10)
    ca_before, server_before = keys.ca_cert.read_bytes(), _cert(keys.server_cert)
    renew_server_certificate(tmp_path, valid_days=400)
    server = _cert(keys.server_cert)
    assert keys.ca_cert.read_bytes() == ca_before
    server.verify_directly_issued_by(_cert(keys.ca_cert))
    assert server.serial_number != server_before.serial_number
    assert server.not_valid_after_utc > server_before.not_valid_after_utc
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["flower.uni.example"]
    assert stat.S_IMODE(keys.server_key.stat().st_mode) == 0o600


def test_renewal_needs_the_ca_key(tmp_path: Path) -> None:
    keys = init_consortium_keys(tmp_path)
    keys.ca_key.unlink()
    with pytest.raises(KeyMaterialError, match=r"ca\.key"):
        renew_server_certificate(tmp_path)


def test_expiry_warns_30_days_before_and_refuses_after_with_the_renew_command(
    tmp_path: Path,
) -> None:
    init_consortium_keys(tmp_path, valid_days=100)
    now = dt.datetime.now(dt.UTC)
    assert check_server_certificate(tmp_path, now=now) is None
    warning = check_server_certificate(tmp_path, now=now + dt.timedelta(days=80))
    assert warning is not None and "edufl server keys renew" in warning
    with pytest.raises(KeyMaterialError, match=r"expired.*edufl server keys renew"):
        check_server_certificate(tmp_path, now=now + dt.timedelta(days=101))


def test_fingerprint_is_openssh_sha256(tmp_path: Path) -> None:
    keys = init_institution_keys(tmp_path, "uni-a")
    line = keys.public_key.read_text()
    assert fingerprint(line).startswith("SHA256:") and "=" not in fingerprint(line)
    assert fingerprint(line) == fingerprint(" ".join(line.split()[:2]))


def test_key_folders_are_0700_even_with_a_permissive_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        init_consortium_keys(tmp_path / "consortium")
        init_institution_keys(tmp_path / "uni", "uni-a")
    finally:
        os.umask(previous)
    for folder in (tmp_path / "consortium", tmp_path / "uni"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
