"""The prepared export is reused across messages until one of its files changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from client import app as node_app
from shared_models.errors import DataContractError
from shared_models.protocol import NodeConfig


@pytest.fixture(autouse=True)
def _empty_caches():
    node_app.clear_caches()
    yield
    node_app.clear_caches()


def _calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = node_app.prepare_node_data

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(node_app, "prepare_node_data", counting)
    return calls


def test_a_primed_export_is_not_read_again_until_a_file_changes(export_copy: Path, monkeypatch):
    calls = _calls(monkeypatch)
    config = NodeConfig(data_path=str(export_copy), institution="uni_north").to_node_config()
    assert node_app.prime(config)
    assert node_app.prime(config)  # after a task: nothing changed, nothing read
    assert len(calls) == 1
    own = NodeConfig.parse(config)
    first = node_app._node(own, node_app.RoundSettings())
    assert len(calls) == 1

    assert node_app._node(own, node_app.RoundSettings()) is first

    students = export_copy / "students.csv"
    text = students.read_text()
    lines = text.splitlines(keepends=True)
    students.write_text("".join(lines[:-1]))  # one student fewer: the export is now invalid
    with pytest.raises(DataContractError, match=r"is not in students\.csv"):
        node_app._node(own, node_app.RoundSettings())
    assert len(calls) == 2

    students.write_text(text)  # as before, but written again
    node_app._node(own, node_app.RoundSettings())
    assert len(calls) == 3
    (export_copy / "notes.txt").write_text("an added file is a change too")
    node_app._node(own, node_app.RoundSettings())
    assert len(calls) == 4


def test_another_seed_prepares_its_own_split(export_copy: Path, monkeypatch):
    calls = _calls(monkeypatch)
    own = NodeConfig(data_path=str(export_copy), institution="uni_north")
    node_app._node(own, node_app.RoundSettings())
    node_app._node(own, node_app.RoundSettings(seed=1))
    node_app._node(own, node_app.RoundSettings(seed=1))
    assert len(calls) == 2


def test_priming_a_broken_export_leaves_the_error_to_the_task(tmp_path: Path):
    config = NodeConfig(data_path=str(tmp_path / "missing")).to_node_config()
    assert not node_app.prime(config)
