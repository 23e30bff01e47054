"""Time and peak memory of DMD, KGA and PCA from the Gram matrix, against the bare read pass, PyDMD and sklearn.

Builds a store of N parameters x T checkpoints (default 1M x 150: 600 MB of float32) of synthetic training-like
trajectories (offset + a few smooth shared curves with per-weight gains + noise), then measures, each in a fresh
subprocess so that peak RSS is the step's own:

- the floor: one bare read pass over the store (read + decompress + hand to torch, no compute);
- DMD (rank 10, projected) cold (Gram pass included) and warm (cached Gram: no pass), and warm with the modes
  materialised (one pass); KGA warm (one pass for masks + basis); PCA (40 dims) cold (two passes) and warm (one);
- PyDMD ``DMD(svd_rank=10)`` and scikit-learn ``PCA(n_components=40)`` on the same data loaded into memory
  (the load from the store is timed separately and not included), where they fit in memory.

Usage: python bench/gram_methods.py [--rows 1000000] [--cols 150] [--dir bench-out/gram] [--device auto]
                                    [--skip-references] [--keep]
Prints a markdown table (record it in bench/results/, with the command) and writes results.json next to the store.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_store(path: Path, n_rows: int, n_cols: int) -> float:
    """Synthetic trajectories written block by block (bounded memory), then committed."""
    import numpy as np

    sys.path[:0] = [str(ROOT / "src")]
    from cmdtool.store import from_array

    rng = np.random.default_rng(0)
    t = np.linspace(0.0, 1.0, n_cols)
    curves = np.stack([1 - np.exp(-5 * t), np.sin(3 * t), t ** 2, np.exp(-20 * t), np.cos(7 * t) * np.exp(-2 * t)])
    started = time.perf_counter()
    W = np.empty((n_rows, n_cols), dtype=np.float32)
    step = 200_000
    for r0 in range(0, n_rows, step):
        rows = min(step, n_rows - r0)
        gains = rng.normal(size=(rows, len(curves))) * rng.uniform(0.01, 0.1, size=(rows, 1))
        offsets = rng.normal(size=(rows, 1)) * 0.05
        block = offsets + gains @ curves + 1e-3 * rng.standard_normal((rows, n_cols))
        W[r0:r0 + rows] = block
    quarter = n_rows // 4
    tensors = {f"block{k}.weight": (quarter,) for k in range(3)}
    tensors["head.weight"] = (n_rows - 3 * quarter,)
    from_array(path, W, labels=range(1, n_cols + 1), tensors=tensors)
    return time.perf_counter() - started


def run_measured(code: str) -> dict:
    """A step in a fresh interpreter (numpy, torch and open_store imported before the clock starts)."""
    return _measure.run_measured(code, preamble="import numpy as np, torch\nfrom cmdtool.store import open_store")


def steps(store: Path, device: str, references: bool) -> dict[str, str]:
    open_rw = f"st = open_store({str(store)!r}, mode='r+')"
    drop_gram = "st.results.delete('gram', 'full')"
    out = {
        "read pass (floor)": f"""
            from cmdtool.passes.local import stream
            {open_rw}
            stream(st, [], device={device!r})
        """,
        "DMD r=10, cold (Gram pass + algebra)": f"""
            from cmdtool.analyzers.dmd import DMD
            {open_rw}
            {drop_gram}
            m = DMD(rank=10, device={device!r}).fit(st); m.save('bench')
            result['relative_error'] = m.metrics_['relative_error']
        """,
        "DMD r=10, warm (cached Gram, no pass)": f"""
            from cmdtool.analyzers.dmd import DMD
            {open_rw}
            m = DMD(rank=10, device={device!r}).fit(st); m.save('bench')
            result['relative_error'] = m.metrics_['relative_error']
        """,
        "DMD r=0 (optimal threshold), warm": f"""
            from cmdtool.analyzers.dmd import DMD
            {open_rw}
            m = DMD(rank=0, device={device!r}).fit(st); m.save('bench0')
            result['rank'] = m.rank_
            result['relative_error'] = m.metrics_['relative_error']
        """,
        "DMD r=10 + modes, warm (one pass)": f"""
            from cmdtool.analyzers.dmd import DMD
            {open_rw}
            m = DMD(rank=10, save_modes=True, device={device!r}).fit(st); m.save('bench_modes')
        """,
        "KGA r=10 masks + basis, warm (one pass)": f"""
            from cmdtool.analyzers.kga import KGA
            {open_rw}
            m = KGA(rank=10, device={device!r}).fit(st); m.save('bench')
            result['masked_fraction'] = m.masked_fraction_
        """,
        "PCA d=40, cold (Gram pass + directions pass)": f"""
            from cmdtool.analyzers.pca import PCA
            {open_rw}
            {drop_gram}
            m = PCA(dims=40, device={device!r}).fit(st); m.save('bench')
            result['relative_error'] = m.metrics_['relative_error']
        """,
        "PCA d=40, warm (directions pass)": f"""
            from cmdtool.analyzers.pca import PCA
            {open_rw}
            m = PCA(dims=40, device={device!r}).fit(st); m.save('bench')
            result['relative_error'] = m.metrics_['relative_error']
        """,
    }
    out = {name: textwrap.dedent(code) for name, code in out.items()}
    if references:
        out.update(_measure.reference_steps(store))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cols", type=int, default=150)
    parser.add_argument("--dir", type=Path, default=ROOT / "bench-out" / "gram")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-references", action="store_true", help="Do not run PyDMD / scikit-learn.")
    parser.add_argument("--keep", action="store_true", help="Keep the store afterwards.")
    args = parser.parse_args()

    store = args.dir / f"store_{args.rows}x{args.cols}.zarr"
    if not store.exists():
        args.dir.mkdir(parents=True, exist_ok=True)
        seconds = make_store(store, args.rows, args.cols)
        print(f"built {store} in {seconds:.1f} s", file=sys.stderr)
    results = {}
    for name, code in steps(store, args.device, not args.skip_references).items():
        results[name] = run_measured(code)
        print(f"{name}: {results[name]}", file=sys.stderr)

    floor = results["read pass (floor)"].get("seconds")
    raw_mb = 4 * args.rows * args.cols / 1e6
    print(f"\nN = {args.rows:,} x T = {args.cols} ({raw_mb:,.0f} MB float32), device {args.device}\n")
    print("| step | time (s) | x read pass | peak RSS (MB) | notes |")
    print("|---|---:|---:|---:|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | - | - | - | failed: {r['error']} |")
            continue
        notes = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                          if k not in ("seconds", "peak_rss_mb", "import_rss_mb"))
        print(f"| {name} | {r['seconds']:.2f} | {r['seconds'] / floor:.2f} | {r['peak_rss_mb']:,.0f} | {notes} |")
    base = results["read pass (floor)"].get("import_rss_mb")
    print(f"\n(interpreter + torch + numpy after import: {base:,.0f} MB RSS)")
    ours = {"dmd": results["DMD r=10, cold (Gram pass + algebra)"],
            "pca": results["PCA d=40, cold (Gram pass + directions pass)"]}
    refs = {"dmd": results.get(_measure.PYDMD_STEP), "pca": results.get(_measure.SKLEARN_STEP)}
    for key in ("dmd", "pca"):
        ref = refs[key]
        if ref and "seconds" in ref and "seconds" in ours[key]:
            print(f"{key}: cmdtool cold / reference time = {ours[key]['seconds'] / ref['seconds']:.2f}, "
                  f"peak RSS ratio = {ours[key]['peak_rss_mb'] / ref['peak_rss_mb']:.2f} "
                  f"(reference time excludes its {ref.get('load_seconds', 0):.1f} s load)")
    (args.dir / "results.json").write_text(json.dumps({"rows": args.rows, "cols": args.cols, "device": args.device,
                                                       "results": results}, indent=2))
    if not args.keep:
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
