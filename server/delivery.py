"""Delivering the final global model to every node after the last round.

The deployment's ServerApp (`server.app`) calls `deliver_final_model` once the run's last round
is committed. Every connected node gets one ``query`` message: the final checkpoint's weights
and what they are (`shared_models.protocol.Delivery`: model, task, seed, spec fingerprint, run
id, round and the weights' SHA-256). Each node verifies it against its own spec and ledger and
adopts it into its home (`client.app.deliver`), then acknowledges with a yes/no and the
checksum. The server logs which institutions adopted it and writes ``delivery.json`` to the run
folder. A node that refused keeps its previous model; it (or one that was offline) can adopt the
run's result by hand with ``edufl client adopt RUN_DIR --data EXPORT``.

Simulations skip it: their virtual nodes share one machine and have no home of their own; the
run folder holds the model (``edufl client adopt RUN_DIR`` or ``--model RUN_DIR``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from server.checkpoints import CheckpointStore
from server.superlink.retry import exchange
from shared_models.atomic import write_text_atomic
from shared_models.data.contract import FeatureSpec
from shared_models.models.checkpoints import checkpoint_model
from shared_models.models.weights import named_weights
from shared_models.protocol import (
    ARRAYS_RECORD,
    DELIVERY_RECORD,
    Delivery,
    RoundSettings,
    read_acknowledgement,
    weights_sha256,
)

logger = logging.getLogger(__name__)

DELIVERY_FILE = "delivery.json"


@dataclass(frozen=True)
class DeliveryReport:
    """Who adopted the final model, and why the others did not."""

    run_id: str
    round: int
    weights_sha256: str
    adopted: list[str] = field(default_factory=list)  # institutions, by enrolled key
    #: Institution (``node N`` if unknown) -> why: the node's refusal, no home, no reply.
    not_adopted: dict[str, str] = field(default_factory=dict)


def deliver_final_model(
    grid: Grid,
    run_dir: Path,
    spec: FeatureSpec,
    *,
    institution: Callable[[Message], str],
    timeout: float,
) -> DeliveryReport | None:
    """Send the run's last checkpoint to every connected node; log and record who adopted it.

    Args:
        institution: names a reply's sender (in a deployment by its enrolled key).
        timeout: seconds to wait for the acknowledgements.

    Returns:
        The report (also in ``run_dir/delivery.json``), or None when nothing was delivered
        (no checkpoint, no node, or the SuperLink could not be reached).
    """
    last = CheckpointStore(run_dir).latest()
    if last is None:
        logger.warning("no checkpoint in %s: no final model to deliver", run_dir)
        return None
    # The committed checkpoint, read back with its checksums checked: what the nodes get is
    # exactly what the run folder holds.
    weights = named_weights(checkpoint_model(last, spec))
    manifest = last.manifest
    settings = RoundSettings(
        model=manifest["model"],
        model_overrides=manifest.get("model_overrides") or {},
        task=manifest.get("task", "risk"),
        seed=int(manifest.get("seed", 0)),
        spec_fingerprint=str(manifest["spec_fingerprint"]),
        run_id=str(manifest.get("run_id") or ""),
        server_round=last.round,
    )
    delivery = Delivery(settings, weights_sha256(weights))
    report = DeliveryReport(settings.run_id, last.round, delivery.weights_sha256)
    by_hand = f"it can adopt the model by hand: edufl client adopt {run_dir} --data EXPORT"
    try:
        nodes = sorted(grid.get_node_ids())
        arrays = ArrayRecord({name: Array(value) for name, value in weights.items()})
        messages = [
            Message(
                RecordDict(
                    {ARRAYS_RECORD: arrays, DELIVERY_RECORD: ConfigRecord(delivery.to_config())}
                ),
                dst_node_id=node,
                message_type=MessageType.QUERY,
                group_id=f"delivery-{last.round}",
            )
            for node in nodes
        ]
        logger.info("delivering the final model (round %d) to %d node(s)", last.round, len(nodes))
        replies = exchange(grid, messages, timeout)
    except Exception:  # the run is committed; delivery is the last step and may be redone
        logger.exception("could not deliver the final model; each institution: %s", by_hand)
        return None
    answered = set()
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        answered.add(node)
        name = institution(reply) or f"node {node}"
        if reply.has_error():
            report.not_adopted[name] = reply.error.reason
            continue
        ack = read_acknowledgement(reply.content.config_records)
        if ack.adopted and ack.weights_sha256 == delivery.weights_sha256:
            report.adopted.append(name)
        elif ack.adopted:
            report.not_adopted[name] = "acknowledged weights with another checksum"
        else:
            report.not_adopted[name] = "the node keeps no models (no home)"
    for node in sorted(set(nodes) - answered):
        report.not_adopted[f"node {node}"] = "no reply in time"
    report.adopted.sort()
    write_text_atomic(run_dir / DELIVERY_FILE, json.dumps(asdict(report), indent=2) + "\n")
    logger.info(
        "final model (round %d, sha256 %s) adopted by %d of %d node(s): %s",
        last.round,
        delivery.weights_sha256[:12],
        len(report.adopted),
        len(nodes),
        ", ".join(report.adopted) or "none",
    )
    for name, why in sorted(report.not_adopted.items()):
        logger.warning("%s did not adopt the final model (%s); %s", name, why, by_hand)
    return report


def delivery_summary(run_dir: Path) -> list[str]:
    """Lines for the operator's terminal: who adopted the run's final model (none if not sent)."""
    path = Path(run_dir) / DELIVERY_FILE
    try:
        report = json.loads(path.read_text("utf-8"))
        adopted, refused = list(report["adopted"]), dict(report["not_adopted"])
        lines = [
            f"final model (round {report['round']}, sha256 {str(report['weights_sha256'])[:12]}) "
            f"adopted by {len(adopted)} of {len(adopted) + len(refused)} node(s): "
            f"{', '.join(adopted) or 'none'}"
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    lines += [f"  not adopted by {name}: {why}" for name, why in sorted(refused.items())]
    return lines
