"""What every fuzz test asserts about one hostile input, and the tally the lead cites.

A hostile input passes when edufl either accepts it or refuses it with a domain error
(`EduflError`) whose message names the file; through the CLI, when the exit code is a
documented one, the output holds no ``Traceback`` and the error line names the file. Anything
else is counted as a traceback and fails the test with the full exception.

``EDUFL_FUZZ_SCALE`` multiplies every test's number of examples (``scripts/fuzz_report.py``
runs the suite with a larger scale); generation is derandomized and uses no example database,
so a run is reproducible on any machine.
"""

from __future__ import annotations

import hashlib
import os
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, settings

from shared_models.errors import EduflError

T = TypeVar("T")

SCALE = float(os.environ.get("EDUFL_FUZZ_SCALE", "1"))

#: (file kind, outcome) -> count; read by conftest's summary and scripts/fuzz_report.py.
#: Each hostile input is tallied once, with the first of: accepted (loaded, or a library call
#: returned its report), refused (a domain error / exit 2), exit 1 (validate: not usable;
#: audit: tampered), traceback, known (a reported bug in a file this suite may not fix).
#: Independently, every check that a failed command left its outputs alone is tallied as
#: kept or half-written.
TALLY: Counter[tuple[str, str]] = Counter()

ACCEPTED = "accepted"
REFUSED = "refused with a clear error"
FAILED_CHECK = "checked: not usable / tampered (exit 1)"
TRACEBACK = "traceback"
KNOWN = "known bug outside the fixed files (reported)"
HALF_WRITTEN = "half-written output"
OUTPUT_KEPT = "outputs intact after failure"


