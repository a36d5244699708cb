"""Hostile privacy ledgers (signed JSON lines), key registries and heads files.

Through `edufl audit verify` (0 intact, 1 tampered naming the first bad line, 2 unusable
input, 3 nothing wrong found but not all checked), `edufl audit budget` (which verifies first;
its existing report must survive a refused ledger) and the library functions they call. A
hostile ledger must be refused (exit 1 or 2 with a message, or a report that is not ok):
never accepted, never a traceback. Entries are damaged as bytes, as JSON that is well formed but
wrong, and as wrong entries *re-signed with the institution's real key*, so that only the
schema and accounting checks stand between them and the auditor's tables.
"""

from __future__ import annotations

import base64
import contextlib
import json
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import assume, given
from hypothesis import strategies as st

from privacy.audit.verify import VerifyReport, load_heads, load_keys, verify_ledger
from privacy.keys import load_node_private_key
from privacy.ledger.entries import parse_entries
from tests.fuzz.conftest import INSTITUTIONS
from tests.fuzz.harness import assert_unchanged, call, cli, digests, fuzz
from tests.fuzz.mutations import HOSTILE_VALUES, byte_damage, hostile_toml, wrong_document


@pytest.fixture(scope="module")
def signing_keys(keys_dir: Path) -> dict[str, ec.EllipticCurvePrivateKey]:
    return {name: load_node_private_key(keys_dir / name) for name in INSTITUTIONS}


