"""CPU memory of KGA and Efficient-KGA (paper 003 Sec. 4.1 and Fig. 5: Efficient-KGA keeps U and W̃ = Uᵀ W, not W).

    python examples/kga_memory.py                      # full size: a 1.05M-parameter MLP, 30 epochs (make kga-memory)
    python examples/kga_memory.py --quick              # CI size

Each variant trains the same MLP (Adam lr 1e-3, 4 steps of 256 random samples per epoch; the data do not matter
for memory) in a fresh process and reports: the bytes KGA holds after every epoch (``KGAOptimizer.memory_bytes()``: the
snapshot buffer and its Gram matrix, the basis U, W̃, the step buffer), the process's peak resident memory
(ru_maxrss), and the wall time of KGA's refits. Variants: the base optimizer alone, KGA with the paper's growing
window (history=None: W holds every epoch), KGA with history 10, Efficient-KGA (history=None: W̃ grows, r×t).
No GPU was available for these runs: the figures are CPU memory.

Writes <out>/kga_memory.json and kga_memory.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from kga_common import add_common_arguments, markdown_table, save_figure, save_json

VARIANTS = {
    "Adam alone": None,
    "KGA, history=None (all epochs)": dict(history=None),
    "KGA, history=10": dict(history=10),
    "Efficient-KGA, history=None": dict(history=None, efficient=True),
}


def measure(width: int, epochs: int, options: dict | None) -> dict:
    """One variant, in this process (call it in a fresh one for a clean peak RSS)."""
    import resource
    import time

    import torch

    from cmdtool.training import KGAOptimizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.ReLU(), torch.nn.Linear(2 * width, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    kga = KGAOptimizer(opt, model.named_parameters(), alpha=1.0, warmup=5, **options) if options is not None else None
    g = torch.Generator().manual_seed(0)
    held, fit_seconds = [], []
    started = time.perf_counter()
    for _ in range(epochs):
        for _ in range(4):
            x = torch.randn(256, width, generator=g)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), x[:, :1]).backward()
            (kga.step if kga is not None else opt.step)()
        if kga is not None:
            record = kga.epoch_end()
            held.append(kga.memory_bytes())
            fit_seconds.append(record["fit_seconds"])
    n_params = sum(p.numel() for p in model.parameters())
    return {"n_params": n_params, "held": held, "fit_seconds": fit_seconds,
            "seconds": time.perf_counter() - started,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "fits": [] if kga is None else [{k: f[k] for k in ("epoch", "rank", "accelerating")} for f in kga.fits_]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "build/kga")
    args = parser.parse_args(argv)
    width, epochs = (64, 8) if args.quick else (724, 30)      # 724 -> 1,051,249 parameters
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, *sys.path])}
    results = {}
    for label, options in VARIANTS.items():
        if args.quick:                # in this process: the byte counts only (a peak RSS needs a fresh process)
            results[label] = dict(measure(width, epochs, options), peak_rss_bytes=None)
            continue
        code = ("import json, sys; from kga_memory import measure; "
                f"print(json.dumps(measure({width}, {epochs}, {options!r})))")
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {label}: peak RSS {results[label]['peak_rss_bytes'] / 2**20:.0f} MiB")
    n_params = results["Adam alone"]["n_params"]
    base_rss = results["Adam alone"]["peak_rss_bytes"]

    def rss(r):
        return "-" if r["peak_rss_bytes"] is None else f"{r['peak_rss_bytes'] / 2**20:.0f}"

    rows = []
    for label, r in results.items():
        if not r["held"]:
            rows.append([label, "-", "-", "-", rss(r), "-", "-"])
            continue
        last = r["held"][-1]
        fits = r["fit_seconds"][5:]
        rows.append([label, f"{last['total'] / 2**20:.2f}", f"{last['snapshots'] / 2**20:.2f}",
                     f"{(last['basis'] + last['reduced_trajectories']) / 2**20:.2f}", rss(r),
                     "-" if base_rss is None else f"{(r['peak_rss_bytes'] - base_rss) / 2**20:+.0f}",
                     f"{1000 * sum(fits) / max(len(fits), 1):.0f}"])
    weights_mib = 4 * n_params / 2**20
    table = (f"MLP with {n_params:,} parameters ({weights_mib:.2f} MiB of float32 weights), {epochs} epochs\n\n"
             + markdown_table(["variant", "KGA holds at the end (MiB)", "of which W and its Gram (MiB)",
                               "U and W̃ (MiB)", "peak RSS (MiB)", "RSS minus Adam alone (MiB)",
                               "refit wall ms/epoch (shared machine)"], rows))
    print(table)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for label, r in results.items():
        if r["held"]:
            ax.plot(range(1, epochs + 1), [h["total"] / 2**20 for h in r["held"]], "o-", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("bytes KGA holds (MiB)")
    ax.set_title(f"{n_params:,}-parameter MLP: KGA state per epoch (CPU)", fontsize=9)
    ax.legend(fontsize=7)
    figure = save_figure(fig, args, "kga_memory.png")
    payload = {"width": width, "epochs": epochs, "table": table, "results": results}
    save_json(args.out / "kga_memory.json", payload)
    print(f"wrote {args.out / 'kga_memory.json'} and {figure}")
    return payload


if __name__ == "__main__":
    main()
