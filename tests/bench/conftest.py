"""Shared by the benchmark tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _script_settings_stay_in_the_script() -> Iterator[None]:
    """A benchmark's ``main`` quiets the root, ``flwr`` and ``edufl`` loggers and sets torch's
    threads, as a script may; the tests after these must not inherit that."""
    import torch

    loggers = [logging.getLogger(name) for name in ("", "flwr", "edufl")]
    levels, threads = [lg.level for lg in loggers], torch.get_num_threads()
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)
    torch.set_num_threads(threads)
