"""What `edufl server ...` and `edufl client start` check before anything starts, through the CLI.

Real key files throughout: consortium keys from `edufl server keys init`, node keys from
`edufl client keys init`, and server certificates of a chosen validity signed with the
consortium's own CA key (``cryptography``) for the expiry checks.
"""

from __future__ import annotations

import datetime as dt
import socket
import stat
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from privacy.keys import init_consortium_keys, init_institution_keys, load_certificate
from server.institutions import load_registry
from server.superlink.launcher import ServerLayout, start_superlink
from shared_models.deployment import FLOWER_VERSION, is_loopback
from shared_models.processes import DeploymentError
from simulations.cli import app


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), prog_name="edufl")
    return result.exit_code, result.output


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something already listens on: `server start` stops there, harmlessly."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# --- plaintext only on loopback ---------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "[::]", "unresolvable.invalid"])
def test_server_start_refuses_insecure_on_a_public_address(tmp_path: Path, host: str) -> None:
    code, out = _invoke(
        "server", "start", "--insecure", "--state", str(tmp_path), "--address", f"{host}:8000"
    )
    assert code == 2
    assert "--insecure" in out and "not a loopback address" in out and "127.0.0.1" in out
    assert not (tmp_path / "server.json").exists()  # nothing started


def test_client_start_refuses_insecure_towards_a_public_superlink(export_copy: Path) -> None:
    code, out = _invoke(
        "client", "start", "--data", str(export_copy), "--superlink", "192.0.2.10:8000",
        "--insecure",
    )  # fmt: skip
    assert code == 2
    assert "refused on --superlink 192.0.2.10" in out and "Drop --insecure" in out


