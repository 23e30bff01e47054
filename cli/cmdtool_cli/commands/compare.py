"""`cmdtool compare`: several models of the same trajectories side by side (the work is in the library).

The method options are generated from the analyzer registry with no defaults of their own (each method uses its
own unless the user types one), so that explicit sizes can win over the equal budget.
"""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from cmdtool.errors import UsageError

from ..analyzer_options import with_analyzer_options
from ..common import (JsonOption, QuietOption, StoreOption, console, handle_errors, print_json, print_table,
                      progress_for, with_scheduler)

PLOT_FORMATS = ("png", "pdf", "svg")


def register(app: typer.Typer) -> None:
    def compare_command(
        methods: list[str] = typer.Argument(..., help="Methods to compare, e.g. `dmd cmd pca`."),
        equal_budget: bool = typer.Option(True, "--equal-budget/--own-sizes", help="Size every method that can "
                                          "trade size for accuracy (DMD/KGA/POD rank, PCA dims) to store no more "
                                          "numbers than the reference (CMD when compared, else the first method, or "
                                          "--budget); a size you give explicitly is kept. --own-sizes: each method "
                                          "as you saved it (decompose), else at its own default size."),
        budget: int = typer.Option(None, "--budget", help="Stored-number budget instead of the reference method's "
                                   "size."),
        refit: bool = typer.Option(False, "--refit", help="Fit every method again. Without it a method given "
                                   "none of its options is compared as saved (decompose's 'default' fit, e.g. "
                                   "the --modes 5 you chose), and otherwise a saved fit of the same "
                                   "configuration is reused."),
        name: str = typer.Option("compare", "--name", help="Prefix of the names under which new fits are saved "
                                 "(followed by a digest of the configuration)."),
        plot: str = typer.Option(None, "--plot", help="Write a per-epoch error plot to this file (png, pdf, svg); "
                                 "an existing file cmdtool did not write needs --force."),
        force: bool = typer.Option(False, "--force", help="Replace an existing --plot file."),
        store: str = StoreOption,
        quiet: bool = QuietOption,
        as_json: bool = JsonOption,
        **options,
    ):
        """Fit (or reuse saved fits of) several methods on the same trajectories; one table of error, size, time.
        By default every method is sized to the same budget of stored numbers (fair: see --equal-budget).

        Examples: `cmdtool compare dmd cmd pca`, `cmdtool compare cmd dmd pca pod --plot err.png`,
        `cmdtool compare dmd pca --epochs 1:80 --rank 10 --dims 10 --json`.
        """
        from cmdtool.workflows.compare import compare as run_comparison
        from cmdtool.store import open_store

        st = open_store(store, mode="r+")
        if plot:  # refused before the work: never a source checkpoint or a file cmdtool did not write
            from cmdtool.utils.output_folder import check_output_file

            check_output_file(plot, st, force=force, option="--plot")
            _plot_format(plot)
        result = run_comparison(st, methods, options, name=name, reuse=not refit, equal_budget=equal_budget,
                                budget=budget, progress=progress_for(quiet or as_json))
        if plot:
            from cmdtool.report.figures import comparison_figure

            from cmdtool.utils.output_folder import write_atomically

            figure = comparison_figure(result)
            write_atomically(plot, lambda temporary: figure.savefig(temporary, dpi=120, format=_plot_format(plot)))
        if as_json:
            print_json(result.to_dict())
            return
        render(result)
        if plot and not quiet:
            console.print(f"per-epoch error plot written to {plot}", highlight=False)

    app.command("compare")(handle_errors(with_scheduler(with_analyzer_options(compare_command, own_defaults=True))))


def _plot_format(path: str) -> str:
    """matplotlib's format from the file's suffix (the temporary file the plot is written to has none)."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise UsageError(f"--plot {path}: give a file ending in {', '.join('.' + f for f in PLOT_FORMATS)}")
    return suffix


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def budget_text(result) -> str:
    """Which budget the table's sizes follow (its header says it)."""
    if result.budget_source is None:
        return "each method at its own size (--own-sizes)"
    if result.budget_source == "given":
        return f"equal budget {result.budget:,} floats (--budget)"
    return f"equal budget {result.budget:,} floats (the size of {result.budget_source})"


def render(result) -> None:
    """One row per method; column names kept short so the table fits an 80-column terminal."""
    title = (f"N = {result.n_rows:,} weights x T = {result.n_cols} checkpoints "
             f"(epochs {result.labels[0]}..{result.labels[-1]}, raw {result.raw_floats:,} floats); "
             f"{budget_text(result)}")
    table = Table(title=title, show_edge=False, pad_edge=False)
    for column in ("method", "error", "motion", "final", "worst@epoch", "floats", "ratio", "time s"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    notes = []
    for row in result.methods:
        setting = " ".join(f"{k}={v}" for k, v in row.size.items())
        label = f"{row.method} {setting}".strip()
        notes.append(f"{row.method} {setting}: {row.fit}" + (" (time of that fit)" if row.reused else ""))
        if row.size_given:
            notes.append(f"{row.method}: kept the size given ({setting}), not the budget")
        table.add_row(label, _fmt(row.relative_error, ".4f"), _fmt(row.relative_error_motion, ".4f"),
                      _fmt(row.final_epoch_error, ".4f"),
                      f"{_fmt(row.worst_epoch_error, '.4f')}@{row.worst_epoch}", f"{row.stored_floats:,}",
                      f"{row.compression_ratio:.1f}x", _fmt(row.fit_seconds, ".2f"))
    print_table(table)
    console.print("error = ‖W−Ŵ‖/‖W‖, motion = ‖W−Ŵ‖/‖W − mean_t W‖, final/worst = ‖w_t−ŵ_t‖/‖w_t‖; "
                  "ratio = raw floats / stored floats", highlight=False, style="dim")
    for note in notes:
        console.print(note, highlight=False, style="dim")
