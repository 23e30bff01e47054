"""Would a float32 Gram matrix do? DMD/PCA errors from G computed in float32 blocks against float64.

    PYTHONPATH=src python bench/gram_precision.py [--rows 1000000] [--cols 150] [--dir bench-out/precision]

Builds (or reuses) the two benchmark stores (bench/decompose.py's planted modes, bench/gram_methods.py's
smooth curves), computes G = WᵀW in float64 (what cmdtool does) and with float32 products summed in chunks of k
rows (k = 4096 ... 64) and accumulated in float64, and prints how far the DMD (rank 10) and PCA (40) errors
computed from each G move from the float64 ones (relative). The errors are small differences of G's entries,
so float32 rounding in G shows up in them amplified.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402


def gram(W, rows: int | None, block_rows: int = 131072) -> np.ndarray:
    """float64 G (rows None) or float32 products summed over chunks of ``rows`` rows, accumulated in float64."""
    import torch

    n, t = W.shape
    total = torch.zeros((t, t), dtype=torch.float64)
    for r0 in range(0, n, block_rows):
        block = torch.from_numpy(W[r0:r0 + block_rows])
        if rows is None:
            x = block.double()
            total += x.T @ x
            continue
        whole = (len(block) // rows) * rows
        parts = [block[:whole].reshape(-1, rows, t)] + ([block[whole:][None]] if whole < len(block) else [])
        for x in parts:
            total += (x.transpose(1, 2) @ x).double().sum(0)
    return total.numpy()


def errors(G: np.ndarray, n_rows: int) -> np.ndarray:
    """DMD rank 10 and PCA 40 relative errors (overall and to motion) from G, as cmdtool computes them."""
    from cmdtool.analyzers.dmd import dmd_from_gram
    from cmdtool.analyzers.linear_models import descending_eigh, linear_model_metrics

    t = G.shape[0]
    dmd = linear_model_metrics(G, dmd_from_gram(G, n_rows, 10).reconstruction, 0)
    centring = np.eye(t) - 1.0 / t
    _, vectors = descending_eigh(centring @ G @ centring)
    pca = linear_model_metrics(G, np.full((t, t), 1.0 / t) + vectors[:, :40] @ vectors[:, :40].T, 0)
    return np.array([dmd["relative_error"], dmd["relative_error_motion"], pca["relative_error"],
                     pca["relative_error_motion"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cols", type=int, default=150)
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parents[1] / "bench-out" / "precision")
    args = parser.parse_args()

    import decompose
    import gram_methods

    from cmdtool.store import open_store

    args.dir.mkdir(parents=True, exist_ok=True)
    builders = {"planted modes (bench/decompose.py)": lambda p: decompose.build_store(p, args.rows, args.cols, 10,
                                                                                       0.05),
                "smooth curves (bench/gram_methods.py)": lambda p: gram_methods.make_store(p, args.rows, args.cols)}
    print("| data | G | DMD error | PCA error | largest relative change of the 4 errors | CPU s |")
    print("|---|---|---:|---:|---:|---:|")
    for k, (name, build) in enumerate(builders.items()):
        path = args.dir / f"store{k}_{args.rows}x{args.cols}.zarr"
        if not path.exists():
            build(path)
        W = open_store(path).trajectories[:, :]
        reference = None
        for rows in (None, 4096, 1024, 256, 64):
            started = time.process_time()
            G = gram(W, rows)
            seconds = time.process_time() - started
            values = errors(G, len(W))
            reference = values if reference is None else reference
            change = float(np.max(np.abs(values / reference - 1)))
            label = "float64" if rows is None else f"float32, {rows}-row chunks"
            print(f"| {name} | {label} | {values[0]:.6f} | {values[2]:.6f} | {change:.1e} | {seconds:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
