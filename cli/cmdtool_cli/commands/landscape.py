"""`cmdtool landscape`: a metric over the values of one or two CMD reference weights (paper 000 App. G)."""

from __future__ import annotations

from pathlib import Path

import typer

from cmdtool.workflows.landscape import landscape as compute_landscape

from ..common import (ForceOutputOption, JsonOption, QuietOption, StoreOption, console, handle_errors, print_json,
                      progress_for)
from .evaluate import FnOption, ModelFactoryOption, SortMetricOption, SortModeOption, StripPrefixOption


def register(app: typer.Typer) -> None:
    @app.command("landscape")
    @handle_errors
    def landscape(
        fn: str = FnOption,
        epoch: int = typer.Option(..., "--epoch", "-e", help="Epoch label whose modelled checkpoint is the "
                                  "centre of the grid."),
        mode: list[int] = typer.Option(..., "--mode", help="CMD mode whose reference weight is varied (once: a "
                                       "curve; twice: a surface)."),
        span: float = typer.Option(0.5, "--span", help="Grid half-width relative to the recorded value: "
                                   "[r - span*|r|, r + span*|r|] (App. G uses 0.5)."),
        points: int = typer.Option(None, "--points", help="Grid points per mode (default 51 for a curve, i.e. "
                                   "increments of r/50 as in App. G, and 21 per axis for a surface)."),
        decomposition: str = typer.Option("default", "--name", help="Name of the CMD result to use."),
        model_factory: str = ModelFactoryOption,
        strip_prefix: list[str] = StripPrefixOption,
        sort_metric: str = SortMetricOption,
        sort_mode: str = SortModeOption,
        out: Path = typer.Option(Path("landscape"), "--out", "-o", help="Folder for the data (npz, json) and "
                                 "the figure (png): a new or empty folder, or one cmdtool wrote."),
        force: bool = ForceOutputOption,
        store: str = StoreOption,
        quiet: bool = QuietOption,
        as_json: bool = JsonOption,
    ):
        """Vary the reference weight of one or two CMD modes around its recorded value at an epoch, every
        weight of those modes following a_i * r + b_i, and evaluate your metric function on the grid.

        Examples: `cmdtool landscape --fn cmdtool.datasets:evaluate --epoch 40 --mode 0`,
        `cmdtool landscape --fn eval.py:metrics -e 40 --mode 0 --mode 1 --points 15`.
        """
        from cmdtool.utils.output_folder import OutputFolder
        from cmdtool.store import open_store

        st = open_store(store, mode="r")
        OutputFolder(out, "landscape", force=force, store=st)  # refuse a folder before the work, not after
        result = compute_landscape(st, fn, epoch, mode, span=span, points=points, decomposition=decomposition,
                                   model_factory=model_factory, sort_metric=sort_metric, sort_mode=sort_mode,
                                   strip_prefix=tuple(strip_prefix or ()),
                                   progress=progress_for(quiet or as_json))
        paths = result.save(out, force=force, store=st)
        if as_json:
            print_json({**result.to_json(), "files": {k: str(v) for k, v in paths.items()}})
            return
        metric = result.sort_metric
        where = ", ".join(f"mode {m} ({n}) = {v:.6g} (recorded {r:.6g})" for m, n, v, r in
                          zip(result.modes, result.reference_weights, result.best_values, result.recorded))
        console.print(f"epoch {result.epoch}: {metric} original checkpoint {result.original_metrics[metric]:.4f}, "
                      f"CMD-modelled {result.recorded_metrics[metric]:.4f}, best on the grid "
                      f"{result.best_metrics[metric]:.4f} at {where}", highlight=False)
        if not quiet:
            console.print(f"data: {paths['npz']}, {paths['json']}; figure: {paths['png']}", highlight=False)
