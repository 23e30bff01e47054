"""`cmdtool reconstruct`: write the CMD-modelled checkpoint of one or more epochs."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import typer

from cmdtool.analyzers import get_analyzer
from cmdtool.errors import UsageError
from cmdtool.ingest.formats import safetensors_metadata
from cmdtool.output_folder import OutputFolder, check_output_file
from cmdtool.report.checkpoints import FORMATS, build_state_dict, source_format, write_state_dict
from cmdtool.store import open_store

from ..common import ForceOutputOption, JsonOption, QuietOption, StoreOption, console, handle_errors, print_json

DEFAULT_FOLDER = "reconstructed"


def register(app: typer.Typer) -> None:
    @app.command("reconstruct")
    @handle_errors
    def reconstruct(
        epoch: list[int] = typer.Option(..., "--epoch", "-e", help="Epoch label to reconstruct (repeat for "
                                        "several)."),
        variant: str = typer.Option("posthoc", "--variant", help="posthoc (Sec. 3.2) or online (Sec. 3.3; "
                                    "needs `decompose --warmup F`)."),
        name: str = typer.Option("default", "--name", help="Name of the CMD result to use."),
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
        """Write the CMD-modelled checkpoint of an epoch: same keys, order, shapes and dtypes as the source,
        loadable with load_state_dict(strict=True).

        Examples: `cmdtool reconstruct --epoch 150`, `cmdtool reconstruct -e 100 -e 150 --variant online
        --format safetensors --out ckpts_cmd/`.
        """
        if variant not in ("posthoc", "online"):
            raise UsageError(f"unknown --variant {variant!r}: choose posthoc or online")
        if fmt is not None and fmt not in FORMATS:
            raise UsageError(f"unknown --format {fmt!r}: choose pt or safetensors")
        st = open_store(store, mode="r")
        columns = [st.column_of(label) for label in dict.fromkeys(epoch)]  # unknown epochs fail first
        hint = "cmdtool decompose --modes 10" + (" --warmup 20" if variant == "online" else "")
        if not st.results.exists("cmd", name):
            raise UsageError(f"no CMD decomposition named {name!r} in {st.path} yet: run `{hint}` first")
        cmd = get_analyzer("cmd").load(st, name)
        if variant == "online" and not cmd.has_online:
            raise UsageError(f"the CMD decomposition {name!r} has no online variant: run `{hint}` first")
        paths = _output_paths(out, st, columns, name, variant, fmt)
        as_file = len(paths) == 1 and paths[0][0] == out
        if as_file:  # refused before the work: a source checkpoint, or a file cmdtool did not write
            check_output_file(out, st, force=force)
        # a folder follows the output-folder rule (staged, published whole); one file is written in place, atomically
        written = []
        with contextlib.nullcontext(out.parent) if as_file else \
                OutputFolder(paths[0][0].parent, "reconstruct", force=force, store=st) as target:
            for column, (path, chosen) in zip(columns, paths):
                started = time.perf_counter()
                vector = cmd.reconstruct_epoch(st, column, variant=variant)
                source = Path(st.time_axis[column].source)
                metadata = safetensors_metadata(source) if chosen == "safetensors" else None
                write_state_dict(build_state_dict(st, vector, column), target / path.name, chosen, metadata=metadata)
                record = {"epoch": int(st.labels[column]), "variant": variant, "path": str(path), "format": chosen,
                          "source": st.time_axis[column].source, "seconds": round(time.perf_counter() - started, 3)}
                written.append(record)
                if not as_json and not quiet:
                    console.print(f"epoch {record['epoch']} ({variant} CMD, {cmd.metrics_['modes']} modes) -> "
                                  f"{path}", highlight=False)
        if as_json:
            print_json(written)


def _output_paths(out: Path | None, st, columns, name: str, variant: str, fmt: str | None):
    """(path, format) per column: a file for one epoch when --out names a file, else files in a folder."""
    prefix = "cmd" if variant == "posthoc" else "cmd-online"
    chosen = [fmt or source_format(st, c) for c in columns]
    as_file = out is not None and len(columns) == 1 and not out.is_dir() and out.suffix in (".pt", ".safetensors")
    if as_file:
        if fmt is None:
            chosen = ["safetensors" if out.suffix == ".safetensors" else "pt"]
        return [(out, chosen[0])]
    if out is not None and out.suffix in (".pt", ".safetensors") and len(columns) > 1:
        raise UsageError(f"--out {out} names one file but {len(columns)} epochs were asked for; give a folder")
    folder = out if out is not None else Path(DEFAULT_FOLDER)
    return [(folder / f"{prefix}_{name}_epoch{int(st.labels[c])}.{f}", f) for c, f in zip(columns, chosen)]
