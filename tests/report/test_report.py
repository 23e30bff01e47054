"""`cmdtool report` (figures, index.html, summary.json) and `cmdtool export` (npy, csv, hdf5)."""

from __future__ import annotations

import csv
import json
import re
import shutil

import h5py
import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure
from typer.testing import CliRunner

from cmdtool.analyzers.cmd.posthoc import PosthocCMD
from cmdtool.analyzers.dmd import DMD
from cmdtool.analyzers.kga import KGA
from cmdtool.analyzers.pca import PCA
from cmdtool.errors import UsageError
from cmdtool.report import export as export_module
from cmdtool.report import figures as F
from cmdtool.report.export import export
from cmdtool.report.html_report import build_report
from cmdtool.store import from_array, open_store
from cmdtool_cli.app import app
from tests.conftest import planted_modes

matplotlib.use("Agg")

ALL_FIGURES = {"cmd_correlation", "cmd_modes", "cmd_reconstructions", "cmd_layer_modes", "epoch_errors",
               "eigenvalues", "kwm_masks", "pca_variance", "pca_path", "evaluation"}
EVALUATION_RECORDS = [{"method": method, "epoch": epoch, "metrics": {"test_acc": 0.5 + 0.01 * epoch + shift,
                                                                      "test_loss": 2.0 - 0.03 * epoch}}
                      for method, shift in (("original", 0.0), ("cmd", 0.02), ("ema", 0.01))
                      for epoch in range(1, 31)]


