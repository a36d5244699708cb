"""The paced SuperNode loop: Flower's own loop, asking sooner after a message."""

from __future__ import annotations

import inspect
import itertools
import logging
import time
import types

import pytest

from client.node import pacing as supernode_pace
from client.node.pacing import FLOWER_IDLE_S, Pace, PacedClock, install


def test_pace_asks_soon_after_a_message_then_backs_off_to_flowers_three_seconds() -> None:
    pace = Pace(first=0.25, growth=1.25, flat=0)
    waits = [pace.next_wait() for _ in range(20)]
    assert waits[0] == 0.25
    assert all(b >= a for a, b in itertools.pairwise(waits))
    assert waits[-1] == FLOWER_IDLE_S
    assert sum(w < FLOWER_IDLE_S for w in waits) == 12  # about 10 s of quicker pulls
    pace.busy()
    assert pace.next_wait() == 0.25


def test_pace_keeps_its_first_interval_for_the_flat_window_after_each_message() -> None:
    now = [0.0]
    pace = Pace(first=0.25, growth=1.25, flat=2.5, clock=lambda: now[0])

    def waits_until(end: float) -> list[float]:
        out = []
        while now[0] < end:
            out.append(pace.next_wait())
            now[0] += out[-1]
        return out

    flat = waits_until(2.5)
    assert flat == [0.25] * 10  # the next round's message, 0.5-2 s away, is seen <= 0.25 s late
    later = waits_until(60.0)
    assert later[:3] == [0.25, 0.3125, 0.390625]  # then backing off as before
    assert later[-1] == FLOWER_IDLE_S  # an idle node asks at Flower's pace
    pace.busy()
    assert waits_until(now[0] + 2.5) == [0.25] * 10


def test_pace_refuses_a_negative_flat_window() -> None:
    with pytest.raises(ValueError, match="flat window"):
        Pace(flat=-1)


@pytest.mark.parametrize("first", [0, -1, 3.5])
def test_pace_refuses_an_interval_outside_what_flower_would_do(first: float) -> None:
    with pytest.raises(ValueError, match="pull interval"):
        Pace(first=first)


def _fake_loop(pulls: list[int | None]) -> types.ModuleType:
    """A stand-in for flwr.supernode.start_client_internal, with its loop's shape."""
    loop = types.ModuleType("fake_start_client_internal")
    loop.time = time  # type: ignore[attr-defined]
    loop._pull_and_store_message = lambda **_: pulls.pop(0)  # type: ignore[attr-defined]
    loop._push_messages = lambda **_: None  # type: ignore[attr-defined]

    def run() -> None:  # Flower 1.41's loop, minus the connection
        while pulls:
            if loop._pull_and_store_message() is None:  # type: ignore[attr-defined]
                loop.time.sleep(3)  # type: ignore[attr-defined]
                continue
            loop._push_messages()  # type: ignore[attr-defined]

    loop.run = run  # type: ignore[attr-defined]
    return loop


def test_installed_loop_waits_less_after_each_message(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(supernode_pace.time, "sleep", slept.append)
    loop = _fake_loop([None, None, None, 7, None, None])
    assert install(loop, Pace(first=0.25, growth=2.0, flat=0))
    loop.run()  # type: ignore[attr-defined]
    # three empty pulls back off, the message (and its reply) resets the pace
    assert slept == [0.25, 0.5, 1.0, 0.25, 0.5]


def test_only_the_loops_fixed_sleeps_change(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(supernode_pace.time, "sleep", slept.append)
    clock = PacedClock(Pace(first=0.25), reply_check=0.05)
    clock.sleep(3)
    clock.sleep(0.5)  # the reply check
    clock.sleep(1.7)  # any other sleep is kept
    assert slept == [0.25, 0.05, 1.7]
    assert clock.monotonic is time.monotonic  # the rest of `time` is the real module


def test_a_loop_of_another_shape_runs_at_flowers_pace(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=supernode_pace.logger.name)
    loop = types.ModuleType("other_release")
    loop.time = time  # type: ignore[attr-defined]
    assert not install(loop, Pace())
    assert loop.time is time  # type: ignore[attr-defined]
    assert "Flower's own pace" in caplog.text


def test_the_pin_still_has_the_loop_that_is_paced() -> None:
    """A Flower upgrade that changes the SuperNode's loop must be noticed, not silently unpaced."""
    from flwr.supernode import start_client_internal as real

    loop = types.ModuleType("copy")
    loop.__dict__.update(
        {k: getattr(real, k) for k in ("time", "_pull_and_store_message", "_push_messages")}
    )
    assert install(loop, Pace())
    assert "time.sleep(3)" in inspect.getsource(real.start_client_internal)
    assert "time.sleep(0.5)" in inspect.getsource(real._push_messages)


def test_command_line_needs_the_supernode_command_and_a_sane_interval() -> None:
    with pytest.raises(SystemExit, match="after --"):
        supernode_pace.main(["--pull-interval", "0.25"])
    with pytest.raises(SystemExit, match="--pull-interval"):
        supernode_pace.main(["--pull-interval", "9", "--", "flower-supernode", "--insecure"])


def test_the_paced_node_prints_flowers_lines_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its own lines get a handler of their own; none goes on the root logger, where Flower's
    lines (which propagate) would be printed a second time, debug lines included."""
    monkeypatch.setattr(supernode_pace.logger, "handlers", [])
    monkeypatch.setattr(supernode_pace.logger, "propagate", True)
    root = logging.getLogger()
    before = list(root.handlers)
    supernode_pace._log_own_lines()
    supernode_pace._log_own_lines()  # once is enough
    assert root.handlers == before
    assert len(supernode_pace.logger.handlers) == 1
    assert not supernode_pace.logger.propagate
