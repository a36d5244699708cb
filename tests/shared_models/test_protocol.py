"""The wire protocol: every key spelled once, round trips, the reply allow-list, a light import."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared_models import protocol
from shared_models.errors import DataContractError, PrivacyConfigError
from shared_models.model_names import MODEL_NAMES
from shared_models.protocol import (
    METRIC_KEYS,
    NodeConfig,
    NodeConfigError,
    ProtocolError,
    Reply,
    RoundSettings,
    RoundSettingsError,
    encode_reply,
    read_reply,
)

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared_models", "privacy", "client", "server", "simulations")
PROTOCOL = Path("shared_models/protocol.py")

#: Wire keys that are also ordinary words (a manifest's "model", a ledger entry's "node", an
#: evaluation report's "loss"): outside the modules that speak the wire they mean something
#: else, so for them only those modules are checked.
COMMON_WORDS = frozenset(
    {"model", "task", "seed", "institution", "dp", "arrays", "metrics", "node", "privacy", "loss"}
    | {"delivery", "adopted", "device"}
)
WIRE_MODULES = (
    "client/app.py",
    "client/local.py",
    "client/node/launcher.py",
    "server/config.py",
    "server/guard.py",
    "server/rounds.py",
    "simulations/runner.py",
)
#: The same text meaning something else there.
FOREIGN = {
    ("server/superlink/control.py", "run-id"),  # a field of `flwr ls --format json`'s output
    ("client/local.py", "loss"),  # a key of shared_models.evaluation's report
    ("client/node/launcher.py", "privacy"),  # the default DP state folder's name
    ("simulations/runner.py", "privacy"),  # the run directory's DP state folder
}


def _wire_keys() -> set[str]:
    keys = {f.alias or name for name, f in RoundSettings.model_fields.items()}
    keys |= {f.alias or name for name, f in NodeConfig.model_fields.items()}
    keys |= {protocol.ARRAYS_RECORD, protocol.METRICS_RECORD, protocol.NODE_RECORD}
    keys |= {protocol.PRIVACY_RECORD, protocol.LEDGER_ENTRY, protocol.LEDGER_EARLIER}
    keys |= {protocol.DELIVERY_RECORD, protocol.WEIGHTS_SHA256, protocol.ADOPTED}
    return keys | METRIC_KEYS


@cache
def _string_constants(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text("utf-8"), str(path))
    return frozenset(
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    )


def _sources() -> list[Path]:
    return sorted(p.relative_to(ROOT) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_wire_key_is_spelled_in_the_protocol_module_only() -> None:
    keys = _wire_keys()
    assert {"data-path", "dp-epsilon", "num-examples", "privacy-ledger-entry"} <= keys
    offenders = []
    for path in _sources():
        if path == PROTOCOL:
            continue
        checked = keys if str(path) in WIRE_MODULES else keys - COMMON_WORDS
        found = checked & _string_constants(ROOT / path)
        offenders += [
            f"{path}: {key!r}" for key in sorted(found) if (str(path), key) not in FOREIGN
        ]
    assert not offenders, "wire keys spelled outside shared_models/protocol.py:\n" + "\n".join(
        offenders
    )


def test_importing_the_protocol_imports_neither_torch_nor_flower_nor_opacus() -> None:
    code = (
        "import shared_models.protocol, sys; "
        "print(sorted(m for m in ('torch', 'flwr', 'opacus') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


# --- round settings -----------------------------------------------------------------------------

round_settings = st.builds(
    RoundSettings,
    model=st.sampled_from([m for m in MODEL_NAMES if m not in ("cnn", "cnn-lstm")]),
    model_overrides=st.fixed_dictionaries({}, optional={"dropout": st.floats(0.0, 0.9)}),
    task=st.sampled_from(["risk", "grade", "multitask"]),
    local_epochs=st.integers(1, 50),
    batch_size=st.integers(1, 1024),
    learning_rate=st.floats(1e-6, 1.0),
    proximal_mu=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
    spec_fingerprint=st.text("0123456789abcdef", max_size=64),
    run_id=st.text(max_size=64),
    server_round=st.integers(0, 1000),
    planned_rounds=st.integers(1, 1000),
    dp_epsilon=st.none() | st.floats(0.01, 100.0),
    dp_delta=st.none() | st.floats(1e-9, 0.5),
    dp_max_grad_norm=st.none() | st.floats(0.01, 10.0),
    dp_accountant=st.sampled_from([None, "rdp", "prv"]),
)


@settings(max_examples=60, deadline=None)
@given(round_settings)
def test_round_settings_survive_the_message_config(settings_: RoundSettings) -> None:
    config = settings_.to_config()
    assert all(isinstance(v, bool | int | float | str) for v in config.values())
    assert RoundSettings.from_config(config) == settings_


def test_no_dp_travels_as_epsilon_zero_and_comes_back_as_none() -> None:
    config = RoundSettings().to_config()
    assert config[protocol.DP_EPSILON] == protocol.NO_DP_EPSILON
    assert RoundSettings.from_config(config).dp_epsilon is None
    assert RoundSettings.from_config(config | {protocol.DP_EPSILON: 2.5}).dp_epsilon == 2.5


def test_the_servers_base_config_leaves_the_strategys_keys_to_the_strategy() -> None:
    base = RoundSettings(server_round=4, proximal_mu=0.1).to_config(base=True)
    assert protocol.SERVER_ROUND not in base and protocol.PROXIMAL_MU not in base


def test_a_bad_model_override_is_named_in_the_round_settings_error() -> None:
    with pytest.raises(RoundSettingsError, match="hidden"):
        RoundSettings.from_config({"model": "lstm", "model-config": '{"hidden": 3}'})
    with pytest.raises(RoundSettingsError, match="unknown model"):
        RoundSettings.from_config({"model": "transformer"})


# --- node config --------------------------------------------------------------------------------

texts = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30)
node_configs = st.builds(
    NodeConfig,
    data_path=st.none() | texts.filter(lambda t: not ('"' in t and "'" in t)),
    institution=st.none() | st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True),
    spec_path=st.none() | st.just("/specs/consortium.toml"),
    privacy_state=st.none() | st.just("/srv/privacy"),
    privacy_key=st.none() | st.just("/keys/uni-a"),
    dp=st.sampled_from([None, "required", "off"]),
    dp_epsilon=st.none() | st.floats(0.01, 100.0),
    dp_delta=st.none() | st.floats(1e-9, 0.5),
    partition_id=st.none() | st.integers(0, 100),
)


@settings(max_examples=80, deadline=None)
@given(node_configs)
def test_node_config_survives_flowers_node_config_and_its_command_line(own: NodeConfig) -> None:
    from flwr.common.config import parse_config_args

    assert NodeConfig.parse(own.to_node_config()) == own
    assert NodeConfig.parse(parse_config_args([own.to_flower_arg()])) == own


@pytest.mark.parametrize("path", ["'\\", "a\\b'c", "C:\\data\\n", 'x\\"y', "it's"])
def test_a_path_with_a_backslash_and_one_kind_of_quote_survives_flowers_command_line(
    path: str,
) -> None:
    """Found by the property test above: ``'\\`` was refused as if it held both quotes."""
    from flwr.common.config import parse_config_args

    own = NodeConfig(data_path=path)
    assert NodeConfig.parse(parse_config_args([own.to_flower_arg()])) == own


