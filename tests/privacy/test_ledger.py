"""The ledger is tamper-evident: any changed byte or field, removed or moved entry is found."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from privacy.audit.budget import recompute_budget
from privacy.audit.verify import load_heads, load_keys, verify_ledger
from privacy.budget import LEGACY_NEIGHBOURING, NEIGHBOURING
from privacy.keys import init_institution_keys, load_node_private_key
from privacy.ledger.consortium import ConsortiumLedger, encode_entry
from privacy.ledger.entries import (
    LEDGER_FILE,
    LedgerEntry,
    LedgerError,
    canonical_json,
    parse_entries,
    sign_entry,
)
from privacy.ledger.institution import InstitutionLedger

INSTITUTIONS = ("uni_a", "uni_b")
ROUNDS = 3
_FIELDS = (
    *("v", "institution", "node", "run_id", "round", "seq", "time", "private", "accountant"),
    *("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "delta", "n_students"),
    *("epsilon_after", "epsilon_budget", "prev_hash", "public_key", "signature"),
    *("kind", "neighbouring", "n_noised"),
)


def _fields(server_round: int) -> dict[str, Any]:
    return {
        "node": "17",
        "run_id": "run-1",
        "round": server_round,
        "private": True,
        "accountant": "rdp",
        "noise_multiplier": 1.1,
        "sample_rate": 0.125,
        "steps": 8,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
        "n_students": 640,
        "epsilon_after": 0.5 * server_round,
        "epsilon_budget": 8.0,
        "kind": "train",
        "neighbouring": NEIGHBOURING,
        "n_noised": True,
    }


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys = tmp_path_factory.mktemp("keys")
    for name in INSTITUTIONS:
        init_institution_keys(keys, name)
    return keys


@pytest.fixture(scope="module")
def ledgers(keys_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each institution's own ledger, and the consortium's interleaving of both."""
    root = tmp_path_factory.mktemp("ledgers")
    own = {n: InstitutionLedger(root / n, n, keys_dir / n) for n in INSTITUTIONS}
    consortium = ConsortiumLedger(root / "consortium.jsonl")
    for server_round in range(1, ROUNDS + 1):
        for ledger in own.values():
            entry = ledger.sign_next(_fields(server_round))
            ledger.append(entry)
            assert consortium.receive(entry)
    return {"consortium": consortium.path} | {n: root / n / LEDGER_FILE for n in INSTITUTIONS}


@pytest.fixture(scope="module")
def lines(ledgers: dict[str, Path]) -> list[bytes]:
    return ledgers["consortium"].read_bytes().splitlines(keepends=True)


def _verify(tmp_path: Path, data: bytes, keys_dir: Path, ledgers: dict[str, Path]) -> Any:
    path = tmp_path / "tampered.jsonl"
    path.write_bytes(data)
    heads = load_heads([ledgers[n] for n in INSTITUTIONS])
    return verify_ledger(path, load_keys(keys_dir), heads)


def test_intact_consortium_ledger_verifies_against_registered_keys(
    tmp_path: Path, lines: list[bytes], keys_dir: Path, ledgers: dict[str, Path]
) -> None:
    report = _verify(tmp_path, b"".join(lines), keys_dir, ledgers)

    assert report.ok, report.problems
    assert report.chains == {name: ROUNDS for name in INSTITUTIONS}


_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_SETTINGS
@given(data=st.data())
def test_flipping_any_byte_is_detected(
    tmp_path: Path, lines: list[bytes], keys_dir: Path, ledgers: dict[str, Path], data: Any
) -> None:
    blob = bytearray(b"".join(lines))
    position = data.draw(st.integers(0, len(blob) - 1), label="byte")
    blob[position] ^= data.draw(st.integers(1, 255), label="xor mask")

    assert not _verify(tmp_path, bytes(blob), keys_dir, ledgers).ok


@_SETTINGS
@given(
    index=st.integers(0, 2 * ROUNDS - 1),
    field=st.sampled_from(_FIELDS),
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-3, 10**6),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
    ),
)
def test_changing_any_field_of_any_entry_is_detected(
    tmp_path: Path,
    lines: list[bytes],
    keys_dir: Path,
    ledgers: dict[str, Path],
    index: int,
    field: str,
    value: Any,
) -> None:
    entry = json.loads(lines[index])
    assume(entry[field] != value or type(entry[field]) is not type(value))
    entry[field] = value
    tampered = list(lines)
    tampered[index] = canonical_json(entry) + b"\n"  # a careful forger keeps the form

    report = _verify(tmp_path, b"".join(tampered), keys_dir, ledgers)

    assert not report.ok
    assert report.problems[0].line == index + 1  # the first bad entry is the changed one


@_SETTINGS
@given(index=st.integers(0, 2 * ROUNDS - 1))
def test_removing_any_entry_is_detected(
    tmp_path: Path, lines: list[bytes], keys_dir: Path, ledgers: dict[str, Path], index: int
) -> None:
    kept = lines[:index] + lines[index + 1 :]

    assert not _verify(tmp_path, b"".join(kept), keys_dir, ledgers).ok


