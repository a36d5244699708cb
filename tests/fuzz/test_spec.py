"""Hostile feature specs (the consortium data contract, TOML).

Through `load_spec` (a `DataContractError` naming the file, or a spec), `edufl client spec show
--spec FILE` and `edufl client validate DIR --spec FILE`. A spec that loads must be usable: its
fingerprint computes and its TOML form loads back to the same spec.
"""

from __future__ import annotations

import tempfile
import tomllib
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared_models.data.contract import FeatureSpec, load_spec, parse_spec
from tests.fuzz.harness import call, cli, fuzz
from tests.fuzz.mutations import hostile_toml

VALID = resources.files("shared_models").joinpath("specs/default.toml").read_bytes()
VALID_DOC = tomllib.loads(VALID.decode())


@fuzz(300)
@given(data=st.data())
def test_hostile_specs_fail_with_the_file_named_or_load_consistently(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "consortium spec.toml"
        path.write_bytes(data.draw(hostile_toml(VALID, VALID_DOC), label="spec"))
        spec = call("spec TOML", lambda: load_spec(path), names=[str(path)])
        if isinstance(spec, FeatureSpec):  # accepted: it must be a coherent contract
            assert parse_spec(spec.to_toml()).fingerprint == spec.fingerprint


@fuzz(30)
@given(command=st.sampled_from(("show", "validate")), data=st.data())
def test_spec_commands_refuse_a_hostile_spec_in_one_line(
    export_dir: Path, command: str, data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.toml"
        path.write_bytes(data.draw(hostile_toml(VALID, VALID_DOC), label="spec"))
        if command == "show":
            args = ["client", "spec", "show", "--spec", str(path)]
            cli("spec TOML", args, names=[str(path)], codes=(0, 2))
        else:
            args = ["client", "validate", str(export_dir), "--spec", str(path)]
            cli("spec TOML", args, names=[str(path), str(export_dir)], codes=(0, 1, 2))


@pytest.mark.parametrize("kind", ["spec", "mapping", "rules", "key registry"])
def test_a_byte_order_mark_is_accepted_and_utf16_is_named_as_the_problem(
    tmp_path: Path, kind: str
) -> None:
    """What Windows editors write: UTF-8 with a BOM loads; UTF-16 gets "save it as UTF-8"."""
    from client.early_warning.rules import load_rules
    from privacy.audit.verify import load_keys
    from shared_models.data.mapping import load_mapping

    valid, load = {
        "spec": (VALID, load_spec),
        "mapping": (b'[columns.students]\nstudent_id = "pseudo_id"\n', load_mapping),
        "rules": (
            resources.files("client").joinpath("default_rules.toml").read_bytes(),
            load_rules,
        ),
        "key registry": (b'[institutions.uni_a]\npublic_key = "x"\n', load_keys),
    }[kind]
    path = tmp_path / f"{kind}.toml"
    path.write_bytes(b"\xef\xbb\xbf" + valid)
    if kind != "key registry":  # "x" is no key: only the encoding is checked there
        call(f"{kind} TOML (encoding)", lambda: load(path), names=[], count=False)
    path.write_bytes(valid.decode().encode("utf-16"))
    error = call(f"{kind} TOML (encoding)", lambda: load(path), names=[str(path)], count=False)
    assert isinstance(error, Exception) and "UTF-8" in str(error), error
