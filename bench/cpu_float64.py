"""CPU seconds of the pass accumulators' float64 work: numpy/OpenBLAS in cache-sized chunks (what the CPU passes
run, cmdtool.passes.host_float64) against the torch path (what CUDA runs), on the same in-memory blocks, with
one compute thread and one BLAS thread (as a pass sets them on 2 cores), and the largest relative difference of
their results. No store is read: this isolates the arithmetic from the read.

Usage: PYTHONPATH=src python bench/cpu_float64.py [--rows 1048576] [--cols 150] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1 << 20)
    parser.add_argument("--cols", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs per path")
    args = parser.parse_args()

    import torch
    from threadpoolctl import threadpool_limits

    import cmdtool.passes.host_float64 as host_float64
    import cmdtool.passes.contract as contract
    import cmdtool.passes.local as passes
    from cmdtool.analyzers.cmd.fit_pass import FitPass
    from cmdtool.analyzers.kga import KWMMasks
    from cmdtool.analyzers.linear_models import RowProjection
    from types import SimpleNamespace

    torch.set_num_threads(1)
    threadpool_limits(1, user_api="blas")
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, args.cols)
    curves = np.stack([np.sqrt(t), np.exp(-3 * t), t, np.cos(4 * t), np.sin(7 * t)])
    W = (rng.normal(size=(args.rows, 5)) @ curves + 0.05 * rng.normal(size=(args.rows, args.cols))).astype(np.float32)
    entry = SimpleNamespace(name="w", offset=0)  # one tensor: what FitPass's layer index reads of a layout
    layout = SimpleNamespace(trajectory_entries=[entry])
    block_rows = passes.DEFAULT_BLOCK_BYTES // (4 * args.cols)
    ctx = contract.PassContext(type("Store", (), {"n_rows": args.rows})(), slice(0, args.cols), torch.device("cpu"),
                             block_rows)
    refs = np.linspace(0, args.rows - 1, 10).astype(np.int64)
    matrix = rng.normal(size=(args.cols, 10)) + 1j * rng.normal(size=(args.cols, 10))

    class Writer:  # per-row outputs into memory
        def create(self, name, shape, dtype, chunks=None, compress=True):
            return np.zeros(shape, dtype)

    makers = {
        "Gram (GramAccumulator)": lambda: passes.GramAccumulator(),
        "CMD fit pass (FitPass, M=10)": lambda: FitPass(Writer(), layout, layout.trajectory_entries, refs, W[refs],
                                                        None),
        "DMD modes (RowProjection, complex r=10)": lambda: RowProjection(Writer(), "modes", matrix),
        "PCA directions (RowProjection, centred d=10)": lambda: RowProjection(Writer(), "d", matrix.real, True),
        "KWM masks (KWMMasks)": lambda: KWMMasks(Writer(), matrix[:, :2], 0.5, np.array([args.rows])),
    }

    def run(make):
        best, acc = float("inf"), None
        for _ in range(args.repeat):
            acc = make()
            acc.start(ctx)
            buffers = contract.BlockBuffers()
            blocks = [contract.Block(r, min(r + block_rows, args.rows), torch.from_numpy(W[r:r + block_rows]), buffers)
                      for r in range(0, args.rows, block_rows)]
            started = time.process_time()
            for block in blocks:
                acc.update(block)
            acc.finish()
            best = min(best, time.process_time() - started)
        return best, acc

    def result(acc):
        for key in ("gram", "column_sq_error"):
            if hasattr(acc, key):
                return np.asarray(getattr(acc, key))
        arrays = getattr(acc, "arrays", None)
        return np.asarray(next(iter(arrays.values()))) if arrays else np.asarray(acc.mask)

    print(f"{args.rows:,} x {args.cols} float32, blocks of {block_rows:,} rows, 1 thread; CPU seconds, best of "
          f"{args.repeat}\n")
    print("| accumulator | numpy chunks (s) | torch (s) | torch / numpy | max relative difference |")
    print("|---|---:|---:|---:|---:|")
    for name, make in makers.items():
        numpy_s, numpy_acc = run(make)
        original = host_float64.on_cpu, contract.on_cpu
        host_float64.on_cpu = contract.on_cpu = lambda tensor: False
        try:
            torch_s, torch_acc = run(make)
        finally:
            host_float64.on_cpu, contract.on_cpu = original
        a, b = result(numpy_acc).astype(np.float64), result(torch_acc).astype(np.float64)
        diff = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))
        print(f"| {name} | {numpy_s:.3f} | {torch_s:.3f} | {torch_s / numpy_s:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
