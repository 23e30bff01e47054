"""Scale benchmark: every step of a run shaped like a real model, each in a fresh process, with time and peak RSS.

Writes T real checkpoint files (safetensors or .pt) of a model with real tensor shapes, whose weights move like
training runs do (a per-tensor initial scale, a few smooth shared curves with per-weight gains, noise), then
measures, each in its own interpreter (time without start-up and imports; peak RSS = that process's VmHWM):

  floor        safetensors.load_file / torch.load of every checkpoint
  ingest       cmdtool.ingest (--memory-budget, --codec)
  read         one bare read pass over the store (the floor of every analysis)
  cmd          CMD decompose --modes 10 (Gram not cached: the sampling pass also computes it)
  dmd          DMD rank 10 (Gram cached by cmd)
  kga          KGA classes + KWM masks (one pass)
  pca          PCA d=40 (directions pass)
  reconstruct  `cmdtool reconstruct --epoch LAST` (a checkpoint file written)
  batched      evaluate-style batched reconstruction: CMD models of every 10th epoch, in groups sized by a
               256 MiB budget (what `cmdtool evaluate` does)

Sizes (``--size``; several separated by commas):

  smoke     50,000 x 12      (seconds: the whole pipeline end to end; tests/end_to_end/test_bench_scale.py runs it)
  1m        1,000,000 x 150  generic 4-tensor model
  resnet18  11,699,112 x 150 ResNet-18's tensors (11.69M parameters + BatchNorm running statistics)
  40m       40,000,000 x 150 generic
  vitb16    86,567,656 x 90  ViT-B/16's tensors (patch embedding, 12 blocks, head)
  N:T       any generic size, e.g. 4000000:150; PRESET:T a preset's shapes with T checkpoints (vitb16:4)

Disk: checkpoints and the store of the largest size at once (vitb16: 31 GB of checkpoints + ~31 GB of store);
``--groups G`` writes and ingests the checkpoints in G groups (appending), deleting each group once ingested,
so that only 1/G of the checkpoints is on disk at a time; the ingest and floor figures are then the sums over
the groups. Everything generated is deleted at the end (unless --keep). After each size the script prints a
table; with several sizes, the fit of time against N*T per step.

Usage: python bench/scale.py --size smoke
       python bench/scale.py --size 1m,resnet18,40m,vitb16 --format safetensors --dir /work/scale-bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("floor", "ingest", "read", "cmd", "dmd", "kga", "pca", "reconstruct", "batched")


# ------------------------------------------------------------------------------------------- model shapes
def resnet18_shapes() -> dict[str, tuple[int, ...]]:
    """torchvision's resnet18() state dict: names, shapes, and its BatchNorm buffers."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix: str, c: int) -> None:
        shapes.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                       f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    bn("bn1", 64)
    inplanes = 64
    for layer, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{layer}.{block}"
            stride_in = inplanes if block == 0 else planes
            shapes[f"{p}.conv1.weight"] = (planes, stride_in, 3, 3)
            bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            if block == 0 and layer > 1:
                shapes[f"{p}.downsample.0.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes)
        inplanes = planes
    shapes["fc.weight"], shapes["fc.bias"] = (1000, 512), (1000,)
    return shapes


def vit_b16_shapes() -> dict[str, tuple[int, ...]]:
    """timm's vit_base_patch16_224 state dict: 86,567,656 parameters."""
    d, mlp = 768, 3072
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, d), "pos_embed": (1, 197, d),
                                          "patch_embed.proj.weight": (d, 3, 16, 16), "patch_embed.proj.bias": (d,)}
    for i in range(12):
        p = f"blocks.{i}"
        shapes.update({f"{p}.norm1.weight": (d,), f"{p}.norm1.bias": (d,), f"{p}.attn.qkv.weight": (3 * d, d),
                       f"{p}.attn.qkv.bias": (3 * d,), f"{p}.attn.proj.weight": (d, d), f"{p}.attn.proj.bias": (d,),
                       f"{p}.norm2.weight": (d,), f"{p}.norm2.bias": (d,), f"{p}.mlp.fc1.weight": (mlp, d),
                       f"{p}.mlp.fc1.bias": (mlp,), f"{p}.mlp.fc2.weight": (d, mlp), f"{p}.mlp.fc2.bias": (d,)})
    shapes.update({"norm.weight": (d,), "norm.bias": (d,), "head.weight": (1000, d), "head.bias": (1000,)})
    return shapes


