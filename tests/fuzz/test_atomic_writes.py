"""A failed write never leaves a half-written output: write to a temporary name, then rename.

The disk "fills up" at a chosen write call, after a chosen share of that call's bytes: every
way edufl writes a user-visible file (``Path.write_text``/``write_bytes``, ``torch.save``,
matplotlib's ``savefig``) is wrapped so that the k-th call writes part of its content to the
real path and then raises ``OSError(ENOSPC)``. Whatever k, the previous outputs must be byte
for byte as they were, no temporary file may be left, and the CLI must say what happened in
one line (exit 2), not print a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import io
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import matplotlib.figure
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from server.checkpoints import CheckpointStore
from shared_models.atomic import write_atomic, write_atomic_many, write_text_atomic
from shared_models.data.contract import default_spec
from shared_models.models.artifact import load_trained, save_trained
from shared_models.models.registry import build_model
from tests.fuzz.harness import OUTPUT_KEPT, assert_unchanged, cli, digests, fuzz, record

SPEC = default_spec()


class _DiskFull:
    """Counts writes; the ``fail_at``-th writes ``share`` of its bytes, then raises ENOSPC."""

    def __init__(self, fail_at: int, share: float) -> None:
        self.fail_at, self.share, self.calls, self.failed = fail_at, share, 0, False

    def __call__(self, target: Path | str, data: bytes) -> bool:
        """True when this call must fail (after writing part of ``data`` to ``target``)."""
        self.calls += 1
        if self.calls != self.fail_at:
            return False
        with Path(target).open("wb") as fh:  # the real, unwrapped write
            fh.write(data[: int(len(data) * self.share)])
        self.failed = True
        return True


@contextlib.contextmanager
def disk_full(fail_at: int, share: float) -> Iterator[_DiskFull]:
    fault = _DiskFull(fail_at, share)
    write_text, write_bytes = Path.write_text, Path.write_bytes
    save, savefig = torch.save, matplotlib.figure.Figure.savefig

    def enospc(path: Any) -> OSError:
        return OSError(errno.ENOSPC, "No space left on device", str(path))

    def wrap(original: Callable[..., Any], encode: Callable[..., bytes]) -> Callable[..., Any]:
        def wrapper(self_or_obj: Any, target: Any, *args: Any, **kwargs: Any) -> Any:
            on_disk = isinstance(target, str | Path)  # an in-memory buffer cannot fill a disk
            if on_disk and fault(*encode(self_or_obj, target, *args, **kwargs)):
                raise enospc(target)
            return original(self_or_obj, target, *args, **kwargs)

        return wrapper

    def text(path: Path, data: str, *a: Any, **k: Any) -> tuple[Path, bytes]:
        return path, data.encode("utf-8")

    def raw(path: Path, data: bytes) -> tuple[Path, bytes]:
        return path, bytes(data)

    def tensors(obj: Any, target: Any, *a: Any, **k: Any) -> tuple[Any, bytes]:
        buffer = io.BytesIO()
        save(obj, buffer)
        return target, buffer.getvalue()

    def figure(fig: Any, target: Any, *a: Any, **k: Any) -> tuple[Any, bytes]:
        return target, b"\x89PNG\r\n\x1a\n" + b"\0" * 4096  # the start of a PNG

    def text_method(self: Path, data: str, *a: Any, **k: Any) -> Any:
        if fault(self, data.encode("utf-8")):
            raise enospc(self)
        return write_text(self, data, *a, **k)

    def bytes_method(self: Path, data: bytes) -> Any:
        if fault(self, bytes(data)):
            raise enospc(self)
        return write_bytes(self, data)

    with (
        mock.patch.object(Path, "write_text", text_method),
        mock.patch.object(Path, "write_bytes", bytes_method),
        mock.patch("torch.save", wrap(save, tensors)),
        mock.patch.object(matplotlib.figure.Figure, "savefig", wrap(savefig, figure)),
    ):
        yield fault


FAIL_AT = st.integers(1, 4)
SHARE = st.sampled_from((0.0, 0.01, 0.5, 0.99))


def _no_temporaries(*roots: Path) -> None:
    left = [p for root in roots for p in root.rglob(".*.tmp*")]
    assert not left, f"temporary files left behind: {left}"


@fuzz(40)
@given(old=st.binary(max_size=300), new=st.binary(max_size=300), fail=st.booleans(), share=SHARE)
def test_write_atomic_gives_the_old_file_or_the_whole_new_one(
    old: bytes, new: bytes, fail: bool, share: float
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.csv"
        path.write_bytes(old)

        def writer(target: Path) -> None:
            target.write_bytes(new[: int(len(new) * share)] if fail else new)
            if fail:
                raise OSError(errno.ENOSPC, "No space left on device")

        with contextlib.suppress(OSError):
            write_atomic(path, writer)
        assert path.read_bytes() == (old if fail else new)
        _no_temporaries(Path(tmp))
        record("atomic write", OUTPUT_KEPT)


@fuzz(30)
@given(fail_at=st.integers(1, 3), share=SHARE)
def test_a_group_of_files_is_replaced_all_together_or_not_at_all(
    fail_at: int, share: float
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = ("a.md", "b.json", "c.csv")
        for name in names:
            write_text_atomic(root / name, f"old {name}")
        before = digests(root)
        with disk_full(fail_at, share) as fault:
            try:
                write_atomic_many(
                    {root / n: (lambda t, n=n: t.write_text(f"new {n}", "utf-8")) for n in names}
                )
            except OSError:
                assert fault.failed
        if fault.failed:
            assert_unchanged("atomic write", before, root)
        else:
            assert {p.read_text() for p in map(root.joinpath, names)} == {f"new {n}" for n in names}
        _no_temporaries(root)


def _tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(
        "lstm", SPEC.weeks, len(SPEC.dynamic), len(SPEC.static_names), {"hidden_size": 8}
    )


@fuzz(20)
@given(fail_at=FAIL_AT, share=SHARE)
def test_saving_a_model_over_another_keeps_the_old_pair_whole(
    model_dir: Path, fail_at: int, share: float
) -> None:
    _, normalizer, _ = load_trained(model_dir, SPEC)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(shutil.copytree(model_dir, Path(tmp) / "model"))
        before = digests(out)
        model = _tiny_model(1)
        with disk_full(fail_at, share) as fault:
            try:
                save_trained(out, model, name="lstm", task="risk", spec=SPEC, normalizer=normalizer)
            except OSError:
                assert fault.failed
        if fault.failed:
            assert_unchanged("model folder (write)", before, out)
        load_trained(out, SPEC)  # old or new, the folder holds a loadable model
        _no_temporaries(out)


@fuzz(20)
@given(fail_at=FAIL_AT, share=SHARE)
def test_a_checkpoint_interrupted_by_a_full_disk_leaves_the_last_round_committed(
    fail_at: int, share: float
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        store = CheckpointStore(run)
        state = {"m": np.zeros(4, np.float32)}
        store.save(1, _tiny_model(0), {"model": "lstm"}, state=state, metrics_record={"round": 1})
        committed = digests(run)
        with disk_full(fail_at, share) as fault:
            try:
                store.save(
                    2, _tiny_model(1), {"model": "lstm"}, state=state, metrics_record={"round": 2}
                )
            except OSError:
                assert fault.failed
        last = store.latest()
        assert last is not None
        store.load(last, _tiny_model(2))  # whatever round is committed loads
        if fault.failed:
            assert last.round == 1
            now = digests(run)
            kept = {p: d for p, d in now.items() if p in committed and "round-0001" in p}
            assert kept == {p: d for p, d in committed.items() if "round-0001" in p}
            assert store.trim_metrics(1) in (0, 1)  # a line of the uncommitted round may remain
            record("checkpoint (write)", OUTPUT_KEPT)
        _no_temporaries(run)


@fuzz(4)
@given(fail_at=st.integers(1, 3), share=SHARE)
def test_audit_budget_on_a_full_disk_keeps_the_previous_report(
    ledger_path: Path, fail_at: int, share: float
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Path(tmp) / "ledger.jsonl"  # one entry: the audit's accountant is not cheap
        ledger.write_bytes(ledger_path.read_bytes().splitlines(keepends=True)[0])
        out = Path(tmp) / "audit"
        out.mkdir()
        for name in ("budget.md", "budget.json", "epsilon.png"):
            (out / name).write_text(f"last audit's {name}", "utf-8")
        before = digests(out)
        with disk_full(fail_at, share) as fault:
            # One entry, without its registry or heads: verified for consistency only.
            args = ["audit", "budget", str(ledger), "--out", str(out), "--unauthenticated"]
            result = cli("ledger (write)", args, names=[str(out)], codes=(0, 2))
        if fault.failed:
            assert result.exit_code == 2 and "No space left on device" in result.output
            assert_unchanged("ledger (write)", before, out)
        _no_temporaries(out)


@pytest.mark.parametrize(
    "fail_at",
    [
        1,  # students.csv
        2,  # report.html (both are renamed only once both are complete)
    ],
)
def test_the_advisor_report_on_a_full_disk_keeps_the_previous_report(
    export_dir: Path, model_dir: Path, tmp_path: Path, fail_at: int
) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.html").write_text("<p>last week's report</p>", "utf-8")
    (out / "students.csv").write_text("student_id,tier\ns1,high\n", "utf-8")
    before = digests(out)
    args = ["client", "report", "--data", str(export_dir), "--model", str(model_dir)]
    with disk_full(fail_at, 0.5) as fault:
        result = cli(
            "advisor report (write)", [*args, "--out", str(out)], names=[str(out)], count=False
        )
    assert fault.failed and result.exit_code == 2
    assert "No space left on device" in result.output
    assert digests(out) == before, "a failed report changed the previous one"
    record("advisor report (write)", OUTPUT_KEPT)
    _no_temporaries(out)
