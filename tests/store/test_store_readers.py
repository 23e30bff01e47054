"""The zarr-free readers of a store (issue #11's fast `info` and `verify`) read exactly what zarr reads: the
metadata documents give the same summary as the opened store, and every chunk file of every array cmdtool writes
(numbers compressed or not, integers, complex results, the tensor names) decodes to zarr's values."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import cmdtool
from cmdtool.analyzers import get_analyzer
from cmdtool.store.chunk_files import ArrayDocument, ChunkDamage, is_array
from cmdtool.store.metadata import StoreMetadata
from cmdtool.store.summary import summarize, summarize_store
from cmdtool.store.verify import verify_store

from tests.conftest import write_checkpoints


@pytest.fixture(scope="module", params=["lz4", "none"])
def analysed(request, tmp_path_factory):
    """A store ingested from real checkpoints (with integer tensors) and fitted by CMD, DMD and KGA (complex
    eigenvalues among the results)."""
    root = tmp_path_factory.mktemp(f"readers-{request.param}")
    write_checkpoints(root / "ck", n_epochs=7)
    cmdtool.ingest([root / "ck"], root / "s.zarr", codec=request.param)
    store = cmdtool.open_store(root / "s.zarr", mode="r+")
    for method, config in (("cmd", {"modes": 2}), ("dmd", {}), ("kga", {})):
        get_analyzer(method)(**config).fit(store).save()
    return cmdtool.open_store(root / "s.zarr")


def _every_array(folder):
    for child in sorted(folder.rglob("zarr.json")):
        if is_array(child.parent):
            yield child.parent


def test_metadata_documents_summarise_like_the_opened_store(analysed):
    view = StoreMetadata.read(analysed.path)
    assert (view.chunk_shape, view.codec, view.revision) == (analysed.chunk_shape, analysed.codec,
                                                             analysed.revision)
    assert summarize(view) == summarize(analysed) == summarize_store(analysed.path)
    assert [a["method"] for a in summarize(view)["analyses"]] == ["cmd", "dmd", "gram", "kga"]


def test_every_chunk_decodes_to_zarrs_values(analysed):
    arrays = list(_every_array(analysed.path))
    kinds = {ArrayDocument.read(folder).data_type for folder in arrays}
    assert {"float32", "int64", "string", "complex128"} <= kinds  # every kind of array the store holds
    for folder in arrays:
        document = ArrayDocument.read(folder)
        expected = zarr.open_array(str(folder), mode="r")
        for index in document.chunk_indices():
            chunk = document.read_chunk(index)
            where = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, document.chunk_shape,
                                                                              document.shape))
            want = np.asarray(expected[where])
            if chunk is None:  # never written: zarr reads the fill value
                assert np.all(want == expected.fill_value), folder
                continue
            got = chunk[tuple(slice(0, w.stop - w.start) for w in where)]
            assert got.dtype == want.dtype or document.data_type == "string"
            np.testing.assert_array_equal(got, want, err_msg=str(folder))


def test_damage_is_named_not_guessed(analysed, tmp_path):
    document = ArrayDocument.read(analysed.path / "trajectories")
    data = bytearray(document.chunk_file((0, 0)).read_bytes())
    data[len(data) // 3] ^= 0x01
    with pytest.raises(ChunkDamage, match="checksum"):
        document.decode(bytes(data))
    with pytest.raises(ChunkDamage, match="checksum"):
        document.decode(b"ab")  # shorter than its checksum
    document.codecs = [{"name": "gzip"}]
    with pytest.raises(ChunkDamage, match="codec 'gzip'"):
        document.decode(bytes(data))


def test_verify_of_the_metadata_view_finds_a_damaged_result(analysed, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(analysed.path, copy)
    view = StoreMetadata.read(copy)
    report = verify_store(view)
    assert report.ok and report.chunks_checked > 10
    dmd_arrays = [f for f in _every_array(copy / "results" / "dmd") if any((f / "c").rglob("*"))]
    chunk = next(p for p in (dmd_arrays[0] / "c").rglob("*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:-1] + bytes([chunk.read_bytes()[-1] ^ 0xFF]))
    report = verify_store(StoreMetadata.read(copy))
    assert [(d.array, d.problem) for d in report.damage] == [("results/dmd/default", "checksum")]


@pytest.mark.parametrize("chunk_columns, target_chunk_bytes", [(None, 64 * 1024), (3, 16 * 1024), (7, 4096)])
def test_direct_reads_equal_zarr_for_any_region(tmp_path, chunk_columns, target_chunk_bytes):
    """The store reads its local chunk files itself (store.py ``_read`` -> ``read_region``): every region, aligned
    or not, with chunks narrower than T or spanning it, equals zarr's reading of the same array."""
    from cmdtool.store import from_array

    rng = np.random.default_rng(1)
    values = rng.normal(size=(5003, 20)).astype(np.float32)
    store = from_array(tmp_path / "s.zarr", values, chunk_columns=chunk_columns, target_chunk_bytes=target_chunk_bytes)
    store = cmdtool.open_store(store.path)
    store.trajectories
    assert store._trajectory_files is not None  # the direct path is the one under test
    chunk_rows = store.chunk_shape[0]
    regions = [(slice(0, 5003), slice(0, 20)), (slice(chunk_rows, 3 * chunk_rows), slice(0, 20)),
               (slice(17, 4999), slice(2, 19)), (slice(5002, 5003), slice(19, 20))]
    regions += [(slice(int(a), int(a) + int(n)), slice(int(c), int(c) + int(k)))
                for a, n, c, k in zip(rng.integers(0, 4000, 8), rng.integers(1, 1000, 8), rng.integers(0, 10, 8),
                                      rng.integers(1, 10, 8))]
    for rows, columns in regions:
        np.testing.assert_array_equal(store._read(rows, columns), values[rows, columns])
    blocks = np.concatenate([block.data for block in store.iter_blocks(block_rows=777)])
    np.testing.assert_array_equal(blocks, values)


