"""Benchmark of `cmdtool decompose` (CMD) against its floor and against a dense in-memory implementation.

    PYTHONPATH=src python bench/decompose.py                      # 1M parameters x 150 checkpoints
    PYTHONPATH=src python bench/decompose.py --rows 200000 --cols 80 --device cuda

Builds a synthetic store (planted modes plus noise, spread over several tensors), then runs each phase in a
fresh subprocess so that its peak RSS is its own:

- read:   one bare pass ``for block in store.iter_blocks(): pass`` (read + decompress): the floor.
- cmd:    PosthocCMD(modes=10).fit + save on a store without a cached Gram matrix (pass 1 also computes it),
          then again with the Gram matrix cached (pass 1 reads only the sampled rows' chunks).
- dense:  the same algorithm the way the paper's code does it: load all of W into memory (numpy), the same
          sample and clustering, |corr| of every row with the references, Eq. 6 with pinv per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402

import numpy as np


def peak_rss_mib() -> float:
    return _measure.peak_rss_mb()


def build_store(path: Path, rows: int, cols: int, modes: int, noise: float, seed: int = 0) -> None:
    from cmdtool.store.layout import Layout, TensorEntry, TimeRecord
    from cmdtool.store.store import TrajectoryStore
    from cmdtool.utils.units import now_iso

    rng = np.random.default_rng(seed)
    n_layers = 8
    sizes = np.full(n_layers, rows // n_layers)
    sizes[-1] += rows - sizes.sum()
    entries, offset = [], 0
    for k, size in enumerate(sizes):
        entries.append(TensorEntry(f"layer{k}.weight", (int(size),), "float32", "parameter", "trajectory",
                                   offset, int(size)))
        offset += int(size)
    store = TrajectoryStore.create(path, Layout(entries), chunk_columns=cols)
    store.resize_columns(cols)  # trajectories and the epoch coordinate (what verify and xarray check)
    t = np.linspace(0, 1, cols)
    curves = np.stack([np.sin((m + 1) * 2.1 * t + m) + (m + 1) * t ** ((m % 3) + 1) for m in range(modes)])
    step = store.chunk_shape[0] * 8
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        n = r1 - r0
        mode = rng.integers(0, modes, n)
        block = (rng.uniform(0.5, 2, (n, 1)) * rng.choice([-1, 1], (n, 1)) * curves[mode]
                 + rng.normal(0, 1, (n, 1)))
        block += noise * rng.normal(size=block.shape) * block.std(axis=1, keepdims=True)
        store.trajectories[r0:r1, :] = block.astype(np.float32)
    axis = [TimeRecord(label=i + 1, source="<synthetic>", size=4 * rows, mtime=0.0, digest="",
                       ingested_at=now_iso()) for i in range(cols)]
    store.write_labels(0, [record.label for record in axis])
    store.commit(axis)


def phase_read(store_path: str, device: str) -> dict:
    from cmdtool.store import open_store

    store = open_store(store_path)
    started = time.perf_counter()
    for _ in store.iter_blocks():
        pass
    return {"seconds": time.perf_counter() - started, "peak_rss_mib": peak_rss_mib()}


def phase_cmd(store_path: str, device: str, modes: int, samples: int) -> dict:
    from cmdtool.analyzers.cmd.posthoc import PosthocCMD
    from cmdtool.store import open_store

    store = open_store(store_path, mode="r+")
    runs = []
    for _ in range(2):  # first without a cached Gram matrix, then with it
        started = time.perf_counter()
        cmd = PosthocCMD(modes=modes, samples=samples, device=device).fit(store)
        cmd.save("bench")
        runs.append({"seconds": time.perf_counter() - started, **cmd.timings_,
                     "relative_error": cmd.metrics_["relative_error"],
                     "relative_error_motion": cmd.metrics_["relative_error_motion"]})
    return {"runs": runs, "peak_rss_mib": peak_rss_mib()}


def phase_dense(store_path: str, device: str, modes: int, samples: int) -> dict:
    from cmdtool.analyzers.cmd.math import cluster_sample, sample_rows
    from cmdtool.store import open_store

    store = open_store(store_path)
    started = time.perf_counter()
    W = store.trajectories[:, :]  # the whole (N, T) matrix in memory
    loaded = time.perf_counter()
    sampled = sample_rows([(e.offset, e.numel) for e in store.layout.trajectory_entries], samples, "balanced", 0)
    clustering = cluster_sample(W[sampled], modes)
    refs = W[sampled[clustering.reference_positions]].astype(np.float64)
    # Step 2 as the authors' calc_related_mode: |corr| of all rows with each reference from raw sums
    T = W.shape[1]
    sum_w = W.sum(axis=1, dtype=np.float64)
    sum_ww = np.einsum("ij,ij->i", W, W, dtype=np.float64)
    corr = np.empty((len(W), len(refs)))
    for m, r in enumerate(refs):
        sum_wr = W @ r
        num = T * sum_wr - sum_w * r.sum()
        den = np.sqrt(np.abs((T * sum_ww - sum_w ** 2) * (T * (r * r).sum() - r.sum() ** 2)))
        with np.errstate(invalid="ignore", divide="ignore"):
            corr[:, m] = np.abs(num / den)
    corr[np.isnan(corr)] = 0
    mode = corr.argmax(axis=1)
    # Step 3 (Eq. 6) per mode with the pseudo-inverse of the 2x2 normal matrix, as the authors' calc_AB_vec
    A = np.empty(len(W), dtype=np.float32)
    B = np.empty(len(W), dtype=np.float32)
    sq_error = 0.0
    for m in range(len(refs)):
        rows = np.flatnonzero(mode == m)
        w_tilde = np.vstack([refs[m], np.ones(T)])
        coef = W[rows] @ w_tilde.T @ np.linalg.pinv(w_tilde @ w_tilde.T)
        A[rows], B[rows] = coef[:, 0], coef[:, 1]
        sq_error += float(((W[rows] - coef @ w_tilde) ** 2).sum())
    done = time.perf_counter()
    return {"seconds": done - started, "load_seconds": loaded - started, "compute_seconds": done - loaded,
            "relative_error": float(np.sqrt(sq_error / float((W.astype(np.float64) ** 2).sum()))),
            "peak_rss_mib": peak_rss_mib()}


def run_phase(args, phase: str) -> dict:
    command = [sys.executable, __file__, "--phase", phase, "--store", str(args.store), "--device", args.device,
               "--modes", str(args.modes), "--samples", str(args.samples)]
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cols", type=int, default=150)
    parser.add_argument("--modes", type=int, default=10)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--store", type=Path, default=None, help="where to build the store (default: a temp dir)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense comparison (too big for RAM)")
    parser.add_argument("--phase", choices=["read", "cmd", "dense"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        fn = {"read": phase_read, "cmd": phase_cmd, "dense": phase_dense}[args.phase]
        extra = () if args.phase == "read" else (args.modes, args.samples)
        print(json.dumps(fn(str(args.store), args.device, *extra)))
        return

    temp = None
    if args.store is None:
        temp = Path(tempfile.mkdtemp(prefix="cmdtool-bench-"))
        args.store = temp / "bench.zarr"
    try:
        import torch

        from cmdtool.utils.device import resolve_device

        started = time.perf_counter()
        build_store(args.store, args.rows, args.cols, args.modes, args.noise)
        size = sum(f.stat().st_size for f in args.store.rglob("*") if f.is_file())
        print(f"store: {args.rows:,} parameters x {args.cols} checkpoints ({4 * args.rows * args.cols / 1e6:,.0f} MB "
              f"float32, {size / 1e6:,.0f} MB on disk), built in {time.perf_counter() - started:.1f} s")
        device = resolve_device(args.device)
        print(f"device: {device}"
              + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
              + f", torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}")
        read = run_phase(args, "read")
        read_again = run_phase(args, "read")
        floor = min(read["seconds"], read_again["seconds"])
        cmd = run_phase(args, "cmd")
        cold, warm = cmd["runs"]
        print(f"bare read pass:                 {floor:7.2f} s   peak RSS {read['peak_rss_mib']:7.0f} MiB")
        print(f"decompose (Gram not cached):    {cold['seconds']:7.2f} s   "
              f"ratio to one read {cold['seconds'] / floor:5.2f}"
              f"   (pass 1 + Gram {cold['sampling_pass_seconds']:.2f} s, clustering {cold['clustering_seconds']:.2f} s,"
              f" fit pass {cold['fit_pass_seconds']:.2f} s)")
        print(f"decompose (Gram cached):        {warm['seconds']:7.2f} s   "
              f"ratio to one read {warm['seconds'] / floor:5.2f}"
              f"   (pass 1 {warm['sampling_pass_seconds']:.2f} s, clustering {warm['clustering_seconds']:.2f} s,"
              f" fit pass {warm['fit_pass_seconds']:.2f} s)   peak RSS {cmd['peak_rss_mib']:7.0f} MiB")
        print(f"  relative error {cold['relative_error']:.4f}, to motion {cold['relative_error_motion']:.4f}")
        if not args.no_dense:
            dense = run_phase(args, "dense")
            print(f"dense in-memory (numpy):        {dense['seconds']:7.2f} s   ratio to one read "
                  f"{dense['seconds'] / floor:5.2f}   (load {dense['load_seconds']:.2f} s, compute "
                  f"{dense['compute_seconds']:.2f} s)   peak RSS {dense['peak_rss_mib']:7.0f} MiB")
            print(f"  relative error {dense['relative_error']:.4f}; decompose / dense = "
                  f"{warm['seconds'] / dense['seconds']:.2f} (Gram cached), {cold['seconds'] / dense['seconds']:.2f} "
                  f"(not cached)")
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