def test_node_config_refuses_an_unknown_key_naming_the_valid_ones() -> None:
    with pytest.raises(NodeConfigError, match=r"data_path: unknown key.*valid keys: data-path"):
        NodeConfig.parse({"data_path": "/x"})


def test_an_invalid_dp_key_is_a_privacy_config_error() -> None:
    with pytest.raises(PrivacyConfigError, match="'required' or 'off'"):
        NodeConfig.parse({"data-path": "/x", "dp": "maybe"})
    with pytest.raises(PrivacyConfigError, match="dp-epsilon='many'"):
        NodeConfig.parse({"dp-epsilon": "many"})


def test_a_node_without_an_export_says_how_to_set_one() -> None:
    with pytest.raises(DataContractError, match="--node-config 'data-path="):
        NodeConfig.parse({}).export_path()


def test_a_value_holding_both_quotes_cannot_be_written_for_flower() -> None:
    with pytest.raises(NodeConfigError, match="both"):
        NodeConfig(data_path="""/it's "here\"""").to_flower_arg()


# --- the reply schema ---------------------------------------------------------------------------


def test_a_reply_is_laid_out_as_today_and_read_back_by_the_server() -> None:
    metrics = {"train/loss": 0.5, "val/risk/roc_auc": math.nan, "train/steps": 3.0}
    reply = Reply(12, metrics, "uni_a", weights={"w": [1.0]}, ledger_entry="{}")
    records = encode_reply(reply)
    assert [(r.name, r.kind) for r in records] == [
        ("arrays", "ArrayRecord"),
        ("metrics", "MetricRecord"),
        ("node", "ConfigRecord"),  # the ledger entries too: one object less per reply
    ]
    by_name = {r.name: r.items for r in records}
    assert by_name["metrics"] == {"num-examples": 12, **metrics}
    assert by_name["node"] == {
        "institution": "uni_a",
        "privacy-ledger-entry": "{}",
        "privacy-ledger-earlier": "",
    }
    configs = {r.name: r.items for r in records if r.kind == "ConfigRecord"}
    received = read_reply({"metrics": by_name["metrics"]}, configs)
    assert received.institution == "uni_a" and received.ledger_entry == "{}"
    assert received.metrics["num-examples"] == 12.0


