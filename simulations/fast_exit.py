"""Leave the process without tearing down every module: seconds saved after torch, Ray, pandas.

At exit Python waits for non-daemon threads, runs the ``atexit`` handlers (Ray's shutdown,
logging's flush, ``weakref.finalize`` callbacks such as a ``TemporaryDirectory``'s cleanup),
flushes stdout and stderr, and then finalizes every module and collects the garbage. That last
step took 2.5 s after a simulation on a quiet two-core machine and 11-21 s under load
(docs/benchmarks.md, "interpreter exit"), for nothing: edufl writes every file atomically and
closes it, and Ray is shut down by the simulation's session. `exit_process` does the first three
steps and then ends the process.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn

#: Modules whose teardown is slow; a process that loaded none of them exits the usual way.
HEAVY_MODULES = ("torch", "ray", "pandas")


def exit_process(code: int | str | None) -> NoReturn:
    """Exit with ``code`` (as `sys.exit` reads it), skipping module teardown where it is safe.

    The usual exit runs instead when no heavy module is loaded (nothing to save) or when a
    non-daemon thread is still running (Python would wait for it; so does this).
    """
    heavy = any(name in sys.modules for name in HEAVY_MODULES)
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if not heavy or any(t.is_alive() and not t.daemon for t in others):
        sys.exit(code)
    status = _status(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe: nothing left to say
            stream.flush()
    os._exit(status)


def _status(code: int | str | None) -> int:
    """The exit status `sys.exit(code)` would give (a message goes to stderr, status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
