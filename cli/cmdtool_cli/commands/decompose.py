"""`cmdtool decompose`: fit one or more analyzers and save their results in the store."""

from __future__ import annotations

import typer
from rich.table import Table

from cmdtool.analyzers import available_methods, get_analyzer
from cmdtool.store import open_store

from ..common import (DeviceOption, EpochsOption, JsonOption, QuietOption, StoreOption, console, handle_errors,
                      print_json, progress_for)

CMD_PANEL, DMD_PANEL, PCA_PANEL = "CMD options", "DMD / KGA options", "PCA options"


def register(app: typer.Typer) -> None:
    @app.command("decompose")
    @handle_errors
    def decompose(
        method: list[str] = typer.Option(["cmd"], "--method", "-m",
                                         help="Method(s) to fit: cmd, dmd, kga, pca (repeat to run several; "
                                              "DMD, KGA and PCA share one Gram pass)."),
        name: str = typer.Option("default", "--name", help="Name of the saved result (an existing one of the "
                                 "same method and name is replaced)."),
        epochs: str = EpochsOption,
        device: str = DeviceOption,
        # --- CMD
        modes: int = typer.Option(10, "--modes", "-M", help="Number of CMD modes (clusters).",
                                  rich_help_panel=CMD_PANEL),
        threshold: float = typer.Option(None, "--threshold", help="Cut the clustering at this distance instead "
                                        "of a number of modes.", rich_help_panel=CMD_PANEL),
        samples: int = typer.Option(1000, "--samples", "-K", help="Sampled weights K used for clustering.",
                                    rich_help_panel=CMD_PANEL),
        sampling: str = typer.Option("balanced", "--sampling", help="balanced (half per layer, half uniform; "
                                     "paper App. C.2) or uniform.", rich_help_panel=CMD_PANEL),
        seed: int = typer.Option(0, "--seed", help="Random seed of the sample.", rich_help_panel=CMD_PANEL),
        warmup: int = typer.Option(None, "--warmup", "-F", help="Also fit online CMD with this many warm-up "
                                   "checkpoints (paper Sec. 3.3).", rich_help_panel=CMD_PANEL),
        bn_stats: str = typer.Option("source", "--bn-stats", help="BatchNorm running statistics: 'source' keeps "
                                     "them from the checkpoint at reconstruction, 'model' models them like "
                                     "weights.", rich_help_panel=CMD_PANEL),
        # --- DMD / KGA
        rank: str = typer.Option("0", "--rank", help="DMD rank: an integer, 0 for the Gavish-Donoho optimal "
                                 "hard threshold, or an energy fraction in (0,1).", rich_help_panel=DMD_PANEL),
        exact: bool = typer.Option(False, "--exact/--projected", help="Exact DMD modes (from Y) or projected "
                                   "ones (from X).", rich_help_panel=DMD_PANEL),
        save_modes: bool = typer.Option(False, "--save-modes", help="Materialise the DMD modes (N x r; one more "
                                        "pass).", rich_help_panel=DMD_PANEL),
        eps: float = typer.Option(0.01, "--eps", help="KGA: |λ| within 1±eps is neutral; KWM mask threshold.",
                                  rich_help_panel=DMD_PANEL),
        window: int = typer.Option(5, "--window", help="KGA/KWM: the last s epochs a weight must stay small "
                                   "to be masked.", rich_help_panel=DMD_PANEL),
        mask_threshold: float = typer.Option(None, "--mask-threshold", help="KWM: ε of Eq. 15 in weight units "
                                             "(default: --eps).", rich_help_panel=DMD_PANEL),
        # --- PCA
        dims: int = typer.Option(40, "--dims", help="PCA directions kept (P-BFGS uses 40).",
                                 rich_help_panel=PCA_PANEL),
        store: str = StoreOption,
        quiet: bool = QuietOption,
        as_json: bool = JsonOption,
    ):
        """Model the trajectories: CMD (default), DMD, KGA mode classes or PCA; results are saved in the store.

        Examples: `cmdtool decompose --modes 10`, `cmdtool decompose --modes 10 --warmup 20`,
        `cmdtool decompose -m dmd -m kga -m pca --epochs 1:80`.
        """
        options = dict(modes=modes, threshold=threshold, samples=samples, sampling=sampling, seed=seed,
                       warmup=warmup, bn_stats=bn_stats, rank=rank, exact=exact, save_modes=save_modes, eps=eps,
                       window=window, mask_threshold=mask_threshold, dims=dims, epochs=epochs, device=device)
        methods = list(dict.fromkeys(m.lower() for m in method))
        classes = [get_analyzer(m) for m in methods]  # unknown methods fail before any work
        st = open_store(store, mode="r+")
        progress = progress_for(quiet or as_json)
        summaries = []
        for cls in classes:
            analyzer = cls.from_options(options)
            analyzer.fit(st, progress=progress)
            analyzer.save(name)
            summary = {"name": name, **analyzer.summary()}
            summaries.append(summary)
            if not as_json and not quiet:
                render = getattr(analyzer, "render_summary", None)
                if render is not None:
                    render(console)
                else:
                    _render_generic(summary)
        if as_json:
            print_json(summaries if len(summaries) > 1 else summaries[0])

    _ = available_methods


def _render_generic(summary: dict) -> None:
    table = Table(title=f"{summary['method']} / {summary['name']}", show_edge=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if key in ("method", "name") or isinstance(value, (list, dict)):
            continue
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
