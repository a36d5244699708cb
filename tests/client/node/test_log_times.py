"""``EDUFL_NODE_LOG_TIMES=1`` puts the time on every line of a node's log; unset, nothing."""

from __future__ import annotations

import logging
import re

import pytest

from client.node import log_times


def _line(record_text: str = "task 7: ClientApp done in 0.10 s") -> str:
    record = logging.LogRecord("edufl", logging.INFO, __file__, 1, record_text, None, None)
    return log_times.formatter().format(record)


def test_off_by_default_and_lines_keep_their_format(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(log_times.ENV, raising=False)
    assert not log_times.enabled()
    assert _line() == "INFO    :      task 7: ClientApp done in 0.10 s"
    monkeypatch.setenv(log_times.ENV, "yes")  # only "1" turns it on
    assert not log_times.enabled()


def test_on_every_edufl_and_flower_line_is_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.logger import FLOWER_LOGGER, ConsoleHandler

    monkeypatch.setenv(log_times.ENV, "1")
    assert re.fullmatch(r"INFO     \d\d:\d\d:\d\d\.\d{3}:      task 7: .*", _line())
    # the bench's pattern still finds the task's duration in a timed line
    assert re.search(r"task \d+: ClientApp done in ([\d.]+) s", _line())
    handlers = [h for h in FLOWER_LOGGER.handlers if isinstance(h, ConsoleHandler)]
    assert handlers
    before = [h.timestamps for h in handlers]
    try:
        log_times.time_flower_lines()
        assert all(h.timestamps for h in handlers)
    finally:
        for handler, timestamps in zip(handlers, before, strict=True):
            handler.timestamps = timestamps