def _write_evaluation(store, records=EVALUATION_RECORDS, name="default"):
    writer = store.results.writer("evaluation", name)
    writer.attrs["records"] = records
    return writer.commit()


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A planted-mode store (noisy, so every method has something to model) with every analysis saved."""
    W, *_ = planted_modes(n_rows=600, n_cols=30, n_modes=3, noise=0.05)
    root = tmp_path_factory.mktemp("report")
    store = from_array(root / "all.zarr", W, labels=range(1, 31),
                       tensors={"layer1.weight": (20, 10), "layer1.bias": (200,), "layer2.weight": (200,)},
                       target_chunk_bytes=4 * 64 * 30)
    PosthocCMD(modes=3, samples=200, warmup=10, device="cpu").fit(store).save("default")
    for cls, options in ((DMD, dict(rank=6)), (KGA, dict(rank=6, eps=0.02)), (PCA, dict(dims=5))):
        cls(device="cpu", **options).fit(store).save("default")
    _write_evaluation(store)
    return store


def _copy_store(store, tmp_path, keep):
    """A copy of the analysed store keeping only the result kinds in ``keep`` (the others deleted)."""
    path = tmp_path / "copy.zarr"
    shutil.copytree(store.path, path)
    copy = open_store(path, mode="r+")
    for kind, name in copy.results.list():
        if kind not in keep:
            copy.results.delete(kind, name)
    return copy


# ---------------------------------------------------------------------------------------------- figures
def test_plotting_functions_take_results_and_analyzers(analysed):
    store = analysed
    results = {k: store.results.get(k, "default") for k in ("cmd", "dmd", "kga", "pca", "evaluation")}
    cmd_loaded = PosthocCMD.load(store, "default")
    sample = F.load_cmd_sample(results["cmd"], store)
    # the sample's fitted modes and coefficients are the stored ones, row by row
    assert np.array_equal(sample.modes, results["cmd"]["mode"][sample.indices])
    assert np.allclose(sample.values, store.read_rows(sample.indices))
    figures = [
        F.correlation_matrix_figure(results["cmd"]), F.correlation_matrix_figure(cmd_loaded),
        F.mode_trajectories_figure(results["cmd"], store, sample), F.mode_trajectories_figure(cmd_loaded),
        F.reconstruction_examples_figure(cmd_loaded), F.layer_modes_figure(results["cmd"]),
        F.epoch_error_figure([results["cmd"], results["dmd"], results["pca"]]),
        F.eigenvalues_figure(results["kga"]), F.eigenvalues_figure(KGA.load(store)),
        F.eigenvalues_figure(results["dmd"]),
        F.kwm_mask_figure(results["kga"]), F.pca_variance_figure(PCA.load(store)), F.pca_path_figure(results["pca"]),
        F.evaluation_figure(results["evaluation"]),
    ]
    for fig in figures:
        assert isinstance(fig, Figure)
        panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
        # panels of a grid share their axes' labels along the outer row / column
        assert any(ax.get_xlabel() for ax in panels) and any(ax.get_ylabel() for ax in panels)
        assert fig._suptitle is not None or any(ax.get_title() for ax in fig.axes)
    with pytest.raises(UsageError, match="needs a cmd result"):
        F.correlation_matrix_figure(results["pca"])
    with pytest.raises(UsageError, match="pass the store"):
        F.mode_trajectories_figure(results["cmd"])


def test_correlation_order_is_block_diagonal_by_mode(analysed):
    cmd = analysed.results.get("cmd", "default")
    order = F.clustered_order(cmd["sample_modes"], cmd["linkage"])
    assert sorted(order.tolist()) == list(range(len(order)))
    modes = cmd["sample_modes"][order]
    assert np.all(np.diff(modes) >= 0), "rows ordered by mode"
    # planted modes: |corr| inside a mode block is far higher than across blocks
    c = cmd["correlation"][np.ix_(order, order)]
    same = modes[:, None] == modes[None, :]
    assert c[same].mean() > 0.9 > 0.5 > c[~same].mean()


def test_mode_statistics_follow_appendix_a2(analysed):
    cmd = analysed.results.get("cmd", "default")
    sample = F.load_cmd_sample(cmd, analysed)
    stats = F.mode_statistics(sample, 0, cmd["correlation"], cmd["sample_modes"])
    members = (sample.modes == 0)
    aligned = np.where(sample.a[members, None] < 0, -sample.values[members], sample.values[members])
    unit = (aligned - aligned.min(1, keepdims=True)) / np.ptp(aligned, axis=1, keepdims=True)
    assert np.allclose(stats["mean"], unit.mean(0)) and np.allclose(stats["std"], unit.std(0))
    assert stats["reference"].min() == 0.0 and stats["reference"].max() == 1.0
    assert stats["corr2"] > 0.95  # planted modes: the members' mean follows the reference


def test_evaluation_figure_one_panel_per_metric_one_line_per_method(analysed):
    fig = F.evaluation_figure(analysed.results.get("evaluation", "default"))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert sorted(ax.get_title() for ax in panels) == ["test_acc", "test_loss"]
    for ax in panels:
        assert sorted(line.get_label() for line in ax.get_lines()) == ["cmd", "ema", "original"]
        assert all(len(line.get_xdata()) == 30 for line in ax.get_lines())
    assert "fraction" in panels[0].get_ylabel()


def test_online_error_starts_after_warmup(analysed):
    series = F.epoch_error_series([analysed.results.get("cmd", "default"), analysed.results.get("kga", "default"),
                                   analysed.results.get("dmd", "default")])
    methods = [s["method"] for s in series]
    assert methods == ["cmd", "cmd-online", "dmd"], "kga's curve is dmd's: drawn only without a dmd result"
    online = series[1]["errors"]
    assert np.all(np.isnan(online[:9])) and np.all(np.isfinite(online[9:]))


# ---------------------------------------------------------------------------------------------- report
def _html_references(html_text):
    return set(re.findall(r"(?:src|href)='([^']+)'", html_text))


def test_report_has_every_figure_and_html_references_exist(analysed, tmp_path):
    out = tmp_path / "report"
    report = build_report(analysed, out, formats=("png", "svg"))
    ids = {f.id for f in report.figures}
    assert ids == ALL_FIGURES
    assert report.notes == []
    html_text = (out / "index.html").read_text()
    refs = _html_references(html_text)
    listed = {f for fig in report.figures for f in fig.files.values()}
    assert refs == listed, "the html references every image it lists and nothing else"
    for name in refs:
        assert (out / name).is_file() and (out / name).stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert {f["id"] for f in summary["figures"]} == ALL_FIGURES
    assert summary["results"]["cmd/default"]["modes"] == 3
    assert summary["results"]["kga/default"]["classes"] == {
        k: int(np.sum(analysed.results.get("kga", "default")["classes"] == c))
        for c, k in enumerate(("stable", "neutral", "unstable"))}
    assert summary["results"]["evaluation/default"]["final_epoch_metrics"]["cmd"]["epoch"] == 30
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == [], "no figure left registered with pyplot"


def test_report_skips_missing_analyses_with_notes(analysed, tmp_path):
    store = _copy_store(analysed, tmp_path, keep={"pca", "gram"})
    report = build_report(store, tmp_path / "out")
    assert {f.id for f in report.figures} == {"pca_variance", "pca_path", "epoch_errors"}
    notes = " ".join(report.notes)
    for missing in ("CMD figures skipped", "eigenvalue figure skipped", "KWM mask figure skipped",
                    "metric curves skipped"):
        assert missing in notes
    html_text = (tmp_path / "out" / "index.html").read_text()
    assert "CMD figures skipped" in html_text
    assert _html_references(html_text) == {"pca_variance.png", "pca_path.png", "epoch_errors.png"}
    assert not (tmp_path / "out" / "cmd_correlation.png").exists()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["notes"] == report.notes


def test_report_uses_the_only_result_of_another_name(analysed, tmp_path):
    store = _copy_store(analysed, tmp_path, keep={"gram"})
    _write_evaluation(store, name="run1")
    report = build_report(store, tmp_path / "out", name="default")
    assert [f.id for f in report.figures] == ["evaluation"]
    assert any("using the only one, 'run1'" in n for n in report.notes)


def test_report_of_store_without_analyses_is_a_usage_error(tmp_path):
    W, *_ = planted_modes(n_rows=50, n_cols=6)
    store_path = tmp_path / "bare.zarr"
    from_array(store_path, W)
    with pytest.raises(UsageError, match="no analysis results"):
        build_report(open_store(store_path), tmp_path / "out")
    result = CliRunner().invoke(app, ["report", "--store", str(store_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "no analysis results to report" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["export", "--store", str(store_path), "--out", str(tmp_path / "ex")])
    assert result.exit_code == 2 and "no analysis results" in result.output


def test_cli_report_and_options(analysed, tmp_path):
    runner = CliRunner()
    out = tmp_path / "r"
    result = runner.invoke(app, ["report", "--store", str(analysed.path), "--out", str(out), "--json",
                                 "--format", "pdf", "--format", "png"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {f["id"] for f in summary["figures"]} == ALL_FIGURES
    assert all((out / f"{fid}.pdf").is_file() for fid in ALL_FIGURES)
    result = runner.invoke(app, ["report", "--store", str(analysed.path), "--out", str(out), "--format", "bmp"])
    assert result.exit_code == 2 and "unknown figure format 'bmp'" in result.output
    result = runner.invoke(app, ["report", "--store", str(tmp_path / "nowhere.zarr")])
    assert result.exit_code == 2 and "no trajectory store" in result.output


# ---------------------------------------------------------------------------------------------- export
def _read_csv(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def test_export_round_trips_npy_and_hdf5(analysed, tmp_path, monkeypatch):
    # tiny blocks: N-long and N×d arrays are copied in many pieces, as a large store's would be
    monkeypatch.setattr(export_module, "COPY_BLOCK_BYTES", 1000)
    summary = export(analysed, tmp_path / "ex", formats=("npy", "hdf5"))
    assert summary.results == ["cmd/default", "dmd/default", "kga/default", "pca/default", "evaluation/default"]
    with h5py.File(tmp_path / "ex" / "cmdtool.h5", "r") as h5:
        for kind in ("cmd", "dmd", "kga", "pca"):
            result = analysed.results.get(kind, "default")
            group = h5[f"{kind}/default"]
            assert np.array_equal(group["labels"][...], result.attrs["labels"])
            assert json.loads(group.attrs["attrs_json"])["config"] == result.config
            for key in result.keys():
                stored = result[key]
                from_npy = np.load(tmp_path / "ex" / "npy" / kind / "default" / f"{key}.npy")
                assert from_npy.dtype == stored.dtype and np.array_equal(from_npy, stored), (kind, key)
                assert np.array_equal(group[key][...], stored), (kind, key)
        assert "cmd/default/A" in h5 and h5["cmd/default/A"].shape == (analysed.n_rows,)
        assert h5["pca/default/directions"].shape[0] == analysed.n_rows
        records = json.loads(h5["evaluation/default"].attrs["attrs_json"])["records"]
        assert records == EVALUATION_RECORDS


def test_export_csv_tables_equal_the_store(analysed, tmp_path):
    export(analysed, tmp_path / "ex", formats=("csv",))
    root = tmp_path / "ex" / "csv"
    assert not (tmp_path / "ex" / "npy").exists() and not (tmp_path / "ex" / "cmdtool.h5").exists()
    cmd = analysed.results.get("cmd", "default")
    header, rows = _read_csv(root / "cmd" / "default" / "epoch_errors.csv")
    assert header == ["epoch", "relative_error", "online_relative_error"]
    assert [int(r[0]) for r in rows] == cmd.attrs["labels"]
    assert [float(r[1]) for r in rows] == cmd.metrics["epoch_relative_error"]
    assert [float(r[2]) for r in rows] == cmd.metrics["online"]["epoch_relative_error"]
    _, rows = _read_csv(root / "cmd" / "default" / "mode_sizes.csv")
    assert [int(r[1]) for r in rows] == cmd.metrics["mode_sizes"]
    assert [int(r[3]) for r in rows] == cmd["reference_indices"].tolist()
    _, rows = _read_csv(root / "cmd" / "default" / "reference_trajectories.csv")
    assert np.array_equal(np.array([[float(x) for x in r[1:]] for r in rows]).T,
                          cmd["reference_trajectories"].astype(np.float64))
    header, rows = _read_csv(root / "cmd" / "default" / "layers.csv")
    assert [r[0] for r in rows] == list(cmd.metrics["layers"])
    kga = analysed.results.get("kga", "default")
    header, rows = _read_csv(root / "kga" / "default" / "spectrum.csv")
    eigenvalues = np.array([complex(float(r[1]), float(r[2])) for r in rows])
    assert np.array_equal(eigenvalues, kga["eigenvalues"])
    assert [r[-1] for r in rows] == [kga.attrs["class_codes"][str(c)] for c in kga["classes"]]
    _, rows = _read_csv(root / "kga" / "default" / "layers.csv")
    assert [int(r[2]) for r in rows] == kga["masked_per_tensor"].tolist()
    pca = analysed.results.get("pca", "default")
    _, rows = _read_csv(root / "pca" / "default" / "explained_variance.csv")
    assert np.array_equal([float(r[2]) for r in rows], pca["explained_variance_ratio"])
    _, rows = _read_csv(root / "pca" / "default" / "coordinates.csv")
    assert np.array_equal(np.array([[float(x) for x in r[1:]] for r in rows]), pca["coordinates"])
    _, rows = _read_csv(root / "evaluation" / "default" / "records.csv")
    assert len(rows) == 2 * len(EVALUATION_RECORDS)


def test_cli_export_options_and_errors(analysed, tmp_path):
    runner = CliRunner()
    out = tmp_path / "ex"
    result = runner.invoke(app, ["export", "--store", str(analysed.path), "--out", str(out), "-m", "pca",
                                 "-f", "npy", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["results"] == ["pca/default"]
    assert np.array_equal(np.load(out / "npy" / "pca" / "default" / "means.npy"),
                          analysed.results.get("pca", "default")["means"])
    for args, message in ((["-m", "nosuch"], "no nosuch result"), (["-f", "xlsx"], "unknown export format"),
                          (["-m", "cmd", "--name", "other"], "no cmd result named 'other'")):
        result = runner.invoke(app, ["export", "--store", str(analysed.path), "--out", str(out), *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
