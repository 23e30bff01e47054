"""The pass contract (design sec. 5.1) and the number of reads of the store each fit takes.

Every accumulator, split across two partials (pickled copies, as a worker receives them) that each see half of
the blocks and are then merged, gives what one stream gives: reductions to 1e-12 relative (float64 summation
order), per-row outputs exactly (each row is written once, by the block that holds it).

A counting reader (``TrajectoryStore._read`` wrapped) turns the cells a fit reads into a number of passes, so a
change that adds a pass fails here; no timing is measured.
"""

from __future__ import annotations

import numpy as np
import pytest

from cmdtool.analyzers.cmd.fit_pass import FitPass
from cmdtool.analyzers.cmd.replay import OnlineReplay
from cmdtool.analyzers.kga import KWMMasks
from cmdtool.analyzers.linear_models import ColumnsOfModel, RowProjection
from cmdtool.passes.contract import Accumulator, merged
from cmdtool.passes.local import (GramAccumulator, RowGather, iter_pass_blocks, pass_context, run_blocks,
                                  run_blocks_side_by_side, stream)
from cmdtool.workflows.averages import average_weights
from cmdtool.store import from_array, open_store

from tests.conftest import planted_modes

N_ROWS, N_COLS = 3000, 16
TENSORS = {"a.weight": (1000,), "bn.running_mean": (200,), "b.weight": (1800,)}
BLOCK_BYTES = 4 * N_COLS * 256  # 256 rows per block: 12 blocks


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    W, *_ = planted_modes(N_ROWS, N_COLS, n_modes=3, noise=0.05, seed=3)
    W[17, 4] = np.nan
    W[2500, 0] = np.inf
    path = tmp_path_factory.mktemp("passes") / "s.zarr"
    from_array(path, W, tensors=TENSORS, target_chunk_bytes=4 * N_COLS * 128)  # 128-row chunks
    return open_store(path, mode="r+")


def _references(store):
    rows = np.array([3, 1100, 2200])
    return rows, store.read_rows(rows).astype(np.float32)


def _factories(store, writer):
    """name -> a function making a fresh accumulator writing into ``writer`` (None: outputs in memory)."""
    from cmdtool.analyzers.cmd.posthoc import modelled_entries

    refs, trajectories = _references(store)
    modelled = modelled_entries(store.layout, "source")
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(N_COLS, 3))
    complex_matrix = matrix + 1j * rng.normal(size=(N_COLS, 3))
    averages = np.stack([average_weights("ema", 9, N_COLS, 0.8), average_weights("swa", 15, N_COLS, swa_len=4),
                         average_weights("original", 17 - 2, N_COLS)], axis=1)
    return {
        "gram": lambda: GramAccumulator(),
        "row_gather": lambda: RowGather([2999, 5, 17, 1000, 256]),
        "cmd_fit_pass": lambda: FitPass(writer, store.layout, modelled, refs, trajectories,
                                        (refs, trajectories, 6)),
        "pca_directions": lambda: RowProjection(writer, "directions", matrix, centre=True),
        "dmd_modes": lambda: RowProjection(writer, "modes", complex_matrix),
        "kwm_masks": lambda: KWMMasks(writer, complex_matrix[:, :2], 0.5, np.cumsum([1000, 200, 1800])),
        "reconstruction": lambda: ColumnsOfModel(matrix, out=writer.create("out", (N_ROWS, 3), "float32",
                                                                           chunks=(256, 3))),
        "reconstruction_in_memory": lambda: ColumnsOfModel(matrix),   # returned per-row output (MemoryOutputs)
        "ema_swa": lambda: ColumnsOfModel(averages, out=writer.create("avg", (N_ROWS, 3), "float32",
                                                                       chunks=(256, 3)), keep_nonfinite=True),
        "online_replay": lambda: OnlineReplay(_online_modes(store, writer), refs, trajectories, [2, 7, 11],
                                              out=writer.create("replay", (N_ROWS, 3), "float32",
                                                                chunks=(256, 3))),
    }


def _online_modes(store, writer):
    modes = writer.create("online_modes", (N_ROWS,), "int16", chunks=(256,))
    modes[:] = (np.arange(N_ROWS) % 4 - 1).astype(np.int16)  # modes -1..2: kept rows included
    return modes


