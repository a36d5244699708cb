"""Every tampering of a DP run's consortium ledger fails the default `edufl audit verify`.

The run folder is laid out as `edufl simulate run --dp-epsilon` leaves it: the server's
``ledger.jsonl`` and, under ``privacy/INSTITUTION/``, each institution's own ledger and key
pair. Entries come from the project's own `DPSession` (three institutions, three DP rounds
each); each test copies the folder, tampers with the consortium ledger as a forger with the
run folder in hand would, and runs the plain command a user types.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from privacy.budget import DPPlan, PrivacyBudget
from privacy.dp import DPSession
from privacy.keys import load_node_private_key
from privacy.ledger.consortium import ConsortiumLedger
from privacy.ledger.entries import GENESIS, LEDGER_FILE, canonical_json, entry_hash, sign_entry
from shared_models.training import make_loader, make_optimizer, set_seed, train_one_epoch
from simulations.cli import app
from tests.privacy.conftest import BATCH, random_inputs, tiny_model

INSTITUTIONS = ("uni_a", "uni_b", "uni_c")
ROUNDS = 3
runner = CliRunner()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DP run folder: ``ledger.jsonl`` and ``privacy/NAME/{ledger.jsonl,keys/NAME[.pub]}``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("run")
    students = random_inputs(64)
    budget = PrivacyBudget(epsilon=2.0, delta=1e-3, max_grad_norm=1.0, accountant="rdp")
    plan = DPPlan.for_training(len(students), BATCH, local_epochs=1, planned_rounds=ROUNDS)
    server = ConsortiumLedger(run / LEDGER_FILE)
    try:
        for server_round in range(1, ROUNDS + 1):
            for name in INSTITUTIONS:
                session = DPSession.open(run / "privacy" / name, budget, plan, institution=name)
                set_seed(server_round)
                model = tiny_model()
                loader = make_loader(students, BATCH, shuffle=True, seed=server_round)
                model, optimizer, loader = session.make_private(
                    model, make_optimizer(model), loader
                )
                train_one_epoch(model, loader, optimizer, "risk")
                assert server.receive(session.spend_round("run-1", server_round, "node-7"))
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.fixture
def run(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(pristine, copy)
    return copy


def _verify(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["audit", "verify", *args], prog_name="edufl")
    return result.exit_code, result.output


# --- the forger's tools -------------------------------------------------------------------------


def _lines(run: Path) -> list[bytes]:
    return (run / LEDGER_FILE).read_bytes().splitlines(keepends=True)


def _write(run: Path, lines: list[bytes]) -> None:
    (run / LEDGER_FILE).write_bytes(b"".join(lines))


def _entries(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _lines(run)]


def _put(run: Path, entries: list[dict[str, Any]]) -> None:
    _write(run, [canonical_json(e) + b"\n" for e in entries])


def _index(entries: list[dict[str, Any]], name: str, seq: int) -> int:
    return next(i for i, e in enumerate(entries) if e["institution"] == name and e["seq"] == seq)


def _node_key(run: Path, name: str) -> ec.EllipticCurvePrivateKey:
    return load_node_private_key(run / "privacy" / name / "keys" / name)


def _resign(entry: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    return sign_entry({k: v for k, v in entry.items() if k != "signature"}, key)


def _rewrite_chain(
    entries: list[dict[str, Any]], name: str, key: ec.EllipticCurvePrivateKey, **changes: Any
) -> list[dict[str, Any]]:
    """Re-sign and re-link ``name``'s whole chain with ``key``; ``changes`` map field -> fn."""
    out, prev = [], None
    for entry in entries:
        if entry["institution"] != name:
            out.append(entry)
            continue
        fields = {**entry, **{k: fn(entry[k]) for k, fn in changes.items()}}
        fields["prev_hash"] = GENESIS if prev is None else entry_hash(prev)
        prev = _resign(fields, key)
        out.append(prev)
    return out


def _change(run: Path, name: str, seq: int, field: str, value: Any, *, resign: bool) -> None:
    entries = _entries(run)
    i = _index(entries, name, seq)
    entries[i] = {**entries[i], field: value}
    if resign:
        entries[i] = _resign(entries[i], _node_key(run, name))
    _put(run, entries)


def epsilon_changed_without_resigning(run: Path) -> None:
    _change(run, "uni_a", 1, "epsilon_after", 0.1, resign=False)


def sigma_changed_and_resigned_with_own_key(run: Path) -> None:
    _change(run, "uni_a", ROUNDS - 1, "noise_multiplier", 40.0, resign=True)  # the last entry


def steps_changed_and_resigned_with_own_key(run: Path) -> None:
    _change(run, "uni_b", 1, "steps", 1, resign=True)


def first_entry_changed_without_relinking(run: Path) -> None:
    _change(run, "uni_a", 0, "epsilon_after", 0.01, resign=True)


def chain_resigned_with_own_key_epsilon_over_3(run: Path) -> None:
    entries = _entries(run)
    _put(run, _rewrite_chain(entries, "uni_a", _node_key(run, "uni_a"), epsilon_after=_third))


def chain_forged_with_a_fresh_key(run: Path) -> None:
    fresh = ec.generate_private_key(ec.SECP384R1())
    _put(run, _rewrite_chain(_entries(run), "uni_a", fresh, epsilon_after=_third))


