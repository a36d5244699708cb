"""A Flower grid that runs the real ClientApp in-process, and helpers to build real messages.

Flower's own grids need a SuperLink or the Ray engine; this one hands each message straight to
``client.app.app`` with a per-node ``Context``, as a SuperNode would, and turns an exception
into an error reply, as Flower does. The end-to-end Ray and CLI runs are in tests/simulations.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

import client.app
from shared_models.protocol import NodeConfig


class InProcessGrid(Grid):
    """Nodes ``1..n`` each serving one export; ``crash_at`` simulates a SuperLink crash."""

    def __init__(
        self,
        data_paths: list[Path],
        *,
        failing: set[int] | None = None,
        crash_at: Callable[[Message], bool] | None = None,
    ) -> None:
        self.contexts = {
            i + 1: Context(
                run_id=1,
                node_id=i + 1,
                node_config=NodeConfig(data_path=str(p)).to_node_config(),
                state=RecordDict(),
                run_config={},
            )
            for i, p in enumerate(data_paths)
        }
        self.failing = failing or set()
        self.crash_at = crash_at
        self.sent: list[Message] = []

    def set_run(self, run: object) -> None:  # pragma: no cover - not used by the loop
        raise NotImplementedError

    @property
    def run(self) -> object:  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            if self.crash_at is not None and self.crash_at(msg):
                raise RuntimeError("SuperLink crashed")
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            try:
                if node in self.failing:
                    raise OSError(f"node {node} lost its disk")
                replies.append(client.app.app(msg, self.contexts[node]))
            except Exception as exc:  # Flower turns any ClientApp exception into an error reply
                replies.append(Message(Error(code=0, reason=f"{exc!r}"), reply_to=msg))
        return replies


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread; more only contend on a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def exports(consortium_dir: Path) -> list[Path]:
    """Three institutions' exports of the shared synthetic consortium."""
    return [consortium_dir / f"institution_0{i}" for i in (1, 2, 3)]


@pytest.fixture
def flower_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process identity Flower's runtime sets before a ServerApp creates messages."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def reply(
    node_id: int,
    arrays: dict[str, np.ndarray] | None,
    *,
    num_examples: float = 10,
    institution: str = "",
    metrics: dict[str, float] | None = None,
    message_type: str = "train",
) -> Message:
    """A node's reply as the server receives it (metadata as Flower fills it)."""
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    content["metrics"] = MetricRecord({"num-examples": num_examples, **(metrics or {"loss": 0.5})})
    if institution:
        content["node"] = ConfigRecord({"institution": institution})
    metadata = Metadata(
        run_id=1,
        message_id=f"reply-{node_id}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id=f"msg-{node_id}",
        group_id="1",
        created_at=time.time(),
        ttl=3600,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)
