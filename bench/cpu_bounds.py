"""The arithmetic that bounds a pass on the CPU, apart from reading: the float64 Gram product and CMD's fit.

    PYTHONPATH=src python bench/cpu_bounds.py --store STORE             # a store made by bench/side_by_side.py
    PYTHONPATH=src python bench/cpu_bounds.py --store STORE --repeat 5

Prints, on one thread (numpy's BLAS and torch limited to one):

- the Gram product Xᵀ X of float64 row chunks (numpy's syrk), in seconds per 1M rows at the store's width, for
  chunks of 1,024 to 32,768 rows (the passes use 2,048);
- CMD's fit-pass update (``FitPass.update``) on the store's first blocks, already in memory, in CPU seconds per
  1M rows: the fit pass's work without the read. The references are 10 fixed rows of the first block, so the
  figure is comparable between two versions of the code on the same store, not a CMD result.

A pass cannot be shorter than its read (on one core) or than this work (on the other): docs/performance.md,
"What bounds it".
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def gram_seconds_per_million(n_cols: int, chunk_rows: int, repeat: int) -> float:
    x = np.random.default_rng(0).standard_normal((chunk_rows, n_cols))
    gram = np.zeros((n_cols, n_cols))
    gram += x.T @ x  # warm-up
    calls = max(3, 400_000 // chunk_rows)
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(calls):
            gram += x.T @ x
        best = min(best, (time.perf_counter() - started) / (calls * chunk_rows) * 1e6)
    return best


def fit_update_seconds_per_million(store_path: str, blocks: int, repeat: int) -> float:
    import torch

    from cmdtool.analyzers.cmd.fit_pass import FitPass
    from cmdtool.passes.contract import Block, BlockBuffers, PassContext
    from cmdtool.passes.local import DEFAULT_BLOCK_BYTES
    from cmdtool.store import open_store

    store = open_store(store_path)
    layout = store.layout
    values = [block.data for block, _ in zip(store.iter_blocks(block_bytes=DEFAULT_BLOCK_BYTES), range(blocks))]
    first = values[0]
    reference_rows = np.linspace(0, len(first) - 1, 10).astype(np.int64)

    class InMemory:
        def create(self, name, shape, dtype, chunks):
            return np.empty(shape, dtype)

    fit = FitPass(InMemory(), layout, layout.trajectory_entries, reference_rows, first[reference_rows], None)
    fit.start(PassContext(store, slice(0, store.trajectories.shape[1]), torch.device("cpu"), len(first)))
    buffers = BlockBuffers()
    best = float("inf")
    for _ in range(repeat):
        cpu, rows, start = 0.0, 0, 0
        for array in values:
            block = Block(start, start + len(array), torch.from_numpy(array), buffers)
            started = time.thread_time()
            fit.update(block)
            cpu += time.thread_time() - started
            rows += len(array)
            start += len(array)
        best = min(best, cpu / rows * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="a trajectory store (e.g. bench/side_by_side.py's)")
    parser.add_argument("--blocks", type=int, default=4, help="blocks of the store held in memory for the fit")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the fastest is printed")
    args = parser.parse_args()

    from threadpoolctl import threadpool_limits
    import torch

    torch.set_num_threads(1)
    from cmdtool.store import open_store

    n_cols = open_store(args.store).trajectories.shape[1]
    with threadpool_limits(limits=1, user_api="blas"):
        for rows in (1024, 2048, 4096, 8192, 16384, 32768):
            seconds = gram_seconds_per_million(n_cols, rows, args.repeat)
            print(f"float64 Gram, {rows:>6,}-row chunks: {seconds:.3f} s per 1M rows x {n_cols} (one core)")
        seconds = fit_update_seconds_per_million(args.store, args.blocks, args.repeat)
        print(f"CMD fit-pass update: {seconds:.3f} CPU s per 1M rows x {n_cols} (one core, no read)")


if __name__ == "__main__":
    main()
