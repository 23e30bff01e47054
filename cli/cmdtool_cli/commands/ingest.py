"""`cmdtool ingest PATH...`"""

from __future__ import annotations

from pathlib import Path

import typer

from cmdtool.errors import UsageError
from cmdtool.store import format as fmt
from cmdtool.store.format import INGEST_MEMORY_BUDGET as DEFAULT_MEMORY_BUDGET
from cmdtool.utils.units import format_bytes

from ..common import (AllowGlobalOption, JsonOption, QuietOption, StoreOption, allowing_globals, console,
                      handle_errors, print_json, progress_for, with_scheduler)


def register(app: typer.Typer) -> None:
    @app.command("ingest")
    @handle_errors
    @with_scheduler
    def ingest(
        paths: list[Path] = typer.Argument(..., help="Checkpoint files and/or folders of checkpoints, local or "
                                           "fsspec URLs (s3://bucket/ckpts/, downloaded one or two at a time).",
                                           show_default=False),
        store: str = StoreOption,
        label_pattern: str = typer.Option(
            None, "--label-pattern",
            help="Regular expression whose first group is the epoch label, searched in each checkpoint's path "
                 "relative to the folder given (so it can match a folder: 'global_step(\\d+)', "
                 "'checkpoint-(\\d+)'). Default: the number after 'epoch', else after 'step', else the last "
                 "number in the name."),
        skip: list[str] = typer.Option([], "--skip", help="Leave out files or folders whose name or relative path "
                                       "matches this glob (repeatable), e.g. 'best*.ckpt' or '*-v1.ckpt'."),
        set_label: list[str] = typer.Option([], "--set-label", help="PATH=N: ingest the checkpoint at PATH as "
                                            "epoch N (repeatable). Takes a file skipped for having no number, "
                                            "e.g. an HF run's final model.safetensors or Lightning's last.ckpt."),
        strip_prefix: list[str] = typer.Option([], "--strip-prefix", help="Remove this prefix from tensor names "
                                               "where present (repeatable), e.g. 'module.' of DataParallel/DDP or "
                                               "'_orig_mod.' of torch.compile."),
        include: list[str] = typer.Option([], "--include", help="Only tensors whose name matches this glob "
                                          "(repeatable), e.g. 'encoder.*'."),
        exclude: list[str] = typer.Option([], "--exclude", help="Leave out tensors matching this glob "
                                          "(repeatable). They are copied from the source at reconstruction."),
        buffers: bool = typer.Option(True, "--buffers/--no-buffers",
                                     help="Store BatchNorm running statistics as trajectories too."),
        memory_budget: str = typer.Option(DEFAULT_MEMORY_BUDGET, "--memory-budget",
                                          help="Memory for buffering checkpoints before a write, e.g. 512MiB, 4G. "
                                          "Peak memory is about this plus the largest tensor: a checkpoint "
                                          "larger than the budget is streamed through in row slabs."),
        codec: str = typer.Option(None, "--codec", help="Chunk codec of a new store: lz4 (bit-shuffled LZ4) or "
                                  "none; both keep crc32c checksums. Default: " + fmt.DEFAULT_CODEC + " (compared "
                                  "in docs/performance.md). Change it later with `cmdtool rechunk --codec`.",
                                  show_default=False),
        force: bool = typer.Option(False, "--force", help="Replace epochs whose file content changed since "
                                   "they were ingested (otherwise an error)."),
        allow_global: list[str] = AllowGlobalOption,
        quiet: bool = QuietOption,
        as_json: bool = JsonOption,
    ):
        """Stream checkpoints into the trajectory store (created if needed; appends new epochs only).

        Reads .pt/.pth/.bin/.ckpt/.pth.tar files (weights only: no pickled code is ever run), .safetensors files, and checkpoint folders, each one checkpoint: Hugging Face Trainer checkpoint-N/, sharded folders (shards plus an *.index.json), DeepSpeed global_stepN/ and torch.distributed.checkpoint (FSDP) folders. Optimizer, scheduler and RNG files are never read. A folder holding Lightning's default tree (lightning_logs/version_N/checkpoints/) is read there. Files without an epoch number beside numbered ones (last.ckpt, an HF run's final model) and Lightning -vN copies are skipped with a note (a file with the same content as a checkpoint, as that checkpoint). Layouts: docs/formats.md. Safe to interrupt (Ctrl-C keeps every committed checkpoint): run it again to resume.

        Examples: cmdtool ingest ckpts/ --store run.zarr; cmdtool ingest hf_run/ (its checkpoint-N/ folders); cmdtool ingest lightning/checkpoints --skip 'best*'.
        """  # noqa: E501 (one line per paragraph: rich re-wraps help text to the terminal)
        from cmdtool.ingestion import ingest as run_ingest  # torch: imported only when a command needs it

        with allowing_globals(allow_global):
            report = run_ingest(paths, store, label_pattern=label_pattern, include=tuple(include),
                                exclude=tuple(exclude), buffers=buffers, memory_budget=memory_budget, force=force,
                                progress=progress_for(quiet or as_json), skip=tuple(skip),
                                set_labels=_parse_set_labels(set_label), strip_prefix=tuple(strip_prefix),
                                codec=codec)
        if as_json:
            print_json(report.to_json())
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


def _parse_set_labels(items: list[str]) -> dict[str, int]:
    labels = {}
    for item in items:
        path, sep, label = item.rpartition("=")
        if not sep or not path or not label.strip().lstrip("-").isdigit():
            raise UsageError(f"--set-label {item!r}: expected PATH=N with an integer N, e.g. run/last.ckpt=100")
        labels[path] = int(label)
    return labels