def test_direct_reads_from_threads_at_once(tmp_path):
    """Each thread has its own read buffers: concurrent reads (a Dask worker's threads) do not mix chunks."""
    from concurrent.futures import ThreadPoolExecutor

    from cmdtool.store import from_array

    values = np.random.default_rng(2).normal(size=(20000, 12)).astype(np.float32)
    store = from_array(tmp_path / "s.zarr", values, target_chunk_bytes=32 * 1024)
    store = cmdtool.open_store(store.path)
    starts = list(range(0, 20000, 500)) * 3
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda r: store._read(slice(r, r + 500), slice(0, 12)), starts))
    for start, block in zip(starts, got):
        np.testing.assert_array_equal(block, values[start:start + 500])


def test_a_missing_chunk_fails_the_read_instead_of_reading_zeros(analysed, tmp_path):
    import shutil

    from cmdtool.errors import CorruptionError

    copy = tmp_path / "copy.zarr"
    shutil.copytree(analysed.path, copy)
    (copy / "trajectories" / "c" / "0" / "0").unlink()
    with pytest.raises(CorruptionError, match=r"'trajectories' in rows 0\.\.\d+, columns 0\.\.6 is missing"):
        list(cmdtool.open_store(copy).iter_blocks())


def test_direct_reads_of_both_codecs_equal_zarr(analysed):
    """lz4 chunks are decompressed into the result, uncompressed ones (``--codec none``) copied: both as zarr."""
    store = cmdtool.open_store(analysed.path)
    expected = np.asarray(zarr.open_array(str(store.path / "trajectories"), mode="r")[:, :store.n_checkpoints])
    np.testing.assert_array_equal(np.concatenate([b.data for b in store.iter_blocks()]), expected)
    np.testing.assert_array_equal(store.read_column(3), expected[:, 3])


@pytest.mark.parametrize("chunk_columns", [7, 20])
def test_direct_writes_read_back_by_zarr(tmp_path, chunk_columns):
    """``TrajectoryStore.write_region`` encodes chunk files itself (ingest's writes): regions of any shape, whole
    chunks and parts of chunks (read, updated, rewritten), strided values, the padded edge chunks, and columns
    appended later, all read back by zarr as written; no temporary file is left behind."""
    from cmdtool.store import from_array

    rng = np.random.default_rng(3)
    expected = np.zeros((5003, 20), dtype=np.float32)
    store = from_array(tmp_path / "s.zarr", expected[:, :12], chunk_columns=chunk_columns,
                       target_chunk_bytes=8192)
    store = cmdtool.open_store(store.path, mode="r+")
    store.resize_columns(20)
    assert store._trajectory_files is not None
    for _ in range(40):
        start, size = int(rng.integers(0, 5000)), int(rng.integers(1, 1500))
        first, width = int(rng.integers(0, 19)), int(rng.integers(1, 12))
        rows, columns = slice(start, min(start + size, 5003)), slice(first, min(first + width, 20))
        values = rng.normal(size=(columns.stop - columns.start, rows.stop - rows.start)).astype(np.float32)
        store.write_region(rows, columns, values.T)  # a transposed view, as ingest's buffers are
        expected[rows, columns] = values.T
    stored = np.asarray(zarr.open_array(str(store.path / "trajectories"), mode="r")[:, :20])
    np.testing.assert_array_equal(stored, expected)
    assert not list(store.path.rglob("*.partial"))


