"""`compare` (library and CLI) and the CLI of the Gram-based methods."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from typer.testing import CliRunner

import cmdtool.analyzers as registry
from cmdtool.analyzers.base import Analyzer
from cmdtool.workflows.compare import compare
from cmdtool.analyzers.linear_models import linear_model_metrics
from cmdtool.analyzers.params import DEVICE, EPOCHS, Param
from cmdtool.passes.local import gram_matrix
from cmdtool.store import from_array
from cmdtool_cli.app import app


class MeanModel(Analyzer):
    """A stand-in following the base contract: every checkpoint modelled by the row means (2 floats per row
    stand in for CMD's a_i, b_i, plus T numbers of a 'reference curve'). Its motion-relative error is exactly 1."""

    method = "cmd"
    params = (Param("modes", 1, "modes", kind=int, size=True), EPOCHS, DEVICE)

    def __init__(self, *, modes=1, epochs=None, device="auto"):
        self.modes = modes
        self.epochs = epochs
        self.device = device

    def _fit(self, store, writer, progress):
        gram, _ = gram_matrix(store, self.device, progress).window(self.window_)
        n_cols = gram.shape[0]
        self.metrics_ = linear_model_metrics(gram, np.full((n_cols, n_cols), 1.0 / n_cols),
                                             2 * store.n_rows + self.modes * n_cols)


@pytest.fixture
def fake_cmd(monkeypatch):
    module = types.ModuleType("cmdtool.analyzers._test_fake_cmd")
    module.MeanModel = MeanModel
    monkeypatch.setitem(sys.modules, "cmdtool.analyzers._test_fake_cmd", module)
    monkeypatch.setitem(registry._registry(), "cmd", "cmdtool.analyzers._test_fake_cmd:MeanModel")


@pytest.fixture
def linear_store(tmp_path):
    """Linear dynamics of rank 4, w_j(t) = c_j + a_j 0.9ᵗ + 0.3 (d_j cos 0.7t + e_j sin 0.7t), eigenvalues
    1, 0.9, e^{±0.7i}: DMD of rank 4 models it exactly; PCA with one direction keeps only part of the motion;
    the row-mean model none of it."""
    rng = np.random.default_rng(5)
    n_rows, n_cols = 400, 20
    t = np.arange(n_cols)
    coef = rng.normal(size=(n_rows, 4))
    W = (coef[:, :1] + coef[:, 1:2] * 0.9 ** t
         + 0.3 * (coef[:, 2:3] * np.cos(0.7 * t) + coef[:, 3:4] * np.sin(0.7 * t))).astype(np.float32)
    store = from_array(tmp_path / "lin.zarr", W, labels=range(1, n_cols + 1), target_chunk_bytes=4 * n_cols * 64)
    return store, W


def test_compare_orders_methods_as_expected(linear_store, fake_cmd):
    store, W = linear_store
    result = compare(store, ["dmd", "pca", "cmd"], {"rank": "4", "dims": "1"})
    by = {m.method: m for m in result.methods}
    assert by["dmd"].relative_error < 1e-6               # exact: the dynamics are linear of rank 4
    assert by["cmd"].relative_error_motion == pytest.approx(1.0)
    assert 1e-3 < by["pca"].relative_error < by["cmd"].relative_error  # one direction: some of the motion
    assert result.best() == "dmd"
    assert by["dmd"].stored_floats == 4 * 400 + 8
    assert by["pca"].stored_floats == 400 + 400 + 20
    assert by["dmd"].compression_ratio == pytest.approx(400 * 20 / (4 * 400 + 8))
    assert by["pca"].worst_epoch_error == pytest.approx(max(by["pca"].epoch_relative_error))
    assert by["pca"].final_epoch_error == pytest.approx(by["pca"].epoch_relative_error[-1])
    assert result.labels == list(range(1, 21)) and result.raw_floats == 8000
    assert not any(m.reused for m in result.methods)
    # same configuration, unchanged store: every result is reused, nothing is fitted again
    again = compare(store, ["dmd", "pca", "cmd"], {"rank": "4", "dims": "1"})
    assert all(m.reused for m in again.methods)
    assert [m.relative_error for m in again.methods] == [m.relative_error for m in result.methods]
    # another window is another configuration
    window = compare(store, ["dmd"], {"rank": "4", "epochs": "5:20"})
    assert not window.methods[0].reused and window.n_cols == 16


def test_compare_equal_budget_sizes_to_cmd(linear_store, fake_cmd):
    store, W = linear_store
    result = compare(store, ["dmd", "cmd", "pca"], {"modes": 3}, equal_budget=True)
    by = {m.method: m for m in result.methods}
    assert [m.method for m in result.methods] == ["dmd", "cmd", "pca"]  # the table keeps the asked order
    assert result.budget == by["cmd"].stored_floats == 2 * 400 + 3 * 20
    assert by["dmd"].size["rank"] == 2 and by["dmd"].budget_matched
    assert by["pca"].size["dims"] == 1 and by["pca"].budget_matched
    assert not by["cmd"].budget_matched
    assert all(m.stored_floats <= result.budget for m in result.methods)


def test_compare_reuses_the_users_own_fit_and_says_which_fit_each_row_is(linear_store, fake_cmd):
    store, _ = linear_store
    MeanModel(modes=3).fit(store).save("default")  # what `cmdtool decompose --modes 3` saves
    result = compare(store, ["dmd", "cmd"])
    by = {m.method: m for m in result.methods}
    assert by["cmd"].reused and by["cmd"].name == "default" and by["cmd"].size == {"modes": 3}
    assert by["cmd"].fit == "saved fit 'default' (of decompose)"
    assert result.budget == by["cmd"].stored_floats == 2 * 400 + 3 * 20
    assert by["dmd"].fit == f"fitted now (sized to the budget), saved as '{by['dmd'].name}'"
    again = compare(store, ["dmd", "cmd"])
    assert {m.method: m.fit for m in again.methods} == {
        "cmd": "saved fit 'default' (of decompose)", "dmd": f"saved fit '{by['dmd'].name}' (same configuration)"}
    asked = {m.method: m for m in compare(store, ["cmd"], {"modes": 1}).methods}["cmd"]
    assert not asked.reused and asked.size == {"modes": 1} and asked.fit.startswith("fitted now (modes as given)")
    refit = {m.method: m for m in compare(store, ["cmd"], reuse=False).methods}["cmd"]
    assert not refit.reused and refit.size == {"modes": 1} and refit.fit.startswith("fitted now (--refit)")
    # another window: the saved fit is of another window, so it is not taken
    window = {m.method: m for m in compare(store, ["cmd"], {"epochs": "5:20"}).methods}["cmd"]
    assert not window.reused and window.fit.startswith("fitted now (no saved fit on this window)")


def test_compare_explicit_budget(linear_store):
    store, _ = linear_store
    result = compare(store, ["dmd", "pca"], {}, equal_budget=True, budget=3 * 400 + 2 * 20)  # PCA 2 dims: 1240
    by = {m.method: m for m in result.methods}
    assert by["dmd"].size["rank"] == 3 and by["pca"].size["dims"] == 2


# ---------------------------------------------------------------------------------------------------- CLI
runner = CliRunner()


def test_cli_decompose_dmd_kga_pca(linear_store):
    store, _ = linear_store
    out = runner.invoke(app, ["decompose", "-m", "dmd", "-m", "kga", "-m", "pca", "--rank", "4", "--dims", "2",
                              "--eps", "0.02", "--store", str(store.path), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert [d["method"] for d in data] == ["dmd", "kga", "pca"]
    assert data[0]["rank"] == 4 and data[0]["relative_error"] < 1e-6
    assert data[1]["classes"] == {"stable": 1, "neutral": 3, "unstable": 0}   # 0.9 stable; 1, e^{±0.7i} neutral
    assert data[2]["dims"] == 2
    assert {("dmd", "default"), ("kga", "default"), ("pca", "default"), ("gram", "full")} <= set(
        store.results.list())
    text = runner.invoke(app, ["decompose", "-m", "kga", "--rank", "4", "--store", str(store.path)])
    assert text.exit_code == 0, text.output
    assert "KWM" in text.stdout and "neutral" in text.stdout


def test_cli_compare_table_json_plot(linear_store, tmp_path):
    store, _ = linear_store
    plot = tmp_path / "errors.png"
    out = runner.invoke(app, ["compare", "dmd", "pca", "--rank", "4", "--dims", "1", "--store", str(store.path),
                              "--plot", str(plot), "-q"])
    assert out.exit_code == 0, out.output
    assert "dmd rank=4" in out.stdout and "pca dims=1" in out.stdout
    assert plot.is_file() and plot.stat().st_size > 1000
    js = runner.invoke(app, ["compare", "dmd", "pca", "--rank", "4", "--dims", "1", "--store", str(store.path),
                             "--json"])
    assert js.exit_code == 0, js.output
    data = json.loads(js.stdout)
    assert [m["method"] for m in data["methods"]] == ["dmd", "pca"]
    assert all(m["reused"] for m in data["methods"])
    assert data["methods"][0]["relative_error"] < data["methods"][1]["relative_error"]


def test_cli_errors_are_one_line(linear_store):
    store, _ = linear_store
    bad = runner.invoke(app, ["compare", "dmd", "nosuch", "--store", str(store.path)])
    assert bad.exit_code == 2 and "unknown method" in bad.output
    bad_rank = runner.invoke(app, ["decompose", "-m", "dmd", "--rank", "1.5", "--store", str(store.path)])
    assert bad_rank.exit_code == 2 and "energy fraction" in bad_rank.output
    assert "Traceback" not in bad.output + bad_rank.output


def test_cli_compare_plot_never_replaces_a_users_file(linear_store, tmp_path):
    store, _ = linear_store
    plot = tmp_path / "mine.png"
    plot.write_bytes(b"the user's own figure")
    args = ["compare", "dmd", "pca", "--store", str(store.path), "--plot", str(plot), "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "cmdtool did not write" in result.output
    assert plot.read_bytes() == b"the user's own figure"
    bad = runner.invoke(app, ["compare", "dmd", "--store", str(store.path), "--plot", str(tmp_path / "e.txt"), "-q"])
    assert bad.exit_code == 2 and ".png" in bad.output and not (tmp_path / "e.txt").exists()
    forced = runner.invoke(app, args + ["--force"])
    assert forced.exit_code == 0, forced.output
    assert plot.read_bytes().startswith(b"\x89PNG") and not list(tmp_path.glob(".mine.png.*"))
