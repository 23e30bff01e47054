"""Paper 003 Fig. 7 / Table 1, scaled down: KGA, Efficient-KGA and masked KGA (KWM, norm, delta) against Adam and
SGD and against doubling their learning rate, on the digits CNN.

    python examples/kga_digits.py                      # full size: 30 epochs, seeds 0-2 (make kga-digits)
    python examples/kga_digits.py --quick              # CI size

Task: scikit-learn's 8x8 digits, the repo's CNN (3,866 trainable parameters, BatchNorm;
cmdtool.datasets), batch 64, cross-entropy. Base optimizers: Adam lr 1e-3 and plain SGD lr 0.05. KGA:
alpha 1 (the default), eps 0.01, DMD rank by Gavish-Donoho, the paper's growing history (every epoch's snapshot,
history=None), acceleration after the 5th epoch (Sec. 4.2), window s = 5 (App. A.5). "KGA, window of 10" is the
windowed option (the last 10 snapshots) beside it.

Mask thresholds τ are set by a rule, not by hand: the lower quartile of each mask's statistic on the base
optimizer's own run (seed 0, epochs 1-10, i.e. the window the first refits see), rounded to one significant digit:
KWM the largest |non-neutral reconstruction| over the last s epochs (Eq. 15), norm |w| at epoch 10, delta the
largest |w(i) − w(i−1)| over the last s epochs. The quartiles are printed and saved.

Reports, per base optimizer: training loss (mean minibatch loss of the last epoch), its difference to the base
optimizer, test accuracy, masked ratio at the end, extra wall time per epoch over the base optimizer and KGA's own
refit time per epoch (epochs 6-30, where KGA runs; CPU time from time.process_time, the smallest over the seeds,
the methods running interleaved so that other load on a shared machine falls on all of them), and the bytes KGA
holds at the end. Figures kga_digits_<opt>.png as
Fig. 7: loss, loss relative to the base optimizer, masked ratio and KGA's refit time per epoch.
"""

from __future__ import annotations

import argparse

import numpy as np

from cmdtool.analyzers.dmd import dmd_from_gram
from cmdtool.analyzers.eigenvalues import classify_eigenvalues
from cmdtool.analyzers.kga import kwm_score_matrix
from kga_common import Method, add_common_arguments, digits_task, fmt, markdown_table, mean_sd, min_cpu_seconds, \
    run_all, save_figure, save_json, train

BASES = {"Adam": ("adam", 1e-3), "SGD": ("sgd", 0.05)}
KGA_OPTIONS = dict(alpha=1.0, eps=0.01, history=None, warmup=5, window=5)
PROBE_EPOCHS = 10  # the threshold probe's base-optimizer epochs


