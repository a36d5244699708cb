"""The one atomic writer: permissions, durability and cleanup, for one file or several."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from unittest import mock

import pytest

from shared_models.atomic import write_atomic_many, write_bytes_atomic, write_text_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_secret_is_created_private_and_never_readable_by_others(tmp_path: Path) -> None:
    seen: list[int] = []
    real_write_bytes = Path.write_bytes

    def spy(self: Path, data: bytes) -> int:
        seen.append(_mode(self))  # the temporary exists with its mode before any byte is written
        return real_write_bytes(self, data)

    old_umask = os.umask(0)  # a permissive umask must not widen the secret
    try:
        with mock.patch.object(Path, "write_bytes", spy):
            write_bytes_atomic(tmp_path / "node.key", b"secret", mode=0o600)
    finally:
        os.umask(old_umask)
    assert seen == [0o600]
    assert _mode(tmp_path / "node.key") == 0o600
    assert (tmp_path / "node.key").read_bytes() == b"secret"


def test_a_narrow_umask_does_not_narrow_a_public_file(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)
    try:
        write_text_atomic(tmp_path / "node.pub", "key", mode=0o644)
    finally:
        os.umask(old_umask)
    assert _mode(tmp_path / "node.pub") == 0o644


def test_a_durable_write_syncs_the_file_and_then_its_folder(tmp_path: Path) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    with mock.patch("os.fsync", spy):
        write_text_atomic(tmp_path / "state.json", "{}", durable=True)
    assert len(synced) == 2
    assert Path(synced[0]).name.startswith(".state.") and Path(synced[1]) == tmp_path
    assert (tmp_path / "state.json").read_text() == "{}"


def test_a_failed_group_leaves_the_old_files_and_no_temporary(tmp_path: Path) -> None:
    (tmp_path / "a.key").write_bytes(b"old")

    def full(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with pytest.raises(OSError) as caught:
        write_atomic_many(
            {tmp_path / "a.key": lambda t: t.write_bytes(b"new"), tmp_path / "b.pub": full},
            modes={tmp_path / "a.key": 0o600, tmp_path / "b.pub": 0o644},
            durable=True,
        )
    assert caught.value.filename == str(tmp_path / "b.pub")  # the file asked for, not the temp
    assert (tmp_path / "a.key").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.key"]
