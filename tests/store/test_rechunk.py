"""`cmdtool rechunk`: same values and labels, new chunks, results kept, bounded memory, survives SIGKILL."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

import cmdtool
from cmdtool.store import format as fmt
from cmdtool.store import from_array
from cmdtool.store.rechunk import default_chunk_shape, rechunk
from cmdtool.store.verify import verify_store

from tests.conftest import kill_after, release, spawn_waiting_child


def narrow_store(path, rows=20_000, cols=24, seed=0, chunk_rows=1500):
    """A store with the narrow chunks a small ingest budget gives a large model (one checkpoint per chunk)."""
    W = np.random.default_rng(seed).normal(size=(rows, cols)).cumsum(axis=1).astype(np.float32)
    store = from_array(path, W, labels=range(5, 5 + cols), chunk_columns=1, target_chunk_bytes=4 * chunk_rows,
                       tensors={"a.weight": (rows // 2,), "b.weight": (rows - rows // 2,)})
    return store, W


def test_rechunk_keeps_values_labels_and_results(tmp_path):
    store, W = narrow_store(tmp_path / "s.zarr")
    from cmdtool.analyzers import get_analyzer

    analyzer = get_analyzer("dmd").from_options({"rank": "2", "device": "cpu"})
    analyzer.fit(cmdtool.open_store(store.path, mode="r+"))
    analyzer.save("default")
    revision = cmdtool.open_store(store.path).revision

    report = rechunk(store.path, memory_budget="1MiB")  # forces many row blocks
    assert report.old_chunks == (1500, 1) and report.new_chunks == default_chunk_shape(*W.shape)
    after = cmdtool.open_store(store.path)
    assert after.chunk_shape == report.new_chunks and after.meta["chunk_shape"] == list(report.new_chunks)
    np.testing.assert_array_equal(after.trajectories[:, :], W)
    assert after.labels.tolist() == list(range(5, 29)) and after.revision == revision
    assert after.results.exists("dmd", "default")
    assert verify_store(after).ok
    assert not (store.path / fmt.STAGING).exists()
    assert rechunk(store.path).unchanged  # again: nothing to do

    report = rechunk(store.path, chunk_rows=700, chunk_columns=10, codec="none")
    after = cmdtool.open_store(store.path)
    assert after.chunk_shape == (700, 10) and after.codec == "none"
    np.testing.assert_array_equal(after.trajectories[:, :], W)
    # appending after a rechunk writes into the wider chunks (partial chunks are read, merged and rewritten)
    extra = np.random.default_rng(1).normal(size=(W.shape[0], 3)).astype(np.float32)
    writable = cmdtool.open_store(store.path, mode="r+")
    writable.resize_columns(27)
    writable.trajectories[:, 24:27] = extra
    np.testing.assert_array_equal(writable.trajectories[:, :24], W)


def test_a_reader_of_the_old_chunks_stops_instead_of_misreading(tmp_path):
    store, W = narrow_store(tmp_path / "s.zarr")
    reader = cmdtool.open_store(store.path)
    first = next(iter(reader.iter_blocks(block_rows=1500, prefetch=0)))
    np.testing.assert_array_equal(first.data, W[:1500])
    rechunk(store.path)
    with pytest.raises(cmdtool.errors.StoreError, match="rechunked while"):
        list(reader.iter_blocks(block_rows=1500, prefetch=0))


def test_a_swap_cut_between_its_two_renames_is_finished(tmp_path, monkeypatch):
    import cmdtool.store.rechunk as rechunk_module

    store, W = narrow_store(tmp_path / "s.zarr")
    monkeypatch.setattr("cmdtool.utils.os_calls.exchange_paths", lambda a, b: False)  # a filesystem without renameat2

    def killed_swap(store_path, name):  # the first rename only, as a kill after it would leave
        (store_path / name).rename(store_path / fmt.STAGING / f"{name}.old")
        raise KeyboardInterrupt

    monkeypatch.setattr(rechunk_module, "swap_in", killed_swap)
    with pytest.raises(KeyboardInterrupt):
        rechunk(store.path)
    assert not (store.path / fmt.TRAJECTORIES).exists()
    reader = cmdtool.open_store(store.path)  # a reader reads the complete staged copy
    np.testing.assert_array_equal(reader.trajectories[:, :], W)
    monkeypatch.undo()
    writer = cmdtool.open_store(store.path, mode="r+")  # a writer finishes the swap
    assert (store.path / fmt.TRAJECTORIES / "zarr.json").is_file()
    np.testing.assert_array_equal(writer.trajectories[:, :], W)


CHILD = """
import sys
from cmdtool.store.rechunk import rechunk
print("ready", flush=True)
sys.stdin.readline()
rechunk(sys.argv[1], memory_budget="2MiB")
print("done", flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_rechunk_leaves_the_store_as_before_or_rechunked(tmp_path):
    import shutil

    source, W = narrow_store(tmp_path / "source.zarr", rows=36_000, chunk_rows=6000)
    reference = source.path.with_name("ref.zarr")
    shutil.copytree(source.path, reference)
    started = time.perf_counter()
    rechunk(reference, memory_budget="2MiB")
    duration = time.perf_counter() - started
    new_chunks = cmdtool.open_store(reference).chunk_shape

    fractions = sorted(np.random.default_rng(3).uniform(0.05, 1.2, 4))
    paths = [Path(shutil.copytree(source.path, tmp_path / f"kill{i}.zarr")) for i in range(len(fractions))]
    children = [spawn_waiting_child(CHILD, path) for path in paths]
    outcomes = []
    for path, child, fraction in zip(paths, children, fractions):
        release(child)
        kill_after(child, duration * fraction)
        store = cmdtool.open_store(path)
        assert store.chunk_shape in ((6000, 1), new_chunks)
        outcomes.append(store.chunk_shape == new_chunks)
        np.testing.assert_array_equal(store.trajectories[:, :store.n_checkpoints], W)
        assert store.labels.tolist() == list(range(5, 29))
        assert verify_store(store).ok
        rechunk(path, memory_budget="2MiB")  # the rerun completes and cleans up
        done = cmdtool.open_store(path)
        assert done.chunk_shape == new_chunks and not (path / fmt.STAGING).exists()
        np.testing.assert_array_equal(done.trajectories[:, :], W)
    assert not all(outcomes)  # at least one kill landed before the swap


def test_rechunk_command(tmp_path):
    from typer.testing import CliRunner

    from cmdtool_cli.app import app

    store, _ = narrow_store(tmp_path / "s.zarr", rows=3000)
    result = CliRunner().invoke(app, ["rechunk", "--store", str(store.path), "--json"])
    assert result.exit_code == 0, result.output
    assert '"new_chunks"' in result.output
    result = CliRunner().invoke(app, ["rechunk", "--store", str(store.path), "--codec", "zstd"])
    assert result.exit_code == 2 and "unknown codec" in result.output


RSS_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[3])
from _measure import peak_rss_mb
import cmdtool, zarr, numpy
from cmdtool.store.rechunk import rechunk
base = peak_rss_mb()
rechunk(sys.argv[1], memory_budget=sys.argv[2])
print(json.dumps({"growth_mb": peak_rss_mb() - base, "peak_mb": peak_rss_mb()}))
"""


@pytest.mark.slow
def test_rechunk_peak_memory_is_flat_in_the_store_size(tmp_path):
    """Peak growth of a rechunk follows its budget, not the store: the same for a 24 MB and a 96 MB store."""
    import json
    import os
    import subprocess
    import sys

    growth, peaks = [], []
    for rows in (250_000, 1_000_000):
        W = np.random.default_rng(0).normal(size=(rows, 24)).astype(np.float32)
        path = tmp_path / f"s{rows}.zarr"
        from_array(path, W, chunk_columns=1, target_chunk_bytes=4 * 50_000)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), "8MiB",
                              os.path.join(os.path.dirname(__file__), "..", "..", "bench")],
                             capture_output=True, text=True, env=env, check=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        growth.append(measured["growth_mb"])
        peaks.append(measured["peak_mb"])
        np.testing.assert_array_equal(cmdtool.open_store(path).trajectories[:, :], W)
    # 8 MiB budget + zarr's decode/encode buffers (measured 43-46 and 55-69 MB of growth), far below the 96 MB
    # store; the 72 MB more data adds less than half of it to the peak. (A relative bound on the ~90 MB peaks failed
    # 1 run in 5: allocator noise of 10-25 MB is a quarter of such a small process.)
    assert max(growth) < 96 and growth[1] - growth[0] < 36, growth
    assert peaks[1] - peaks[0] < 36, peaks