def threshold_probe(snapshots: list, options: dict) -> dict:
    """Lower quartiles of the three mask statistics on the first ``PROBE_EPOCHS`` epoch snapshots of a base run."""
    W = np.stack(snapshots[:PROBE_EPOCHS], axis=1)
    s = options["window"]
    fit = dmd_from_gram(W.T @ W, W.shape[0], 0)
    classes = classify_eigenvalues(fit.eigenvalues, options["eps"])
    scores = np.abs(W @ kwm_score_matrix(fit.mode_coefficients, fit.amplitudes, fit.eigenvalues, classes,
                                         W.shape[1], s)).max(axis=1)
    statistics = {"kwm": scores, "norm": np.abs(W[:, -1]),
                  "delta": np.abs(np.diff(W[:, -(s + 1):], axis=1)).max(axis=1)}
    quartiles = {k: float(np.quantile(v, 0.25)) for k, v in statistics.items()}
    return {"lower_quartiles": quartiles, "thresholds": {k: float(f"{v:.1g}") for k, v in quartiles.items()},
            "eigenvalue_moduli": [float(abs(v)) for v in fit.eigenvalues]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "build/kga")
    args = parser.parse_args(argv)
    epochs, seeds = (6, [0]) if args.quick else (30, [0, 1, 2])
    options = dict(KGA_OPTIONS, warmup=2, window=2) if args.quick else dict(KGA_OPTIONS)
    task = digits_task(320 if args.quick else None)
    results, tables = {}, []
    for base_name, (optimizer, lr) in BASES.items():
        probe_run = train(task, Method(base_name, optimizer, lr, snapshots=True), min(epochs, PROBE_EPOCHS), 0)
        probe = threshold_probe(probe_run.snapshots, options)
        tau = probe["thresholds"]
        print(f"{base_name} lr {lr:g}: mask statistics' lower quartiles {probe['lower_quartiles']} -> τ {tau}")
        methods = [Method(base_name, optimizer, lr),
                   Method(f"{base_name}, 2× lr", optimizer, 2 * lr),
                   Method("KGA", optimizer, lr, dict(options)),
                   Method("KGA, window of 10 (option)", optimizer, lr, dict(options, history=10)),
                   Method("Efficient-KGA", optimizer, lr, dict(options, efficient=True)),
                   Method(f"KWM-KGA (τ {tau['kwm']:g})", optimizer, lr,
                          dict(options, mask="kwm", mask_threshold=tau["kwm"])),
                   Method(f"norm-masked KGA (τ {tau['norm']:g})", optimizer, lr,
                          dict(options, mask="norm", mask_threshold=tau["norm"])),
                   Method(f"delta-masked KGA (τ {tau['delta']:g})", optimizer, lr,
                          dict(options, mask="delta", mask_threshold=tau["delta"]))]
        print(f"{base_name}: {epochs} epochs, seeds {seeds}")
        runs = run_all(task, methods, epochs, seeds)
        base_loss = np.array([r.train_loss[-1] for r in runs[base_name]])
        base_acc = np.array([r.test_acc[-1] for r in runs[base_name]])
        active = slice(options["warmup"], None)                 # epochs where KGA runs
        n_active = epochs - options["warmup"]
        base_cpu = min_cpu_seconds(runs[base_name], active)
        rows = []
        for label, group in runs.items():
            loss = np.array([r.train_loss[-1] for r in group])
            acc = np.array([r.test_acc[-1] for r in group])
            fit = np.array([r.fit_seconds for r in group])[:, active].mean()
            rows.append([label, fmt(*mean_sd(loss)), fmt(*mean_sd(loss - base_loss), digits=3),
                         f"{int((loss < base_loss).sum())}/{len(loss)}", fmt(*mean_sd(100 * acc), digits=4),
                         fmt(*mean_sd(100 * (acc - base_acc)), digits=2),
                         f"{100 * np.mean([r.masked_fraction[-1] for r in group]):.1f}%",
                         f"{min_cpu_seconds(group):.2f}",
                         f"{1000 * (min_cpu_seconds(group, active) - base_cpu) / n_active:+.1f}",
                         f"{1000 * fit:.1f}", f"{group[0].memory_bytes.get('total', 0) / 1024:.0f}"])
        table = (f"{base_name} (lr {lr:g}), {epochs} epochs, {len(seeds)} seeds\n\n"
                 + markdown_table(["method", "final training loss", "minus base", "seeds below base",
                                   "test acc (%)", "acc minus base (pts)", "masked at end",
                                   "CPU s, all epochs", "extra CPU ms/epoch", "KGA refit ms/epoch (wall)",
                                   "KGA holds (KiB)"], rows))
        print(table)
        tables.append(table)
        kwm = next(g for label, g in runs.items() if label.startswith("KWM"))[0]
        per_tensor = markdown_table(["tensor", "masked at end (KWM, seed 0)"],
                                    [[name, f"{100 * v:.1f}%"] for name, v in kwm.masked_per_tensor[-1].items()])
        print(per_tensor)
        results[base_name] = {"lr": lr, "probe": probe, "runs": runs, "per_tensor": per_tensor}
        _figure(args, base_name, runs, epochs)

    payload = {"epochs": epochs, "seeds": seeds, "kga_options": options, "tables": tables, "results": results}
    save_json(args.out / "kga_digits.json", payload)
    print(f"wrote {args.out / 'kga_digits.json'} and the figures")
    return payload


def _figure(args, base_name: str, runs: dict, epochs: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(1, epochs + 1)
    base_loss = np.array([r.train_loss for r in runs[base_name]]).mean(axis=0)
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    for label, group in runs.items():
        loss = np.array([r.train_loss for r in group]).mean(axis=0)
        masked = np.array([r.masked_fraction for r in group]).mean(axis=0)
        refit = np.array([r.fit_seconds for r in group]).mean(axis=0)
        axes[0, 0].semilogy(x, loss, label=label, lw=1.4)
        axes[0, 1].plot(x, loss / base_loss, lw=1.4)
        axes[1, 0].plot(x, 100 * masked, lw=1.4)
        axes[1, 1].plot(x, 1000 * refit, lw=1.2)
    axes[0, 0].set_ylabel("training loss")
    axes[0, 1].set_ylabel(f"loss / {base_name}'s")
    axes[0, 1].axhline(1, color="grey", lw=0.8)
    axes[1, 0].set_ylabel("masked ratio (%)")
    axes[1, 1].set_ylabel("KGA refit (snapshot, DMD, mask) ms")
    for ax in axes.flat:
        ax.set_xlabel("epoch")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"digits CNN, {base_name} base (mean of {len(runs[base_name])} seeds; "
                 "refit times are wall times measured while the machine was shared)", fontsize=9)
    save_figure(fig, args, f"kga_digits_{base_name.lower()}.png")


if __name__ == "__main__":
    main()
