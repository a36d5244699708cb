from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from shared_models.data.contract import default_spec
from shared_models.data.loader import load_cohort
from shared_models.data.validate import validate_export
from shared_models.errors import DataContractError
from simulations.datasets import registry as datasets
from simulations.import_cli import import_dataset
from simulations.partition import (
    dirichlet_partition,
    partition_tables,
    pool_exports,
    size_skew_partition,
    write_exports,
)
from tests.simulations.oulad_fixture import write_oulad

LABELS = np.array([0.0] * 300 + [1.0] * 100)


def _covers_each_record_once(parts: dict[str, np.ndarray], n: int) -> bool:
    joined = np.sort(np.concatenate(list(parts.values())))
    return bool(np.array_equal(joined, np.arange(n)))


def test_dirichlet_partition_is_reproducible_by_seed_and_covers_every_record() -> None:
    a = dirichlet_partition(LABELS, clients=4, alpha=0.5, seed=3)
    b = dirichlet_partition(LABELS, clients=4, alpha=0.5, seed=3)
    c = dirichlet_partition(LABELS, clients=4, alpha=0.5, seed=4)
    assert list(a) == ["client_01", "client_02", "client_03", "client_04"]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    assert _covers_each_record_once(a, len(LABELS))
    assert min(len(p) for p in a.values()) >= 10


def test_small_alpha_skews_labels_more_than_large_alpha() -> None:
    def spread(alpha: float) -> float:
        rates = [
            [LABELS[p].mean() for p in dirichlet_partition(LABELS, 5, alpha, seed=s).values()]
            for s in range(5)
        ]
        return float(np.mean([np.std(r) for r in rates]))

    assert spread(0.1) > 0.2 > 0.05 > spread(100.0)


def test_size_skew_varies_sizes_with_alpha_and_is_reproducible() -> None:
    a = size_skew_partition(400, clients=5, alpha=0.5, seed=1)
    b = size_skew_partition(400, clients=5, alpha=0.5, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert _covers_each_record_once(a, 400)

    def spread(alpha: float) -> float:
        sizes = [
            [len(p) for p in size_skew_partition(400, 5, alpha, seed=s).values()] for s in range(5)
        ]
        return float(np.mean([np.std(z) for z in sizes]))

    assert spread(0.5) > 30 > 12 > spread(100.0)


def test_impossible_partition_says_what_to_change() -> None:
    with pytest.raises(DataContractError, match="lower --clients"):
        dirichlet_partition(LABELS[:50], clients=10, alpha=0.5, seed=0)
    with pytest.raises(DataContractError, match="raise --alpha"):
        dirichlet_partition(LABELS, clients=20, alpha=0.01, seed=0, min_size=15)


def test_registry_modules_share_one_convention() -> None:
    for name, module in datasets.DATASETS.items():
        assert name == module.NAME and module.SPEC_PATH.is_file()
        assert module.DEFAULT_PARTITION in module.NATURAL_PARTITIONS
        assert module.spec().weeks == module.WEEKS
        assert {"pooled", "dirichlet", "size-skew"} <= set(datasets.partitions(name))
    with pytest.raises(DataContractError, match="choose one of: oulad, uci"):
        datasets.get("ednet")


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_synthetic_consortium_repartitioned_by_label_validates_and_repeats_bytes(
    consortium_dir: Path, tmp_path: Path
) -> None:
    spec = default_spec()
    pooled = pool_exports(sorted(p for p in consortium_dir.iterdir() if p.is_dir()))
    assert len(pooled) == 300 and set(pooled.groups["source"]) == {
        "institution_01",
        "institution_02",
        "institution_03",
    }
    for out in ("a", "b"):
        parts = partition_tables(pooled, spec, "dirichlet", seed=5, alpha=0.3, clients=3)
        write_exports(parts, tmp_path / out, spec, about={"dataset": "synthetic"})
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    total = 0
    for name in ("client_01", "client_02", "client_03"):
        report, _ = validate_export(tmp_path / "a" / name, spec)
        assert report.usable, [str(p) for p in report.errors[:5]]
        total += len(load_cohort(tmp_path / "a" / name, spec, drop_incomplete=False))
    assert total == 300


def test_write_refuses_a_foreign_folder_and_replaces_an_earlier_import(
    tmp_path: Path,
) -> None:
    from simulations.datasets.oulad import loader as oulad

    download = write_oulad(tmp_path / "OULAD")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(DataContractError, match="not empty"):
        oulad.to_exports(download, tmp_path / "mine")
    out = tmp_path / "out"
    oulad.to_exports(download, out, partition="natural-presentation")
    oulad.to_exports(download, out, partition="natural-module")
    assert sorted(p.name for p in out.iterdir()) == [
        "AAA",
        "BBB",
        "partitions.toml",
        "spec.toml",
    ]


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("import")(import_dataset)
    app.callback()(lambda: None)  # keep "import" a sub-command, as under `edufl simulate`
    return app


def test_cli_help_has_an_example() -> None:
    result = CliRunner().invoke(_cli(), ["import", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output


def test_cli_writes_each_partition_and_says_how_to_validate(tmp_path: Path) -> None:
    download = write_oulad(tmp_path / "OULAD")
    out = tmp_path / "out"
    result = CliRunner().invoke(_cli(), ["import", "oulad", str(download), str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'AAA-2013J'}  (6 records, 50.0 % at risk)" in result.output
    assert f"edufl client validate {out / 'AAA-2013J'} --spec {out / 'spec.toml'}" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["uci", "PATH", "OUT", "--partition", "natural-module"], "not a uci partition"),
        (["oulad", "PATH", "OUT", "--partition", "dirichlet"], "needs --clients"),
        (["oulad", "PATH", "OUT", "--clients", "3"], "--clients applies to"),
        (["edx", "PATH", "OUT"], "unknown dataset 'edx'"),
    ],
)
def test_cli_usage_errors_are_one_line_and_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    download = write_oulad(tmp_path / "OULAD")
    args = [
        str(download) if a == "PATH" else str(tmp_path / "o") if a == "OUT" else a for a in args
    ]
    result = CliRunner().invoke(_cli(), ["import", *args])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output
