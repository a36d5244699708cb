"""Where Flower's internals may be used: only in the adapters (two packages and the Ray session).

import-linter (`lint-imports`, contracts in pyproject.toml) checks the layers and cycles; it
cannot tell Flower's public API (``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp``,
``flwr.simulation``) from its internals, since it sees an external package as one module. So a
Flower upgrade that moves an internal name breaks only those adapters.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared_models", "privacy", "client", "server", "simulations")
PUBLIC = ("flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.simulation")
#: The Ray session (one Ray start for many simulations) lends Flower's Ray backend its actors;
#: the inline engine sets the ServerApp's process identity as Flower's simulation does: their
#: names are listed in simulations/flower_surface.py and pinned like the packages'.
ADAPTERS = (
    Path("client/node"),
    Path("server/superlink"),
    Path("simulations/ray_session.py"),
    Path("simulations/inline_grid.py"),
)


def _flower_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n == "flwr" or n.startswith("flwr.")]
    return found


def _is_public(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in PUBLIC)


def test_flower_internals_are_used_only_in_the_adapter_packages() -> None:
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if any(relative.is_relative_to(adapter) for adapter in ADAPTERS):
                continue
            offenders += [
                f"{relative}:{line} imports {module}"
                for line, module in _flower_imports(path)
                if not _is_public(module)
            ]
    assert offenders == [], "\n".join(offenders)


def test_the_adapter_packages_do_use_flower_internals() -> None:
    """The check above is not vacuous: the adapters are where the internals are."""
    used = {
        module
        for adapter in ADAPTERS
        for path in (ROOT / adapter).rglob("*.py")
        for _, module in _flower_imports(path)
        if not _is_public(module)
    }
    assert any(m.startswith("flwr.supernode") for m in used)
    assert any(m.startswith("flwr.superlink") for m in used)