def _state(acc) -> dict:
    """The accumulator's reductions and per-row outputs as numpy arrays."""
    out = {}
    for key, value in vars(acc).items():
        if key.startswith("out") or key in ("arrays", "mask", "means"):
            value = {k: v[...] for k, v in value.items()} if isinstance(value, dict) else value
            if isinstance(value, dict):
                out.update({f"{key}.{k}": np.asarray(v) for k, v in value.items()})
            elif value is not None:
                out[key] = np.asarray(value[...])
        elif isinstance(value, (np.ndarray, int, float)) and not key.startswith(("sorted", "order", "indices",
                                                                                  "reference", "tensor", "steps")):
            out[key] = np.asarray(value)
    return out


def _pass_state(store, name: str, tag: str, split: bool = False, workers: int = 0, device="cpu") -> dict:
    """One CPU pass of accumulator ``name`` over the store (with ``split``: two partials that see the first 5 and
    the other blocks, then merged; with ``workers``: blocks side by side in that many threads); its
    :func:`_state`."""
    window = slice(0, N_COLS)
    writer = store.results.writer("test", tag)
    acc = _factories(store, writer)[name]()
    ctx = pass_context(store, window, device, BLOCK_BYTES)
    acc.start(ctx)
    blocks = iter_pass_blocks(store, window, ctx.device, ctx.block_rows)
    if workers:
        blocks.close()
        run_blocks_side_by_side([acc], store.iter_blocks(columns=window, block_rows=ctx.block_rows),
                                workers, ctx.outputs.arrays)
    elif split:
        first, second = acc.partial(), acc.partial()
        blocks = list(blocks)
        run_blocks([first], blocks[:5])
        run_blocks([second], blocks[5:])
        acc = merged([first, second])
    else:
        run_blocks([acc], blocks)
    acc.finish()
    state = _state(acc)
    writer.discard()
    return state


@pytest.mark.parametrize("name", ["gram", "row_gather", "cmd_fit_pass", "pca_directions", "dmd_modes", "kwm_masks",
                                  "reconstruction", "ema_swa", "online_replay"])
def test_two_merged_halves_equal_one_stream(store, name):
    results = [_pass_state(store, name, f"{name}-{split}", split) for split in (False, True)]
    whole, halves = results
    assert whole.keys() == halves.keys() and whole
    for key in whole:
        np.testing.assert_allclose(halves[key], whole[key], rtol=1e-12, atol=0, err_msg=key)


ALL_ACCUMULATORS = ["gram", "row_gather", "cmd_fit_pass", "pca_directions", "dmd_modes", "kwm_masks",
                    "reconstruction", "reconstruction_in_memory", "ema_swa", "online_replay"]


@pytest.mark.parametrize("name", ALL_ACCUMULATORS)
def test_blocks_side_by_side_equal_one_stream(store, name):
    """Three threads, each feeding its own partials every third block (the in-process engine on several cores):
    the reductions equal one stream's to float64 summation order, per-row outputs exactly, those kept in memory
    included (the threads share the arrays); and two such runs are bitwise equal (the blocks each thread sums
    do not depend on timing)."""
    whole = _pass_state(store, name, f"{name}-whole")
    threads = [_pass_state(store, name, f"{name}-threads{k}", workers=3) for k in range(2)]
    assert whole.keys() == threads[0].keys() and whole
    for key in whole:
        np.testing.assert_allclose(threads[0][key], whole[key], rtol=1e-12, atol=0, err_msg=key)
        np.testing.assert_array_equal(threads[1][key], threads[0][key], err_msg=key)


class FailingAccumulator(Accumulator):
    """Fails on one block only: with two block threads, blocks after it may be in another thread at the same
    moment, and the pass must end those too and report this error."""

    def update(self, block):
        if block.start == 1024:
            raise RuntimeError(f"failed at row {block.start}")


