"""The zarr-free readers of a store (issue #11's fast `info` and `verify`) read exactly what zarr reads: the
metadata documents give the same summary as the opened store, and every chunk file of every array cmdtool writes
(numbers compressed or not, integers, complex results, the tensor names) decodes to zarr's values."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import cmdtool
from cmdtool.analyzers import get_analyzer
from cmdtool.store.chunk_check import ArrayDocument, ChunkDamage, is_array
from cmdtool.store.metadata import StoreMetadata
from cmdtool.store.summary import summarize, summarize_store
from cmdtool.store.verify import verify_store

from conftest import write_checkpoints


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
