"""``--engine inline``: the same ServerApp and ClientApp as on Ray, every node in this process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, ErrorCode
from typer.testing import CliRunner

from server.config import FederationConfig
from shared_models.devices import DeviceError
from shared_models.models.weights import load_tensors
from simulations.cli import app
from simulations.inline_grid import InlineGrid, new_run, server_identity
from simulations.runner import SimulationError, simulate
from simulations.synthetic import write_consortium

runner = CliRunner()


def _echo_app(fail_partition: int | None = None) -> ClientApp:
    """Replies with its partition id and how many messages its context has seen."""
    client = ClientApp()

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        if partition == fail_partition:
            raise OSError(f"node {partition} lost its disk")
        seen = int(context.state.config_records.get("seen", ConfigRecord({"n": 0}))["n"]) + 1
        context.state["seen"] = ConfigRecord({"n": seen})
        msg.content["config"]["mutated"] = True  # the node's copy, not the server's message
        return Message(
            RecordDict({"out": ConfigRecord({"partition": partition, "seen": seen})}),
            reply_to=msg,
        )

    return client


def _send(grid: InlineGrid, round_no: int) -> tuple[list[Message], list[Message]]:
    sent = [
        Message(
            RecordDict({"config": ConfigRecord({"round": round_no})}),
            dst_node_id=node,
            message_type="train",
            group_id=str(round_no),
        )
        for node in grid.get_node_ids()
    ]
    return sent, list(grid.send_and_receive(sent))


def test_inline_grid_gives_each_node_a_persistent_context_as_flower_does() -> None:
    run = new_run()
    grid = InlineGrid(_echo_app(), 3, run)
    with server_identity(run):
        for round_no in (1, 2):
            sent, replies = _send(grid, round_no)
            assert len({m.metadata.message_id for m in sent}) == 3
            by_id = {m.metadata.message_id: m for m in sent}
            for reply in replies:
                asked = by_id[reply.metadata.reply_to_message_id]
                assert reply.metadata.src_node_id == asked.metadata.dst_node_id
                assert reply.metadata.message_id not in by_id
                assert reply.content["out"]["seen"] == round_no  # the context persisted
            assert all("mutated" not in m.content["config"] for m in sent)
    nodes = list(grid.get_node_ids())
    assert len(set(nodes)) == 3 and min(nodes) > 1  # 0 and 1 are the server's and SuperLink's
    configs = [dict(grid.contexts[n].node_config) for n in nodes]
    assert configs == [{PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: 3} for i in range(3)]
    assert all(grid.contexts[n].run_id == run.run_id for n in nodes)


def test_a_failing_node_becomes_an_error_reply_and_the_others_still_answer() -> None:
    run = new_run()
    grid = InlineGrid(_echo_app(fail_partition=1), 3, run)
    with server_identity(run):
        sent, replies = _send(grid, 1)
    assert len(replies) == 3
    failed = [r for r in replies if r.has_error()]
    assert len(failed) == 1
    assert failed[0].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "ClientAppException" in failed[0].error.reason
    assert "node 1 lost its disk" in failed[0].error.reason
    assert failed[0].metadata.reply_to_message_id in {m.metadata.message_id for m in sent}
    assert sorted(r.content["out"]["partition"] for r in replies if not r.has_error()) == [0, 2]


def test_inline_grid_refuses_a_message_for_a_node_it_does_not_have() -> None:
    run = new_run()
    grid = InlineGrid(_echo_app(), 2, run)
    with server_identity(run), pytest.raises(ValueError, match="not in this simulation"):
        grid.push_messages(
            [Message(RecordDict(), dst_node_id=12345, message_type="train", group_id="1")]
        )


def test_inline_refuses_ray_only_options_with_one_clear_line(tmp_path: Path) -> None:
    exports = write_consortium(tmp_path / "c", institutions=2, students=60)
    config = FederationConfig(rounds=1, min_nodes=2, out_dir=tmp_path / "run")
    with pytest.raises(SimulationError, match="cannot join the Ray cluster"):
        simulate(config, exports, engine="inline", ray_address="10.0.0.1:6379")
    with pytest.raises(SimulationError, match="gpus_per_node is a Ray reservation"):
        simulate(config, exports, engine="inline", gpus_per_node=0.5)
    with pytest.raises(SimulationError, match="engine must be one of ray, inline"):
        simulate(config, exports, engine="threads")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="--device cuda"):
            simulate(config, exports, engine="inline", device="cuda")
    args = ["simulate", "run", "--synthetic", "2", "--students", "60", "--out", str(tmp_path)]
    result = runner.invoke(app, [*args, "--engine", "inline", "--ray-address", "h:6379"])
    assert result.exit_code == 2 and "--engine inline" in result.output
    result = runner.invoke(app, [*args, "--engine", "warp"])
    assert result.exit_code == 2 and "--engine must be one of auto, ray, inline" in result.output
    assert not (tmp_path / "consortium").exists()  # refused before writing anything


def test_simulate_run_inline_counts_a_broken_node_as_a_failure_and_goes_on(
    tmp_path: Path,
) -> None:
    exports = write_consortium(tmp_path / "c", institutions=3, students=150)
    (exports[2] / "students.csv").unlink()  # institution_03 cannot load its data
    out = tmp_path / "run"
    data = [arg for e in exports for arg in ("--data", str(e))]
    result = runner.invoke(
        app,
        ["simulate", "run", *data, "--min-nodes", "2", "--rounds", "1", "--engine", "inline",
         "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "round 1/1" in result.output and "federated ROC-AUC" in result.output
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(e["institution"] for e in record["institutions"]) == [
        "institution_01",
        "institution_02",
    ]
    failures = record["failures"]  # its train and its evaluate task, as on Ray
    assert len(failures) == 2 and len({f["node_id"] for f in failures}) == 1
    assert all("ClientAppException" in f["error"] for f in failures)
    assert all("failed at this node (DataContractError)" in f["error"] for f in failures)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inline_nodes_take_turns_on_the_gpu(tmp_path: Path) -> None:
    exports = write_consortium(tmp_path / "c", institutions=2, students=100)
    config = FederationConfig(rounds=1, min_nodes=2, out_dir=tmp_path / "run")
    result = simulate(config, exports, engine="inline", device="cuda")
    assert result.last_round == 1 and 0 <= result.evaluate["risk/roc_auc"] <= 1


# -- the same run on both engines --------------------------------------------------------------


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_consortium(tmp_path_factory.mktemp("c"), institutions=2, students=400)


def _run(exports: list[Path], out: Path, engine: str, dp: bool) -> dict[str, np.ndarray]:
    config = FederationConfig(
        rounds=2, local_epochs=1, min_nodes=2, out_dir=out, dp_epsilon=8.0 if dp else None
    )
    simulate(config, exports, engine=engine)
    (last,) = sorted((out / "checkpoints").glob("round-0002.weights"))
    return {k: v.numpy() for k, v in load_tensors(last).items()}


def _epsilons(out: Path) -> list[dict[str, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{e["institution"]: e["epsilon"] for e in r["institutions"]} for r in records]


@pytest.mark.slow
def test_inline_and_ray_reach_the_same_weights_without_dp(
    consortium: list[Path], tmp_path: Path
) -> None:
    on_ray = _run(consortium, tmp_path / "ray", "ray", dp=False)
    inline = _run(consortium, tmp_path / "inline", "inline", dp=False)
    assert on_ray.keys() == inline.keys()
    for name, value in on_ray.items():
        np.testing.assert_array_equal(inline[name], value, err_msg=name)


@pytest.mark.slow
def test_inline_and_ray_run_the_same_dp_rounds(consortium: list[Path], tmp_path: Path) -> None:
    """Under DP nothing numeric can match exactly: each process draws the DP-SGD noise and the
    noised student count (which sets each node's sample rate, hence its epsilon) from
    ``os.urandom``, on purpose, and a test cannot key Ray's workers. Same rounds, same
    institutions, each trained with DP, and epsilons within the count noise's reach."""
    on_ray = _run(consortium, tmp_path / "ray", "ray", dp=True)
    inline = _run(consortium, tmp_path / "inline", "inline", dp=True)
    assert on_ray.keys() == inline.keys()
    assert all(np.isfinite(v).all() for v in inline.values())
    ray_eps, inline_eps = _epsilons(tmp_path / "ray"), _epsilons(tmp_path / "inline")
    assert len(ray_eps) == len(inline_eps) == 2
    for a, b in zip(ray_eps, inline_eps, strict=True):
        assert a.keys() == b.keys() == {"institution_01", "institution_02"}
        for name in a:
            assert 0 < b[name] <= 8.0 and b[name] == pytest.approx(a[name], rel=0.1)


@pytest.mark.slow
def test_inline_is_deterministic_under_dp_with_keyed_noise_sources(
    consortium: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each node draws from its own fresh source, so the order of the nodes cannot matter."""
    from privacy.noise import SecureRandom

    for where in ("privacy.dp.SecureRandom", "privacy.releases.SecureRandom"):
        monkeypatch.setattr(where, lambda: SecureRandom(bytes(32)))
    first = _run(consortium, tmp_path / "a", "inline", dp=True)
    second = _run(consortium, tmp_path / "b", "inline", dp=True)
    for name, value in first.items():
        np.testing.assert_array_equal(second[name], value, err_msg=name)


def test_an_inline_simulation_loads_none_of_flowers_superlink_state(tmp_path: Path) -> None:
    """In-process, the rounds need no SuperLink: importing its grid loads SQLAlchemy, Alembic
    and FastAPI (about 0.7 s of a 1,200-student simulation's 7.5 s; docs/benchmarks.md)."""
    exports = write_consortium(tmp_path / "consortium", institutions=2, students=120, seed=3)
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from server.config import FederationConfig\n"
        "from simulations.runner import simulate\n"
        "out = Path(sys.argv[1])\n"
        "config = FederationConfig(rounds=1, local_epochs=1, min_nodes=2, out_dir=out)\n"
        "simulate(config, [Path(p) for p in sys.argv[2:]], engine='inline')\n"
        "print(json.dumps(sorted(m for m in ('flwr.superlink.grid', 'sqlalchemy', 'alembic',"
        " 'fastapi') if m in sys.modules)))\n"
    )
    argv = [sys.executable, "-c", script, str(tmp_path / "run"), *map(str, exports)]
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
