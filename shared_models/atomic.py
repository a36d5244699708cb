"""Write-then-rename: a file edufl writes is either the old one or the whole new one.

A crash or a full disk mid-write leaves at most a hidden temporary file, never a half-written
export, model, ledger or report.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it over ``path``.

    The temporary name keeps ``path``'s suffix, so writers that infer the format from it
    (matplotlib, pandas' Parquet) behave as they would for ``path``.
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _name_the_target(exc, tmp, path)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, "utf-8"))


def write_atomic_many(writes: Mapping[Path, Callable[[Path], object]]) -> list[Path]:
    """Write a set of files that belong together (a model's weights and card, a report).

    Every file is written to its temporary sibling first; only when all of them are complete
    are they renamed into place, in the given order. A failure while writing (a full disk, a
    plot that cannot be drawn) leaves every old file as it was and no temporary file behind.
    Only a crash in the microseconds between two renames could leave a mix; readers that
    must notice one record a hash of the other file (as `shared_models.models.artifact` does).
    """
    done: list[tuple[Path, Path]] = []
    try:
        for path, write in writes.items():
            path = Path(path)
            tmp = _temporary(path)
            done.append((tmp, path))
            write(tmp)
        for tmp, path in done:
            os.replace(tmp, path)
    except BaseException as exc:
        for tmp, path in done:
            with contextlib.suppress(OSError):
                tmp.unlink()
            _name_the_target(exc, tmp, path)
        raise
    return [path for _, path in done]


def _name_the_target(exc: BaseException, tmp: Path, path: Path) -> None:
    """A full disk is reported for the file the user asked for, not its hidden temporary."""
    if isinstance(exc, OSError) and exc.filename in (tmp, str(tmp)):
        exc.filename = str(path)


def _temporary(path: Path) -> Path:
    """A hidden sibling that keeps ``path``'s suffix (writers infer the format from it)."""
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
