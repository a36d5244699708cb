"""A CLI that starts at once: `edufl --help` and the light verbs never import torch or Flower.

Each check runs in a fresh interpreter, since the test process itself has long imported both.
Also here: help renders without rich's escapes, and a log line appears once.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from shared_models.cli_support import configure_logging
from simulations.cli import app

REPO = Path(__file__).resolve().parents[1]
#: What a light verb must not pay for (seconds and hundreds of MB each).
HEAVY = ("torch", "flwr", "opacus", "ray")

#: Runs ``edufl ARGV`` (JSON in argv[1]) as the console script does, then names the HEAVY
#: modules (JSON in argv[2]) it loaded. `main` may leave through `simulations.fast_exit`
#: (``os._exit`` after the ``atexit`` handlers), so the names are printed by such a handler and
#: the exit code is the process's own.
_RUN_VERB = """
import atexit, json, sys
from simulations.cli import main
argv, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.argv = ["edufl", *argv]

def report():
    loaded = sorted(m for m in heavy if m in sys.modules)
    print("\\nSTARTUP " + json.dumps({"heavy": loaded}), flush=True)

atexit.register(report)
main()
"""


def _run_verb(argv: list[str]) -> tuple[int, list[str], str]:
    """Run ``edufl ARGV`` in a fresh interpreter: exit code, heavy modules loaded, output."""
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_VERB, json.dumps(argv), json.dumps(HEAVY)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    marker = [line for line in proc.stdout.splitlines() if line.startswith("STARTUP ")]
    assert marker, out
    result = json.loads(marker[-1].removeprefix("STARTUP "))
    return proc.returncode, result["heavy"], out


def test_importing_the_cli_loads_neither_torch_nor_flower() -> None:
    script = (
        "import json, sys, simulations.cli\n"
        "print(sorted(m for m in json.loads(sys.argv[1]) if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(HEAVY)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def _paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[list[str]]:
    """Every group's and command's argv below ``group``, the group itself first."""
    paths = [list(prefix)]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            paths += _paths(command, (*prefix, name))
        else:
            paths.append([*prefix, name])
    return paths


ALL_COMMANDS = _paths(typer.main.get_group(app))


def test_every_help_renders_without_torch_or_flower() -> None:
    script = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from simulations.cli import app\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    result = CliRunner().invoke(app, [*argv, '--help'], prog_name='edufl')\n"
        "    assert result.exit_code == 0, (argv, result.output)\n"
        "print(sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(ALL_COMMANDS), json.dumps(HEAVY)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.fixture(scope="module")
def light_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A synthetic export, a rule file, an empty advisor store and a one-entry ledger."""
    from client.early_warning.store import Store
    from privacy.ledger.institution import InstitutionLedger
    from simulations.synthetic import write_consortium

    root = tmp_path_factory.mktemp("light")
    (export,) = write_consortium(root / "consortium", institutions=1, students=60, seed=3)
    rules = root / "rules.toml"
    rules.write_text((REPO / "client" / "default_rules.toml").read_text("utf-8"), "utf-8")
    with Store(root / "store.sqlite"):
        pass
    ledger = InstitutionLedger(root / "node", "uni_a")
    entry = ledger.sign_next(
        {
            "node": "7",
            "run_id": "run-1",
            "round": 1,
            "private": True,
            "accountant": "rdp",
            "noise_multiplier": 1.1,
            "sample_rate": 0.1,
            "steps": 10,
            "max_grad_norm": 1.0,
            "delta": 1e-5,
            "n_students": 60,
            "epsilon_after": 5.0,
            "epsilon_budget": 8.0,
        }
    )
    ledger.append(entry)
    return {
        "export": export,
        "rules": rules,
        "store": root / "store.sqlite",
        "ledger": ledger.path,
        "out": root / "out",
    }


LIGHT_VERBS: dict[str, list[str]] = {
    "client validate": ["client", "validate", "{export}"],
    "client validate --json": ["client", "validate", "{export}", "--json"],
    "client spec show": ["client", "spec", "show"],
    "client spec init": ["client", "spec", "init", "{out}/spec.toml"],
    "client rules check": ["client", "rules", "check", "{rules}"],
    "client rules indicators": ["client", "rules", "indicators"],
    "client actions list": ["client", "actions", "list", "--db", "{store}"],
    "client actions record": [
        "client", "actions", "record", "s-unknown", "--action", "contacted", "--db", "{store}",
    ],
    "audit verify": ["audit", "verify", "{ledger}", "--heads", "{ledger}"],
    "audit budget": ["audit", "budget", "{ledger}", "--heads", "{ledger}"],
}  # fmt: skip