def _third(epsilon: float) -> float:
    return epsilon / 3


def last_entry_removed(run: Path) -> None:
    _write(run, _lines(run)[:-1])


def every_chains_last_entry_removed(run: Path) -> None:
    _put(run, [e for e in _entries(run) if e["seq"] != ROUNDS - 1])


def middle_entry_removed(run: Path) -> None:
    entries = _entries(run)
    del entries[_index(entries, "uni_b", 1)]
    _put(run, entries)


def whole_institution_removed(run: Path) -> None:
    _put(run, [e for e in _entries(run) if e["institution"] != "uni_c"])


def entries_reordered_within_a_chain(run: Path) -> None:
    entries = _entries(run)
    i, j = _index(entries, "uni_a", 0), _index(entries, "uni_a", 1)
    entries[i], entries[j] = entries[j], entries[i]
    _put(run, entries)


def entry_duplicated(run: Path) -> None:
    lines = _lines(run)
    i = _index(_entries(run), "uni_a", 1)
    _write(run, [*lines[: i + 1], lines[i], *lines[i + 1 :]])


def signature_taken_from_another_entry(run: Path) -> None:
    entries = _entries(run)
    i, j = _index(entries, "uni_a", 1), _index(entries, "uni_a", 0)
    entries[i] = {**entries[i], "signature": entries[j]["signature"]}
    _put(run, entries)


def truncated_mid_line(run: Path) -> None:
    data = (run / LEDGER_FILE).read_bytes()
    (run / LEDGER_FILE).write_bytes(data[: len(data) - 100])


def truncated_at_a_line_break(run: Path) -> None:
    _write(run, _lines(run)[:-2])


def forged_next_entry(run: Path) -> None:
    entries = _entries(run)
    last = entries[_index(entries, "uni_a", ROUNDS - 1)]
    forged = {**last, "round": ROUNDS + 1, "seq": ROUNDS, "prev_hash": entry_hash(last)}
    entries.append(_resign(forged, ec.generate_private_key(ec.SECP384R1())))
    _put(run, entries)


def forged_new_institution(run: Path) -> None:
    entries = _entries(run)
    fresh = ec.generate_private_key(ec.SECP384R1())
    prev = None
    for entry in [e for e in entries if e["institution"] == "uni_a"]:
        fields = {
            **entry,
            "institution": "uni_x",
            "prev_hash": GENESIS if prev is None else entry_hash(prev),
        }
        prev = _resign(fields, fresh)
        entries.append(prev)
    _put(run, entries)


TAMPERINGS: list[Callable[[Path], None]] = [
    epsilon_changed_without_resigning,
    sigma_changed_and_resigned_with_own_key,
    steps_changed_and_resigned_with_own_key,
    first_entry_changed_without_relinking,
    chain_resigned_with_own_key_epsilon_over_3,
    chain_forged_with_a_fresh_key,
    last_entry_removed,
    every_chains_last_entry_removed,
    middle_entry_removed,
    whole_institution_removed,
    entries_reordered_within_a_chain,
    entry_duplicated,
    signature_taken_from_another_entry,
    truncated_mid_line,
    truncated_at_a_line_break,
    forged_next_entry,
    forged_new_institution,
]


# --- the tests ----------------------------------------------------------------------------------


def test_the_untampered_run_ledger_is_intact(run: Path) -> None:
    code, out = _verify(str(run / LEDGER_FILE))

    assert code == 0, out
    assert "=> INTACT" in out and "registered keys" in out


@pytest.mark.parametrize("tamper", TAMPERINGS, ids=[t.__name__ for t in TAMPERINGS])
def test_default_verify_refuses_a_tampered_ledger(
    run: Path, tamper: Callable[[Path], None]
) -> None:
    tamper(run)

    code, out = _verify(str(run / LEDGER_FILE))

    assert code == 1, out
    assert "=> TAMPERED OR DAMAGED" in out and "INTACT\n" not in out
    assert "Traceback" not in out


def test_reordering_lines_across_institutions_is_harmless(run: Path) -> None:
    lines = _lines(run)
    # Grouped by institution, each chain in its own order: the interleaving carries no meaning.
    _write(run, sorted(lines, key=lambda line: json.loads(line)["institution"], reverse=True))

    code, out = _verify(str(run / LEDGER_FILE))

    assert code == 0 and "=> INTACT" in out, out


def test_a_node_rewriting_its_own_chain_is_caught_against_what_the_server_received(
    run: Path,
) -> None:
    own = run / "privacy" / "uni_a" / LEDGER_FILE
    entries = [json.loads(line) for line in own.read_bytes().splitlines()]
    rewritten = _rewrite_chain(entries, "uni_a", _node_key(run, "uni_a"), epsilon_after=_third)
    own.write_bytes(b"".join(canonical_json(e) + b"\n" for e in rewritten))

    code, out = _verify(str(own))

    assert code == 1, out
    assert "uni_a" in out and "head" in out


def test_budget_refuses_a_ledger_with_a_duplicated_entry(run: Path) -> None:
    entry_duplicated(run)

    result = runner.invoke(app, ["audit", "budget", str(run / LEDGER_FILE)], prog_name="edufl")

    assert result.exit_code == 1, result.output
    assert "verify" in result.output and "Traceback" not in result.output
