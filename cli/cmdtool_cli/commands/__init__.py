"""One module per command; each exposes ``register(app)``. A new command is a module plus a line in ``COMMANDS``.

Command modules are imported only when their command runs (or its ``--help`` is shown): ``cmdtool --help`` lists
them from the summaries below, so that it, ``info`` and ``verify`` start without importing numpy, the analyzers
or the other commands' libraries (``bench/startup.py`` measures it). Each summary is the first sentence of the
command's own help, which ``tests/cli/test_details.py`` checks.
"""

from __future__ import annotations

import importlib

import typer
import typer.core
import typer.main

from ..common import OneLineErrors

# command name -> (module of this package that registers it, one-line summary for `cmdtool --help`), in the
# order `cmdtool --help` lists them
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("ingest", "Stream checkpoints into the trajectory store (created if needed; appends new epochs "
                         "only)."),
    "info": ("info", "Summarise a store: parameters, tensors, checkpoints, sizes, NaN/Inf counts and saved "
                     "analyses."),
    "decompose": ("decompose", "Model the trajectories: CMD (default) or any registered method; results are saved "
                               "in the store."),
    "reconstruct": ("reconstruct", "Write the modelled checkpoint of an epoch in the container of that epoch's "
                                   "source checkpoint, so that it loads the way the source loads"),
    "compare": ("compare", "Fit (or reuse saved fits of) several methods on the same trajectories; one table of "
                           "error, size, time."),
    "evaluate": ("evaluate", "Evaluate your metric function on the original checkpoints, EMA and SWA of the "
                             "weights, and the reconstructions of every decomposition in the store (CMD post-hoc "
                             "and online, DMD, PCA, POD, ...); results are saved in the store."),
    "landscape": ("landscape", "Vary the reference weight of one or two CMD modes around its recorded value at an "
                               "epoch, every weight of those modes following a_i * r + b_i, and evaluate your "
                               "metric function on the grid."),
    "report": ("report", "Figures of every analysis in the store (each method's own: CMD correlation matrix, "
                         "modes, reconstructions, modes per layer; DMD eigenvalues by KGA class, KWM masks; PCA; "
                         "POD spectrum; and the per-epoch errors of every model and the metric curves), with an "
                         "index.html and a summary.json."),
    "export": ("report", "Write analysis results (correlation matrix, modes, A/B, references, spectra, PCA, "
                         "errors) as .npy, .csv tables and one HDF5 file, streaming large arrays chunk by chunk."),
    "verify": ("verify", "Check a whole store: decode every chunk (crc32c checksums) and look for missing chunks "
                         "and unreadable results."),
    "rechunk": ("rechunk", "Rewrite the store's chunks for the analyses' read pattern (row blocks over all "
                           "checkpoints), streaming and in bounded memory."),
    "migrate": ("migrate", "Upgrade a store written by an older cmdtool to the current format, in place (values "
                           "unchanged, results kept)."),
}


def load_command(name: str) -> typer.core.TyperCommand:
    """The command ``name``, built by importing its module and registering it on a throw-away app."""
    module_name, _ = COMMANDS[name]
    module = importlib.import_module(f".{module_name}", __name__)
    holder = typer.Typer(add_completion=False)
    module.register(holder)
    return typer.main.get_group(holder).commands[name]


class LazyCommands(OneLineErrors):
    """The top-level group: its commands come from ``COMMANDS`` and are imported on first use."""

    _listing = False  # True while the group's own help is formatted: the summaries suffice, nothing is imported

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS) + [name for name in super().list_commands(ctx) if name not in COMMANDS]

    def get_command(self, ctx, name: str):
        if name not in COMMANDS:
            return super().get_command(ctx, name)
        if self._listing:
            summary = COMMANDS[name][1]
            return typer.core.TyperCommand(name, help=summary, short_help=summary)
        if name not in self.commands:
            self.commands[name] = load_command(name)
        return self.commands[name]

    def format_help(self, ctx, formatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False
