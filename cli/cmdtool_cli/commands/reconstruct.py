"""`cmdtool reconstruct`: write the modelled checkpoint of one or more epochs, of any registered method (CMD by
default) or of the EMA/SWA weight averages."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import typer

from cmdtool.analyzers import reconstructions
from cmdtool.workflows.averages import BASELINES
from cmdtool.errors import UsageError

from ..common import (AllowGlobalOption, ForceOutputOption, JsonOption, QuietOption, StoreOption, allowing_globals,
                      console, handle_errors, print_json, progress_for, with_scheduler)

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
        fmt: str = typer.Option(None, "--format", help="pt or safetensors: a bare state dict (the store's tensor "
                                "names) instead of the default, the source checkpoint's own container (a Lightning "
                                ".ckpt, the loop's dict, an HF folder, DCP, DeepSpeed: docs/formats.md)."),
        strip_prefix: list[str] = typer.Option(None, "--strip-prefix", help="Remove this prefix from the tensor "
                                               "names written (repeatable), e.g. '_orig_mod.' (torch.compile) or "
                                               "'module.' (DataParallel/DDP), to load into the bare model."),
        out: Path = typer.Option(None, "--out", "-o", help="Output file (one epoch whose container is a file, "
                                 "or a bare state dict) or folder (default "
                                 f"./{DEFAULT_FOLDER}/). Never a source checkpoint, nor inside the store or a "
                                 "folder of source checkpoints."),
        force: bool = ForceOutputOption,
        allow_global: list[str] = AllowGlobalOption,
        store: str = StoreOption,
        quiet: bool = QuietOption,
        as_json: bool = JsonOption,
    ):
        """Write the modelled checkpoint of an epoch in the container of that epoch's source checkpoint, so
        that it loads the way the source loads (Lightning's load_from_checkpoint, the loop's dict, HF
        from_pretrained, dcp.load); only the modelled weights differ. --format writes a bare state dict.

        Examples: `cmdtool reconstruct --epoch 150`, `cmdtool reconstruct -e 100 -e 150 --variant online
        --format safetensors --out ckpts_cmd/`, `cmdtool reconstruct -e 150 -m dmd`, `cmdtool reconstruct -e 150
        -m swa --swa-fraction 0.2`, `cmdtool reconstruct -e 150 --strip-prefix _orig_mod. --format pt`.
        """
        from cmdtool.ingestion.checkpoints import write_modelled_checkpoint
        from cmdtool.ingestion.containers import describe_bare, write_container
        from cmdtool.utils.output_folder import OutputFolder, check_output_file
        from cmdtool.store import open_store

        model = _model_name(method.lower(), variant)
        if fmt is not None and fmt not in FORMATS:
            raise UsageError(f"unknown --format {fmt!r}: choose pt or safetensors")
        st = open_store(store, mode="r")
        columns = [st.column_of(label) for label in dict.fromkeys(epoch)]  # unknown epochs fail first
        strip = _checked_prefixes(st, strip_prefix or [])
        # what each epoch becomes is decided (and refused) before any work
        with allowing_globals(allow_global):  # the sources' containers are read to plan the outputs
            plans = _output_plans(out, st, columns, model if model in AVERAGES else f"{model}_{name}", fmt)
        vectors = _averages(st, model, columns, ema_beta, swa_fraction, epochs, progress_for(quiet or as_json)) \
            if model in AVERAGES else _modelled(st, model, columns, name)
        as_file = len(plans) == 1 and plans[0].path == out
        if as_file:  # refused before the work: a source checkpoint, or a file cmdtool did not write
            check_output_file(out, st, force=force)
        # a folder follows the output-folder rule (staged, published whole); one file is written in place, atomically
        written = []
        with contextlib.nullcontext(out.parent) if as_file else \
                OutputFolder(plans[0].path.parent, "reconstruct", force=force, store=st) as target:
            for column, plan in zip(columns, plans):
                with allowing_globals(allow_global):  # sources are read here, lazily
                    started = time.perf_counter()
                    blocks, described, model_variant = next(vectors)
                    if plan.container is not None:
                        container = write_container(st, column, blocks, plan.container, target / plan.path.name,
                                                    strip)
                    else:
                        rename = {e.name: _stripped(e.name, strip) for e in st.layout.entries} if strip else None
                        metadata = _bare_metadata(st, column) if plan.format == "safetensors" else None
                        write_modelled_checkpoint(st, column, blocks, target / plan.path.name, plan.format,
                                                  metadata=metadata, rename=rename)
                        container = describe_bare(plan.format)
                    record = {"epoch": int(st.labels[column]), "method": model, "variant": model_variant,
                              "path": str(plan.path), "format": plan.format or plan.container.kind,
                              "container": container, "source": st.time_axis[column].source,
                              "seconds": round(time.perf_counter() - started, 3)}
                    written.append(record)
                    if not as_json and not quiet:  # the container is named when it holds more than the weights
                        shown = "" if container.endswith("state dict") else f" ({container})"
                        console.print(f"epoch {record['epoch']} ({described}) -> {plan.path}{shown}",
                                      highlight=False)
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
    from cmdtool.workflows.averages import check_ema_beta, iter_averages, swa_length

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


@dataclass(frozen=True)
class _Plan:
    path: Path                 # the file or folder written
    container: object = None   # the source's Container, written as such; None: a bare state dict
    format: str | None = None  # the bare state dict's format (pt or safetensors)


def _output_plans(out: Path | None, st, columns, prefix: str, fmt: str | None) -> list[_Plan]:
    """What each column becomes and where: the source's container (a file or a folder) or, with --format (or a
    store built from memory, or an --out file that the container is not), a bare state dict. One epoch is
    written to --out itself when it names a checkpoint file; otherwise into the folder --out (default
    ./reconstructed/), named ``<prefix>_epoch<E>`` with the container's suffix."""
    from cmdtool.ingestion.containers import source_container
    from cmdtool.ingestion.formats import CHECKPOINT_SUFFIXES, SAFETENSORS_SUFFIX

    names_file = out is not None and not out.is_dir() and out.name.endswith(CHECKPOINT_SUFFIXES)
    if names_file and len(columns) > 1:
        raise UsageError(f"--out {out} names one file but {len(columns)} epochs were asked for; give a folder")
    plans = []
    for column in columns:
        try:
            container = None if fmt is not None else source_container(st, column)
        except UsageError:  # no source to rebuild the container from: a named file is then a bare state dict
            if not names_file:
                raise
            container = None
        if names_file:  # the file named: the container when it is one file of that kind, else a bare state dict
            wanted = "safetensors" if out.name.endswith(SAFETENSORS_SUFFIX) else "torch"
            if container is not None and container.kind == wanted:
                return [_Plan(out, container)]
            return [_Plan(out, None, fmt or ("safetensors" if wanted == "safetensors" else "pt"))]
        folder = out if out is not None else Path(DEFAULT_FOLDER)
        stem = f"{prefix}_epoch{int(st.labels[column])}"
        if container is None:
            plans.append(_Plan(folder / f"{stem}.{fmt or 'pt'}", None, fmt or "pt"))
        else:
            plans.append(_Plan(folder / f"{stem}{container.suffix}", container))
    return plans


def _stripped(name: str, prefixes: tuple[str, ...]) -> str:
    from cmdtool.ingestion.formats import strip_prefix

    return strip_prefix(name, prefixes)


def _checked_prefixes(st, prefixes: list[str]) -> tuple[str, ...]:
    """--strip-prefix values, each carried by some tensor name (the store's, or the source's with the prefix
    ingest stripped put back): a prefix that matches nothing is a typo, refused."""
    from cmdtool.ingestion.ingest import store_strip_prefixes

    names = [e.name for e in st.layout.entries]
    candidates = names + [p + n for p in store_strip_prefixes(st) for n in names]
    for prefix in prefixes:
        if not prefix or not any(n.startswith(prefix) for n in candidates):
            example = names[0] if names else ""
            raise UsageError(f"--strip-prefix {prefix!r}: no tensor name starts with it (e.g. {example!r})")
    return tuple(prefixes)


def _bare_metadata(st, column: int):
    """A bare safetensors file keeps a safetensors source's header metadata."""
    from cmdtool.ingestion.formats import safetensors_metadata

    source = Path(st.time_axis[column].source)
    return safetensors_metadata(source) if source.is_absolute() and source.exists() else None