def fuzz(max_examples: int) -> settings:
    """Hypothesis settings for a fuzz test: reproducible, no deadline, scaled by the env."""
    return settings(
        max_examples=max(1, round(max_examples * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


def record(kind: str, outcome: str) -> None:
    TALLY[(kind, outcome)] += 1


class Traceback(AssertionError):
    """A hostile input escaped as something other than a domain error."""


def _fail(kind: str, what: str, exc: BaseException) -> Traceback:
    record(kind, TRACEBACK)
    text = "".join(traceback.format_exception(exc))
    return Traceback(f"[{kind}] {what} raised {type(exc).__name__}: {exc}\n{text}")


def raised_in(*places: str) -> Callable[[BaseException], bool]:
    """A ``known`` predicate: the innermost project frame is in one of ``places``.

    ``places`` are folders or files relative to the repository (``"simulations"``,
    ``"server/config.py"``). For bugs in files this suite's author may not change: they are
    tallied apart (and reported) instead of failing the suite; a bug elsewhere still fails it.
    """
    root = Path(__file__).resolve().parents[2]

    def known(exc: BaseException) -> bool:
        frames = [
            Path(f.filename).relative_to(root).as_posix()
            for f in traceback.extract_tb(exc.__traceback__)
            if Path(f.filename).is_relative_to(root)
            and not Path(f.filename).relative_to(root).as_posix().startswith("tests/")
        ]
        return bool(frames) and any(
            frames[-1] == p or frames[-1].startswith(p.rstrip("/") + "/") for p in places
        )

    return known


def call(
    kind: str,
    fn: Callable[[], T],
    *,
    names: Iterable[str],
    count: bool = True,
    known: Callable[[BaseException], bool] | None = None,
) -> T | EduflError | None:
    """Run a library entry point; returns its result or the domain error it raised.

    Args:
        names: strings one of which the error message must contain (the file's name).
        count: tally this as a hostile input tried (False for a second look at the same one).
        known: recognises an already-reported bug in a file this suite may not fix: tallied
            as `KNOWN` (and None returned) instead of failing.
    """
    try:
        result = fn()
    except EduflError as exc:
        message = str(exc)
        assert message.strip(), f"[{kind}] {type(exc).__name__} without a message"
        assert any(n in message for n in names), (
            f"[{kind}] error does not name the file ({list(names)}): {message}"
        )
        if count:
            record(kind, REFUSED)
        return exc
    except Exception as exc:
        if known is not None and known(exc):
            record(kind, KNOWN)
            return None
        raise _fail(kind, getattr(fn, "__name__", "call"), exc) from exc
    if count:
        record(kind, ACCEPTED)
    return result


_RUNNER = CliRunner()
_COMMAND: list[click.Command] = []


def _command() -> click.Command:
    """The `edufl` click command, built once (typer rebuilds it on every invoke: ~35 ms)."""
    if not _COMMAND:
        import typer

        from simulations.cli import app

        _COMMAND.append(typer.main.get_command(app))
    return _COMMAND[0]


def cli(
    kind: str,
    args: list[str],
    *,
    names: Iterable[str],
    codes: tuple[int, ...] = (0, 2),
    env: dict[str, str] | None = None,
    count: bool = True,
) -> Result:
    """Invoke ``edufl ARGS`` in-process and check the user sees no traceback.

    Args:
        names: strings one of which a failing command's output must contain.
        codes: the documented exit codes for this command (2: user error; 1: checked, failed).
        count: tally this as a hostile input tried (False for a second look at the same one).
    """
    result = _RUNNER.invoke(_command(), args, prog_name="edufl", env=env)
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        raise _fail(kind, f"edufl {' '.join(args)}", exc)
    output = result.output
    if "Traceback" in output:
        record(kind, TRACEBACK)
        raise Traceback(f"[{kind}] edufl {' '.join(args)} printed a traceback:\n{output}")
    assert result.exit_code in codes, (
        f"[{kind}] edufl {' '.join(args)} exited {result.exit_code}, expected one of {codes}:\n"
        f"{output[-2000:]}"
    )
    if result.exit_code == 0:
        if count:
            record(kind, ACCEPTED)
        return result
    names = list(names)
    assert any(n in output for n in names), (
        f"[{kind}] the message does not name the file ({names}):\n{output[-2000:]}"
    )
    if result.exit_code == 2:
        assert "error: " in output, f"[{kind}] exit 2 without an 'error:' line:\n{output}"
    if count:
        record(kind, REFUSED if result.exit_code == 2 else FAILED_CHECK)
    return result


def digests(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under ``roots`` (hidden temporary files included)."""
    out: dict[str, str] = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_unchanged(kind: str, before: dict[str, str], *roots: Path) -> None:
    """The outputs are byte for byte what they were, and no temporary file was left."""
    after = digests(*roots)
    if after != before:
        record(kind, HALF_WRITTEN)
        changed = sorted(set(before.items()) ^ set(after.items()))
        raise AssertionError(f"[{kind}] a failed command changed its outputs: {changed}")
    record(kind, OUTPUT_KEPT)


def summary_rows() -> list[dict[str, Any]]:
    """One row per file kind: inputs tried and each outcome's count."""
    kinds = sorted({k for k, _ in TALLY})
    rows = []
    for kind in kinds:
        counts = {o: n for (k, o), n in TALLY.items() if k == kind}
        tried = sum(n for o, n in counts.items() if o != OUTPUT_KEPT and o != HALF_WRITTEN)
        rows.append(
            {
                "kind": kind,
                "tried": tried,
                "accepted": counts.get(ACCEPTED, 0),
                "refused": counts.get(REFUSED, 0),
                "exit1": counts.get(FAILED_CHECK, 0),
                "tracebacks": counts.get(TRACEBACK, 0),
                "known_reported": counts.get(KNOWN, 0),
                "outputs_checked": counts.get(OUTPUT_KEPT, 0) + counts.get(HALF_WRITTEN, 0),
                "half_written": counts.get(HALF_WRITTEN, 0),
            }
        )
    return rows


_COLUMNS = (
    ("tried", "tried"),
    ("accepted", "accepted"),
    ("refused", "refused"),
    ("exit1", "exit 1"),
    ("tracebacks", "tracebacks"),
    ("known_reported", "known, reported"),
    ("outputs_checked", "outputs checked"),
    ("half_written", "half-written"),
)


def render_table(rows: list[dict[str, Any]]) -> str:
    """Kinds x outcomes; ``refused`` = a clear domain error (exit 2 through the CLI)."""

    def line(name: str, values: dict[str, Any]) -> str:
        cells = " ".join(f"{values[key]:>{len(title)}}" for key, title in _COLUMNS)
        return f"{name:<27} {cells}"

    header = f"{'file kind':<27} " + " ".join(title for _, title in _COLUMNS)
    lines = [header, "-" * len(header), *(line(r["kind"], r) for r in rows)]
    if rows:
        total = {key: sum(r[key] for r in rows) for key, _ in _COLUMNS}
        lines += ["-" * len(header), line("total", total)]
    return "\n".join(lines)
