"""The KGA examples (examples/kga_*.py) at CI size: they run, write their figures, and report what they measured."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def examples_on_path():
    sys.path.insert(0, str(EXAMPLES))
    yield
    sys.path.remove(str(EXAMPLES))


def run_example(name: str, out: Path) -> dict:
    module = importlib.import_module(name)
    payload = module.main(["--quick", "--out", str(out)])
    assert json.loads((out / f"{name}.json").read_text())        # the json is written and readable
    return payload


@pytest.mark.slow
def test_fig4_mlp_quick(examples_on_path, tmp_path):
    payload = run_example("kga_fig4_mlp", tmp_path)
    runs = payload["runs"]["0.001"]
    assert set(runs) == {"SGD", "SGD, 2× lr", "KGA-Epoch", "KGA-Iter (every 16 steps)", "KGA-Epoch, Eq. 13 literal",
                         "KGA-Epoch, window of 10 (option)", "KGA-Iter, window of 10 (option)"}
    assert all(len(r.train_loss) == 6 for group in runs.values() for r in group)
    # KGA-Iter refits every 16 of the 64 steps per epoch after a warm-up of 2 intervals; KGA-Epoch once per epoch
    assert len(runs["KGA-Iter (every 16 steps)"][0].fits) == 6 * 4 - 1
    assert len(runs["KGA-Epoch"][0].fits) == 5
    assert any(runs["KGA-Epoch"][0].accelerating) and runs["KGA-Epoch"][0].train_loss != runs["SGD"][0].train_loss
    assert (tmp_path / "kga_fig4_mlp.png").stat().st_size > 10_000


@pytest.mark.slow
def test_alpha_sweep_quick(examples_on_path, tmp_path):
    payload = run_example("kga_alpha_sweep", tmp_path)
    digits = payload["results"]["digits CNN, Adam lr 1e-3"]
    runs = digits["runs"]
    # α = 0 adds nothing: the same trajectory as the base optimizer, bit for bit
    assert runs["alpha=0"][0].train_loss == runs["base"][0].train_loss
    assert digits["points"][0] == (0.0, 0.0, 0.0, 0.0)         # α, median, mean, sd of the difference
    assert runs["alpha=2"][0].train_loss != runs["base"][0].train_loss
    fig3 = payload["fig3_moduli"]
    assert math.isclose(fig3["0"][1], 0.9) and fig3["10"][1] > 1 > fig3["2"][1]
    for name in ("kga_alpha_sweep.png", "kga_fig3_modes.png"):
        assert (tmp_path / name).stat().st_size > 10_000


@pytest.mark.slow
def test_digits_quick(examples_on_path, tmp_path):
    payload = run_example("kga_digits", tmp_path)
    for base in ("Adam", "SGD"):
        result = payload["results"][base]
        runs = result["runs"]
        assert len(runs) == 8
        masked = {label: group[0].masked_fraction[-1] for label, group in runs.items()}
        assert all(0 < v < 1 for label, v in masked.items() if "masked" in label or "KWM" in label)
        assert all(v == 0 for label, v in masked.items() if "mask" not in label and "KWM" not in label)
        assert set(result["probe"]["thresholds"]) == {"kwm", "norm", "delta"}
        assert runs["Efficient-KGA"][0].memory_bytes["snapshots"] == 0
        assert (tmp_path / f"kga_digits_{base.lower()}.png").stat().st_size > 10_000


@pytest.mark.slow
def test_memory_quick(examples_on_path, tmp_path):
    payload = run_example("kga_memory", tmp_path)
    results = payload["results"]
    full = results["KGA, history=None (all epochs)"]["held"]
    efficient = results["Efficient-KGA, history=None"]["held"]
    # the full variant's snapshot buffer grows with the epochs; Efficient-KGA holds no snapshots after its first fit
    assert full[-1]["snapshots"] > full[0]["snapshots"] > 0
    assert efficient[-1]["snapshots"] == 0 and efficient[-1]["total"] < full[-1]["total"]
    assert (tmp_path / "kga_memory.png").stat().st_size > 10_000
