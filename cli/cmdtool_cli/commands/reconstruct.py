"""`cmdtool reconstruct`: write the modelled checkpoint of one or more epochs, of any registered method (CMD by
default) or of the EMA/SWA weight averages."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import typer

from cmdtool.analyzers import reconstructions
from cmdtool.averages import BASELINES
from cmdtool.errors import UsageError

from ..common import (ForceOutputOption, JsonOption, QuietOption, StoreOption, console, handle_errors, print_json,
                      progress_for, with_scheduler)

DEFAULT_FOLDER = "reconstructed"
FORMATS = ("pt", "safetensors")
AVERAGES = tuple(m for m in BASELINES if m != "original")


def register(app: typer.Typer) -> None:
    models = ", ".join(reconstructions())

    @app.command("reconstruct")
    @handle_errors
    @with_scheduler
    def reconstruct(
        epoch: list[int] = typer.Option(..., "--epoch", "-e", help="Epoch label to reconstruct (repeat for "
                                        "several)."),
        method: str = typer.Option("cmd", "--method", "-m", help=f"Model to write: {models}, or the weight "
                                   f"averages {' or '.join(AVERAGES)}."),
        variant: str = typer.Option(None, "--variant", help="CMD: posthoc (Sec. 3.2) or online (Sec. 3.3; needs "
                                    "`decompose --warmup F`); `--method cmd --variant online` is `--method "
                                    "cmd-online`."),
        name: str = typer.Option("default", "--name", help="Name of the saved result to use."),
        ema_beta: float = typer.Option(0.9, "--ema-beta", help="EMA: ema_t = β ema_(t-1) + (1-β) w_t."),
        swa_fraction: float = typer.Option(0.25, "--swa-fraction", help="SWA: mean of the last fraction of the "
                                           "window's checkpoints up to the epoch."),
        epochs: str = typer.Option(None, "--epochs", help="EMA/SWA: the window A:B the averages run over (EMA "
                                   "starts at A; SWA's length is a fraction of it). Default: the whole store."),
        fmt: str = typer.Option(None, "--format", help="pt or safetensors (default: the source checkpoint's "
                                "format; torch files and sharded folders give pt)."),
        out: Path = typer.Option(None, "--out", "-o", help="Output file (one epoch) or folder (default "
                                 f"./{DEFAULT_FOLDER}/). Never a source checkpoint, nor inside the store or a "
                                 "folder of source checkpoints."),
        force: bool = ForceOutputOption,
        store: str = StoreOption,
        quiet: bool = QuietOption,
        as_json: bool = JsonOption,
    ):
        """Write the modelled checkpoint of an epoch: same keys, order, shapes and dtypes as the source,
        loadable with load_state_dict(strict=True).

        Examples: `cmdtool reconstruct --epoch 150`, `cmdtool reconstruct -e 100 -e 150 --variant online
        --format safetensors --out ckpts_cmd/`, `cmdtool reconstruct -e 150 -m dmd`, `cmdtool reconstruct -e 150
        -m swa --swa-fraction 0.2`.
        """
        from cmdtool.ingest.checkpoints import write_modelled_checkpoint
        from cmdtool.ingest.formats import safetensors_metadata
        from cmdtool.output_folder import OutputFolder, check_output_file
        from cmdtool.store import open_store

        model = _model_name(method.lower(), variant)
        if fmt is not None and fmt not in FORMATS:
            raise UsageError(f"unknown --format {fmt!r}: choose pt or safetensors")
        st = open_store(store, mode="r")
        columns = [st.column_of(label) for label in dict.fromkeys(epoch)]  # unknown epochs fail first
        vectors = _averages(st, model, columns, ema_beta, swa_fraction, epochs, progress_for(quiet or as_json)) \
            if model in AVERAGES else _modelled(st, model, columns, name)
        paths = _output_paths(out, st, columns, model if model in AVERAGES else f"{model}_{name}", fmt)
        as_file = len(paths) == 1 and paths[0][0] == out
        if as_file:  # refused before the work: a source checkpoint, or a file cmdtool did not write
            check_output_file(out, st, force=force)
        # a folder follows the output-folder rule (staged, published whole); one file is written in place, atomically
        written = []
        with contextlib.nullcontext(out.parent) if as_file else \
                OutputFolder(paths[0][0].parent, "reconstruct", force=force, store=st) as target:
            for column, (path, chosen) in zip(columns, paths):
                started = time.perf_counter()
                blocks, described, model_variant = next(vectors)
                source = Path(st.time_axis[column].source)
                metadata = safetensors_metadata(source) if chosen == "safetensors" else None
                write_modelled_checkpoint(st, column, blocks, target / path.name, chosen, metadata=metadata)
                record = {"epoch": int(st.labels[column]), "method": model, "variant": model_variant,
                          "path": str(path), "format": chosen, "source": st.time_axis[column].source,
                          "seconds": round(time.perf_counter() - started, 3)}
                written.append(record)
                if not as_json and not quiet:
                    console.print(f"epoch {record['epoch']} ({described}) -> {path}", highlight=False)
        if as_json:
            print_json(written)


def _model_name(method: str, variant: str | None) -> str:
    """The model's name in the registry (``cmd`` + ``--variant online`` is ``cmd-online``), checked."""
    known = tuple(reconstructions()) + AVERAGES
    if variant is not None:
        if method != "cmd":
            raise UsageError(f"--variant applies to --method cmd; name the model with --method ({', '.join(known)})")
        if variant not in ("posthoc", "online"):
            raise UsageError(f"unknown --variant {variant!r}: choose posthoc or online")
        method = "cmd" if variant == "posthoc" else "cmd-online"
    if method not in known:
        raise UsageError(f"unknown --method {method!r}: choose from {', '.join(known)}")
    return method