def test_the_launcher_refuses_plaintext_off_loopback_too(tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match="not a loopback address"):
        start_superlink(ServerLayout(tmp_path), "0.0.0.0:8000", None)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("unresolvable.invalid", False),
    ],
)
def test_loopback_means_only_this_machine(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_insecure_on_loopback_is_still_allowed_for_local_tests(
    tmp_path: Path, busy_port: int
) -> None:
    code, out = _invoke(
        "server", "start", "--insecure", "--state", str(tmp_path),
        "--address", f"localhost:{busy_port}",
    )  # fmt: skip
    assert "WARNING: --insecure" in out
    assert code == 2 and "in use" in out  # got past the check, stopped at the busy port


# --- the pinned Flower -------------------------------------------------------------------------


@pytest.fixture
def other_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    real = metadata.version
    monkeypatch.setattr(
        metadata, "version", lambda name: "1.42.0" if name == "flwr" else real(name)
    )


@pytest.mark.usefixtures("other_flower")
def test_server_start_refuses_another_flower_in_one_line(tmp_path: Path) -> None:
    init_consortium_keys(tmp_path / "keys")
    code, out = _invoke(
        "server", "start", "--keys", str(tmp_path / "keys"), "--state", str(tmp_path)
    )
    assert code == 2
    line = next(line for line in out.splitlines() if "Flower" in line)
    assert f"installed Flower is 1.42.0, edufl needs exactly {FLOWER_VERSION}" in line
    assert f'pip install "flwr[simulation]=={FLOWER_VERSION}"' in line


@pytest.mark.usefixtures("other_flower")
def test_client_start_refuses_another_flower_in_one_line(tmp_path: Path, export_copy: Path) -> None:
    keys = init_institution_keys(tmp_path, "uni-a")
    (tmp_path / "ca.pem").write_text("unused")
    code, out = _invoke(
        "client", "start", "--data", str(export_copy), "--superlink", "127.0.0.1:9",
        "--root-cert", str(tmp_path / "ca.pem"), "--key", str(keys.private_key),
    )  # fmt: skip
    assert code == 2
    assert f"installed Flower is 1.42.0, edufl needs exactly {FLOWER_VERSION}" in out


# --- enrol --replace ---------------------------------------------------------------------------


def test_enrol_replace_revokes_the_old_key_which_no_name_can_enrol_again(tmp_path: Path) -> None:
    state = tmp_path / "state"
    old = init_institution_keys(tmp_path / "old", "uni-a").public_key
    new = init_institution_keys(tmp_path / "new", "uni-a").public_key
    assert _invoke("server", "enrol", str(old), "--name", "uni-a", "--state", str(state))[0] == 0

    code, out = _invoke("server", "enrol", str(new), "--name", "uni-a", "--state", str(state))
    assert code == 2
    assert "edufl server enrol NEW.pub --name uni-a --replace" in out

    code, out = _invoke(
        "server", "enrol", str(new), "--name", "uni-a", "--replace", "--state", str(state)
    )
    assert code == 0, out
    assert "revoked the old key of uni-a" in out
    registry = load_registry(state)
    assert registry.institutions["uni-a"].public_key.split()[1] in new.read_text()
    [revocation] = registry.revocations
    assert (revocation.name, revocation.reason) == ("uni-a", "replaced")
    assert revocation.public_key.split()[1] in old.read_text()

    code, out = _invoke("server", "enrol", str(old), "--name", "uni-z", "--state", str(state))
    assert code == 2
    assert "was replaced" in out and "edufl client keys init --force" in out
    assert stat.S_IMODE((state / "institutions.toml").stat().st_mode) == 0o600


# --- keys renew --------------------------------------------------------------------------------


def test_keys_renew_issues_a_new_server_certificate_from_the_same_ca(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert _invoke("server", "keys", "init", "--dir", str(keys), "--address", "127.0.0.1")[0] == 0
    ca_before = (keys / "ca.pem").read_bytes()
    cert_before = load_certificate(keys / "server.pem")
    key_before = (keys / "server.key").read_bytes()

    code, out = _invoke("server", "keys", "renew", "--dir", str(keys), "--valid-days", "400")
    assert code == 0, out
    assert "institutions keep theirs" in out
    assert (keys / "ca.pem").read_bytes() == ca_before
    assert (keys / "server.key").read_bytes() != key_before
    cert = load_certificate(keys / "server.pem")
    assert cert.serial_number != cert_before.serial_number
    cert.verify_directly_issued_by(load_certificate(keys / "ca.pem"))
    sans = x509.SubjectAlternativeName
    assert (
        cert.extensions.get_extension_for_class(sans).value
        == cert_before.extensions.get_extension_for_class(sans).value
    )
    left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=399) < left <= dt.timedelta(days=400)
    assert stat.S_IMODE((keys / "server.key").stat().st_mode) == 0o600


def test_keys_renew_without_the_ca_key_says_what_it_needs(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    init_consortium_keys(keys)
    (keys / "ca.key").unlink()  # kept offline
    code, out = _invoke("server", "keys", "renew", "--dir", str(keys))
    assert code == 2
    assert "ca.key" in out


# --- expiry warning and refusal at `server start` ---------------------------------------------


def _server_certificate_ending(keys: Path, end: dt.datetime) -> None:
    """Replace ``keys/server.pem`` by one the consortium CA signs, valid until ``end``."""
    ca_key = serialization.load_pem_private_key((keys / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = load_certificate(keys / "ca.pem")
    old = load_certificate(keys / "server.pem")
    server_key = serialization.load_pem_private_key((keys / "server.key").read_bytes(), None)
    assert isinstance(server_key, ec.EllipticCurvePrivateKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(end - dt.timedelta(days=400))
        .not_valid_after(end)
    )
    for extension in old.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    cert = builder.sign(ca_key, hashes.SHA384())
    (keys / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_server_start_warns_when_the_certificate_expires_within_30_days(
    tmp_path: Path, busy_port: int
) -> None:
    keys = tmp_path / "keys"
    init_consortium_keys(keys)
    _server_certificate_ending(keys, dt.datetime.now(dt.UTC) + dt.timedelta(days=10, hours=1))
    code, out = _invoke(
        "server", "start", "--keys", str(keys), "--state", str(tmp_path / "state"),
        "--address", f"127.0.0.1:{busy_port}",
    )  # fmt: skip
    assert "WARNING: the server certificate" in out and "10 day(s) left" in out
    assert f"edufl server keys renew --dir {keys}" in out
    assert code == 2 and "in use" in out  # it went on to start (stopped by the busy port)


def test_server_start_does_not_warn_about_a_certificate_with_time_left(
    tmp_path: Path, busy_port: int
) -> None:
    keys = tmp_path / "keys"
    init_consortium_keys(keys)
    _server_certificate_ending(keys, dt.datetime.now(dt.UTC) + dt.timedelta(days=31))
    code, out = _invoke(
        "server", "start", "--keys", str(keys), "--state", str(tmp_path / "state"),
        "--address", f"127.0.0.1:{busy_port}",
    )  # fmt: skip
    assert "WARNING" not in out
    assert code == 2 and "in use" in out


def test_server_start_refuses_an_expired_certificate_naming_the_renew_command(
    tmp_path: Path, busy_port: int
) -> None:
    keys = tmp_path / "keys"
    init_consortium_keys(keys)
    _server_certificate_ending(keys, dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    state = tmp_path / "state"
    code, out = _invoke("server", "start", "--keys", str(keys), "--state", str(state))
    assert code == 2
    assert "expired" in out and f"edufl server keys renew --dir {keys}" in out
    assert not (state / "server.json").exists()

    # Renewing is the fix: the same command then gets past the certificate check.
    assert _invoke("server", "keys", "renew", "--dir", str(keys))[0] == 0
    code, out = _invoke(
        "server", "start", "--keys", str(keys), "--state", str(state),
        "--address", f"127.0.0.1:{busy_port}",
    )  # fmt: skip
    assert "expired" not in out and "WARNING" not in out
    assert code == 2 and "in use" in out  # stopped by the busy port, after the certificate