def test_the_server_still_reads_the_ledger_entries_of_an_earlier_nodes_own_record() -> None:
    """Nodes of edufl before 2026-12-03 sent them in a "privacy" record beside "node"."""
    configs = {
        "node": {"institution": "uni_a"},
        "privacy": {"privacy-ledger-entry": "{}", "privacy-ledger-earlier": "[]"},
    }
    received = read_reply({"metrics": {"num-examples": 3}}, configs)
    assert (received.institution, received.ledger_entry, received.ledger_earlier) == (
        "uni_a",
        "{}",
        "[]",
    )


def test_an_evaluation_reply_carries_no_weights_and_no_privacy_record() -> None:
    names = [r.name for r in encode_reply(Reply(5, {"loss": 0.1}, "uni_a"))]
    assert names == ["metrics", "node"]


def test_a_metric_outside_the_schema_may_not_leave_the_node() -> None:
    with pytest.raises(ProtocolError, match="student_42"):
        encode_reply(Reply(5, {"loss": 0.1, "student_42/score": 0.9}, "uni_a"))


def test_every_metric_a_node_computes_is_in_the_allow_list() -> None:
    assert {"loss", "val/loss", "risk/roc_auc", "val/grade/r2", "engagement/mae"} <= METRIC_KEYS
    assert protocol.metric_key("risk", "roc_auc", validation=True) == "val/risk/roc_auc"
    with pytest.raises(ProtocolError):
        protocol.metric_key("risk", "student_id")


def test_a_private_reply_may_carry_released_values_only() -> None:
    """Under DP the exact training loss once told a server whether a student trained."""
    base = {"num_examples": 212, "institution": "uni_a", "ledger_entry": "{}", "private": True}
    with pytest.raises(protocol.ProtocolError, match="DP reply schema"):
        protocol.encode_reply(protocol.Reply(metrics={"train/loss": 0.69}, **base))
    with pytest.raises(protocol.ProtocolError, match="DP reply schema"):
        protocol.encode_reply(protocol.Reply(metrics={"risk/roc_auc": 0.8}, **base))
    with pytest.raises(protocol.ProtocolError, match="ledger entry"):
        protocol.encode_reply(protocol.Reply(**(base | {"ledger_entry": None}), metrics={}))
    with pytest.raises(protocol.ProtocolError, match="10 numbers"):
        protocol.encode_reply(protocol.Reply(metrics={protocol.RISK_HIST_POS: [1.0]}, **base))

    histograms = {protocol.RISK_HIST_POS: [0.5] * 10, protocol.RISK_HIST_NEG: [-1.0] * 10}
    records = protocol.encode_reply(
        protocol.Reply(metrics=histograms | {protocol.NOISE_HIST_STD: 20.0}, **base)
    )
    metrics = next(r.items for r in records if r.name == protocol.METRICS_RECORD)
    assert metrics[protocol.NUM_EXAMPLES] == 212 and metrics[protocol.RISK_HIST_NEG] == [-1.0] * 10
    received = protocol.read_reply({"metrics": metrics}, {})
    assert received.histograms == histograms
