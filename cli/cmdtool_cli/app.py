"""Entry point of the `cmdtool` console script."""

from __future__ import annotations

import typer

from .commands import LazyCommands
from .common import state

app = typer.Typer(
    name="cmdtool",
    cls=LazyCommands,  # commands are imported when used: fast start-up (commands/__init__.py)
    help="Analyse neural-network training dynamics from saved checkpoints.\n\n"
         "Typical run: `cmdtool ingest ckpts/` (checkpoints -> ./cmdtool.zarr), then `cmdtool decompose --modes 10`, "
         "`cmdtool reconstruct --epoch 150`, `cmdtool compare dmd cmd`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _global(debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors.")):
    state["debug"] = debug


def main() -> None:
    app()
