"""Leaving the process without module teardown keeps what Python's exit guarantees."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(body: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(
        """
        import atexit, sys, threading, time, types
        from pathlib import Path
        from simulations.fast_exit import exit_process

        out = Path(sys.argv[1])
        sys.modules.setdefault("torch", types.ModuleType("torch"))  # "heavy" without the wait
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        print("unflushed output", end="")
        """
    ) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_exit_keeps_the_status_the_atexit_handlers_and_the_buffered_output(
    tmp_path: Path,
) -> None:
    proc = _run("exit_process(3)\n", tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "unflushed output"
    assert (tmp_path / "atexit").read_text() == "ran"


def test_a_message_exits_with_status_one_on_stderr(tmp_path: Path) -> None:
    proc = _run("exit_process('no such export')\n", tmp_path)
    assert proc.returncode == 1 and "no such export" in proc.stderr


def test_a_running_non_daemon_thread_is_waited_for(tmp_path: Path) -> None:
    body = """
        def late():
            time.sleep(1.0)
            (out / "thread").write_text("done")
        threading.Thread(target=late).start()
        exit_process(0)
    """
    proc = _run(body, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"


def test_the_edufl_command_exits_with_its_status_through_main() -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "Run a federated simulation" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "run", "--out", "x"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "either --data DIR" in bad.stderr
