"""The `deployment` fixture: real processes on loopback, all stopped by pid afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.harness import Deployment, deployment_fixture


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    yield from deployment_fixture(tmp_path)