def test_an_error_in_a_block_thread_ends_the_pass_with_it(store, monkeypatch):
    """The error of one thread reaches the caller; the other threads and the reader's thread end with it."""
    import threading

    monkeypatch.setenv("CMDTOOL_PASS_WORKERS", "2")
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="failed at row 1024"):
        stream(store, [GramAccumulator(), FailingAccumulator()], device="cpu", block_bytes=BLOCK_BYTES)
    for _ in range(50):
        if threading.active_count() <= before:
            break
        threading.Event().wait(0.1)
    assert threading.active_count() <= before


def test_pass_workers_from_the_environment(monkeypatch):
    from cmdtool.passes.local import pass_workers
    from cmdtool.errors import UsageError

    monkeypatch.setenv("CMDTOOL_PASS_WORKERS", "3")
    assert pass_workers("cpu") == 3 and pass_workers("cuda:0") == 1
    monkeypatch.setenv("CMDTOOL_PASS_WORKERS", "zero")
    with pytest.raises(UsageError, match="CMDTOOL_PASS_WORKERS must be a whole number"):
        pass_workers("cpu")


@pytest.mark.parametrize("name", ["gram", "row_gather", "cmd_fit_pass", "pca_directions", "dmd_modes", "kwm_masks",
                                  "reconstruction", "ema_swa", "online_replay"])
def test_cpu_numpy_path_equals_the_torch_path(store, name, monkeypatch):
    """On the CPU the accumulators compute in numpy (float64 work in numpy chunks, host_float64); on a torch
    device, here torch.device("cpu") with host_float64's CPU shortcuts off (the path CUDA runs), they give the
    same reductions to float64 summation order and the same outputs. Chunks of 100 rows split every 256-row
    block unevenly, so the chunk boundaries are exercised."""
    import torch

    import cmdtool.passes.host_float64 as host_float64
    import cmdtool.passes.local as local

    monkeypatch.setattr(host_float64, "CHUNK_BYTES", 100 * 8 * N_COLS)
    host = _pass_state(store, name, f"{name}-numpy")
    monkeypatch.setattr(host_float64, "on_cpu", lambda tensor: False)
    # resolve_device makes torch.device("cpu") the numpy CPU; kept as a torch device, the pass runs GPU code
    monkeypatch.setattr(local, "resolve_device", lambda device: device)
    torch_path = _pass_state(store, name, f"{name}-torch", device=torch.device("cpu"))
    # (the numpy side also holds its start-time constants as arrays, the torch side as tensors: not compared)
    assert torch_path.keys() <= host.keys() and torch_path
    for key in torch_path:
        # float32 outputs computed from float64 values that differ in the last bits may round one ulp apart; a
        # reference row's squared error is 0 up to cancellation (1e-15 against entries of order 1)
        rtol = 1e-12 if host[key].dtype == np.float64 else 1e-6
        finite = np.abs(torch_path[key][np.isfinite(torch_path[key])])  # EMA/SWA keep stored NaN/Inf rows
        scale = float(finite.max()) if finite.size else 0.0
        np.testing.assert_allclose(host[key], torch_path[key], rtol=rtol, atol=1e-12 * scale, err_msg=key)


def test_merge_adds_up_the_reductions(store):
    """The merged Gram equals the dense WᵀW of the finite rows (merge is a real sum, not a copy of one half)."""
    W = store.read_columns(slice(0, N_COLS)).astype(np.float64)
    W = W[np.isfinite(W).all(axis=1)]
    acc = GramAccumulator()
    ctx = pass_context(store, slice(0, N_COLS), "cpu", BLOCK_BYTES)
    acc.start(ctx)
    parts = [acc.partial() for _ in range(3)]
    for k, block in enumerate(iter_pass_blocks(store, ctx.columns, ctx.device, ctx.block_rows)):
        parts[k % 3].update(block)
    total = merged(parts)
    total.finish()
    np.testing.assert_allclose(total.gram, W.T @ W, rtol=1e-12)
    assert total.rows == len(W) == N_ROWS - 2


