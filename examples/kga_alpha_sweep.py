"""Paper 003 Fig. 9 (effect of the acceleration rate α, swept over 0-20) and Fig. 3 (why a large α overshoots).

    python examples/kga_alpha_sweep.py                 # full size (make kga-alpha)
    python examples/kga_alpha_sweep.py --quick         # CI size

Fig. 9 here: the final training loss of KGA minus that of its base optimizer, per seed (the same seed, i.e. the
same initial weights and data order, for both), median and mean ± sd over seeds, on two tasks:
- digits CNN (3,866 trainable parameters) with Adam lr 1e-3, 20 epochs (the paper's Fig. 9 uses Adam, on CIFAR-10);
- the Fig. 4 MLP (1,185 parameters) with SGD lr 5e-4, 25 epochs (at lr 1e-3, where doubling the learning rate is
  already unstable, see kga_fig4_mlp.py, most α > 3 diverge).
KGA: eps 0.01, Gavish-Donoho rank, the paper's growing history (history=None), first fit after 5 epochs.
α = 0 is the base optimizer exactly.

Fig. 3 here: a stable mode λ = 0.9e^{0.15i} with ŵ = 1, stepped 6 times by its own dynamics (unaccelerated change
(λ − 1)ŵ) through :func:`cmdtool.training.kga_optimizer.accelerate_update`, for α = 0, 1, 2, 5, 10.

Writes <out>/kga_alpha_sweep.json and kga_alpha_sweep.png, kga_fig3_modes.png.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from cmdtool.training.kga_optimizer import acceleration_operator, accelerate_update
from kga_common import Method, add_common_arguments, digits_task, fmt, markdown_table, mean_sd, mlp_task, run_all, \
    save_figure, save_json

ALPHAS = [0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0]
FIG3_LAMBDA = 0.9 * np.exp(0.15j)


def fig3_paths(alphas=(0.0, 1.0, 2.0, 5.0, 10.0), steps: int = 6) -> dict[float, np.ndarray]:
    """ŵ after each accelerated step of the mode λ (the real 2×2 system with eigenvalues λ, λ̄; U = I)."""
    lam = FIG3_LAMBDA
    system = np.array([[lam.real, -lam.imag], [lam.imag, lam.real]])
    eigenvalues, right = np.linalg.eig(system)
    order = np.argsort(-eigenvalues.imag)
    eigenvalues, right = eigenvalues[order], right[:, order]
    left = np.linalg.inv(right)
    paths = {}
    for alpha in alphas:
        op = torch.tensor(acceleration_operator(eigenvalues, right, np.zeros(2, np.int8), alpha))
        x = (right @ np.array([1.0, 1.0])).real                     # ŵ = 1
        modes = [(left @ x)[0]]
        for _ in range(steps):
            delta = (system - np.eye(2)) @ x                        # the unaccelerated change (λ − 1)ŵ
            x = x + accelerate_update(torch.tensor(delta), torch.eye(2, dtype=torch.float64), op).numpy()
            modes.append((left @ x)[0])
        paths[alpha] = np.array(modes)
    return paths


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "build/kga")
    args = parser.parse_args(argv)
    if args.quick:
        alphas, seeds, digits_epochs, mlp_epochs, warmup = [0.0, 2.0, 20.0], [0], 6, 6, 2
    else:
        alphas, seeds, digits_epochs, mlp_epochs, warmup = ALPHAS, [0, 1, 2], 20, 25, 5
    options = dict(eps=0.01, history=None, warmup=warmup)
    setups = {"digits CNN, Adam lr 1e-3": (digits_task(320 if args.quick else None), "adam", 1e-3, digits_epochs),
              "MLP z = x² + y², SGD lr 5e-4": (mlp_task(), "sgd", 5e-4, mlp_epochs)}
    results, tables = {}, []
    for title, (task, optimizer, lr, epochs) in setups.items():
        print(f"{title}: {epochs} epochs, seeds {seeds}")
        methods = [Method("base", optimizer, lr)] + [Method(f"alpha={a:g}", optimizer, lr, dict(options, alpha=a))
                                                      for a in alphas]
        runs = run_all(task, methods, epochs, seeds)
        base = np.array([r.train_loss[-1] for r in runs["base"]])
        rows, points = [], []
        for alpha in alphas:
            group = runs[f"alpha={alpha:g}"]
            final = np.array([r.train_loss[-1] for r in group])
            diff = final - base
            finite = np.isfinite(diff)
            median = float(np.median(np.where(finite, diff, np.inf)))     # a diverged run counts as +inf
            row = [f"{alpha:g}", f"{median:.3g}", fmt(*mean_sd(diff[finite]), digits=3) if finite.any() else "-",
                   f"{int((~finite).sum())}/{len(diff)}", f"{int((diff < 0).sum())}/{len(diff)}"]
            if group[0].test_acc:
                acc = np.array([r.test_acc[-1] for r in group]) - np.array([r.test_acc[-1] for r in runs["base"]])
                row.append(fmt(*mean_sd(100 * acc), digits=2))
            rows.append(row)
            points.append((alpha, median, *(mean_sd(diff[finite]) if finite.any() else (np.nan, np.nan))))
        header = ["α", "final loss minus base, median", "mean ± sd (finite runs)", "diverged", "seeds better"]
        if runs["base"][0].test_acc:
            header.append("test accuracy minus base (pts)")
        table = f"{title}, base final loss {fmt(*mean_sd(base))}\n\n" + markdown_table(header, rows)
        print(table)
        tables.append(table)
        results[title] = {"epochs": epochs, "points": points, "runs": runs}

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(10, 3.4))
    for ax, (title, result) in zip(np.atleast_1d(axes), results.items()):
        a, median, mean, sd = np.array(result["points"], dtype=np.float64).T
        shown = np.isfinite(median)
        ax.plot(a[shown], median[shown], "o-", ms=4, label="median over seeds")
        ax.errorbar(a[shown] + 0.15, mean[shown], yerr=sd[shown], fmt="s", ms=3, capsize=3, alpha=0.6,
                    label="mean ± sd (finite runs)")
        top = np.nanmax(np.abs(np.concatenate([median[shown], mean[shown] + sd[shown]]))) if shown.any() else 1
        if (~shown).any():
            ax.plot(a[~shown], np.full((~shown).sum(), top), "rx", ms=8, label="median run diverged")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("α (acceleration rate, Eq. 12)")
        ax.set_ylabel("final loss − base optimizer's")
        ax.set_title(f"{title}, {result['epochs']} epochs ({len(seeds)} seeds)", fontsize=9)
        ax.legend(fontsize=7)
    sweep_png = save_figure(fig, args, "kga_alpha_sweep.png")

    paths = fig3_paths()
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    circle = np.exp(1j * np.linspace(0, 2 * np.pi, 200))
    ax.plot(circle.real, circle.imag, color="grey", lw=0.8)
    for alpha, path in paths.items():
        ax.plot(path.real, path.imag, "o-", ms=3, lw=1, label=f"α = {alpha:g}  (|ŵ₁| = {abs(path[1]):.3f})")
    ax.set_aspect("equal")
    ax.set_xlim(-2.2, 2.2)
    ax.set_ylim(-2.2, 2.2)
    ax.set_title("Fig. 3: mode λ = 0.9e^{0.15i}, ŵ₀ = 1, 6 steps (unit circle grey)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig3_png = save_figure(fig, args, "kga_fig3_modes.png")
    fig3 = {f"{a:g}": [abs(v) for v in p] for a, p in paths.items()}
    print("Fig. 3 |ŵ| after 1 and 6 steps: " + ", ".join(f"α={a}: {v[1]:.3f}, {v[-1]:.3g}" for a, v in fig3.items()))

    payload = {"alphas": alphas, "seeds": seeds, "kga_options": options, "tables": tables, "fig3_moduli": fig3,
               "results": results}
    save_json(args.out / "kga_alpha_sweep.json", payload)
    print(f"wrote {args.out / 'kga_alpha_sweep.json'}, {sweep_png}, {fig3_png}")
    return payload


if __name__ == "__main__":
    main()
