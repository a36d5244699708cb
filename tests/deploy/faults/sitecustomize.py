"""Test-only fault injection: turns a real node's ClientApp into a misbehaving one.

Never installed: a fault test puts this folder on the node's PYTHONPATH, so Python imports it at
start-up in every process of that node (the SuperNode and each ClientApp), and sets
``EDUFL_FAULT`` to what the node's train replies should carry instead of its honest weights:

- ``nan``: one weight is NaN;
- ``shape``: the first array is flattened (wrong shape);
- ``scale``: every weight multiplied by 1000 (a model-replacement attack);
- ``replay``: from round 2 on, the update it sent in round 1 (kept in ``EDUFL_FAULT_STATE``);
- ``slow-evaluate``: honest, but each evaluation takes 15 s longer (a window to crash in);
- ``hold-train``: honest, but a train reply of round N waits, after training, until the file
  ``EDUFL_FAULT_STATE``/release-round-N exists, and first writes ``EDUFL_FAULT_STATE``/held-round-N
  (a round a test can hold and watch; it creates release-round-N beforehand to let round N pass).

It wraps ``client.app.named_weights`` (``hold-train``: ``client.app._reply``) once
``client.app`` is imported; everything else (the data, DP-SGD, the signed ledger entry, the
transport) stays real.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

FAULT = os.environ.get("EDUFL_FAULT", "")


def _corrupt(module: Any) -> None:
    import numpy as np

    honest = module.named_weights
    saved = Path(os.environ.get("EDUFL_FAULT_STATE", "fault-replay.npz"))

    def named_weights(model: Any) -> dict[str, Any]:
        weights = {k: np.array(v, copy=True) for k, v in honest(model).items()}
        first = next(iter(weights))
        if FAULT == "nan":
            weights[first].flat[0] = np.nan
        elif FAULT == "shape":
            weights[first] = weights[first].reshape(-1)
        elif FAULT == "scale":
            weights = {k: v * 1000.0 for k, v in weights.items()}
        elif FAULT == "replay":
            if saved.exists():
                with np.load(saved, allow_pickle=False) as old:
                    return {k: old[k] for k in old.files}
            np.savez(saved, **weights)
        return weights

    if FAULT == "hold-train":
        import time

        reply = module._reply
        state = Path(os.environ["EDUFL_FAULT_STATE"])

        def held_reply(msg: Any, *args: Any, **kwargs: Any) -> Any:
            server_round = module.RoundSettings.from_config(module._config(msg)).server_round
            release = state / f"release-round-{server_round}"
            if msg.metadata.message_type == "train" and not release.exists():
                state.mkdir(parents=True, exist_ok=True)
                (state / f"held-round-{server_round}").touch()
                deadline = time.monotonic() + 150
                while not release.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
            return reply(msg, *args, **kwargs)

        module._reply = held_reply
    elif FAULT == "slow-evaluate":
        import time

        evaluate = module.local_evaluate

        def slow_evaluate(*args: Any, **kwargs: Any) -> Any:
            time.sleep(15)
            return evaluate(*args, **kwargs)

        module.local_evaluate = slow_evaluate
    else:
        module.named_weights = named_weights


class _PatchClientApp(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "client.app":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            load(module)
            _corrupt(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if FAULT:
    sys.meta_path.insert(0, _PatchClientApp())
