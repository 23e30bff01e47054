"""`cmdtool compare`: several models of the same trajectories side by side (the work is in the library)."""

from __future__ import annotations

import math

import typer
from rich.table import Table

from cmdtool.analyzers.compare import compare as run_comparison, plot_epoch_errors
from cmdtool.store import open_store

from ..common import (DeviceOption, EpochsOption, JsonOption, QuietOption, StoreOption, console, handle_errors,
                      print_json, progress_for)


def register(app: typer.Typer) -> None:
    @app.command("compare")
    @handle_errors
    def compare_command(
        methods: list[str] = typer.Argument(..., help="Methods to compare, e.g. `dmd cmd pca`."),
        epochs: str = EpochsOption,
        device: str = DeviceOption,
        rank: str = typer.Option(None, "--rank", help="DMD/KGA rank (integer, 0 = optimal hard threshold, or an "
                                 "energy fraction); default: each method's own."),
        exact: bool = typer.Option(None, "--exact/--projected", help="DMD: exact or projected modes."),
        dims: int = typer.Option(None, "--dims", help="PCA directions (default 40)."),
        modes: int = typer.Option(None, "--modes", "-M", help="CMD modes (default: CMD's own)."),
        samples: int = typer.Option(None, "--samples", "-K", help="CMD sampled weights."),
        seed: int = typer.Option(None, "--seed", help="CMD sampling seed."),
        equal_budget: bool = typer.Option(False, "--equal-budget", help="Size DMD/PCA (rank, dims) to store no "
                                          "more numbers than CMD (or the first method, or --budget)."),
        budget: int = typer.Option(None, "--budget", help="Stored-number budget for --equal-budget instead of "
                                   "the reference method's size."),
        refit: bool = typer.Option(False, "--refit", help="Fit again even where a saved result with the same "
                                   "configuration exists."),
        name: str = typer.Option("compare", "--name", help="Prefix of the names under which new fits are saved "
                                 "(followed by a digest of the configuration)."),
        plot: str = typer.Option(None, "--plot", help="Write a per-epoch error plot to this file (png, pdf, svg)."),
        store: str = StoreOption,
        quiet: bool = QuietOption,
        as_json: bool = JsonOption,
    ):
        """Fit (or reuse saved fits of) several methods on the same trajectories; one table of error, size, time.

        Examples: `cmdtool compare dmd cmd pca`, `cmdtool compare cmd dmd pca --equal-budget --plot err.png`,
        `cmdtool compare dmd pca --epochs 1:80 --rank 10 --dims 10 --json`.
        """
        options = dict(epochs=epochs, device=device, rank=rank, exact=exact, dims=dims, modes=modes,
                       samples=samples, seed=seed)
        st = open_store(store, mode="r+")
        result = run_comparison(st, methods, options, name=name, reuse=not refit,
                                equal_budget=equal_budget or budget is not None, budget=budget,
                                progress=progress_for(quiet or as_json))
        if plot:
            plot_epoch_errors(result, plot)
        if as_json:
            print_json(result.to_dict())
            return
        render(result)
        if plot and not quiet:
            console.print(f"per-epoch error plot written to {plot}", highlight=False)


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def render(result) -> None:
    """One row per method; column names kept short so the table fits an 80-column terminal."""
    title = (f"N = {result.n_rows:,} weights x T = {result.n_cols} checkpoints "
             f"(epochs {result.labels[0]}..{result.labels[-1]}, raw {result.raw_floats:,} floats)")
    if result.budget is not None:
        title += f"; budget {result.budget:,} floats"
    table = Table(title=title, show_edge=False, pad_edge=False)
    for column in ("method", "error", "motion", "final", "worst@epoch", "floats", "ratio", "time s"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    notes = []
    for row in result.methods:
        setting = " ".join(f"{k}={v}" for k, v in row.size.items())
        label = f"{row.method} {setting}".strip()
        if row.reused:
            notes.append(f"{row.method}: reused saved result '{row.name}' (time of that fit)")
        if row.budget_matched:
            notes.append(f"{row.method}: sized to the budget ({setting})")
        table.add_row(label, _fmt(row.relative_error, ".4f"), _fmt(row.relative_error_motion, ".4f"),
                      _fmt(row.final_epoch_error, ".4f"),
                      f"{_fmt(row.worst_epoch_error, '.4f')}@{row.worst_epoch}", f"{row.stored_floats:,}",
                      f"{row.compression_ratio:.1f}x", _fmt(row.fit_seconds, ".2f"))
    console.print(table)
    console.print("error = ‖W−Ŵ‖/‖W‖, motion = ‖W−Ŵ‖/‖W − mean_t W‖, final/worst = ‖w_t−ŵ_t‖/‖w_t‖; "
                  "ratio = raw floats / stored floats", highlight=False, style="dim")
    for note in notes:
        console.print(note, highlight=False, style="dim")
