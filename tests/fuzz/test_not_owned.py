"""Hostile files read outside the fuzzed readers: each bug found became a regression test.

The federation config TOML (server/config.py), node keys (privacy/keys.py), a federated
checkpoint adopted as a local model (client/global_model.py) and the ledger entries a node
sends the server (privacy/ledger/consortium.py: a changed entry must be refused with a message,
never accepted nor a crash). A traceback raised *in the other files* is tallied as "known,
reported"; the bugs found so far are fixed and pinned by the ``test_fixed_*`` tests below; a
traceback anywhere else fails the suite.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import tomli_w
from hypothesis import assume, given
from hypothesis import strategies as st

from client.global_model import adopt_global_model
from privacy.keys import load_node_private_key, load_node_public_key
from privacy.ledger.consortium import ConsortiumLedger
from server.config import FederationConfig
from shared_models.data.contract import default_spec
from shared_models.errors import EduflError
from tests.fuzz.conftest import INSTITUTIONS
from tests.fuzz.harness import call, fuzz, raised_in
from tests.fuzz.mutations import byte_damage, hostile_toml, wrong_document

SPEC = default_spec()

VALID_CONFIG = {
    "model": "lstm",
    "strategy": "fedavg",
    "rounds": 3,
    "min_nodes": 2,
    "local_epochs": 1,
    "model_overrides": {"hidden_size": 16},
    "guard": {},
    "dp_epsilon": 8.0,
}


@fuzz(60)
@given(data=st.data())
def test_hostile_federation_configs_fail_with_the_file_named(data: st.DataObject) -> None:
    valid = tomli_w.dumps(VALID_CONFIG).encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "federation.toml"
        path.write_bytes(data.draw(hostile_toml(valid, VALID_CONFIG), label="config"))
        call(
            "federation config TOML",
            lambda: FederationConfig.from_toml(path),
            names=[str(path)],
            known=raised_in(
                "server/config.py", "shared_models/models", "shared_models/models/registry.py"
            ),
        )


@fuzz(40)
@given(private=st.booleans(), data=st.data())
def test_hostile_node_key_files_fail_with_the_file_named(
    keys_dir: Path, private: bool, data: st.DataObject
) -> None:
    name = INSTITUTIONS[0] if private else f"{INSTITUTIONS[0]}.pub"
    valid = (keys_dir / name).read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data.draw(byte_damage(valid), label="key"))
        load = load_node_private_key if private else load_node_public_key
        call(
            "node key (OpenSSH)",
            lambda: load(path),
            names=[str(path)],
            known=raised_in("privacy/keys.py"),
        )


@fuzz(12)
@given(data=st.data())
def test_hostile_federated_checkpoints_are_refused_when_adopted(
    export_dir: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    from server.checkpoints import CheckpointStore
    from shared_models.models.registry import build_model

    run = tmp_path_factory.getbasetemp() / "fuzz-adopt-run"
    if not run.exists():
        model = build_model("lstm", SPEC.weeks, len(SPEC.dynamic), len(SPEC.static_names), {})
        manifest = {"model": "lstm", "spec_fingerprint": SPEC.fingerprint, "task": "risk"}
        CheckpointStore(run).save(1, model, manifest)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(shutil.copytree(run, Path(tmp) / "run"))
        path = copy / "checkpoints" / "round-0001.json"
        wrong = data.draw(wrong_document(json.loads(path.read_text())), label="manifest")
        path.write_text(json.dumps(wrong, default=str), "utf-8")
        call(
            "federated checkpoint (adopt)",
            lambda: adopt_global_model(copy, export_dir, SPEC, Path(tmp) / "model"),
            names=[str(path), "round-0001"],
            known=raised_in("client/global_model.py", "shared_models/models/registry.py"),
        )


@fuzz(60)
@given(data=st.data())
def test_hostile_ledger_entries_from_a_node_are_refused(
    ledger_path: Path, data: st.DataObject
) -> None:
    line = ledger_path.read_bytes().splitlines()[0]
    with tempfile.TemporaryDirectory() as tmp:
        ledger = ConsortiumLedger(Path(tmp) / "ledger.jsonl")
        if data.draw(st.booleans(), label="as bytes"):
            text = data.draw(byte_damage(line), label="bytes").decode("utf-8", "replace")
        else:
            text = json.dumps(
                data.draw(wrong_document(json.loads(line)), label="entry"), default=str
            )
        assume(not _same_entry(text, line))
        # A changed entry is refused with a message: never accepted, never a crash.
        refused = call(
            "ledger entry (from a node)",
            lambda: ledger.receive_text(text),
            names=["ledger", "entry", "JSON"],
        )
        assert isinstance(refused, EduflError), f"a hostile entry was accepted: {text[:300]}"


def _same_entry(text: str, line: bytes) -> bool:
    """The damage left the entry itself as it was (e.g. only whitespace around it)."""
    try:
        return bool(json.loads(text) == json.loads(line))
    except ValueError:
        return False


# --- bugs this suite found in other modules, fixed: each stays as a regression test ---------


@pytest.mark.parametrize(
    "content",
    [b"a = " + b"[" * 2000 + b"]" * 2000, "rounds = 3\n".encode("utf-16")],
    ids=["nested 2000 deep: RecursionError", "UTF-16: UnicodeDecodeError"],
)
def test_fixed_federation_config_bugs(tmp_path: Path, content: bytes) -> None:
    from server.config import FederationConfigError

    path = tmp_path / "federation.toml"
    path.write_bytes(content)
    with pytest.raises(FederationConfigError, match=r"federation\.toml"):
        FederationConfig.from_toml(path)


ADOPT_BUGS = {
    "manifest is a list: TypeError": lambda m: [1],
    "weights is a list: TypeError": lambda m: {**m, "weights": [1]},
    "unknown model: UnknownModelError": lambda m: {**m, "model": "nope"},
    "bad model_overrides: ValidationError": lambda m: {**m, "model_overrides": {"hidden_size": -1}},
    "seed is text: ValueError": lambda m: {**m, "seed": "x"},
}


@pytest.mark.parametrize("damage", sorted(ADOPT_BUGS))
def test_fixed_checkpoint_adoption_bugs(export_dir: Path, tmp_path: Path, damage: str) -> None:
    from server.checkpoints import CheckpointStore
    from shared_models.errors import EduflError
    from shared_models.models.registry import build_model

    model = build_model("lstm", SPEC.weeks, len(SPEC.dynamic), len(SPEC.static_names), {})
    manifest = {"model": "lstm", "spec_fingerprint": SPEC.fingerprint, "task": "risk"}
    CheckpointStore(tmp_path / "run").save(1, model, manifest)
    path = tmp_path / "run" / "checkpoints" / "round-0001.json"
    path.write_text(json.dumps(ADOPT_BUGS[damage](json.loads(path.read_text()))))
    with pytest.raises(EduflError, match="round-0001"):
        adopt_global_model(tmp_path / "run", export_dir, SPEC, tmp_path / "model")


def test_fixed_public_key_bug_compressed_point(keys_dir: Path, tmp_path: Path) -> None:
    import base64

    from privacy.keys import KeyMaterialError

    kind, blob, *_ = (keys_dir / f"{INSTITUTIONS[0]}.pub").read_bytes().split()
    raw = bytearray(base64.b64decode(blob))
    raw[raw.index(b"\x04", 30)] = 0x02  # the point's "uncompressed" marker -> "compressed"
    path = tmp_path / "uni.pub"
    path.write_bytes(kind + b" " + base64.b64encode(bytes(raw)) + b"\n")
    with pytest.raises(KeyMaterialError, match=r"uni\.pub"):  # today: NotImplementedError
        load_node_public_key(path)


def test_fixed_train_bug_an_export_without_outcomes(export_dir: Path, tmp_path: Path) -> None:
    """A scoring-only export (no outcomes table) is usable, so `edufl train` must say why not."""
    from typer.testing import CliRunner

    from simulations.cli import app

    export = Path(shutil.copytree(export_dir, tmp_path / "export"))
    (export / "outcomes.csv").unlink()
    result = CliRunner().invoke(app, ["train", str(export), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.exception


def test_fixed_ledger_entry_bug_deep_nesting(tmp_path: Path) -> None:
    from privacy.ledger.entries import LedgerError

    with pytest.raises(LedgerError):
        ConsortiumLedger(tmp_path / "ledger.jsonl").receive_text("[" * 100_000)


HUGE_INT = "9" * 5000  # beyond Python's 4300-digit limit for int(str): a plain ValueError


def test_fixed_federation_config_bug_huge_integer(tmp_path: Path) -> None:
    from server.config import FederationConfigError

    path = tmp_path / "federation.toml"
    path.write_text(f"rounds = {HUGE_INT}\n", "utf-8")
    with pytest.raises(FederationConfigError, match=r"federation\.toml"):
        FederationConfig.from_toml(path)


def test_fixed_ledger_entry_bug_huge_integer(tmp_path: Path) -> None:
    from privacy.ledger.entries import LedgerError

    with pytest.raises(LedgerError):
        ConsortiumLedger(tmp_path / "ledger.jsonl").receive_text(f'{{"round": {HUGE_INT}}}')


def test_fixed_checkpoint_adoption_bug_huge_seed(export_dir: Path, tmp_path: Path) -> None:
    from server.checkpoints import CheckpointStore
    from shared_models.errors import EduflError
    from shared_models.models.registry import build_model

    model = build_model("lstm", SPEC.weeks, len(SPEC.dynamic), len(SPEC.static_names), {})
    manifest = {"model": "lstm", "spec_fingerprint": SPEC.fingerprint, "seed": 2**80}
    CheckpointStore(tmp_path / "run").save(1, model, manifest)
    with pytest.raises(EduflError, match="round-0001"):
        adopt_global_model(tmp_path / "run", export_dir, SPEC, tmp_path / "model")