def _modelled(st, model: str, columns: list[int], name: str):
    """(row blocks, description, variant) of each column from the saved result ``name`` of the model's analyzer
    (blocks: :meth:`~cmdtool.analyzers.base.Analyzer.reconstruction_blocks`, evaluated as they are written)."""
    from cmdtool.analyzers import load_reconstruction

    analyzer, reconstruction = load_reconstruction(st, model, name)
    size = " ".join(f"{k}={v}" for k, v in analyzer.model_size().items())
    described = reconstruction.label + (f", {size}" if size else "")
    for column in columns:
        yield (analyzer.reconstruction_blocks(st, [column], **reconstruction.options), described,
               reconstruction.options.get("variant"))


def _averages(st, model: str, columns: list[int], ema_beta: float, swa_fraction: float, epochs: str | None,
              progress):
    """(row blocks, description, None) of each column's EMA or SWA over the window, in the asked order (one stream
    computes them all, whole N-vectors)."""
    from cmdtool.averages import check_ema_beta, iter_averages, swa_length

    window = st.resolve_epochs(epochs)
    outside = [int(st.labels[c]) for c in columns if not window.start <= c < window.stop]
    if outside:
        raise UsageError(f"epoch {outside[0]} is outside the averaging window --epochs {epochs}")
    swa_len = swa_length(window.stop - window.start, swa_fraction)
    if model == "swa":
        short = [int(st.labels[c]) for c in columns if c - window.start + 1 < swa_len]
        if short:
            raise UsageError(f"epoch {short[0]} has fewer than the {swa_len} checkpoints SWA averages "
                             f"(--swa-fraction {swa_fraction} of {window.stop - window.start}); lower --swa-fraction "
                             "or pick a later epoch")
    beta = check_ema_beta(ema_beta)
    found = {column: vector for _, column, vector in
             iter_averages(st, window, columns, [model], beta, swa_len, progress=progress, description=model.upper())}
    described = f"EMA, beta {beta}" if model == "ema" else f"SWA of the last {swa_len} checkpoints"
    for column in columns:
        yield [(slice(0, st.n_rows), found[column])], described, None


def _output_paths(out: Path | None, st, columns, prefix: str, fmt: str | None):
    """(path, format) per column: a file for one epoch when --out names a file, else files in a folder."""
    from cmdtool.ingest.checkpoints import source_format

    chosen = [fmt or source_format(st, c) for c in columns]
    as_file = out is not None and len(columns) == 1 and not out.is_dir() and out.suffix in (".pt", ".safetensors")
    if as_file:
        if fmt is None:
            chosen = ["safetensors" if out.suffix == ".safetensors" else "pt"]
        return [(out, chosen[0])]
    if out is not None and out.suffix in (".pt", ".safetensors") and len(columns) > 1:
        raise UsageError(f"--out {out} names one file but {len(columns)} epochs were asked for; give a folder")
    folder = out if out is not None else Path(DEFAULT_FOLDER)
    return [(folder / f"{prefix}_epoch{int(st.labels[c])}.{f}", f) for c, f in zip(columns, chosen)]
