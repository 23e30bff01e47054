"""Ingest throughput, memory and codec choice, against the floor of ``torch.load``-ing every checkpoint.

Writes T checkpoints (``--run synthetic``: a 4-tensor random walk of N parameters; ``--run trained``: a real
training run, an MLP 64-W-W-10 trained with SGD+momentum on scikit-learn's digits, one checkpoint per epoch, so
that the weights compress like trained weights do), then measures, each in a fresh subprocess so that the time
and peak RSS are the step's own (imports excluded; "wall" adds the interpreter start-up and imports):

- the floor: ``torch.load`` of every checkpoint (what any tool must at least do),
- ``cmdtool.ingest`` with each ``--codecs`` entry (store size and compression ratio too),
- one bare read pass over each resulting store (the floor of every analysis),
- the content hashes on the same files (sha256 and xxh3_128; blake3 when installed).

``--repeat K`` runs K rounds of those steps in turn (floor, ingest and read per codec) and reports the fastest
of each, with every run listed.

Usage: python bench/ingest.py [--run synthetic|trained] [--params N | --width W] [--checkpoints T]
                              [--format pt|safetensors] [--codecs lz4,none] [--budget 1GiB] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def save(state: dict, path: Path) -> None:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


def make_synthetic_run(folder: Path, n_params: int, n_checkpoints: int, suffix: str) -> None:
    import torch

    width = 1000
    shapes = {"embed.weight": (n_params // 4 // width, width), "block.0.weight": (n_params // 4 // width, width),
              "block.1.weight": (n_params // 4 // width, width), "head.weight": (n_params // 4 // width, width)}
    used = sum(a * b for a, b in shapes.values())
    if n_params > used:
        shapes["head.bias"] = (n_params - used,)
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(*s, generator=generator) for k, s in shapes.items()}
    drift = {k: torch.randn(*s, generator=generator) * 1e-3 for k, s in shapes.items()}
    for epoch in range(1, n_checkpoints + 1):
        for k in state:
            state[k] += drift[k] + 1e-4 * torch.randn(*state[k].shape, generator=generator)
        save(state, folder / f"epoch_{epoch}{suffix}")


def make_trained_run(folder: Path, width: int, n_checkpoints: int, suffix: str) -> None:
    """A real training run (real data, real optimiser): its weights compress like trained weights."""
    import torch
    from torch import nn

    from cmdtool.datasets import load_split

    torch.manual_seed(0)
    data = load_split()
    x, y = data.train_x.flatten(1), data.train_y
    model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(1, n_checkpoints + 1):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        save({k: v.clone() for k, v in model.state_dict().items()}, folder / f"epoch_{epoch:03d}{suffix}")


def measured(code: str) -> dict:
    started = time.perf_counter()
    result = _measure.run_measured(code, preamble="import torch, zarr, numpy\nimport cmdtool")  # imports untimed
    if "error" in result:
        raise SystemExit(f"benchmark step failed: {result['error']}")
    result["wall"] = time.perf_counter() - started
    return result


PROFILE = """
import collections, importlib, shutil, threading
ingest_module = importlib.import_module("cmdtool.ingestion.ingest")
from cmdtool.ingestion import formats
from cmdtool.store.store import TrajectoryStore
totals = collections.defaultdict(float)

def timed(owner, name, label):
    function = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            thread = "main" if threading.current_thread() is threading.main_thread() else "worker"
            totals[f"{label} ({thread})"] += time.perf_counter() - started
    setattr(owner, name, wrapper)

