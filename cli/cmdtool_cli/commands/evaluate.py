"""`cmdtool evaluate`: a user's metric function on original, EMA/SWA-averaged and modelled checkpoints."""

from __future__ import annotations

import typer
from rich.table import Table

from cmdtool.workflows.evaluate import Evaluation, all_methods, evaluate as run_evaluation

from ..common import EpochsOption, JsonOption, QuietOption, StoreOption, console, handle_errors, print_json, \
    print_table, progress_for, with_scheduler

FnOption = typer.Option(..., "--fn", help="Metric function: package.module:function (looked for from the working "
                        "directory too, as python -m does) or path/to/file.py:function. "
                        "It takes a state dict (or, with --model-factory, a model) and returns a dict of "
                        "floats, e.g. {'test_acc': 0.93, 'test_loss': 0.21}.")
ModelFactoryOption = typer.Option(None, "--model-factory", help="Optional module:function returning an "
                                  "nn.Module: cmdtool loads each state dict into it (strict, eval mode) and "
                                  "calls --fn with the model instead.")
StripPrefixOption = typer.Option(None, "--strip-prefix", help="Remove this prefix from the tensor names before "
                                 "--fn or --model-factory's model sees them (repeatable): '_orig_mod.' "
                                 "(torch.compile), 'module.' (DataParallel/DDP).")
SortMetricOption = typer.Option(None, "--sort-metric", help="Metric that picks the best point (default: the "
                                "first one the function returns).")
SortModeOption = typer.Option("auto", "--sort-mode", help="auto (losses/errors are minimised, anything else "
                              "maximised), max or min.")


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    @handle_errors
    @with_scheduler
    def evaluate(
        fn: str = FnOption,
        model_factory: str = ModelFactoryOption,
        methods: list[str] = typer.Option(None, "--methods", "-m", help="Methods to evaluate (repeat or comma-"
                                          f"separate): {', '.join(all_methods())}. Default: original, ema, swa "
                                          "and the models of every decomposition in the store (kga, whose model "
                                          "is DMD's, only when named)."),
        epochs: str = EpochsOption,
        every: int = typer.Option(1, "--every", help="Evaluate every K-th epoch of the window (the last one "
                                  "always)."),
        ema_beta: float = typer.Option(0.9, "--ema-beta", help="EMA of the weights: ema_t = β ema_(t-1) + "
                                       "(1-β) w_t."),
        swa_fraction: float = typer.Option(0.25, "--swa-fraction", help="SWA: mean of the last fraction of the "
                                           "window's checkpoints (evaluated where that many are available)."),
        decomposition: str = typer.Option("default", "--decomposition", help="Name of the saved decomposition "
                                          "results to reconstruct from."),
        name: str = typer.Option("default", "--name", help="Name of the saved evaluation (replaced if it "
                                 "exists)."),
        strip_prefix: list[str] = StripPrefixOption,
        sort_metric: str = SortMetricOption,
        sort_mode: str = SortModeOption,
        store: str = StoreOption,
        quiet: bool = QuietOption,
        as_json: bool = JsonOption,
    ):
        """Evaluate your metric function on the original checkpoints, EMA and SWA of the weights, and the
        reconstructions of every decomposition in the store (CMD post-hoc and online, DMD, PCA, POD, ...);
        results are saved in the store.

        Examples: `cmdtool evaluate --fn cmdtool.datasets:evaluate`,
        `cmdtool evaluate --fn eval.py:metrics -m original,cmd,ema --every 5 --ema-beta 0.95`.
        """
        from cmdtool.store import open_store

        from cmdtool.utils.imports import working_directory_importable

        st = open_store(store, mode="r+")
        with working_directory_importable():  # for the run: the function may import its neighbours when called
            run = run_evaluation(st, fn, model_factory=model_factory, methods=methods, epochs=epochs,
                                 every=every, ema_beta=ema_beta, swa_fraction=swa_fraction,
                                 decomposition=decomposition, name=name, progress=progress_for(quiet or as_json),
                                 strip_prefix=tuple(strip_prefix or ()))
        rows = run.summary(sort_metric, sort_mode)
        if as_json:
            print_json({"name": name, "config": run.config, "summary": rows, "timings": run.timings})
            return
        render_summary(run, rows)


def render_summary(run: Evaluation, rows: list[dict]) -> None:
    if not rows:
        console.print("nothing was evaluated")
        return
    metric_names = list(rows[0]["final"])
    sort_metric = rows[0]["sort_metric"]
    table = Table(title=f"evaluation / {run.name}: final epoch and best epoch by {sort_metric}", show_edge=False)
    table.add_column("method")
    table.add_column("final epoch", justify="right")
    for metric in metric_names:
        table.add_column(metric, justify="right")
    table.add_column("best epoch", justify="right")
    table.add_column(f"best {sort_metric}", justify="right")
    for row in rows:
        table.add_row(row["method"], str(row["final_epoch"]),
                      *[_fmt(row["final"].get(m)) for m in metric_names],
                      str(row["best_epoch"]) if row["best_epoch"] is not None else "-", _fmt(row["best"]))
    print_table(table)
    total = run.timings.get("total_seconds")
    if total is not None:
        console.print(f"{len(run.records)} evaluations in {total:.1f} s, saved as evaluation/{run.name}",
                      highlight=False)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
