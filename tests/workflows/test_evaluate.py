"""`cmdtool evaluate` and `cmdtool landscape`: stored records, EMA/SWA against a dense computation, failing
callables, the file form of --fn, landscape grids with a known optimum, and the demo end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cmdtool.analyzers import get_analyzer
from cmdtool.workflows.evaluate import Evaluation, evaluate
from cmdtool.workflows.landscape import grid_axis, landscape
from cmdtool.store import from_array, open_store
from cmdtool_cli.app import app

from tests.conftest import planted_modes, write_checkpoints

runner = CliRunner()

# metrics that identify the vector exactly: sums and a few entries of the flattened float weights
METRICS_SOURCE = """
import torch

calls = []

def metrics(state_dict):
    w = torch.cat([v.flatten().double() for v in state_dict.values() if v.is_floating_point()])
    calls.append(1)
    return {"mean": float(w.mean()), "first": float(w[0]), "last": float(w[-1]), "loss": float((w ** 2).mean())}

def failing_at_second_call(state_dict):
    calls.append(1)
    if len(calls) >= 2:
        raise RuntimeError("boom")
    return {"mean": 0.0}
"""


@pytest.fixture
def metric_module(tmp_path, monkeypatch):
    folder = tmp_path / "usercode"
    folder.mkdir()
    name = f"user_metrics_{abs(hash(str(tmp_path)))}"
    (folder / f"{name}.py").write_text(METRICS_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    return name, folder / f"{name}.py"


@pytest.fixture
def tiny_run(tmp_path):
    """A real checkpoint folder (8 epochs of a small CNN) ingested, with CMD (+online), DMD and PCA fitted."""
    write_checkpoints(tmp_path / "ckpts", n_epochs=8)
    store = str(tmp_path / "run.zarr")
    assert runner.invoke(app, ["ingest", str(tmp_path / "ckpts"), "--store", store, "-q"]).exit_code == 0
    assert runner.invoke(app, ["decompose", "-M", "3", "-K", "100", "--warmup", "4", "--store", store,
                               "-q"]).exit_code == 0
    assert runner.invoke(app, ["decompose", "-m", "dmd", "-m", "pca", "--rank", "3", "--dims", "2",
                               "--store", store, "-q"]).exit_code == 0
    return store


def dense_vector_metrics(w: np.ndarray) -> dict:
    w = w.astype(np.float64)
    return {"mean": w.mean(), "first": w[0], "last": w[-1], "loss": (w ** 2).mean()}


def test_evaluate_stores_records_and_baselines_match_dense(tiny_run, metric_module):
    name, _ = metric_module
    result = runner.invoke(app, ["evaluate", "--fn", f"{name}:metrics", "--store", tiny_run, "--json",
                                 "--swa-fraction", "0.25", "--ema-beta", "0.8", "--sort-metric", "loss"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [r["method"] for r in out["summary"]] == ["original", "ema", "swa", "cmd", "cmd-online", "dmd", "pca"]
    assert all(r["final_epoch"] == 8 for r in out["summary"])
    st = open_store(tiny_run)
    run = Evaluation.load(st, "default")
    assert run.config["ema_beta"] == 0.8 and run.config["swa_length"] == 2
    # every record has the fixed format
    for record in run.records:
        assert set(record) == {"method", "epoch", "metrics"}
        assert isinstance(record["epoch"], int) and set(record["metrics"]) == {"mean", "first", "last", "loss"}
    # dense reference (fine for 8 columns); the CNN's float tensors are all trajectories, so the metric
    # function sees exactly W's column (integers are not floating point and are left out of its sums)
    W = st.trajectories[:, :].astype(np.float64)
    ema = W[:, 0].copy()
    for t in range(8):
        if t:
            ema = 0.8 * ema + 0.2 * W[:, t]
        epochs, mean = run.curve("ema", "mean")
        assert mean[t] == pytest.approx(dense_vector_metrics(ema.astype(np.float32))["mean"], rel=1e-6)
        assert run.curve("original", "last")[1][t] == pytest.approx(W[-1, t], rel=1e-6)
    # SWA with a window of 2: from the 2nd epoch on, mean of epochs t-1 and t
    epochs, swa_first = run.curve("swa", "first")
    assert list(epochs) == list(range(2, 9))
    np.testing.assert_allclose(swa_first, (W[0, :-1] + W[0, 1:]) / 2, rtol=1e-6)
    epochs, swa_loss = run.curve("swa", "loss")
    dense = [dense_vector_metrics(((W[:, t - 1] + W[:, t]) / 2).astype(np.float32))["loss"] for t in range(1, 8)]
    np.testing.assert_allclose(swa_loss, dense, rtol=1e-6)
    # modelled methods: the callable saw exactly the analyzers' reconstructions
    cmd = get_analyzer("cmd").load(st, "default")
    for method, variant in (("cmd", "posthoc"), ("cmd-online", "online")):
        _, loss = run.curve(method, "loss")
        dense = [dense_vector_metrics(cmd.reconstruct_epoch(st, c, variant=variant))["loss"] for c in range(8)]
        np.testing.assert_allclose(loss, dense, rtol=1e-6)
    # the summary's best epoch minimises the loss (auto direction)
    row = next(r for r in out["summary"] if r["method"] == "original")
    _, loss = run.curve("original", "loss")
    assert row["best_epoch"] == int(np.argmin(loss)) + 1 and row["best"] == pytest.approx(loss.min())


def test_evaluate_subset_every_and_methods(tiny_run, metric_module):
    name, _ = metric_module
    st = open_store(tiny_run, mode="r+")
    run = evaluate(st, f"{name}:metrics", methods=["original,swa", "cmd"], epochs="2:8", every=3, name="sub",
                   swa_fraction=0.5)
    assert run.config["epochs"] == [2, 5, 8]     # every 3rd of the window, plus its last epoch
    assert {(r["method"], r["epoch"]) for r in run.records} == {
        ("original", 2), ("original", 5), ("original", 8), ("swa", 5), ("swa", 8), ("cmd", 2), ("cmd", 5),
        ("cmd", 8)}   # SWA of the last 4 of 7: evaluated where 4 epochs are available
    assert st.results.exists("evaluation", "sub") and st.results.exists("evaluation", "default") is False


def test_failing_callable_names_epoch_and_method_and_keeps_results(tiny_run, metric_module):
    name, _ = metric_module
    result = runner.invoke(app, ["evaluate", "--fn", f"{name}:failing_at_second_call", "--store", tiny_run,
                                 "-m", "cmd", "-q"])
    assert result.exit_code == 1
    message = result.output.strip()
    assert "\n" not in message and "Traceback" not in message
    assert "epoch 2 of method cmd" in message and "RuntimeError: boom" in message
    run = Evaluation.load(open_store(tiny_run), "default")
    assert run.records == [{"method": "cmd", "epoch": 1, "metrics": {"mean": 0.0}}]


def test_fn_as_file_path_and_bad_specs(tiny_run, metric_module):
    _, path = metric_module
    result = runner.invoke(app, ["evaluate", "--fn", f"{path}:metrics", "--store", tiny_run, "-m", "original",
                                 "-q"])
    assert result.exit_code == 0, result.output
    assert "original" in result.output and "best epoch" in result.output
    for spec, words in ((f"{path}:nope", "has no function 'nope'"),
                        ("no_such_module_xyz:f", "no module 'no_such_module_xyz' on the import path"),
                        ("justaname", "module:function")):
        bad = runner.invoke(app, ["evaluate", "--fn", spec, "--store", tiny_run])
        assert bad.exit_code == 2 and words in bad.output
    bad = runner.invoke(app, ["evaluate", "--fn", f"{path}:metrics", "--store", tiny_run, "-m", "kga"])
    assert bad.exit_code == 2 and "run `cmdtool decompose -m kga` first" in bad.output


def test_fn_module_in_the_working_directory_imports_as_python_m_does(tiny_run, tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    name = f"cwd_metrics_{abs(hash(str(tmp_path)))}"
    (folder / f"{name}.py").write_text(METRICS_SOURCE)
    monkeypatch.chdir(folder)
    path_before = list(sys.path)
    assert str(folder) not in sys.path and "" not in sys.path
    result = runner.invoke(app, ["evaluate", "--fn", f"{name}:metrics", "--store", tiny_run, "-m", "original",
                                 "-q"])
    assert result.exit_code == 0, result.output
    assert sys.path == path_before  # the working directory was on the path for the command only
    missing = runner.invoke(app, ["evaluate", "--fn", "pkg.missing_metrics:metrics", "--store", tiny_run])
    assert missing.exit_code == 2 and missing.stderr.strip() == (
        "error: --fn 'pkg.missing_metrics:metrics': no module 'pkg' on the import path (the working directory and "
        "PYTHONPATH); name its file instead, e.g. --fn pkg/missing_metrics.py:metrics")


def test_landscape_grid_and_known_optimum(tmp_path):
    W, modes, a, b, curves = planted_modes(n_rows=300, n_cols=12, n_modes=2)
    st = from_array(tmp_path / "s.zarr", W, labels=range(1, 13))
    cmd = get_analyzer("cmd")(modes=2, samples=300).fit(st)
    cmd.save("default")
    mode_of_row = np.asarray(cmd.mode_[:])
    row = int(np.flatnonzero(mode_of_row == 0)[5])
    slope, offset = float(cmd.A_[row]), float(cmd.B_[row])
    r0 = float(cmd.reference_trajectories_[0, 6])      # epoch 7 = column 6
    axis = grid_axis(r0, 0.5, 11)
    np.testing.assert_allclose(axis, r0 + np.arange(-5, 6) * abs(r0) / 10)   # App. G: [r - |r|/2, r + |r|/2]
    target = slope * axis[8] + offset                 # the weight hits `target` at the 9th grid value

    def peak(state_dict):
        return {"score": -float((state_dict["w"][row].double() - target) ** 2)}

    result = landscape(st, peak, 7, [0], span=0.5, points=11)
    np.testing.assert_allclose(result.axes[0], axis)
    assert result.best_index == (8,) and result.best_values[0] == pytest.approx(axis[8])
    assert result.recorded == [pytest.approx(r0)]
    assert result.recorded_metrics["score"] == pytest.approx(result.metrics["score"][5])   # δ = 0 is the centre
    # 2-D: the other mode does not move row `row`, so its axis is flat; the tie is broken towards recorded
    two = landscape(st, peak, 7, [0, 1], points=11)
    assert two.metrics["score"].shape == (11, 11) and two.best_index == (8, 5)
    paths = two.save(tmp_path / "out")
    with np.load(paths["npz"]) as data:
        np.testing.assert_allclose(data["metric_score"], two.metrics["score"])
    assert paths["png"].stat().st_size > 0 and json.loads(paths["json"].read_text())["best"]["index"] == [8, 5]


def test_landscape_cli(tiny_run, metric_module, tmp_path):
    name, _ = metric_module
    result = runner.invoke(app, ["landscape", "--fn", f"{name}:metrics", "--epoch", "8", "--mode", "0",
                                 "--points", "7", "--sort-metric", "loss", "--out", str(tmp_path / "ls"),
                                 "--store", tiny_run, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(out["axes"][0]) == 7 and out["lower_is_better"] is True
    assert Path(out["files"]["png"]).is_file()
    bad = runner.invoke(app, ["landscape", "--fn", f"{name}:metrics", "--epoch", "8", "--mode", "7",
                              "--store", tiny_run])
    assert bad.exit_code == 2 and "mode 7 does not exist" in bad.output
