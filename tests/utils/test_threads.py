"""A cmdtool call leaves torch's and BLAS's thread counts as it found them (cmdtool.utils.threads.thread_limits)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from cmdtool.store import from_array, open_store
from cmdtool.utils.threads import one_torch_thread, thread_limits

from tests.conftest import planted_modes


def thread_counts():
    """torch's intra-op count and every thread pool threadpoolctl sees (BLAS, OpenMP), by library file."""
    return torch.get_num_threads(), sorted((p["user_api"], p["filepath"], p["num_threads"]) for p in threadpool_info())


def blas_counts():
    return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}


@pytest.fixture()
def user_settings():
    """A user's process with its own settings: 3 torch threads, 3 BLAS threads (whatever the machine has)."""
    before = torch.get_num_threads()
    with threadpool_limits(limits=3, user_api="blas"):
        torch.set_num_threads(3)
        yield
    torch.set_num_threads(before)


def test_a_dmd_fit_leaves_the_thread_counts_as_it_found_them(tmp_path, monkeypatch, user_settings):
    from cmdtool.analyzers import get_analyzer

    W, *_ = planted_modes(3000, 16, n_modes=3, noise=0.02, seed=2)
    from_array(tmp_path / "s.zarr", W)
    st = open_store(tmp_path / "s.zarr", mode="r+")
    monkeypatch.setattr("cmdtool.utils.device.available_cores", lambda: 2)  # the pass takes 1 thread of 3
    import cmdtool.passes.local as passes

    seen, run_blocks = [], passes.run_blocks

    def watched(*args, **kwargs):
        seen.append((torch.get_num_threads(), blas_counts()))
        return run_blocks(*args, **kwargs)

    monkeypatch.setattr(passes, "run_blocks", watched)
    get_analyzer("dmd")(rank=3, device="cpu").fit(st)  # imports what the fit needs (numpy's and scipy's BLAS)
    st.results.delete("gram", "full")
    before = thread_counts()
    assert before[0] == 3 and blas_counts() == {3}
    get_analyzer("dmd")(rank=3, device="cpu").fit(st)
    assert seen[-1] == (1, {1})  # inside the pass: one thread each
    assert thread_counts() == before


def test_blocks_that_overlap_and_end_out_of_order_restore_the_counts(user_settings):
    before = thread_counts()
    first, second = thread_limits(1, blas_threads=1), thread_limits(2, blas_threads=2)
    first.__enter__()
    second.__enter__()  # e.g. a second pass started in another thread
    assert torch.get_num_threads() == 2 and blas_counts() == {2}
    first.__exit__(None, None, None)  # the first ends first: the second's counts hold
    assert torch.get_num_threads() == 2 and blas_counts() == {2}
    second.__exit__(None, None, None)
    assert thread_counts() == before


def test_counts_are_restored_after_an_error_and_across_threads(user_settings):
    before = thread_counts()
    with pytest.raises(RuntimeError), one_torch_thread():
        assert torch.get_num_threads() == 1
        raise RuntimeError("in the block")
    assert thread_counts() == before
    barrier, errors = threading.Barrier(2), []

    def run(n):
        try:
            with thread_limits(n, blas_threads=n):
                barrier.wait(timeout=10)  # both blocks open at once
                np.ones((64, 64)) @ np.ones((64, 64))
                barrier.wait(timeout=10)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(n,)) for n in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors and thread_counts() == before