timed(ingest_module, "fill_rows", "fill buffers")
timed(ingest_module, "count_nonfinite", "NaN/Inf count")
timed(ingest_module, "file_digest", "content digest")
timed(formats.OpenCheckpoint, "__init__", "open checkpoints")
timed(TrajectoryStore, "write_region", "chunk writes")
shutil.rmtree(STORE, ignore_errors=True)
cmdtool.ingest([CKPTS], STORE)
result.update(totals)
"""


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", choices=("synthetic", "trained"), default="synthetic")
    parser.add_argument("--params", type=int, default=1_000_000, help="synthetic run: parameters")
    parser.add_argument("--width", type=int, default=1000, help="trained run: hidden width (1000: 1.08M parameters)")
    parser.add_argument("--checkpoints", type=int, default=150)
    parser.add_argument("--format", choices=("pt", "safetensors"), default="pt")
    parser.add_argument("--codecs", default="lz4,none")
    parser.add_argument("--budget", default="1GiB")
    parser.add_argument("--dir", type=Path, default=ROOT / "bench-out" / "ingest")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and stores afterwards")
    parser.add_argument("--repeat", type=int, default=1, help="run every step this many rounds (each round runs the "
                        "steps in turn), report the fastest and list all (the development machine is noisy)")
    parser.add_argument("--profile", action="store_true", help="also time where one ingest spends its time, per "
                        "thread (main: reading; worker: the writer and the hash threads)")
    parser.add_argument("--chunk-sweep", default="", help="also rechunk the first store to these chunk widths "
                        "(e.g. 1,8,32,150; rows: cmdtool's default for each width) and time a bare read of each")
    args = parser.parse_args()

    suffix = "." + args.format
    size = args.params if args.run == "synthetic" else args.width
    ckpts = args.dir / f"{args.run}-{size}x{args.checkpoints}-{args.format}"
    if not any(ckpts.glob(f"*{suffix}")):
        ckpts.mkdir(parents=True, exist_ok=True)
        print(f"writing {args.checkpoints} {args.run} checkpoints to {ckpts} ...", flush=True)
        (make_synthetic_run if args.run == "synthetic" else make_trained_run)(ckpts, size, args.checkpoints, suffix)
    files = sorted(ckpts.glob(f"*{suffix}"))
    mb = sum(p.stat().st_size for p in files) / 1e6
    print(f"run: {len(files)} {args.format} checkpoints, {mb:,.0f} MB ({args.run})")
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)  # same page-cache state

    loader = ("from safetensors.torch import load_file as load" if args.format == "safetensors" else
              "load = lambda p: torch.load(p, map_location='cpu', weights_only=True)")
    codecs = args.codecs.split(",")
    steps = {"floor": f"""
        from pathlib import Path
        {loader}
        for p in sorted(Path({str(ckpts)!r}).glob("*{suffix}")):
            for v in load(p).values():
                v.sum()  # touch the data
    """}
    for codec in codecs:
        store = str(args.dir / f"store-{codec}.zarr")
        steps[f"ingest {codec}"] = f"""
            import shutil
            shutil.rmtree({store!r}, ignore_errors=True)
            started = time.perf_counter()  # the removal of the previous round's store is not timed
            report = cmdtool.ingest([{str(ckpts)!r}], {store!r}, memory_budget={args.budget!r}, codec={codec!r})
            result["seconds"] = time.perf_counter() - started
            result["chunks"] = list(cmdtool.open_store({store!r}).chunk_shape)
        """
        steps[f"read {codec}"] = f"""
            for block in cmdtool.open_store({store!r}).iter_blocks():
                pass
        """
    # Rounds of every step in turn (the machine's state drifts: a step is compared with the others of its round),
    # and the fastest of the rounds reported.
    runs: dict[str, list[dict]] = {name: [] for name in steps}
    for _ in range(args.repeat):
        for name, code in steps.items():
            runs[name].append(measured(code))
    best = {name: min(results, key=lambda r: r["seconds"]) for name, results in runs.items()}
    floor = best["floor"]

    def seconds(name: str) -> str:
        return ", ".join(f"{r['seconds']:.2f}" for r in runs[name]) if args.repeat > 1 else ""

    print(f"{'torch.load of every checkpoint':40s} {floor['seconds']:6.2f} s (wall {floor['wall']:5.1f})  "
          f"{mb / floor['seconds']:6.0f} MB/s  peak RSS {floor['peak_rss_mb']:5.0f} MB  {seconds('floor')}")
    for codec in codecs:
        res, read = best[f"ingest {codec}"], best[f"read {codec}"]
        store = args.dir / f"store-{codec}.zarr"
        on_disk = folder_bytes(store / "trajectories")
        raw = 4 * cmdtool_rows(store) * len(files)
        print(f"{'cmdtool ingest --codec ' + codec:40s} {res['seconds']:6.2f} s (wall {res['wall']:5.1f})  "
              f"{mb / res['seconds']:6.0f} MB/s  peak RSS {res['peak_rss_mb']:5.0f} MB  "
              f"{res['seconds'] / floor['seconds']:5.2f}x torch.load  chunks {res['chunks'][0]}x{res['chunks'][1]}  "
              f"store {on_disk / 1e6:,.0f} MB, ratio {raw / on_disk:.3f}  {seconds('ingest ' + codec)}")
        print(f"{'  bare read pass, ' + codec:40s} {read['seconds']:6.2f} s  peak RSS {read['peak_rss_mb']:5.0f} MB"
              f"  {seconds('read ' + codec)}")
    if args.profile:
        store = args.dir / "store-profile.zarr"
        res = measured(f"CKPTS, STORE = {str(ckpts)!r}, {str(store)!r}\n" + PROFILE)
        print(f"{'profile of one ingest':40s} {res['seconds']:6.2f} s: " + ", ".join(
            f"{k} {v:.2f} s" for k, v in sorted(res.items(), key=lambda kv: -kv[1] if isinstance(kv[1], float)
                                                else 0) if "(" in k))
    if args.chunk_sweep:
        source = args.dir / f"store-{args.codecs.split(',')[0]}.zarr"
        for width in [int(w) for w in args.chunk_sweep.split(",")]:
            sweep = args.dir / f"sweep-{width}.zarr"
            shutil.rmtree(sweep, ignore_errors=True)
            shutil.copytree(source, sweep)
            res = measured(f"""
                from cmdtool.store.rechunk import rechunk
                result["chunks"] = list(rechunk({str(sweep)!r}, chunk_columns={width}).new_chunks)
            """)
            read = measured(f"""
                s = cmdtool.open_store({str(sweep)!r})
                for block in s.iter_blocks():
                    pass
            """)
            print(f"{'  chunks ' + 'x'.join(map(str, res['chunks'])):40s} rechunk {res['seconds']:6.2f} s  "
                  f"peak RSS {res['peak_rss_mb']:5.0f} MB;  bare read {read['seconds']:6.2f} s  "
                  f"peak RSS {read['peak_rss_mb']:5.0f} MB")
            shutil.rmtree(sweep)
    hashes = measured(f"""
        import hashlib, xxhash
        makers = {{"sha256": hashlib.sha256, "xxh3_128": xxhash.xxh3_128}}
        try:
            import blake3
            makers["blake3"] = blake3.blake3
        except ImportError:
            pass
        from pathlib import Path
        files = sorted(Path({str(ckpts)!r}).glob("*{suffix}"))
        for name, make in makers.items():
            t = time.perf_counter()
            for f in files:
                h = make()
                with open(f, "rb") as handle:
                    while chunk := handle.read(1024**2):
                        h.update(chunk)
            result[name] = time.perf_counter() - t
    """)
    print("content hash of every file            " + "  ".join(
        f"{k} {v:.2f} s ({mb / v:,.0f} MB/s)" for k, v in hashes.items() if k not in ("seconds", "peak_rss_mb",
                                                                                   "import_rss_mb", "wall")))
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


def cmdtool_rows(store: Path) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    import cmdtool

    return cmdtool.open_store(store).n_rows


if __name__ == "__main__":
    main()
