"""Check that a code change leaves every result equal: run the digits pipeline with two versions of cmdtool on
the same checkpoints, then compare every exported array bit for bit, every result's attributes, the CSV tables,
the commands' JSON outputs and the reconstructed checkpoints.

    python examples/train_digits.py --out /tmp/same/ckpts --epochs 40
    git archive main | tar -x -C /tmp/same/main_src
    python bench/same_results.py run /tmp/same/main --ckpts /tmp/same/ckpts \\
        --pythonpath /tmp/same/main_src/src:/tmp/same/main_src/cli
    python bench/same_results.py run /tmp/same/new --ckpts /tmp/same/ckpts
    python bench/same_results.py diff /tmp/same/main /tmp/same/new

Timings, paths and creation times are left out of the comparison; keys one side has and the other lacks are
listed (a new output field is expected to show up there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# what one pipeline run does (the steps of `make demo`, plus a second reconstruct and compare)
STEPS = [
    ("decompose_cmd", ["decompose", "--modes", "10", "--warmup", "20", "--json"]),
    ("decompose_gram", ["decompose", "-m", "dmd", "-m", "kga", "-m", "pca", "--rank", "2", "--dims", "1", "--json"]),
    ("reconstruct", ["reconstruct", "--epoch", "40", "--epoch", "25", "--out", "{out}/reconstructed", "--json"]),
    ("reconstruct_online", ["reconstruct", "--epoch", "30", "--variant", "online", "--out", "{out}/reconstructed",
                            "--json"]),
    ("evaluate", ["evaluate", "--fn", "cmdtool.datasets:evaluate", "--json"]),
    ("compare", ["compare", "cmd", "dmd", "pca", "--equal-budget", "--json"]),
    ("compare_sized", ["compare", "dmd", "pca", "--rank", "4", "--dims", "3", "--json"]),
    ("landscape", ["landscape", "--fn", "cmdtool.datasets:evaluate", "--epoch", "40", "--mode", "0",
                   "--points", "7", "--out", "{out}/landscape", "--json"]),
    ("report", ["report", "--out", "{out}/report", "--json"]),
]
VOLATILE = {"timings", "created_at", "modified_at", "fit_seconds", "seconds", "wall_seconds", "total_seconds",
            "evaluate_seconds", "reconstruct_seconds", "baselines_stream_seconds", "sampling_pass_seconds",
            "clustering_seconds", "fit_pass_seconds", "gram_seconds", "pass_seconds", "store", "path", "source",
            "files", "out_dir", "bytes_written"}


def run(out: Path, ckpts: Path, pythonpath: str | None) -> None:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out.mkdir(parents=True, exist_ok=False)
    store = ["--store", str(out / "run.zarr")]

    def cmdtool(args: list[str], json_to: str | None = None) -> None:
        args = [a.replace("{out}", str(out)) for a in args]
        done = subprocess.run([sys.executable, "-m", "cmdtool_cli", *args, *store], env=env, check=True,
                              stdout=subprocess.PIPE, text=True)
        if json_to:
            (out / f"{json_to}.json").write_text(done.stdout)

    cmdtool(["ingest", str(ckpts), "-q"])
    for name, args in STEPS:
        cmdtool(args, name)
    cmdtool(["export", "--all-names", "--out", str(out / "export"), "-q"])


def strip(value, roots):
    if isinstance(value, dict):
        return {k: strip(v, roots) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [strip(v, roots) for v in value]
    if isinstance(value, str):
        for root in roots:
            value = value.replace(str(root), "RUN")
    return value


def differences(a: Path, b: Path) -> list[str]:
    import torch

    problems: list[str] = []

    def diff(x, y, where):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                if k not in x or k not in y:
                    problems.append(f"{where}/{k}: only in {'the second' if k not in x else 'the first'}")
                else:
                    diff(x[k], y[k], f"{where}/{k}")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y)):
                diff(u, v, f"{where}[{i}]")
        elif x != y:
            problems.append(f"{where}: {str(x)[:80]} != {str(y)[:80]}")

    arrays = {side: {p.relative_to(side) for p in (side / "export/npy").rglob("*.npy")} for side in (a, b)}
    for rel in sorted(arrays[a] | arrays[b]):
        if rel not in arrays[a] or rel not in arrays[b]:
            problems.append(f"{rel}: only in one run")
            continue
        x, y = np.load(a / rel), np.load(b / rel)
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y, equal_nan=True):
            problems.append(f"{rel}: arrays differ")
    for attrs in sorted((a / "export/npy").rglob("attrs.json")):
        rel = attrs.relative_to(a)
        if (b / rel).is_file():
            diff(strip(json.loads(attrs.read_text()), (a, b)), strip(json.loads((b / rel).read_text()), (a, b)),
                 str(rel))
    for table in sorted((a / "export/csv").rglob("*.csv")):
        rel = table.relative_to(a)
        if not (b / rel).is_file() or table.read_bytes() != (b / rel).read_bytes():
            problems.append(f"{rel}: csv differs or is missing")
    for name, _ in STEPS:
        diff(strip(json.loads((a / f"{name}.json").read_text()), (a, b)),
             strip(json.loads((b / f"{name}.json").read_text()), (a, b)), name)
    for checkpoint in sorted((a / "reconstructed").glob("*.pt")):  # not the folder's .cmdtool-output.json marker
        other = b / "reconstructed" / checkpoint.name
        if not other.is_file():
            problems.append(f"reconstructed/{checkpoint.name}: missing in the second run")
            continue
        x, y = torch.load(checkpoint, weights_only=True), torch.load(other, weights_only=True)
        if list(x) != list(y) or any(not torch.equal(x[k], y[k]) for k in x):
            problems.append(f"reconstructed/{checkpoint.name}: tensors differ")
    print(f"{len(arrays[a])} exported arrays in the first run, {len(arrays[b])} in the second")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="run the pipeline into OUT")
    one.add_argument("out", type=Path)
    one.add_argument("--ckpts", type=Path, required=True, help="checkpoint folder (examples/train_digits.py)")
    one.add_argument("--pythonpath", help="PYTHONPATH of the cmdtool version to run (default: the installed one)")
    two = sub.add_parser("diff", help="compare two runs")
    two.add_argument("first", type=Path)
    two.add_argument("second", type=Path)
    opts = parser.parse_args()
    if opts.command == "run":
        run(opts.out, opts.ckpts, opts.pythonpath)
        return
    problems = differences(opts.first, opts.second)
    print("\n".join(problems) if problems else "no difference")


if __name__ == "__main__":
    main()