def _dumps(obj: Any) -> bytes:
    """Canonical-looking JSON that, unlike the ledger's own, lets NaN and odd types through."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def _resign(entry: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    payload = {k: v for k, v in entry.items() if k != "signature"}
    signature = key.sign(_dumps(payload), ec.ECDSA(hashes.SHA256()))
    return {**payload, "signature": base64.b64encode(signature).decode()}


@st.composite
def hostile_ledger(
    draw: st.DrawFn, valid: bytes, keys: dict[str, ec.EllipticCurvePrivateKey]
) -> bytes:
    lines = valid.splitlines()
    family = draw(st.sampled_from(("bytes", "entry", "entry", "resigned", "lines")))
    if family == "bytes":
        return draw(byte_damage(valid))
    if family == "lines":
        bad = draw(
            st.sampled_from(
                (
                    b"[" * 5000 + b"]" * 5000,
                    b"9" * 5000,
                    b'{"v":1e400}',
                    b"[]",
                    b"null",
                    b"",
                    b'{"institution":"uni_a","institution":"uni_b"}',
                    lines[0] + b"  ",
                    lines[-1],
                )
            )
        )
        i = draw(st.integers(0, len(lines)))
        return b"\n".join([*lines[:i], bad, *lines[i:]]) + b"\n"
    i = draw(st.integers(0, len(lines) - 1))
    entry = json.loads(lines[i])
    wrong = draw(wrong_document(entry))
    if family == "resigned" and isinstance(wrong.get("institution"), str):
        key = keys.get(wrong["institution"], keys[INSTITUTIONS[0]])
        with contextlib.suppress(TypeError, ValueError):  # NaN cannot be signed
            wrong = _resign(wrong, key)
    lines[i] = _dumps(wrong)
    return b"\n".join(lines) + b"\n"


def _heads_args(ledger_path: Path) -> list[str]:
    """Each institution's own ledger (next to the consortium's, see conftest) as its head."""
    return [a for n in INSTITUTIONS for a in ("--heads", str(ledger_path.parent / n / LEDGER))]


LEDGER = "ledger.jsonl"


@fuzz(100)
@given(data=st.data())
def test_hostile_ledgers_are_reported_as_tampered_or_refused(
    ledger_path: Path, keys_dir: Path, signing_keys: dict[str, Any], data: st.DataObject
) -> None:
    valid = ledger_path.read_bytes()
    hostile = data.draw(hostile_ledger(valid, signing_keys), label="ledger")
    assume(hostile != valid)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.jsonl"
        path.write_bytes(hostile)
        entry = data.draw(
            st.sampled_from(("verify --keys", "verify --unauthenticated", "library")),
            label="entry",
        )
        if entry == "library":
            keys = load_keys(keys_dir)
            heads = load_heads([ledger_path.parent / n / LEDGER for n in INSTITUTIONS])
            report = call(
                "ledger JSONL", lambda: verify_ledger(path, keys, heads), names=[str(path)]
            )
            assert not isinstance(report, VerifyReport) or not report.ok, "hostile ledger passed"
            call("ledger JSONL", lambda: parse_entries(path), names=[str(path)], count=False)
            return
        args = ["audit", "verify", str(path), *_heads_args(ledger_path)]
        args += ["--keys", str(keys_dir)] if entry == "verify --keys" else ["--unauthenticated"]
        cli("ledger JSONL", args, names=[path.name], codes=(1, 2))


@fuzz(12)
@given(write_report=st.booleans(), data=st.data())
def test_audit_budget_keeps_the_previous_report_when_it_refuses_a_ledger(
    ledger_path: Path,
    keys_dir: Path,
    signing_keys: dict[str, Any],
    write_report: bool,
    data: st.DataObject,
) -> None:
    valid = ledger_path.read_bytes()
    hostile = data.draw(hostile_ledger(valid, signing_keys), label="ledger")
    assume(hostile != valid)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.jsonl"
        path.write_bytes(hostile)
        out = Path(tmp) / "audit"
        out.mkdir()
        for name in ("budget.md", "budget.json", "epsilon.png"):
            (out / name).write_text(f"last audit's {name}", "utf-8")
        before = digests(out)
        args = ["audit", "budget", str(path), "--keys", str(keys_dir), *_heads_args(ledger_path)]
        args += ["--out", str(out)] if write_report else []
        # The ledger is verified first: a hostile one is refused before any recomputation.
        cli("ledger JSONL", args, names=[path.name], codes=(1, 2))
        assert_unchanged("ledger JSONL", before, out)


@pytest.fixture(scope="module")
def registry_text(keys_dir: Path) -> bytes:
    doc = {
        "institutions": {
            name: {
                "public_key": (keys_dir / f"{name}.pub").read_text().strip(),
                "enrolled_at": "2025-01-01T00:00:00Z",
            }
            for name in INSTITUTIONS
        }
    }
    return tomli_w.dumps(doc).encode()


@fuzz(80)
@given(data=st.data())
def test_hostile_key_registries_fail_with_the_file_named(
    ledger_path: Path, registry_text: bytes, data: st.DataObject
) -> None:
    doc = tomllib.loads(registry_text.decode())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "institutions.toml"
        path.write_bytes(data.draw(hostile_toml(registry_text, doc), label="registry"))
        if data.draw(st.booleans(), label="through the CLI"):
            args = ["audit", "verify", str(ledger_path), "--keys", str(path)]
            names = [str(path), str(ledger_path)]
            # Without heads the ledger is never called intact (3: its tails unchecked).
            cli("key registry TOML", args, names=names, codes=(1, 2, 3))
        else:
            call("key registry TOML", lambda: load_keys(path), names=[str(path)])


@fuzz(40)
@given(data=st.data())
def test_hostile_public_key_files_in_a_key_folder_fail_with_the_file_named(
    keys_dir: Path, data: st.DataObject
) -> None:
    valid = (keys_dir / f"{INSTITUTIONS[0]}.pub").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{INSTITUTIONS[0]}.pub"
        path.write_bytes(data.draw(byte_damage(valid), label="public key"))
        call("key registry TOML", lambda: load_keys(Path(tmp)), names=[str(path)])


HEADS = {"uni_a": {"seq": 1, "hash": "ab" * 32}, "uni_b": {"seq": 1, "hash": "cd" * 32}}


@st.composite
def hostile_heads(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(byte_damage(json.dumps(HEADS).encode()))
    doc = draw(st.one_of(wrong_document(HEADS), HOSTILE_VALUES))
    return _dumps(doc) if draw(st.booleans()) else b"[" * 3000 + b"]" * 3000


@fuzz(60)
@given(data=st.data())
def test_hostile_heads_files_fail_with_the_file_named(
    ledger_path: Path, keys_dir: Path, data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "heads.json"
        path.write_bytes(data.draw(hostile_heads(), label="heads"))
        if data.draw(st.booleans(), label="through the CLI"):
            args = ["audit", "verify", str(ledger_path), "--heads", str(path)]
            args += ["--keys", str(keys_dir)]
            # Exit 1: the heads loaded but do not match; the report names the ledger's line.
            # Exit 3: they name no registered institution, so the tails stay unchecked.
            cli("heads JSON", args, names=[str(path), str(ledger_path)], codes=(1, 2, 3))
        else:
            call("heads JSON", lambda: load_heads([path]), names=[str(path)])
