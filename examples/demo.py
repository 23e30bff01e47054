"""`make demo`: all of cmdtool on a real training run, through the same commands a user types.

1. trains the digits CNN (examples/train_digits.py: SGD with momentum, one-pixel shifts, one checkpoint per
   epoch, a held-out test split),
2. ingest -> decompose (CMD post-hoc + online, DMD, KGA, PCA) -> reconstruct -> evaluate (held-out accuracy of
   original, EMA, SWA and modelled weights) -> compare -> landscape -> report (when `cmdtool report` exists),
3. prints a summary. Everything goes to demo-run/ (see docs/demo.md for a walk-through with real output).

Options: ``--epochs`` (default 40, or $CMDTOOL_DEMO_EPOCHS), ``--seed``, ``--out``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
METRIC_FN = "cmdtool.datasets:evaluate"
# DMD and PCA are sized to about CMD's storage (2 numbers per weight), as `cmdtool compare --equal-budget`
# does: rank-2 DMD keeps 2 mode vectors, 1-direction PCA a mean and one direction.
DMD_RANK, PCA_DIMS, CMD_MODES = 2, 1, 10


def run(args: list[str], show: str | None = None) -> None:
    """Run a command, echoing it the way a user would type it."""
    print(f"\n$ {show or shlex.join(args)}", flush=True)
    subprocess.run(args, check=True)


def cmdtool(*args: str) -> None:
    run([sys.executable, "-m", "cmdtool_cli", *args], show=shlex.join(["cmdtool", *args]))


def has_command(name: str) -> bool:
    probe = subprocess.run([sys.executable, "-m", "cmdtool_cli", name, "--help"], capture_output=True)
    return probe.returncode == 0


DEMO_MARKER = ".cmdtool-demo"  # a folder holding it was made by this script, which may then start it afresh


def start_fresh(out: Path) -> None:
    """An empty ``out``: removes an earlier demo's folder, never a folder the demo did not make."""
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).is_file():
            sys.exit(f"demo: --out {out} already holds files the demo did not write; choose a new folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("made by examples/demo.py; the next demo run replaces this folder\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="cmdtool end-to-end demo on the digits CNN")
    parser.add_argument("--epochs", type=int, default=int(os.environ.get("CMDTOOL_DEMO_EPOCHS", 40)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("demo-run"))
    opts = parser.parse_args(argv)
    started = time.perf_counter()
    out = opts.out
    start_fresh(out)
    ckpts, store = out / "ckpts", ["--store", str(out / "cmdtool.zarr")]
    final = str(opts.epochs)
    warmup = str(max(2, opts.epochs // 2))

    run([sys.executable, str(EXAMPLES / "train_digits.py"), "--out", str(ckpts), "--epochs", final,
         "--seed", str(opts.seed)], show=f"python examples/train_digits.py --out {ckpts} --epochs {final} "
                                         f"--seed {opts.seed}")
    cmdtool("ingest", str(ckpts), *store, "-q")
    cmdtool("info", *store)
    cmdtool("decompose", "--modes", str(CMD_MODES), "--warmup", warmup, *store, "-q")
    cmdtool("decompose", "-m", "dmd", "-m", "kga", "-m", "pca", "--rank", str(DMD_RANK), "--dims", str(PCA_DIMS),
            *store, "-q")
    cmdtool("reconstruct", "--epoch", final, "--out", str(out / "reconstructed"), *store)
    cmdtool("evaluate", "--fn", METRIC_FN, *store, "-q")
    cmdtool("compare", "cmd", "dmd", "pca", "--equal-budget", "--plot", str(out / "compare_errors.png"), *store,
            "-q")
    cmdtool("landscape", "--fn", METRIC_FN, "--epoch", final, "--mode", "0", "--out", str(out / "landscape"),
            *store, "-q")
    report = None
    if has_command("report"):
        report = out / "report"
        cmdtool("report", "--out", str(report), *store)
    summarise(out, report, time.perf_counter() - started)


def summarise(out: Path, report: Path | None, seconds: float) -> None:
    from cmdtool.workflows.evaluate import Evaluation
    from cmdtool.store import open_store

    evaluation = Evaluation.load(open_store(out / "cmdtool.zarr"), "default")
    print("\n== summary: held-out test accuracy (final epoch; best epoch) ==")
    for row in evaluation.summary("test_acc"):
        print(f"  {row['method']:<11} {row['final']['test_acc']:.4f} at epoch {row['final_epoch']:<4} "
              f"best {row['best']:.4f} at epoch {row['best_epoch']}")
    print(f"\nstore: {out / 'cmdtool.zarr'}; reconstructed checkpoint: {out / 'reconstructed'}/; "
          f"landscape: {out / 'landscape'}/; error plot: {out / 'compare_errors.png'}")
    print(f"report: {report / 'index.html' if (report / 'index.html').exists() else report}" if report
          else "report: `cmdtool report` is not available in this version; skipped")
    print(f"demo finished in {seconds:.0f} s")


if __name__ == "__main__":
    main()
