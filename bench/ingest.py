"""Ingest throughput and memory on a large synthetic run.

Writes T checkpoints of an N-parameter model (default 1M x 150, ~600 MB of .pt files), then measures, each in a
fresh subprocess so that peak RSS is the command's own:

- the floor: ``torch.load`` of every checkpoint (what any tool must at least do),
- ``cmdtool.ingest`` with two memory budgets (peak RSS should follow the budget, not T),
- one bare read pass over the resulting store (the floor of every analysis).

Usage: python bench/ingest.py [--params 1000000] [--checkpoints 150] [--dir bench-out/ingest] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_run(folder: Path, n_params: int, n_checkpoints: int) -> int:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    width = 1000
    shapes = {"embed.weight": (n_params // 4 // width, width), "block.0.weight": (n_params // 4 // width, width),
              "block.1.weight": (n_params // 4 // width, width), "head.weight": (n_params // 4 // width, width)}
    used = sum(a * b for a, b in shapes.values())
    shapes["head.bias"] = (n_params - used,)
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(*s, generator=generator) for k, s in shapes.items()}
    drift = {k: torch.randn(*s, generator=generator) * 1e-3 for k, s in shapes.items()}
    for epoch in range(1, n_checkpoints + 1):
        path = folder / f"epoch_{epoch}.pt"
        if not path.exists():
            for k in state:
                state[k] += drift[k] + 1e-4 * torch.randn(*state[k].shape, generator=generator)
            torch.save(state, path)
    return sum(p.stat().st_size for p in folder.glob("*.pt"))


def run_measured(code: str) -> dict:
    result = _measure.run_measured(code, preamble="import torch\nimport cmdtool")  # imports not timed
    if "error" in result:
        raise SystemExit(f"benchmark step failed: {result['error']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--checkpoints", type=int, default=150)
    parser.add_argument("--dir", type=Path, default=ROOT / "bench-out" / "ingest")
    parser.add_argument("--budgets", default="256MiB,1GiB")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and stores afterwards")
    args = parser.parse_args()

    ckpts = args.dir / f"ckpts-{args.params}x{args.checkpoints}"
    print(f"writing {args.checkpoints} checkpoints of {args.params:,} parameters to {ckpts} ...", flush=True)
    total_bytes = make_run(ckpts, args.params, args.checkpoints)
    mb = total_bytes / 1e6
    print(f"run: {args.checkpoints} x {args.params:,} float32 = {mb:,.0f} MB of .pt files\n")

    floor = run_measured(f"""
        import torch
        from pathlib import Path
        for p in sorted(Path({str(ckpts)!r}).glob("*.pt")):
            state = torch.load(p, map_location="cpu", weights_only=True)
            for v in state.values():
                v.sum()  # touch the data
    """)
    print(f"torch.load of every checkpoint      {floor['seconds']:7.1f} s  {mb / floor['seconds']:7.0f} MB/s  "
          f"peak RSS {floor['peak_rss_mb']:6.0f} MB")
    rows = []
    for budget in args.budgets.split(","):
        store = args.dir / f"store-{budget}.zarr"
        shutil.rmtree(store, ignore_errors=True)
        res = run_measured(f"""
            import cmdtool
            report = cmdtool.ingest([{str(ckpts)!r}], {str(store)!r}, memory_budget={budget!r})
            result["chunks"] = list(cmdtool.open_store({str(store)!r}).chunk_shape)
        """)
        rows.append((budget, res))
        print(f"cmdtool ingest --memory-budget {budget:6s} {res['seconds']:7.1f} s  {mb / res['seconds']:7.0f} MB/s  "
              f"peak RSS {res['peak_rss_mb']:6.0f} MB  ratio to torch.load {res['seconds'] / floor['seconds']:4.2f}  "
              f"chunks {res['chunks'][0]}x{res['chunks'][1]}")
    store = args.dir / f"store-{args.budgets.split(',')[-1]}.zarr"
    read = run_measured(f"""
        import cmdtool
        s = cmdtool.open_store({str(store)!r})
        for block in s.iter_blocks():
            pass
    """)
    size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) / 1e6
    print(f"bare read pass over the store        {read['seconds']:7.1f} s  {mb / read['seconds']:7.0f} MB/s  "
          f"peak RSS {read['peak_rss_mb']:6.0f} MB  (store {size:,.0f} MB on disk, ratio {mb / size:.2f}x)")
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