@_SETTINGS
@given(order=st.permutations(range(2 * ROUNDS)))
def test_reordering_entries_of_an_institution_is_detected(
    tmp_path: Path, lines: list[bytes], keys_dir: Path, ledgers: dict[str, Path], order: list[int]
) -> None:
    names = [json.loads(line)["institution"] for line in lines]

    def chains(seq: list[int]) -> dict[str, list[int]]:
        return {n: [i for i in seq if names[i] == n] for n in INSTITUTIONS}

    # Interleaving different institutions' chains carries no meaning; their own order does.
    assume(chains(order) != chains(list(range(2 * ROUNDS))))

    moved = b"".join(lines[i] for i in order)

    assert not _verify(tmp_path, moved, keys_dir, ledgers).ok


def test_removing_the_last_entry_needs_the_institutions_heads_to_be_seen(
    tmp_path: Path, lines: list[bytes], keys_dir: Path
) -> None:
    path = tmp_path / "truncated.jsonl"
    path.write_bytes(b"".join(lines[:-1]))

    assert verify_ledger(path, load_keys(keys_dir)).ok  # a chain alone cannot show it
    heads = {"uni_b": {"seq": ROUNDS - 1, "hash": "0" * 64}}
    report = verify_ledger(path, load_keys(keys_dir), heads)
    assert "removed at the end" in report.problems[0].reason


def test_entry_resigned_with_an_unregistered_key_is_detected(
    tmp_path: Path, lines: list[bytes], keys_dir: Path, ledgers: dict[str, Path]
) -> None:
    forger = ec.generate_private_key(ec.SECP384R1())
    entry = json.loads(lines[2])
    entry["epsilon_after"] = 0.01
    forged = sign_entry({k: v for k, v in entry.items() if k != "signature"}, forger)
    tampered = [*lines[:2], canonical_json(forged) + b"\n", *lines[3:]]

    report = _verify(tmp_path, b"".join(tampered), keys_dir, ledgers)

    assert report.problems[0].line == 3
    assert "not uni_a's registered key" in report.problems[0].reason


def test_consortium_ledger_refuses_forged_and_gapped_entries_and_ignores_resends(
    tmp_path: Path, keys_dir: Path
) -> None:
    key = load_node_private_key(keys_dir / "uni_a")
    registered = key.public_key()
    own = InstitutionLedger(tmp_path / "uni_a", "uni_a", key)
    server = ConsortiumLedger(tmp_path / "consortium.jsonl")
    entries = []
    for server_round in (1, 2, 3):
        entries.append(own.sign_next(_fields(server_round)))
        own.append(entries[-1])

    assert server.receive_text(encode_entry(entries[0]), registered)
    assert not server.receive(entries[0], registered)  # a resend after a lost reply
    with pytest.raises(LedgerError, match="seq 2 where seq 1 was due"):
        server.receive(entries[2], registered)
    forged = {**entries[1], "epsilon_after": 0.0}
    with pytest.raises(LedgerError, match="signature does not match"):
        server.receive(forged, registered)
    assert server.receive(entries[1], registered)
    assert [e.seq for e in server.entries()] == [0, 1]


def test_tampering_tests_cover_every_field_of_the_entry_schema(lines: list[bytes]) -> None:
    assert sorted(json.loads(lines[0])) == sorted(_FIELDS) == sorted(LedgerEntry.model_fields)


def test_an_entry_signed_before_kind_and_neighbouring_existed_still_verifies_as_record_level(
    tmp_path: Path, keys_dir: Path
) -> None:
    key = load_node_private_key(keys_dir / "uni_a")
    own = InstitutionLedger(tmp_path, "uni_a", key)
    old = {k: v for k, v in _fields(1).items() if k not in ("kind", "neighbouring", "n_noised")} | {
        "sample_rate": 0.125,
        "n_students": 64,
        "delta": 1e-3,
        "epsilon_after": 0.0,
    }
    own.append(own.sign_next(old))
    new = _fields(2) | {"n_students": 64, "delta": 1e-3, "epsilon_after": 0.0}
    own.append(own.sign_next(new))

    assert verify_ledger(own.path, {"uni_a": key.public_key()}).ok  # its signed bytes hold
    first, second = parse_entries(own.path)
    assert "kind" not in first.model_dump() and second.model_dump()["kind"] == "train"

    rows = recompute_budget([first, second]).rows
    # Accounted per record, and said so, never passed off as student-level.
    assert rows[0].neighbouring == LEGACY_NEIGHBOURING
    assert "record-level (legacy entry)" in rows[0].status
    assert rows[1].neighbouring == NEIGHBOURING and "record-level" not in rows[1].status


def test_an_entry_claiming_another_neighbouring_relation_fails_the_budget_audit(
    tmp_path: Path, keys_dir: Path
) -> None:
    own = InstitutionLedger(tmp_path, "uni_a", load_node_private_key(keys_dir / "uni_a"))
    own.append(own.sign_next(_fields(1) | {"neighbouring": "replace-one-record"}))

    report = recompute_budget(parse_entries(own.path))

    assert [row.status for row in report.rows] == ["UNKNOWN NEIGHBOURING RELATION"]
    assert not report.ok
