"""cmdtool's ctypes calls (cmdtool.utils.os_calls): each works where the system has it, and its fallback works where
it does not (simulated: ctypes cannot open the C library)."""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import numpy as np
import pytest

import cmdtool
from cmdtool.utils import os_calls
from cmdtool.ingestion import formats
from cmdtool.store import format as fmt
from cmdtool.store.rechunk import swap_in

from tests.conftest import write_checkpoints


@pytest.fixture()
def no_libc(monkeypatch):
    """ctypes cannot open the C library (as on a system without one it knows)."""

    def unavailable(*args, **kwargs):
        raise OSError("no C library here")

    os_calls._libc.cache_clear()
    monkeypatch.setattr(ctypes, "CDLL", unavailable)
    yield
    monkeypatch.undo()
    os_calls._libc.cache_clear()


def _two_arrays(tmp_path):
    store = tmp_path / "s.zarr"
    (store / fmt.STAGING / fmt.TRAJECTORIES).mkdir(parents=True)
    (store / fmt.TRAJECTORIES).mkdir()
    (store / fmt.TRAJECTORIES / "zarr.json").write_text("live")
    (store / fmt.STAGING / fmt.TRAJECTORIES / "zarr.json").write_text("staged")
    return store


def test_exchange_paths_swaps_or_changes_nothing(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("A")
    b.mkdir()
    swapped = os_calls.exchange_paths(a, b)
    if swapped:  # Linux with renameat2 on this filesystem
        assert a.is_dir() and b.read_text() == "A"
    else:
        assert a.read_text() == "A" and b.is_dir()
    assert os_calls.exchange_paths(tmp_path / "missing", b) is False


def test_swap_in_without_renameat2_swaps_with_two_renames(tmp_path, no_libc):
    assert os_calls.exchange_paths(tmp_path, tmp_path) is False
    store = _two_arrays(tmp_path)
    swap_in(store, fmt.TRAJECTORIES)
    assert (store / fmt.TRAJECTORIES / "zarr.json").read_text() == "staged"
    assert (store / fmt.STAGING / f"{fmt.TRAJECTORIES}.old" / "zarr.json").read_text() == "live"


def test_release_mapped_pages_keeps_the_file_data(tmp_path):
    path = tmp_path / "f.bin"
    data = np.arange(4 * mmap.PAGESIZE, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
        view = np.frombuffer(mapped, dtype=np.uint8)
        assert view.sum() == data.sum()  # the pages are faulted in
        released = os_calls.release_mapped_pages(view.ctypes.data, view.nbytes)
        assert released == (os_calls._libc() is not None and hasattr(mmap, "MADV_DONTNEED"))
        np.testing.assert_array_equal(view, data)  # read again from the file
        del view
        mapped.close()


def test_ingest_without_madvise_stores_the_same_values(tmp_path, monkeypatch):
    """Checkpoints read through memory maps whose pages cannot be handed back early: the same stored values.
    (float16 tensors are converted from the mapping, whose pages are then handed back.)"""
    import torch

    write_checkpoints(tmp_path / "ck", n_epochs=3, fmt="pt", dtype=torch.float16)
    answers = []
    release = os_calls.release_mapped_pages

    def watched(address, length):
        answers.append(release(address, length))
        return answers[-1]

    monkeypatch.setattr(formats, "release_mapped_pages", watched)
    cmdtool.ingest([tmp_path / "ck"], tmp_path / "with.zarr")
    linux = Path("/proc/self/maps").exists()  # where cmdtool finds the mappings it may hand back
    assert all(answers) and (bool(answers) or not linux)  # the ingest hands mapped pages back
    answers.clear()
    os_calls._libc.cache_clear()
    with monkeypatch.context() as patch:
        patch.setattr(ctypes, "CDLL", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("no C library")))
        cmdtool.ingest([tmp_path / "ck"], tmp_path / "without.zarr")
    os_calls._libc.cache_clear()
    assert not any(answers) and (bool(answers) or not linux)  # unavailable: each call said so, none raised
    np.testing.assert_array_equal(cmdtool.open_store(tmp_path / "without.zarr").read_columns(slice(0, 3)),
                                  cmdtool.open_store(tmp_path / "with.zarr").read_columns(slice(0, 3)))
