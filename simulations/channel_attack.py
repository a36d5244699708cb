"""`edufl audit channel-attack`: a malicious server against a real node, on synthetic data.

Wires `privacy.audit.channel` (the engine, which knows no Flower type) to the node's own
``client.app`` ClientApp: one synthetic institution's export without the target student and a
copy with them (their ``lms_logins`` far above anyone's), crafted LSTM weights that single the
target out, and one real DP training round per trial, each in a fresh privacy-state folder, as
``edufl client start`` would run it (``dp="required"`` with the node's own budget).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from shared_models.cli_support import user_errors

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

FEATURE = "lms_logins"
TARGET_LOGINS = 10_000  # valid for the contract, and far beyond any real student's week
INSTITUTION = "uni_target"


@dataclass(frozen=True)
class AttackSetup:
    """The two exports, the crafted weights and what the server reads the update along."""

    member_export: Path
    non_member_export: Path
    target_id: str
    weights: dict[str, np.ndarray]
    directions: dict[str, dict[str, np.ndarray]]
    config: Any  # server.config.FederationConfig


def prepare_attack(
    work: Path, *, epsilon: float, delta: float, students: int = 120, seed: int = 0
) -> AttackSetup:
    """Write the exports under ``work`` and craft the weights for them.

    The attacker knows everything but membership (the DP game's adversary): the other students,
    the target's record, and how the node normalises; it picks a target id the node's split puts
    in its training students and a threshold between the target's value and everyone else's.
    """
    import numpy as np

    from privacy.audit.channel import canary_lstm_weights
    from server.config import FederationConfig
    from server.federation import global_model
    from shared_models.data.contract import default_spec
    from shared_models.data.node import prepare_node_data, split_node
    from shared_models.models.weights import named_weights
    from simulations.synthetic import write_consortium

    spec = default_spec()
    config = FederationConfig(
        model_overrides={"hidden_size": 8, "dropout": 0.0},
        local_epochs=1,
        rounds=1,
        seed=seed,
        dp_epsilon=epsilon,
        dp_delta=delta,
    )
    (generated,) = write_consortium(
        work / "consortium", institutions=1, students=students, seed=seed
    )
    non_member = work / "non-member"
    shutil.copytree(generated, non_member, dirs_exist_ok=True)
    for attempt in range(200):
        # Where the target sits among the records varies too, for splits that depend on the
        # records' order rather than on the student id.
        target_id = "s" + hashlib.sha256(f"target-{attempt}".encode()).hexdigest()[:12]
        member = work / f"member-{attempt}"
        _add_target(non_member, member, target_id, attempt)
        split = split_node(member, spec, seed=seed, institution=INSTITUTION).train
        if target_id in {str(s) for s in split.student_ids}:
            break
        shutil.rmtree(member)
    else:
        raise RuntimeError("no target id among 200 lands in the node's training split")
    feature = spec.dynamic_names.index(FEATURE)
    inputs = prepare_node_data(member, spec, seed=seed, institution=INSTITUTION).train
    others = prepare_node_data(non_member, spec, seed=seed, institution=INSTITUTION).train
    is_target = np.array([str(s) == target_id for s in split.student_ids])
    target_value = float(inputs.dynamic[is_target, :, feature].max())
    rest = max(
        float(inputs.dynamic[~is_target, :, feature].max()),
        float(others.dynamic[:, :, feature].max()),
    )
    threshold = (target_value + rest) / 2 if target_value > rest else target_value - 1e-3
    logger.info(
        "target %s: normalised %s %.3g, everyone else at most %.3g; threshold %.3g",
        target_id,
        FEATURE,
        target_value,
        rest,
        threshold,
    )
    weights, directions = canary_lstm_weights(
        named_weights(global_model(config, spec)),
        feature=feature,
        threshold=threshold,
        target_label=float(inputs.at_risk[is_target][0]),
    )
    return AttackSetup(member, non_member, target_id, weights, directions, config)


def _add_target(source: Path, out: Path, target_id: str, position: int) -> None:
    """Copy ``source`` to ``out`` with one more student, before the ``position``-th one: the
    first student's record, renamed, with ``lms_logins`` at `TARGET_LOGINS` every week."""
    import numpy as np
    import pandas as pd

    shutil.copytree(source, out)
    for table in sorted(out.glob("*.csv")):
        frame = pd.read_csv(table, dtype={"student_id": str})
        ids = frame["student_id"].unique()
        target = frame[frame["student_id"] == ids[0]].copy()
        target["student_id"] = target_id
        if FEATURE in target:
            target[FEATURE] = TARGET_LOGINS
        at = int(np.flatnonzero(frame["student_id"].to_numpy() == ids[position % len(ids)])[0])
        parts = [frame.iloc[:at], target, frame.iloc[at:]]
        pd.concat(parts).to_csv(table, index=False, lineterminator="\n")


def run_trial(setup: AttackSetup, member: bool, trial: int, work: Path) -> Mapping[str, float]:
    """One DP round of the real ClientApp on the member or non-member export: its values."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

    from client.app import app
    from privacy.audit.channel import reply_values
    from shared_models.data.contract import default_spec
    from shared_models.protocol import RUN_ID, SERVER_ROUND, NodeConfig

    config = setup.config
    node = Context(
        run_id=1,
        node_id=7,
        node_config=NodeConfig(
            data_path=str(setup.member_export if member else setup.non_member_export),
            institution=INSTITUTION,
            privacy_state=str(work / f"state-{trial}"),
            dp="required",
            dp_epsilon=float(config.dp_epsilon),
            dp_delta=float(config.dp_delta),
        ).to_node_config(),
        state=RecordDict(),
        run_config={},
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in setup.weights.items()}),
            "config": ConfigRecord(
                config.train_config(default_spec().fingerprint)
                | {SERVER_ROUND: 1, RUN_ID: f"attack-{trial}"}
            ),
        }
    )
    metadata = Metadata(
        run_id=1,
        message_id=f"m{trial}",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600,
        message_type="train",
    )
    reply = app(Message(content=content, metadata=metadata), node)
    if reply.has_error():
        raise RuntimeError(f"the node refused trial {trial}: {reply.error.reason}")
    records = {
        name: {k: v.numpy() if isinstance(v, Array) else v for k, v in record.items()}
        for name, record in reply.content.items()
    }
    return reply_values(records, setup.weights, setup.directions)


def attack_node(
    work: Path, *, trials: int, epsilon: float, delta: float, students: int, seed: int
) -> Any:
    """Prepare the exports under ``work`` and run the attack; a `ChannelAttackResult`."""
    import torch

    from privacy.audit.channel import channel_attack

    setup = prepare_attack(work, epsilon=epsilon, delta=delta, students=students, seed=seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads cost more than they give
    try:
        return channel_attack(
            lambda member, i: run_trial(setup, member, i, work),
            trials,
            epsilon=epsilon,
            delta=delta,
            seed=seed,
        )
    finally:
        torch.set_num_threads(threads)


@user_errors
def channel_attack(
    trials: int = typer.Option(60, min=12, help="Rounds played, half with the target."),
    epsilon: float = typer.Option(1.0, min=0.0, help="The node's claimed epsilon (its budget)."),
    delta: float = typer.Option(1e-5, help="The node's claimed delta."),
    students: int = typer.Option(120, min=20, help="Students of the synthetic institution."),
    seed: int = typer.Option(0, help="Seed of the synthetic data and of the trial order."),
    work: Path | None = typer.Option(None, help="Keep the exports and states here."),
) -> None:
    """A malicious server reads every value of a DP node's train reply: can it tell membership?

    Each trial is one real DP round of this edufl's ClientApp on a synthetic export with or
    without the target student, under weights crafted to single the target out. Prints each
    value's distinguishing advantage with its confidence interval and the largest advantage
    (epsilon, delta) allows; exit 1 when the advantage's lower bound exceeds it.

    Example:

      edufl audit channel-attack --trials 60 --epsilon 1
    """
    from privacy.audit.channel import render_channel_attack

    with tempfile.TemporaryDirectory(prefix="edufl-channel-") as tmp:
        folder = work or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        result = attack_node(
            folder, trials=trials, epsilon=epsilon, delta=delta, students=students, seed=seed
        )
    typer.echo(render_channel_attack(result))
    raise typer.Exit(1 if result.refuted else 0)
