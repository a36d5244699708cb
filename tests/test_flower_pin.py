"""Flower is pinned exactly, and every internal name and text edufl relies on is still there.

`client.node.flower_surface` and `server.superlink.flower_surface` list what the adapters import,
call, replace or read in Flower's log; these tests check each against the installed Flower, and
that the lists leave nothing out. A Flower upgrade that renames one fails here.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import tomllib
from pathlib import Path

import pytest

from client.node import flower_surface as node_surface
from server.superlink import flower_surface as server_surface
from shared_models.deployment import (
    FLOWER_VERSION,
    FlowerName,
    FlowerText,
    check_flower_version,
    exit_unless_pinned_flower,
)
from shared_models.processes import DeploymentError
from simulations import flower_surface as simulation_surface

ROOT = Path(__file__).resolve().parents[1]
NAMES = [*node_surface.NAMES, *server_surface.NAMES, *simulation_surface.NAMES]
TEXTS = [*node_surface.TEXTS, *server_surface.TEXTS, *simulation_surface.TEXTS]
ADAPTERS = {
    "client/node": node_surface.NAMES,
    "server/superlink": server_surface.NAMES,
    # Only ray_session.py and inline_grid.py import Flower internals there (tests/test_layers.py).
    "simulations": simulation_surface.NAMES,
}
PUBLIC = ("flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.simulation")


def _resolve(entry: FlowerName) -> object:
    value: object = importlib.import_module(entry.module)
    for part in filter(None, entry.attr.split(".")):
        value = getattr(value, part)
    return value


def test_pyproject_pins_exactly_the_release_the_start_check_wants() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    flower = [d for d in pyproject["project"]["dependencies"] if d.startswith("flwr")]
    assert flower == [f"flwr[simulation]=={FLOWER_VERSION}"]
    assert check_flower_version() == FLOWER_VERSION  # the installed one passes


@pytest.mark.parametrize("installed", ["1.42.0", "1.41.1", "1.41.0rc1", "1.41"])
def test_another_flower_is_refused_with_a_one_line_fix(installed: str) -> None:
    with pytest.raises(DeploymentError) as refused:
        check_flower_version(installed)
    message = str(refused.value)
    assert "\n" not in message
    assert f"installed Flower is {installed}" in message
    assert f"edufl needs exactly {FLOWER_VERSION}" in message
    assert f'pip install "flwr[simulation]=={FLOWER_VERSION}"' in message


def test_an_entry_point_exits_with_the_message_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from importlib import metadata

    monkeypatch.setattr(metadata, "version", lambda name: "1.42.0")
    with pytest.raises(SystemExit, match=r"^edufl: installed Flower is 1\.42\.0"):
        exit_unless_pinned_flower()


@pytest.mark.parametrize("entry", NAMES, ids=lambda e: f"{e.module}:{e.attr}")
def test_every_flower_name_edufl_uses_exists_with_the_parameters_edufl_passes(
    entry: FlowerName,
) -> None:
    value = _resolve(entry)
    if entry.params is None:
        return
    descriptor = getattr(value, "DESCRIPTOR", None)
    if descriptor is not None:  # a protobuf message: its fields are its parameters
        assert set(entry.params) <= set(descriptor.fields_by_name)
        return
    parameters = inspect.signature(value).parameters  # type: ignore[arg-type]
    names = {n for n, p in parameters.items() if n != "self"}
    assert set(entry.params) <= names, f"{entry.attr} lost {set(entry.params) - names}"
    required = {
        n
        for n, p in parameters.items()
        if n != "self"
        and p.default is inspect.Parameter.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    assert required <= set(entry.params), f"{entry.attr} now needs {required - set(entry.params)}"


@pytest.mark.parametrize("entry", TEXTS, ids=lambda e: f"{e.module}:{e.text}")
def test_every_flower_text_edufl_reads_or_replaces_is_still_in_flowers_source(
    entry: FlowerText,
) -> None:
    source = inspect.getsource(importlib.import_module(entry.module))
    assert entry.text in source


def _flower_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every ``from flwr... import name`` and ``import flwr...`` in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flwr"):
            found += [(str(node.module), alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.startswith("flwr")]
    return [(m, n) for m, n in found if not m.startswith(PUBLIC)]


@pytest.mark.parametrize("package", sorted(ADAPTERS))
def test_the_lists_name_every_flower_internal_the_adapters_import(package: str) -> None:
    listed = ADAPTERS[package]
    modules = {e.module for e in listed}
    attrs = {(e.module, e.attr.split(".")[0]) for e in listed}
    missing = [
        f"{path.name}: from {module} import {name}"
        for path in sorted((ROOT / package).glob("*.py"))
        for module, name in _flower_imports(path)
        if (module, name) not in attrs and f"{module}.{name}" not in modules
    ]
    assert missing == [], f"add these to {package}/flower_surface.py: {missing}"


def test_the_code_reads_its_flower_texts_and_names_from_the_lists() -> None:
    from client.node import launcher, pacing, warm_exec
    from server.superlink import control, retry

    assert node_surface.ACTIVATED.text == launcher._ACTIVATED
    assert launcher._FLOWER_EXIT.search("Exit Code: 305").group(1) == "305"  # type: ignore[union-attr]
    assert node_surface.RECEIVED.text.encode() == warm_exec._HINT
    assert (node_surface.PULL.attr, node_surface.PUSH.attr) == (pacing._PULL, pacing._PUSH)
    assert server_surface.ALREADY_REGISTERED.text == control._ALREADY_REGISTERED
    assert server_surface.HTTP_GRID.module == retry._HTTP_GRID
