"""SIGKILL during decompose: no half-written result is ever visible, and a rerun equals an uninterrupted run."""

from __future__ import annotations

import time

import numpy as np
import pytest

import cmdtool
from cmdtool.analyzers import get_analyzer
from cmdtool.store import from_array
from cmdtool.store.verify import verify_store

from tests.conftest import kill_after, planted_modes, release, spawn_waiting_child

CHILD = """
import sys, cmdtool
from cmdtool.analyzers import get_analyzer
store = cmdtool.open_store(sys.argv[1], mode="r+")
options = dict(modes=4, samples=300, warmup=8, rank="0", dims=6, save_modes=True, device="cpu")
print("ready", flush=True)
sys.stdin.readline()
for method in sys.argv[2].split(","):
    analyzer = get_analyzer(method).from_options(options)
    analyzer.fit(store)
    analyzer.save("default")
print("done", flush=True)
"""
OPTIONS = dict(modes=4, samples=300, warmup=8, rank="0", dims=6, save_modes=True, device="cpu")
METHODS = ["cmd", "dmd", "pca"]


def fit_all(store):
    out = {}
    for method in METHODS:
        analyzer = get_analyzer(method).from_options(OPTIONS)
        analyzer.fit(store)
        analyzer.save("default")
        out[method] = analyzer
    return out


def result_arrays(store, method):
    result = store.results.get(method, "default")
    return {key: np.asarray(result.array(key)[...]) for key in result.keys()}


@pytest.fixture
def crash_store(tmp_path):
    W, *_ = planted_modes(n_rows=60_000, n_cols=24, n_modes=4, noise=0.05)
    from_array(tmp_path / "ref.zarr", W, labels=range(1, 25), target_chunk_bytes=4 * 24 * 8192)
    return tmp_path, W


@pytest.mark.slow
def test_sigkill_during_decompose_never_exposes_a_partial_result(crash_store):
    tmp_path, W = crash_store
    reference_store = cmdtool.open_store(tmp_path / "ref.zarr", mode="r+")
    started = time.perf_counter()
    fit_all(reference_store)
    duration = time.perf_counter() - started
    reference = {m: result_arrays(reference_store, m) for m in METHODS}

    rng = np.random.default_rng(7)
    fractions = sorted(rng.uniform(0.0, 1.1, 8))
    stores, children = [], []
    for i in range(len(fractions)):
        path = tmp_path / f"kill{i}.zarr"
        from_array(path, W, labels=range(1, 25), target_chunk_bytes=4 * 24 * 8192)
        stores.append(path)
        children.append(spawn_waiting_child(CHILD, path, ",".join(METHODS)))
    for path, proc, fraction in zip(stores, children, fractions):
        release(proc)
        kill_after(proc, duration * fraction)
        store = cmdtool.open_store(path, mode="r+")
        # whatever was committed is complete and equal to the uninterrupted run; the rest is absent
        for method in METHODS:
            if store.results.exists(method, "default"):
                got = result_arrays(store, method)
                assert got.keys() == reference[method].keys()
                for key in got:
                    np.testing.assert_allclose(got[key], reference[method][key], rtol=1e-6, atol=1e-7)
        assert verify_store(store).ok
        fit_all(store)  # rerun
        for method in METHODS:
            got = result_arrays(store, method)
            for key in reference[method]:
                np.testing.assert_allclose(got[key], reference[method][key], rtol=1e-6, atol=1e-7)
        # staged folders of the killed run are not results; the index names only complete ones
        committed = set(store.results._index().values())
        for method in METHODS:
            listed = [p.name for p in (path / "results" / method).iterdir()]
            assert sum(f"{method}/{n}" in committed for n in listed) == 1


REPORT_CHILD = """
import sys, cmdtool
from cmdtool.report.html_report import build_report
store = cmdtool.open_store(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
build_report(store, sys.argv[2])
"""


def report_files(folder):
    """The report's files, and a check that index.html references only files that exist."""
    import re

    index = (folder / "index.html").read_text()
    for ref in re.findall(r'(?:src|href)="([^"#:]+)"', index):
        assert (folder / ref).is_file(), f"index.html references missing {ref}"
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.slow
def test_sigkill_during_report_never_leaves_a_partial_report(crash_store):
    from cmdtool.report.html_report import build_report

    tmp_path, _ = crash_store
    store = cmdtool.open_store(tmp_path / "ref.zarr", mode="r+")
    fit_all(store)
    started = time.perf_counter()
    build_report(store, tmp_path / "reference-report")
    duration = time.perf_counter() - started
    expected = report_files(tmp_path / "reference-report")
    fractions = sorted(np.random.default_rng(3).uniform(0.0, 1.0, 4))
    outs = [tmp_path / f"report{i}" for i in range(len(fractions))]
    build_report(store, outs[-1])  # an older complete report in place: a kill must not damage it
    children = [spawn_waiting_child(REPORT_CHILD, tmp_path / "ref.zarr", out) for out in outs]
    for out, proc, fraction in zip(outs, children, fractions):
        release(proc)
        kill_after(proc, duration * fraction)
        if out.exists():  # complete (old or new), never partial
            assert report_files(out) == expected
        build_report(store, out)  # rerun
        assert report_files(out) == expected
        assert not list(tmp_path.glob(".cmdtool-partial-*"))  # staging folders of killed runs are cleared
