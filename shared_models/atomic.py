"""Write-then-rename: a file edufl writes is either the old one or the whole new one.

A crash or a full disk mid-write leaves at most a hidden temporary file, never a half-written
export, model, ledger or report.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it over ``path``.

    The temporary name keeps ``path``'s suffix, so writers that infer the format from it
    (matplotlib, pandas' Parquet) behave as they would for ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, "utf-8"))
