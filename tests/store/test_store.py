"""The block reader, windows, gathers, results and the Gram pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cmdtool
from cmdtool.passes.local import RowGather, cached_gram, gram_matrix
from cmdtool.errors import UsageError
from cmdtool_cli.app import app


def test_blocks_cover_every_row_once(random_store):
    store, W = random_store
    seen = []
    for start, stop, block in store.iter_blocks(block_rows=64):
        assert block.dtype == np.float32 and block.shape == (stop - start, 17)
        seen.append((start, stop))
        np.testing.assert_array_equal(block, W[start:stop])
    assert seen[0][0] == 0 and seen[-1][1] == 500
    assert all(a[1] == b[0] for a, b in zip(seen, seen[1:]))


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_column_windows_and_row_ranges(random_store, prefetch):
    store, W = random_store
    cols = store.resolve_epochs("12:20")
    assert (cols.start, cols.stop) == (2, 11)
    rows = slice(70, 431)
    got = np.concatenate([b.data for b in store.iter_blocks(columns=cols, rows=rows, block_rows=100,
                                                            prefetch=prefetch)])
    np.testing.assert_array_equal(got, W[70:431, 2:11])


def test_torch_blocks_on_cpu(random_store):
    store, W = random_store
    blocks = list(store.iter_blocks(block_rows=128, device="cpu", dtype=torch.float64))
    assert all(isinstance(b.data, torch.Tensor) and b.data.dtype == torch.float64 for b in blocks)
    np.testing.assert_allclose(torch.cat([b.data for b in blocks]).numpy(), W)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_torch_blocks_on_cuda(random_store):
    store, W = random_store
    blocks = list(store.iter_blocks(block_rows=128, device="cuda"))
    assert blocks[0].data.is_cuda
    np.testing.assert_array_equal(torch.cat([b.data for b in blocks]).cpu().numpy(), W)


def test_stopping_early_stops_the_reader_thread(random_store):
    import threading

    store, _ = random_store
    for block in store.iter_blocks(block_rows=8, prefetch=2):
        break
    del block
    assert not any(t.name == "cmdtool-block-reader" and t.is_alive() for t in threading.enumerate())


def test_read_rows_gathers_any_order(random_store):
    store, W = random_store
    idx = np.array([499, 3, 250, 3, 64, 0])
    np.testing.assert_array_equal(store.read_rows(idx), W[idx])
    np.testing.assert_array_equal(store.read_rows(idx, columns=slice(5, 9)), W[idx, 5:9])


def test_epoch_labels_and_errors(random_store):
    store, _ = random_store
    assert store.column_of(26) == 16
    with pytest.raises(UsageError, match=r"available epochs: 10\.\.26"):
        store.column_of(99)
    with pytest.raises(UsageError, match="selects no checkpoint"):
        store.resolve_epochs("40:50")
    with pytest.raises(UsageError, match="cannot read epoch window"):
        store.resolve_epochs("a-b")
    assert store.resolve_epochs(":12") == slice(0, 3)


def test_gram_pass_matches_dense_and_is_cached(tmp_path, random_store):
    store, W = random_store
    store = cmdtool.open_store(store.path, mode="r+")
    gram = gram_matrix(store, device="cpu")
    W64 = W.astype(np.float64)
    np.testing.assert_allclose(gram.gram, W64.T @ W64, rtol=1e-12)
    np.testing.assert_allclose(gram.column_sums, W64.sum(0), rtol=1e-12)
    window_gram, _ = gram.window(slice(3, 9))
    np.testing.assert_allclose(window_gram, W64[:, 3:9].T @ W64[:, 3:9], rtol=1e-12)
    cached = cached_gram(store)
    assert cached is not None and np.array_equal(cached.gram, gram.gram)
    # a sample can ride along with the (cached) Gram pass
    gather = RowGather([5, 400, 17])
    gram_matrix(store, extra=[gather])
    np.testing.assert_array_equal(gather.values, W[[5, 400, 17]])


def test_gram_leaves_out_nonfinite_rows(tmp_path):
    W = np.arange(40, dtype=np.float32).reshape(10, 4)
    W[3, 2] = np.nan
    store = cmdtool.store.from_array(tmp_path / "n.zarr", W)
    gram = gram_matrix(store)
    finite = np.delete(W, 3, axis=0).astype(np.float64)
    np.testing.assert_allclose(gram.gram, finite.T @ finite)
    assert gram.nonfinite_rows == 1 and gram.rows == 9


def test_results_commit_atomically_and_replace(random_store):
    store, _ = random_store
    store = cmdtool.open_store(store.path, mode="r+")
    writer = store.results.writer("demo", "x")
    writer.put("values", np.arange(5))
    assert not store.results.exists("demo", "x")  # staged, not visible
    writer.attrs["config"] = {"k": 1}
    result = writer.commit()
    assert store.results.exists("demo", "x") and result.config == {"k": 1}
    np.testing.assert_array_equal(result["values"], np.arange(5))
    writer = store.results.writer("demo", "x")
    writer.put("values", np.arange(3))
    writer.commit()
    assert store.results.get("demo", "x")["values"].tolist() == [0, 1, 2]
    assert len([p for p in (store.path / "results" / "demo").iterdir() if p.is_dir()]) == 1  # replaced one gone
    with pytest.raises(UsageError, match="no demo result named 'y'"):
        store.results.get("demo", "y")


def test_result_row_ranges_read_from_chunk_files_as_zarr_does(random_store):
    """A committed result's row ranges are read from its chunk files directly (results.RowRanges): the same
    values as zarr's for 1-D and 2-D arrays and ranges across chunks; a chunk zarr left unwritten reads as the
    fill value, a damaged one is a CorruptionError naming it."""
    from cmdtool.errors import CorruptionError
    from cmdtool.store.results import RowRanges

    store, _ = random_store
    store = cmdtool.open_store(store.path, mode="r+")
    rng = np.random.default_rng(3)
    vector, matrix = rng.normal(size=1000).astype(np.float32), rng.integers(-9, 9, size=(1000, 3)).astype(np.int16)
    writer = store.results.writer("demo", "rows")
    writer.create("vector", (1000,), np.float32, chunks=(96,))[0:1000] = vector
    writer.create("matrix", (1000, 3), np.int16, chunks=(128, 3))[0:1000] = matrix
    result = writer.commit()
    for key, expected in (("vector", vector), ("matrix", matrix)):
        array = result.array(key)
        assert isinstance(array, RowRanges)
        for lo, hi in ((0, 1000), (95, 97), (100, 356), (999, 1000), (0, 1)):
            np.testing.assert_array_equal(array[lo:hi], expected[lo:hi])
            np.testing.assert_array_equal(array[lo:hi], result.group[key][lo:hi])
        np.testing.assert_array_equal(array[::7], expected[::7])   # anything else is zarr's
    chunk = result.folder / "vector" / "c" / "1"
    chunk.unlink()
    np.testing.assert_array_equal(result.array("vector")[90:200], np.r_[vector[90:96], np.zeros(96), vector[192:200]])
    chunk = result.folder / "matrix" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptionError, match=r"matrix: chunk \(2, 0\) failed its checksum"):
        result.array("matrix")[200:300]


def test_info_json(tmp_path, random_store):
    store, _ = random_store
    result = CliRunner().invoke(app, ["info", "--store", str(store.path), "--json"])
    assert result.exit_code == 0, result.output
    import json

    summary = json.loads(result.output)
    assert summary["parameters"] == 500 and summary["checkpoints"] == 17
    assert summary["labels"] == {"first": 10, "last": 26}
    assert summary["compression_ratio"] > 0
