"""The training-time examples at CI size (full size: `make train-cmd-embedded`, `make train-cmd-federated`), and
`cmdtool ingest` of the checkpoints an embedded-CMD run saves."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cmdtool.ingestion import ingest
from cmdtool.store import open_store

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

pytestmark = pytest.mark.slow


def test_embedded_example_runs_and_its_checkpoints_ingest_unchanged(tmp_path):
    import embedded_digits

    result = embedded_digits.main(["--quick", "--out", str(tmp_path / "out"), "--checkpoints",
                                   str(tmp_path / "ckpts"), "--figures", str(tmp_path / "fig")])
    cfg, summary, run = result["config"], result["summary"], result["runs"][0]
    assert (tmp_path / "out" / "results.json").is_file() and len(list((tmp_path / "fig").glob("*.png"))) == 2
    for method in embedded_digits.METHODS:
        assert len(run[method]) == cfg["epochs"] and 0.5 < summary[method]["mean"] / 100 <= 1
    # basic P: ceil(P n) weights every L epochs from F + L on
    shares = np.array(run["embedded_trained_fraction"])
    assert shares[:cfg["warmup"] + cfg["every"]].tolist() == [1.0] * (cfg["warmup"] + cfg["every"])
    assert shares[-1] == pytest.approx(1 - 3 * cfg["fraction"], abs=0.01)
    # the checkpoints of the embedded run go into a store as they are, value for value
    paths = sorted((tmp_path / "ckpts").glob("epoch_*.pt"))
    assert len(paths) == cfg["epochs"]
    ingest([str(tmp_path / "ckpts")], str(tmp_path / "store.zarr"))
    store = open_store(tmp_path / "store.zarr")
    assert store.n_checkpoints == cfg["epochs"]
    last = torch.load(paths[-1], weights_only=True)
    flat = torch.cat([v.reshape(-1).float() for v in last.values() if v.is_floating_point()]).numpy()
    np.testing.assert_array_equal(store.read_column(cfg["epochs"] - 1), flat)


def test_federated_example_runs_and_its_counts_match_the_formulas(tmp_path):
    import federated_digits

    result = federated_digits.main(["--quick", "--out", str(tmp_path / "out"), "--figures", str(tmp_path / "fig")])
    summary, run = result["summary"], result["runs"][0]
    assert summary["counted_equals_eq16"] and summary["baseline_counted_equals_eq15"]
    assert 0 < summary["volume_ratio"]["mean"] < 100
    assert len(run["cmd"]["rounds"]) == result["config"]["rounds"]
    assert (tmp_path / "fig" / "training_federated.png").is_file()
