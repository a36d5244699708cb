"""Cheap identities of files on disk: has an export changed since it was last read?

A stamp is what `os.stat` says of each file (size, modification time, inode, status-change
time), a few microseconds per file where hashing the contents would read the whole export. Any
write moves a file's status-change time (ctime, in ns), which, unlike the modification time, no
tool can set back, so a changed, added, removed, renamed or replaced file changes the stamp.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def export_stamp(folder: Path) -> tuple[Any, ...]:
    """Every file under ``folder`` (the tables, a mapping file): name and `file_stamp`.

    An unreadable folder gets a stamp equal to no other: whatever holds it reads it again.
    """
    try:
        return tuple(
            (str(f.relative_to(folder)), *file_stamp(f))
            for f in sorted(folder.rglob("*"))
            if f.is_file()
        )
    except OSError:
        return (("<unreadable>", time.monotonic_ns()),)  # never equal: read it again


def file_stamp(path: Path) -> tuple[int, int, int, int]:
    """Size, modification time, inode and status-change time of ``path`` (ns).

    A missing or unreadable file gets a stamp equal to no other.
    """
    try:
        st = path.stat()
    except OSError:
        return (-1, -1, -1, time.monotonic_ns())  # never equal: read it again
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
