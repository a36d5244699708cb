"""The institution registry: revocations kept by fingerprint, key rotation, past keys verify."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from privacy.audit.verify import audit_ledger
from privacy.keys import init_institution_keys, load_node_public_key, public_key_line
from privacy.ledger.consortium import ConsortiumLedger
from privacy.ledger.institution import InstitutionLedger
from server.institutions import (
    EnrolmentError,
    Registry,
    load_registry,
    save_registry,
)
from tests.privacy.test_ledger import _fields


def _line(tmp_path: Path, name: str) -> str:
    keys = init_institution_keys(tmp_path / name, name)
    return public_key_line(load_node_public_key(keys.public_key))


def test_revoking_a_name_twice_keeps_both_keys_refused(tmp_path: Path) -> None:
    first, second = _line(tmp_path, "k1"), _line(tmp_path, "k2")
    registry = Registry().with_institution("uni-a", first).without("uni-a")
    registry = registry.with_institution("uni-a", second).without("uni-a")
    assert [r.public_key for r in registry.revocations] == [first, second]
    for key in (first, second):
        for name in ("uni-a", "uni-z"):
            with pytest.raises(EnrolmentError, match="was revoked"):
                registry.with_institution(name, key)
    # ... also after a round trip through the file.
    save_registry(tmp_path / "state", registry)
    assert load_registry(tmp_path / "state").revocations == registry.revocations


def test_replace_revokes_the_old_key_and_enrols_the_new(tmp_path: Path) -> None:
    old, new = _line(tmp_path, "k1"), _line(tmp_path, "k2")
    registry = Registry().with_institution("uni-a", old)
    with pytest.raises(EnrolmentError, match="--replace"):
        registry.with_institution("uni-a", new)
    replaced = registry.with_institution("uni-a", new, replace=True)
    assert replaced.institutions["uni-a"].public_key == new
    assert [(r.name, r.reason, r.public_key) for r in replaced.revocations] == [
        ("uni-a", "replaced", old)
    ]
    with pytest.raises(EnrolmentError, match="was replaced"):
        replaced.with_institution("uni-b", old)


def test_a_registry_with_revocations_by_name_still_loads(tmp_path: Path) -> None:
    key = _line(tmp_path, "k1")
    (tmp_path / "institutions.toml").write_text(
        f'[revoked.uni-c]\npublic_key = "{key}"\nrevoked_at = 2026-01-02T03:04:05Z\n'
    )
    registry = load_registry(tmp_path)
    assert registry.revoked["uni-c"].public_key == key
    with pytest.raises(EnrolmentError, match="was revoked"):
        registry.with_institution("uni-x", key)


def test_registry_file_and_state_folder_are_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = save_registry(state, Registry())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_ledger_entries_of_revoked_and_rotated_keys_still_verify(tmp_path: Path) -> None:
    names = ("uni_a", "uni_b")
    keys = {n: init_institution_keys(tmp_path / "keys", n) for n in names}
    registry = Registry()
    for name in names:
        line = public_key_line(load_node_public_key(keys[name].public_key))
        registry = registry.with_institution(name, line)
    consortium = ConsortiumLedger(tmp_path / "ledger.jsonl")
    for name in names:
        own = InstitutionLedger(tmp_path / "own" / name, name, keys[name].private_key)
        for server_round in (1, 2):
            entry = own.sign_next(_fields(server_round))
            own.append(entry)
            assert consortium.receive(entry)
    # uni_a rotates its key, uni_b is revoked: what they signed before still verifies.
    registry = registry.with_institution("uni_a", _line(tmp_path, "k-new"), replace=True)
    registry = registry.without("uni_b")
    state = tmp_path / "state"
    registry_path = save_registry(state, registry)

    report, _ = audit_ledger(consortium.path, registry_path)
    assert report.ok, report.problems
    assert report.chains == {"uni_a": 2, "uni_b": 2}