def generic_shapes(n_params: int) -> dict[str, tuple[int, ...]]:
    width = 1000
    rows = max(1, n_params // 4 // width)
    shapes = {f"block.{i}.weight": (rows, width) for i in range(4)}
    rest = n_params - 4 * rows * width
    if rest > 0:
        shapes["block.3.bias"] = (rest,)
    return shapes


def size_spec(name: str) -> tuple[str, dict, int]:
    presets = {"smoke": (generic_shapes(50_000), 12), "1m": (generic_shapes(1_000_000), 150),
               "resnet18": (resnet18_shapes(), 150), "40m": (generic_shapes(40_000_000), 150),
               "vitb16": (vit_b16_shapes(), 90)}
    base, _, t = name.partition(":")
    if base in presets:  # a preset, optionally with another checkpoint count: vitb16:4
        shapes, default_t = presets[base]
        return name.replace(":", "x"), shapes, int(t or default_t)
    return name.replace(":", "x"), generic_shapes(int(float(base))), int(t or 150)


def n_params(shapes: dict) -> int:
    return sum(math.prod(s) for k, s in shapes.items() if not k.endswith("num_batches_tracked"))


# ------------------------------------------------------------------------------------------- checkpoints
def write_checkpoints(folder: Path, shapes: dict, epochs: range, n_epochs: int, fmt: str) -> int:
    """Checkpoints ``epochs`` of a run of ``n_epochs``: w(t) = w0 + g_1 c_1(t) + g_2 c_2(t) + noise, with w0 at
    each tensor's init scale, three smooth curves c_m shared by all weights and per-weight gains (the
    structure CMD/DMD/PCA find in real runs). Seeded per tensor: every group of a run agrees."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    t_axis = torch.linspace(0, 1, n_epochs)
    curves = torch.stack([1 - torch.exp(-5 * t_axis), torch.sin(3 * t_axis), t_axis ** 2])
    per_tensor = {}
    for k, (name, shape) in enumerate(shapes.items()):
        if name.endswith("num_batches_tracked"):
            continue
        g = torch.Generator().manual_seed(k)
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else max(1, shape[0] if shape else 1)
        scale = 1 / math.sqrt(fan_in)
        w0 = torch.randn(shape, generator=g) * scale
        gains = torch.randn((3, *shape), generator=g) * (0.1 * scale)
        modes = torch.randint(0, 3, shape, generator=g)
        per_tensor[name] = (w0, gains.gather(0, modes.unsqueeze(0)).squeeze(0), modes, scale)
    written = 0
    for epoch in epochs:
        state = {}
        for k, (name, shape) in enumerate(shapes.items()):
            if name.endswith("num_batches_tracked"):
                state[name] = torch.tensor(epoch * 100, dtype=torch.int64)
                continue
            w0, gain, modes, scale = per_tensor[name]
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(1_000_003 * epoch + k))
            state[name] = w0 + gain * curves[:, epoch][modes] + noise * (0.005 * scale)
        path = folder / f"epoch_{epoch + 1:04d}.{fmt}"
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(state, str(path))
        else:
            torch.save(state, path)
        written += path.stat().st_size
    return written


# ------------------------------------------------------------------------------------------- steps
IN_PROCESS = False  # --in-process: run the steps in this interpreter (a check of the code paths, no RSS per step)


def measure(code: str, device: str) -> dict:
    preamble = f"import numpy, torch, zarr\nimport cmdtool\nDEVICE = {device!r}"
    if IN_PROCESS:
        import textwrap

        namespace = {"result": {}}
        exec(preamble, namespace)
        started = time.perf_counter()
        exec(textwrap.dedent(code).strip(), namespace)
        return {"seconds": time.perf_counter() - started, "peak_rss_mb": _measure.peak_rss_mb(), **namespace["result"]}
    result = _measure.run_measured(code, preamble=preamble)
    if "error" in result:
        raise SystemExit(f"benchmark step failed: {result['error']}")
    return result


def step_code(step: str, store: Path, ckpts: Path, fmt: str, budget: str, codec: str, out: Path) -> str:
    s = repr(str(store))
    if step == "floor":
        load = ("from safetensors.torch import load_file as load" if fmt == "safetensors"
                else "load = lambda p: torch.load(p, map_location='cpu', weights_only=True, mmap=True)")
        return f"""
            from pathlib import Path
            {load}
            for p in sorted(Path({str(ckpts)!r}).glob("*.{fmt}")):
                for v in load(p).values():
                    v.sum()  # touch every value
        """
    if step == "ingest":
        return f"cmdtool.ingest([{str(ckpts)!r}], {s}, memory_budget={budget!r}, codec={codec!r})"
    if step == "read":
        return f"""
            for block in cmdtool.open_store({s}).iter_blocks():
                pass
        """
    fits = {"cmd": "{'modes': 10, 'samples': 1000, 'device': DEVICE}",
            "dmd": "{'rank': '10', 'device': DEVICE}",
            "kga": "{'rank': '10', 'device': DEVICE}",
            "pca": "{'dims': 40, 'device': DEVICE}"}
    if step in fits:
        return f"""
            from cmdtool.analyzers import get_analyzer
            store = cmdtool.open_store({s}, mode="r+")
            get_analyzer({step!r}).from_options({fits[step]}).fit(store).save("bench")
        """
    if step == "reconstruct":
        return f"""
            from cmdtool_cli.app import app
            last = int(cmdtool.open_store({s}).labels[-1])
            app(["reconstruct", "--store", {s}, "--epoch", str(last), "--name", "bench", "--format", {fmt!r},
                 "--out", {str(out / ('reconstructed.' + fmt))!r}, "--quiet", "--force"], standalone_mode=False)
        """
    if step == "batched":
        return f"""
            from cmdtool.analyzers import get_analyzer
            store = cmdtool.open_store({s})
            cmd = get_analyzer("cmd").load(store, "bench")
            columns = list(range(0, store.n_checkpoints, 10))
            group = max(1, (256 * 1024**2) // (4 * store.n_rows))  # evaluate's default budget
            for start in range(0, len(columns), group):
                cmd.reconstruct_epochs(store, columns[start:start + group])
            result["epochs"] = len(columns)
        """
    raise ValueError(step)


def run_size(name: str, args) -> dict:
    label, shapes, n_epochs = size_spec(name)
    n = n_params(shapes)
    work = args.dir / label
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store, ckpts = work / "store.zarr", work / "ckpts"
    ckpt_bytes = 4 * n * n_epochs
    groups = args.groups or (3 if ckpt_bytes > 20e9 else 1)
    free = shutil.disk_usage(work).free
    # ingest: a group of checkpoints beside the store; then the store and the analyses' results in it (PCA's 40
    # directions, KGA's rank-10 basis and mask, CMD's mode/A/B/row error: about 55 float32 per parameter). The
    # ViT-B run failed for want of the second with 50 GB free: 31 GB of store + 19 GB of results.
    results_bytes = 4 * n * 55
    need = max(ckpt_bytes / groups, results_bytes) + ckpt_bytes * 1.05
    print(f"\n== {label}: {n:,} parameters x {n_epochs} checkpoints ({ckpt_bytes / 1e9:.1f} GB float32, "
          f"{len(shapes)} tensors, {args.format}, {groups} group(s); needs ~{need / 1e9:.0f} GB of disk, "
          f"{free / 1e9:.0f} GB free)", flush=True)
    if need > free:
        raise SystemExit(f"not enough disk under {args.dir}: {label} needs ~{need / 1e9:.0f} GB, "
                         f"{free / 1e9:.0f} GB free; pass --groups to keep fewer checkpoints at once")
    results: dict[str, dict] = {}
    bounds = [round(i * n_epochs / groups) for i in range(groups + 1)]
    for g in range(groups):
        started = time.perf_counter()
        written = write_checkpoints(ckpts, shapes, range(bounds[g], bounds[g + 1]), n_epochs, args.format)
        print(f"  wrote epochs {bounds[g] + 1}..{bounds[g + 1]}: {written / 1e9:.1f} GB in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        for step in ("floor", "ingest"):
            r = measure(step_code(step, store, ckpts, args.format, args.budget, args.codec, work), args.device)
            acc = results.setdefault(step, {"seconds": 0.0, "peak_rss_mb": 0.0})
            acc["seconds"] += r["seconds"]
            acc["peak_rss_mb"] = max(acc["peak_rss_mb"], r["peak_rss_mb"])
        if groups > 1 or not args.keep:
            shutil.rmtree(ckpts)  # the store holds the values now; reconstruct needs no source file
    # the store ingest wrote is still being written back from the page cache; a read timed meanwhile competes
    # with that write-back (the 40M read took 109 s right after ingest, a whole CMD pass 65 s)
    started = time.perf_counter()
    os.sync()
    print(f"  sync after ingest: {time.perf_counter() - started:.1f} s (not timed)", flush=True)
    for step in STEPS[2:]:
        results[step] = measure(step_code(step, store, ckpts, args.format, args.budget, args.codec, work),
                                args.device)
        r = results[step]
        print(f"  {step:12s} {r['seconds']:8.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
    store_bytes = sum(p.stat().st_size for p in (store / "trajectories").rglob("*") if p.is_file())
    summary = {"size": label, "n_params": n, "n_checkpoints": n_epochs, "format": args.format, "codec": args.codec,
               "budget": args.budget, "groups": groups, "store_gb": store_bytes / 1e9, "steps": results}
    print_table(summary)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def print_table(summary: dict) -> None:
    steps, read = summary["steps"], summary["steps"]["read"]["seconds"]
    print(f"\n| {summary['size']} ({summary['n_params']:,} x {summary['n_checkpoints']}) | seconds | x read | "
          f"peak RSS (MB) |\n|---|---:|---:|---:|")
    for step in STEPS:
        r = steps[step]
        print(f"| {step} | {r['seconds']:.2f} | {r['seconds'] / read:.2f} | {r['peak_rss_mb']:.0f} |")
    print(f"ingest / floor: {steps['ingest']['seconds'] / steps['floor']['seconds']:.2f}; store "
          f"{summary['store_gb']:.2f} GB on disk")


def print_fit(summaries: list[dict]) -> None:
    """Least-squares fit seconds = a + b * N*T per step, its worst relative residual, and peak RSS / smallest."""
    import numpy as np

    sizes = np.array([s["n_params"] * s["n_checkpoints"] for s in summaries], dtype=float)
    print("\n| step | seconds per 1e9 values (slope) | intercept (s) | worst residual | peak RSS vs smallest |"
          "\n|---|---:|---:|---:|---:|")
    for step in STEPS:
        seconds = np.array([s["steps"][step]["seconds"] for s in summaries])
        peaks = np.array([s["steps"][step]["peak_rss_mb"] for s in summaries])
        slope, intercept = np.polyfit(sizes, seconds, 1)
        residual = np.max(np.abs(seconds - (intercept + slope * sizes)) / np.maximum(seconds, 1e-9))
        print(f"| {step} | {slope * 1e9:.2f} | {intercept:.2f} | {residual:.0%} | "
              f"{' / '.join(f'{p / peaks[0]:.2f}' for p in peaks)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="smoke", help="smoke, 1m, resnet18, 40m, vitb16 or N:T (comma list)")
    parser.add_argument("--format", choices=("safetensors", "pt"), default="safetensors")
    parser.add_argument("--budget", default="1GiB", help="ingest --memory-budget")
    parser.add_argument("--codec", default=None, help="ingest --codec (default: cmdtool's)")
    parser.add_argument("--device", default="auto", help="analyses' --device (auto, cpu, cuda)")
    parser.add_argument("--groups", type=int, default=None, help="write+ingest the checkpoints in this many groups")
    parser.add_argument("--dir", type=Path, default=ROOT / "bench-out" / "scale")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints and stores")
    parser.add_argument("--in-process", action="store_true", help="run every step in this interpreter: checks "
                        "the pipeline quickly (the tests do), but the peak RSS figures are then not per step")
    args = parser.parse_args()
    global IN_PROCESS
    IN_PROCESS = args.in_process
    summaries = [run_size(name.strip(), args) for name in args.size.split(",")]
    if len(summaries) > 1:
        print_fit(summaries)
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=2))
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
