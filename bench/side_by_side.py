"""cmdtool's analyses and the in-memory references on the same generated data, in one run, as ratios to one read.

    PYTHONPATH=src python bench/side_by_side.py                        # N = 1,000,000 x T = 150 (600 MB float32)
    PYTHONPATH=src python bench/side_by_side.py --rows 4000000 --skip-references --json out.json

Builds one store of planted-mode trajectories (bench/decompose.py's generator: 10 modes, 5% noise, 8 tensors),
then runs every step in a fresh interpreter (imports untimed) so that its seconds and peak RSS (VmHWM) are its own:

- the floor: one bare read of the store (``for block in store.iter_blocks(): pass``), the best of two;
- cmdtool, each fitted and saved as ``cmdtool decompose`` does: CMD ``--modes 10`` cold (no cached Gram matrix:
  the sampling pass computes it) and warm, DMD rank 10 cold, KGA rank 10 cold and warm, PCA 40 directions cold
  and warm ("cold" deletes the cached Gram matrix first);
- the references, with W loaded into memory first (load time reported apart, not counted): the dense
  paper-style CMD of bench/decompose.py (same sample, clustering, M and K), PyDMD ``DMD(svd_rank=10)`` with its
  ``reconstructed_data``, scikit-learn ``PCA(n_components=40)`` with its reconstruction.

Prints one table (seconds, x one read, peak RSS, relative error ‖W−Ŵ‖/‖W‖) and the ratios against the
references. The machine's load average is printed with it: timings taken on a busy machine are not quiet figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def steps(store: Path, device: str, references: bool) -> dict[str, str]:
    """name -> code run in a fresh interpreter (``st``: the store opened for writing results)."""
    drop_gram = "st.results.exists('gram', 'full') and st.results.delete('gram', 'full')"

    def fit(call: str, cold: bool, extra: str = "") -> str:
        return f"""
            from cmdtool.analyzers import get_analyzer
            st = open_store({str(store)!r}, mode='r+')
            {drop_gram if cold else 'pass'}
            started, cpu_started = time.perf_counter(), time.process_time()
            m = {call}.fit(st); m.save('bench')
            result.update(seconds=time.perf_counter() - started, cpu_seconds=time.process_time() - cpu_started)
            result['relative_error'] = m.metrics_['relative_error']
            {extra}
        """

    cmd = f"get_analyzer('cmd')(modes=10, samples=1000, device={device!r})"
    dmd = f"get_analyzer('dmd')(rank=10, device={device!r})"
    kga = f"get_analyzer('kga')(rank=10, device={device!r})"
    pca = f"get_analyzer('pca')(dims=40, device={device!r})"
    out = {
        "bare read": f"""
            st = open_store({str(store)!r})
            for _ in range(2):
                t0, c0 = time.perf_counter(), time.process_time()
                for block in st.iter_blocks():
                    pass
                if time.perf_counter() - t0 < result.get('seconds', 1e9):
                    result.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)
        """,
        "CMD --modes 10, cold": fit(cmd, True, "result.update({k: v for k, v in m.timings_.items() "
                                                "if k.endswith('pass_seconds')})"),
        "CMD --modes 10, Gram cached": fit(cmd, False),
        "DMD rank 10, cold": fit(dmd, True),
        "KGA rank 10, cold": fit(kga, True),
        "KGA rank 10, Gram cached": fit(kga, False),
        "PCA 40, cold": fit(pca, True),
        "PCA 40, Gram cached": fit(pca, False),
    }
    if references:
        out["dense paper-style CMD, in memory"] = f"""
            import decompose
            cpu_started = time.process_time()
            r = decompose.phase_dense({str(store)!r}, {device!r}, 10, 1000)
            result.update(seconds=r['compute_seconds'], load_seconds=r['load_seconds'],
                          relative_error=r['relative_error'],
                          cpu_seconds_with_load=time.process_time() - cpu_started)
        """
    out = {name: textwrap.dedent(code) for name, code in out.items()}
    if references:
        out.update(_measure.reference_steps(store))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cols", type=int, default=150)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-references", action="store_true", help="only cmdtool (N too large for RAM)")
    parser.add_argument("--store", type=Path, default=None,
                        help="build (or reuse, if it exists) the store here; default: a temporary folder")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    args = parser.parse_args()

    import decompose  # the generator, shared with bench/decompose.py

    temp = None
    if args.store is None:
        temp = Path(tempfile.mkdtemp(prefix="cmdtool-side-by-side-"))
        args.store = temp / "bench.zarr"
    try:
        if not args.store.exists():
            started = time.perf_counter()
            decompose.build_store(args.store, args.rows, args.cols, 10, 0.05)
            print(f"built {args.store} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        results = {}
        for name, code in steps(args.store, args.device, not args.skip_references).items():
            results[name] = _measure.run_measured(
                code, preamble="import numpy as np, torch\nfrom cmdtool.store import open_store")
            print(f"{name}: {results[name]}", file=sys.stderr)
        print_table(args, results)
        if args.json:
            args.json.write_text(json.dumps({"rows": args.rows, "cols": args.cols, "device": args.device,
                                             "load_average": os.getloadavg(), "results": results}, indent=2))
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def print_table(args, results: dict) -> None:
    floor = results["bare read"]["seconds"]
    print(f"N = {args.rows:,} x T = {args.cols} ({4 * args.rows * args.cols / 1e6:,.0f} MB float32), device "
          f"{args.device}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end "
          f"(each step in a fresh process; references: W in RAM, its load not counted)\n")
    cpu_floor = results["bare read"]["cpu_seconds"]
    print("| step | seconds | x one read | CPU seconds | x one read's CPU | peak RSS (MB) | relative error |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | |")
            continue
        error = f"{r['relative_error']:.6f}" if "relative_error" in r else ""
        print(f"| {name} | {r['seconds']:.2f} | {r['seconds'] / floor:.2f} | {r['cpu_seconds']:.2f} | "
              f"{r['cpu_seconds'] / cpu_floor:.2f} | {r['peak_rss_mb']:,.0f} | {error} |")
    pairs = [("CMD --modes 10, cold", "dense paper-style CMD, in memory"),
             ("DMD rank 10, cold", _measure.PYDMD_STEP), ("PCA 40, cold", _measure.SKLEARN_STEP)]
    print()
    for ours, ref in pairs:
        a, b = results.get(ours, {}), results.get(ref, {})
        if "seconds" in a and "seconds" in b:
            print(f"{ref.split(',')[0]} / cmdtool {ours}: {b['seconds'] / a['seconds']:.1f}x the time, "
                  f"{b['peak_rss_mb'] / a['peak_rss_mb']:.1f}x the peak RSS; errors {b['relative_error']:.6f} vs "
                  f"{a['relative_error']:.6f}")


if __name__ == "__main__":
    main()
