"""`cmdtool info`"""

from __future__ import annotations

import typer
from rich.table import Table

from cmdtool.store.format import FORMAT_VERSION
from cmdtool.store.summary import summarize_store
from cmdtool.utils.units import format_bytes

from ..common import JsonOption, StoreOption, console, handle_errors, print_json, print_table


def register(app: typer.Typer) -> None:
    @app.command("info")
    @handle_errors
    def info(store: str = StoreOption, as_json: bool = JsonOption,
             layers: bool = typer.Option(False, "--layers", help="List every tensor, not only the largest ten.")):
        """Summarise a store: parameters, tensors, checkpoints, sizes, NaN/Inf counts and saved analyses.
        Tied tensors (one storage under two names, e.g. an output layer tied to the embedding) are listed and
        counted once, with the alias noted."""
        summary = summarize_store(store)  # a local store: from its metadata documents, without importing zarr
        if as_json:
            print_json(summary)
            return
        labels = summary["labels"]
        ratio = summary["compression_ratio"]
        console.print(f"[bold]{summary['store']}[/bold] (format v{summary['format_version']}, "
                      f"revision {summary['revision']})")
        if summary["format_version"] < FORMAT_VERSION:
            console.print("  [yellow]note:[/yellow] an older store format: `cmdtool migrate` (or any command that "
                          "writes) upgrades it so that xarray and dask can open it")
        console.print(f"  parameters   {summary['parameters']:,} in {summary['tensors']} tensors "
                      f"(+{summary['integer_tensors']} integer tensors kept aside"
                      + (f", {len(summary['excluded_tensors'])} excluded" if summary['excluded_tensors'] else "")
                      + (f", {len(summary['tied_tensors'])} tied to another, stored once"
                         if summary['tied_tensors'] else "")
                      + ")")
        console.print(f"  checkpoints  {summary['checkpoints']} (epochs {labels['first']}..{labels['last']})")
        console.print(f"  source dtype {', '.join(summary['source_dtypes'])}; stored float32, chunks "
                      f"{summary['chunk_shape'][0]} x {summary['chunk_shape'][1]} ({summary['codec']})")
        if summary["rechunk_suggested"]:
            console.print(f"  [yellow]note:[/yellow] each chunk holds {summary['chunk_shape'][1]} of "
                          f"{summary['checkpoints']} checkpoints; `cmdtool rechunk` rewrites them for the analyses' "
                          f"row-block reads (docs/store.md)")
        console.print(f"  on disk      {format_bytes(summary['bytes_on_disk'])} (trajectories "
                      f"{format_bytes(summary['trajectory_bytes_on_disk'])}, raw "
                      f"{format_bytes(summary['bytes_raw_float32'])}"
                      + (f", compression {ratio:.2f}x" if ratio else "") + ")")
        console.print(f"  NaN/Inf      {summary['nonfinite_values']:,}"
                      + (f" (epochs {', '.join(summary['nonfinite_by_epoch'])})" if summary['nonfinite_values']
                         else ""))
        table = Table(title="tensors" if layers else "largest tensors", show_edge=False)
        for col in ("name", "shape", "dtype", "kind", "values"):
            table.add_column(col, justify="right" if col == "values" else "left")
        # a tied tensor is one tensor under two names: one row, the alias noted, its values counted once
        aliases: dict[str, list[str]] = {}
        for tied in summary["tied_tensors"]:
            aliases.setdefault(tied["tied_to"], []).append(tied["name"])
        listed = [r for r in summary["layers"] if r["role"] != "tied"]
        rows = listed if layers else sorted(listed, key=lambda r: -r["numel"])[:10]
        for row in rows:
            kind = row["kind"] if row["role"] == "trajectory" else f"{row['kind']} ({row['role']})"
            name = " = ".join([*aliases.get(row["name"], []), row["name"]])
            if row["name"] in aliases:
                name += " (tied, stored once)"
            table.add_row(name, "x".join(map(str, row["shape"])) or "scalar", row["dtype"], kind,
                          f"{row['numel']:,}")
        print_table(table)
        if summary["analyses"]:
            console.print("  analyses     " + ", ".join(
                f"{a['method']}/{a['name']}" + (" (stale)" if a["stale"] else "") for a in summary["analyses"]))
        else:
            console.print("  analyses     none yet (run `cmdtool decompose`)")
