"""Write-then-rename: a file edufl writes is either the old one or the whole new one.

The one writer behind every file edufl writes in place (exports, models, checkpoints, keys,
accountant state, reports). A crash or a full disk mid-write leaves at most a hidden temporary
file next to the target, never a half-written one, and a failed write removes that temporary.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path


def write_atomic(
    path: Path, write: Callable[[Path], object], *, mode: int | None = None, durable: bool = False
) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it over ``path``.

    The temporary name keeps ``path``'s suffix, so writers that infer the format from it
    (matplotlib, pandas' Parquet) behave as they would for ``path``.

    Args:
        path: the file to replace or create.
        write: writes the whole content to the path it is given.
        mode: permissions of the new file; it is created with them before ``write`` runs, so a
            secret (0o600) is never readable by others, not even for a moment.
        durable: fsync the file before the rename and its folder after it, so the new content
            survives a power cut once this returns (privacy state, keys).
    """
    modes = {path: mode} if mode is not None else None
    return write_atomic_many({path: write}, modes=modes, durable=durable)[0]


def write_text_atomic(
    path: Path, text: str, *, mode: int | None = None, durable: bool = False
) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (``mode``, ``durable``: see `write_atomic`)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, "utf-8"), mode=mode, durable=durable)


def write_bytes_atomic(
    path: Path, data: bytes, *, mode: int | None = None, durable: bool = False
) -> Path:
    """Write ``data`` to ``path`` atomically (``mode`` and ``durable`` as in `write_atomic`)."""
    return write_atomic(path, lambda tmp: tmp.write_bytes(data), mode=mode, durable=durable)


def write_atomic_many(
    writes: Mapping[Path, Callable[[Path], object]],
    *,
    modes: Mapping[Path, int] | None = None,
    durable: bool = False,
) -> list[Path]:
    """Write a set of files that belong together (a model's weights and card, a report).

    Every file is written to its temporary sibling first; only when all of them are complete
    are they renamed into place, in the given order. A failure while writing (a full disk, a
    plot that cannot be drawn) leaves every old file as it was and no temporary file behind.
    Only a crash in the microseconds between two renames could leave a mix; readers that
    must notice one record a hash of the other file (as `shared_models.models.artifact` does).

    Args:
        writes: each target path and the function that writes its content to a given path.
        modes: permissions of some of the files (see `write_atomic`).
        durable: see `write_atomic`.
    """
    modes = {Path(p): m for p, m in (modes or {}).items()}
    done: list[tuple[Path, Path]] = []
    try:
        for path, write in writes.items():
            path = Path(path)
            tmp = _temporary(path)
            done.append((tmp, path))
            if path in modes:
                _create(tmp, modes[path])
            write(tmp)
            if path in modes:
                os.chmod(tmp, modes[path])  # the umask may have narrowed it; never widens a secret
            if durable:
                _fsync(tmp)
        for tmp, path in done:
            os.replace(tmp, path)
    except BaseException as exc:
        for tmp, path in done:
            with contextlib.suppress(OSError):
                tmp.unlink()
            _name_the_target(exc, tmp, path)
        raise
    if durable:  # the renames themselves: entries of the folders
        for folder in dict.fromkeys(path.parent for _, path in done):
            _fsync(folder)
    return [path for _, path in done]


def _create(tmp: Path, mode: int) -> None:
    """Create ``tmp`` empty with ``mode``: a writer opening it later truncates, keeps the mode."""
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by a crashed writer of the same pid: its mode is not ours to keep
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's) data to disk, whoever wrote it and through which handle."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _name_the_target(exc: BaseException, tmp: Path, path: Path) -> None:
    """A full disk is reported for the file the user asked for, not its hidden temporary."""
    if isinstance(exc, OSError) and exc.filename in (tmp, str(tmp)):
        exc.filename = str(path)


def _temporary(path: Path) -> Path:
    """A hidden sibling that keeps ``path``'s suffix (writers infer the format from it)."""
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
