"""`cmdtool ingest PATH...`"""

from __future__ import annotations

from pathlib import Path

import typer

from cmdtool.store.format import INGEST_MEMORY_BUDGET as DEFAULT_MEMORY_BUDGET
from cmdtool.units import format_bytes

from ..common import JsonOption, QuietOption, StoreOption, console, handle_errors, print_json, progress_for


def register(app: typer.Typer) -> None:
    @app.command("ingest")
    @handle_errors
    def ingest(
        paths: list[Path] = typer.Argument(..., help="Checkpoint files and/or folders of checkpoints.",
                                           show_default=False),
        store: str = StoreOption,
        label_pattern: str = typer.Option(
            None, "--label-pattern",
            help="Regular expression whose first group is the epoch label, e.g. 'ep(\\d+)'. Default: the number "
                 "after 'epoch', else after 'step', else the last number in the name."),
        include: list[str] = typer.Option([], "--include", help="Only tensors whose name matches this glob "
                                          "(repeatable), e.g. 'encoder.*'."),
        exclude: list[str] = typer.Option([], "--exclude", help="Leave out tensors matching this glob "
                                          "(repeatable). They are copied from the source at reconstruction."),
        buffers: bool = typer.Option(True, "--buffers/--no-buffers",
                                     help="Store BatchNorm running statistics as trajectories too."),
        memory_budget: str = typer.Option(DEFAULT_MEMORY_BUDGET, "--memory-budget",
                                          help="Memory for buffering checkpoints before a write, e.g. 512MiB, 4G."),
        force: bool = typer.Option(False, "--force", help="Replace epochs whose file content changed since "
                                   "they were ingested (otherwise an error)."),
        quiet: bool = QuietOption,
        as_json: bool = JsonOption,
    ):
        """Stream checkpoints into the trajectory store (created if needed; appends new epochs only).

        Reads .pt/.pth/.bin/.ckpt files (weights only: no pickled code is ever run), .safetensors files, and sharded folders (shards plus an *.index.json count as one checkpoint). Safe to interrupt: run it again to resume.

        Example: cmdtool ingest ckpts/ --store run.zarr
        """  # noqa: E501 (one line per paragraph: rich re-wraps help text to the terminal)
        from cmdtool.ingest import ingest as run_ingest  # torch: imported only when a command needs it

        report = run_ingest(paths, store, label_pattern=label_pattern, include=tuple(include),
                            exclude=tuple(exclude), buffers=buffers, memory_budget=memory_budget, force=force,
                            progress=progress_for(quiet or as_json))
        if as_json:
            print_json(report.to_json())
            return
        if quiet:
            return
        verb = "created" if report.created else "updated"
        if not report.added and not report.replaced:
            console.print(f"{report.store}: up to date ({report.n_checkpoints} checkpoints, nothing new)")
            return
        rate = report.bytes_read / max(report.seconds, 1e-9) / 1e6
        console.print(f"{verb} {report.store}: +{len(report.added)} checkpoints"
                      + (f", {len(report.replaced)} replaced" if report.replaced else "")
                      + f" -> {report.n_rows:,} parameters x {report.n_checkpoints} checkpoints "
                      f"({format_bytes(report.bytes_read)} read in {report.seconds:.1f} s, {rate:.0f} MB/s)")
        if report.added:
            console.print(f"epochs {report.added[0]}..{report.added[-1]} added"
                          + (f"; {len(report.unchanged)} already present" if report.unchanged else ""))
        for label, count in report.nonfinite.items():
            console.print(f"[yellow]warning:[/yellow] epoch {label} has {count:,} NaN/Inf values (stored as is; "
                          f"analyses leave those rows out)")