@pytest.mark.parametrize("verb", list(LIGHT_VERBS))
def test_a_light_verb_runs_without_torch_or_flower(
    verb: str, light_inputs: dict[str, Path]
) -> None:
    argv = [arg.format(**light_inputs) for arg in LIGHT_VERBS[verb]]
    light_inputs["out"].mkdir(exist_ok=True)

    code, heavy, out = _run_verb(argv)

    # Recording an action for a student never scored is a user error (2); the rest succeed.
    assert code == (2 if verb == "client actions record" else 0), out
    assert heavy == [], f"{verb} imported {heavy}"


@pytest.mark.parametrize("argv", ALL_COMMANDS, ids=" ".join)
def test_help_shows_no_rich_escapes(argv: list[str]) -> None:
    result = CliRunner().invoke(app, [*argv, "--help"], prog_name="edufl", env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert "\\[" not in result.output


def test_help_still_shows_defaults_and_required() -> None:
    result = CliRunner().invoke(
        app, ["client", "start", "--help"], prog_name="edufl", env={"COLUMNS": "100"}
    )
    assert "[required]" in result.output and "[default: 90.0; x>=0]" in result.output


def test_help_defaults_match_their_sources() -> None:
    from client.node import cli as node_cli
    from client.node.launcher import DEFAULT_MAX_MODEL_PARAMS, DEFAULT_PULL_INTERVAL_S
    from client.node.pacing import PULL_INTERVAL_S
    from privacy.keys import DEFAULT_ADDRESSES
    from server import cli as server_cli
    from server.superlink.launcher import DEFAULT_ADDRESS
    from simulations.reproduce import cli as reproduce_cli
    from simulations.reproduce.config import MODES
    from simulations.reproduce.data import DATASETS

    assert server_cli.DEFAULT_CERT_ADDRESSES == DEFAULT_ADDRESSES
    assert server_cli.DEFAULT_ADDRESS == DEFAULT_ADDRESS
    assert tuple(DATASETS) == reproduce_cli.DATASET_NAMES
    assert reproduce_cli.MODE_NAMES == MODES
    assert node_cli.DEFAULT_MAX_MODEL_PARAMS == DEFAULT_MAX_MODEL_PARAMS
    assert node_cli.PULL_INTERVAL_S == DEFAULT_PULL_INTERVAL_S == PULL_INTERVAL_S
    from bench.bench_deploy import PACED_PULL_S

    assert PACED_PULL_S == DEFAULT_PULL_INTERVAL_S  # the benchmark's `paced` is the default


@pytest.fixture
def restore_logging() -> object:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = saved[0], saved[1]


def _own_handler_logger(name: str, stream: io.StringIO) -> logging.Logger:
    """A logger like Flower's: its own console handler, and it propagates."""
    lib = logging.getLogger(name)
    lib.handlers = [logging.StreamHandler(stream)]
    lib.setLevel(logging.DEBUG)
    lib.propagate = True
    return lib


def test_a_library_logger_with_its_own_handler_is_printed_once(
    restore_logging: object, capsys: pytest.CaptureFixture[str]
) -> None:
    own = io.StringIO()
    configure_logging(1)
    lib = _own_handler_logger("flwr_like_test", own)
    child = logging.getLogger("flwr_like_test.server")

    lib.warning("round 1 done")
    child.info("round 2 done")
    logging.getLogger("server.test").info("ours")

    err = capsys.readouterr().err
    assert own.getvalue() == "round 1 done\nround 2 done\n"
    assert "round" not in err
    assert err.count("ours") == 1


def test_logging_configured_twice_prints_each_line_once(
    restore_logging: object, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(1)
    configure_logging(1)
    _own_handler_logger("flwr_like_test2", io.StringIO()).error("once")
    logging.getLogger("server.test").warning("once too")

    err = capsys.readouterr().err
    assert err.count("once too") == 1 and "once\n" not in err.replace("once too", "")


def test_a_library_with_only_a_null_handler_still_reaches_the_root(
    restore_logging: object, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(0)
    lib = logging.getLogger("quiet_lib_test")
    lib.addHandler(logging.NullHandler())
    lib.warning("library warning")

    assert capsys.readouterr().err.count("library warning") == 1


def test_the_serverapp_process_prints_flowers_lines_once() -> None:
    """In a process edufl's CLI did not configure (the ServerApp under a SuperLink), Opacus'
    import-time ``basicConfig`` and Flower's own console handler printed each line twice."""
    probe = (
        "import logging\n"
        "import opacus\n"  # installs a root handler, as in the ServerApp process
        "from flwr.common.logger import log\n"
        "import server.app\n"
        "from shared_models.cli_support import show_each_record_once\n"
        "show_each_record_once()\n"
        "log(logging.WARNING, 'round 1 of 5 once')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True
    )
    assert (done.stdout + done.stderr).count("round 1 of 5 once") == 1, done.stderr
