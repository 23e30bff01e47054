"""`cmdtool decompose`: fit one or more analyzers and save their results in the store.

The options are generated from the analyzer registry (see ``analyzer_options``): a new analyzer's parameters
and method name appear here without an edit.
"""

from __future__ import annotations

import typer

from cmdtool.analyzers import analyzer_classes, get_analyzer

from ..analyzer_options import with_analyzer_options
from ..common import (JsonOption, QuietOption, StoreOption, handle_errors, print_json, progress_for,
                      with_scheduler)
from ..render import print_blocks
from ..summaries import summary_blocks


def register(app: typer.Typer) -> None:
    methods = ", ".join(analyzer_classes())

    def decompose(
        method: list[str] = typer.Option(["cmd"], "--method", "-m",
                                         help=f"Method(s) to fit: {methods} (repeat to run several; the methods "
                                              "fitted from the Gram matrix share one Gram pass)."),
        name: str = typer.Option("default", "--name", help="Name of the saved result (an existing one of the "
                                 "same method and name is replaced)."),
        store: str = StoreOption,
        quiet: bool = QuietOption,
        as_json: bool = JsonOption,
        **options,
    ):
        """Model the trajectories: CMD (default) or any registered method; results are saved in the store.

        Examples: `cmdtool decompose --modes 10`, `cmdtool decompose --modes 10 --warmup 20`,
        `cmdtool decompose -m dmd -m kga -m pca --epochs 1:80`, `cmdtool decompose -m pod --rank 5`.
        """
        from cmdtool.store import open_store

        chosen = list(dict.fromkeys(m.lower() for m in method))
        classes = [get_analyzer(m) for m in chosen]  # unknown methods fail before any work
        analyzers = [cls.from_options(options) for cls in classes]
        for analyzer in analyzers:  # every parameter is checked before any pass
            analyzer.validate_params()
        st = open_store(store, mode="r+")
        progress = progress_for(quiet or as_json)
        summaries = []
        for analyzer in analyzers:
            analyzer.fit(st, progress=progress)
            analyzer.save(name)
            summaries.append({"name": name, **analyzer.summary()})
            if not as_json and not quiet:
                print_blocks(summary_blocks(analyzer))
        if as_json:
            print_json(summaries if len(summaries) > 1 else summaries[0])

    app.command("decompose")(handle_errors(with_scheduler(with_analyzer_options(decompose))))