def test_ema_swa_weights_follow_the_recursions():
    rng = np.random.default_rng(1)
    W = rng.normal(size=(50, 12))
    ema = W[:, 0].copy()
    for t in range(1, 12):
        ema = 0.7 * ema + 0.3 * W[:, t]
        np.testing.assert_allclose(W @ average_weights("ema", t, 12, 0.7), ema, rtol=1e-12)
    np.testing.assert_allclose(W @ average_weights("swa", 8, 12, swa_len=3), W[:, 6:9].mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(W @ average_weights("original", 5, 12), W[:, 5])


# ---------------------------------------------------------------------------------------------- reads per fit
@pytest.fixture()
def counted(tmp_path, monkeypatch):
    """A fresh store and a function giving the passes read since the last call (cells read / (N T))."""
    from cmdtool.store.store import TrajectoryStore

    W, *_ = planted_modes(4000, 20, n_modes=3, noise=0.02, seed=5)
    path = tmp_path / "c.zarr"
    from_array(path, W, tensors={"a.weight": (2000,), "b.weight": (2000,)}, target_chunk_bytes=4 * 20 * 100)
    cells = [0]
    original = TrajectoryStore._read

    def counting_read(self, rows, cols, **allocate):
        out = original(self, rows, cols, **allocate)
        cells[0] += out.size
        return out

    monkeypatch.setattr(TrajectoryStore, "_read", counting_read)
    st = open_store(path, mode="r+")

    def passes_read() -> float:
        value, cells[0] = cells[0] / (4000 * 20), 0
        return value

    return st, passes_read


def test_each_fit_reads_the_store_as_often_as_its_passes(counted):
    from cmdtool.analyzers import get_analyzer

    st, passes_read = counted
    cases = [  # (method, options, drop the cached Gram first, passes)
        ("dmd", {"rank": 3}, True, 1), ("dmd", {"rank": 3}, False, 0), ("dmd", {"rank": 3, "save_modes": True},
                                                                          False, 1),
        ("kga", {"rank": 3}, True, 2), ("kga", {"rank": 3}, False, 1),
        ("pca", {"dims": 4}, True, 2), ("pca", {"dims": 4}, False, 1),
        ("pod", {"rank": 3}, True, 2), ("pod", {"rank": 3}, False, 1),
        ("cmd", {"modes": 3}, True, 2), ("cmd", {"modes": 3, "warmup": 8}, True, 2),
    ]
    for method, options, cold, expected in cases:
        if cold and st.results.exists("gram", "full"):
            st.results.delete("gram", "full")
        passes_read()
        get_analyzer(method)(device="cpu", **options).fit(st)
        assert passes_read() == pytest.approx(expected), (method, options, cold)


def test_cmd_with_a_cached_gram_reads_only_the_sampled_chunk_rows(counted):
    from cmdtool.analyzers.cmd.posthoc import PosthocCMD

    st, passes_read = counted
    cmd = PosthocCMD(modes=3, samples=30, device="cpu").fit(st)  # caches G
    chunk_rows = st.chunk_shape[0]
    sampled_chunks = len(np.unique(cmd.sampled_indices_ // chunk_rows))
    assert sampled_chunks * chunk_rows < 4000
    passes_read()
    PosthocCMD(modes=3, samples=30, device="cpu").fit(st)
    # the fit pass, and only the chunk rows that hold one of the 30 sampled weights
    assert passes_read() == pytest.approx(1 + sampled_chunks * chunk_rows / 4000)


def test_reconstructions_and_averages_take_one_pass(counted):
    from cmdtool.analyzers.cmd.posthoc import PosthocCMD
    from cmdtool.analyzers.dmd import DMD
    from cmdtool.workflows.averages import iter_averages

    st, passes_read = counted
    dmd = DMD(rank=3, device="cpu").fit(st)
    passes_read()
    dmd.reconstruct_epochs(st, [3, 10, 19])
    assert passes_read() == pytest.approx(1)
    cmd = PosthocCMD(modes=3, warmup=6, device="cpu").fit(st)
    cmd.save("x")
    passes_read()
    cmd.reconstruct_epochs(st, [7, 9], variant="online")  # one replay over epochs 0..9
    assert passes_read() == pytest.approx(10 / 20)
    vectors = list(iter_averages(st, slice(0, 20), [4, 19], ["original", "ema", "swa"], 0.9, 5))
    assert len(vectors) == 6 and passes_read() == pytest.approx(1)   # SWA of 5 is full at column 4
