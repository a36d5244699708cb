"""Every `edufl` command the README and docs/ show parses: its sub-commands and options exist.

This does not run them (the deployment walk-through needs servers and nodes; tests/deploy runs
those flows for real); it catches a renamed option or command the moment the docs drift.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from simulations.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"```(?:bash|sh|console)\n(.*?)```", re.DOTALL)


def _commands(path: Path) -> list[str]:
    commands = []
    for block in _BLOCK.findall(path.read_text("utf-8")):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            for part in re.split(r"\s*(?:&&|;)\s*", line):
                if part.startswith("edufl "):
                    commands.append(part)
    return commands


CASES = [(path.name, command) for path in DOCS for command in _commands(path)]
EDUFL: click.Command = typer.main.get_command(app)


def test_the_docs_show_edufl_commands() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize(("doc", "command"), CASES, ids=[f"{d}:{c[:60]}" for d, c in CASES])
def test_documented_command_parses(doc: str, command: str) -> None:
    args = shlex.split(command, comments=True)[1:]
    cmd = EDUFL
    ctx = cmd.make_context("edufl", [], resilient_parsing=True)
    # Walk down the sub-command groups, then let click parse the leaf's own arguments.
    while isinstance(cmd, click.Group) and args and not args[0].startswith("-"):
        sub = cmd.get_command(ctx, args[0])
        assert sub is not None, f"{doc}: `{command}`: no command {args[0]!r}"
        ctx = sub.make_context(args[0], [], parent=ctx, resilient_parsing=True)
        cmd, args = sub, args[1:]
    if "--help" in args:
        return  # the command path exists; help needs no other argument
    try:
        cmd.make_context(ctx.info_name, list(args), parent=ctx.parent)
    except click.UsageError as exc:
        pytest.fail(f"{doc}: `{command}` does not parse: {exc.format_message()}")