@pytest.mark.parametrize("read_ahead_bytes, most_alive", [(10**9, 4), (1, 3)])
def test_the_reader_holds_the_consumers_block_and_its_read_ahead_only(monkeypatch, read_ahead_bytes, most_alive):
    """Blocks alive while a slow consumer iterates: its own, those read ahead (2, or 1 when two would pass
    READ_AHEAD_BYTES) and the next read starting while the consumer's loop variable still holds its last one.
    The earlier queue let the producer finish one block more than that (5 alive at 114 MB blocks: 758 MB CMD
    peak at ResNet-18 size instead of 539)."""
    import time
    import weakref

    from cmdtool.store import reader

    monkeypatch.setattr(reader, "READ_AHEAD_BYTES", read_ahead_bytes)
    alive, most = [], [0]  # weak references to every block read (arrays are not hashable: no WeakSet)

    def read(rows, columns):
        values = np.full((rows.stop - rows.start, columns.stop - columns.start), rows.start, dtype=np.float32)
        alive.append(weakref.ref(values))
        most[0] = max(most[0], sum(ref() is not None for ref in alive))
        return values

    starts = []
    for block in reader.iter_row_blocks(read, slice(0, 200), slice(0, 4), 10, prefetch=2):
        time.sleep(0.01)  # the producer runs as far ahead as it may
        starts.append(int(block.data[0, 0]))
    assert starts == list(range(0, 200, 10)) and most[0] <= most_alive


def test_block_arrays_are_reused_only_after_the_consumer_releases_them(tmp_path, monkeypatch):
    """With ``reuse_arrays`` the reader reads into a block's array again only after ``block.release()`` (or the
    end of ``with block:``): blocks held without release keep their values however long the iteration goes on,
    and released ones are read into again (few arrays allocated for many blocks)."""
    from cmdtool.store import from_array, reader

    values = np.random.default_rng(3).normal(size=(30011, 12)).astype(np.float32)
    store = cmdtool.open_store(from_array(tmp_path / "s.zarr", values, target_chunk_bytes=16 * 1024).path)
    lent = []
    original_empty = reader.BlockArrays.empty

    def counted_empty(self, shape, dtype):
        array = original_empty(self, shape, dtype)
        lent.append(array.base if array.base is not None else array)
        return array

    monkeypatch.setattr(reader.BlockArrays, "empty", counted_empty)

    def read_holding_some(prefetch: int, held=(2, 3, 24, 27)) -> int:
        """Iterate, holding the blocks ``held`` without release; the number of distinct arrays lent."""
        lent.clear()
        kept = []
        for k, block in enumerate(store.iter_blocks(block_rows=1000, prefetch=prefetch, reuse_arrays=True)):
            np.testing.assert_array_equal(block.data, values[block.start:block.stop])
            if k in held:  # held without release: early ones while the pool is small, late ones too
                kept.append((block.start, block.stop, block.data))
                continue
            with block:
                pass
            assert block.data is None  # released: no longer the consumer's
        for start, stop, data in kept:
            np.testing.assert_array_equal(data, values[start:stop])  # none read into again
        assert len(lent) == 31
        return len({id(array) for array in lent})

    # read in the consumer's thread, the order of events is fixed. The pool keeps 2 arrays (prefetch 0 + 2):
    # blocks 0 and 1 share the first, block 2 keeps it, block 3 keeps the second; from then on the pool has
    # nothing to hand out again, and blocks 4-30 get arrays of their own
    assert read_holding_some(prefetch=0) == 2 + 27
    assert read_holding_some(prefetch=0, held=()) == 1  # every block released: one array serves all 31
    # read ahead in a thread, how many blocks are in flight at a read depends on timing; reuse still happens
    assert read_holding_some(prefetch=2) < 31

    # a consumer that never releases gets every block intact (nothing is reused behind its back)
    held = [block for block in store.iter_blocks(block_rows=1000, reuse_arrays=True)]
    np.testing.assert_array_equal(np.concatenate([block.data for block in held]), values)

    for device in ("cpu", None):  # blocks as CPU tensors share the pool's arrays the same way
        got = []
        for block in store.iter_blocks(block_rows=1000, device=device, reuse_arrays=True):
            got.append(block.data.clone() if device else block.data.copy())
            block.release()
        np.testing.assert_array_equal(np.concatenate([np.asarray(data) for data in got]), values)
