"""`cmdtool report` and `cmdtool export`: figures + html + summary.json, and results for other tools."""

from __future__ import annotations

import typer
from rich.table import Table

from cmdtool.report.export import FORMATS as EXPORT_FORMATS, exported_kinds

from ..common import (ForceOutputOption, JsonOption, QuietOption, StoreOption, console, handle_errors, print_json,
                      print_table, progress_for)


def register(app: typer.Typer) -> None:
    @app.command("report")
    @handle_errors
    def report_command(
        out: str = typer.Option("report", "--out", "-o", help="Folder for the figures, index.html and "
                                "summary.json: a new or empty folder, or one an earlier report wrote (only the "
                                "files cmdtool wrote there are replaced)."),
        name: str = typer.Option("default", "--name", help="Result name to draw for each method (when a method "
                                 "has one result under another name, that one is used, with a note)."),
        formats: list[str] = typer.Option(["png"], "--format", "-f", help="Figure format: png, svg or pdf "
                                          "(repeat for several; the html shows png, else svg)."),
        dpi: int = typer.Option(110, "--dpi", help="Resolution of png figures."),
        force: bool = ForceOutputOption,
        store: str = StoreOption,
        quiet: bool = QuietOption,
        as_json: bool = JsonOption,
    ):
        """Figures of every analysis in the store (each method's own: CMD correlation matrix, modes,
        reconstructions, modes per layer; DMD eigenvalues by KGA class, KWM masks; PCA; POD spectrum; and the
        per-epoch errors of every model and the metric curves), with an index.html and a summary.json. Figures
        whose analysis is missing are skipped with a note.

        Examples: `cmdtool report`, `cmdtool report --out figs --format png --format pdf`.
        """
        from cmdtool.report.html_report import build_report  # matplotlib: imported only when a report is made
        from cmdtool.store import open_store

        st = open_store(store, mode="r")
        report = build_report(st, out, name=name, formats=formats, dpi=dpi,
                              progress=progress_for(quiet or as_json), force=force)
        if as_json:
            print_json(report.summary)
            return
        if quiet:
            return
        table = Table(title=f"report of {st.path} in {out}/", show_edge=False, pad_edge=False)
        table.add_column("figure", no_wrap=True)
        table.add_column("files")
        for fig in report.figures:
            table.add_row(fig.title, " ".join(fig.files.values()))
        print_table(table)
        for note in report.notes:
            console.print(f"note: {note}", highlight=False, style="dim")
        console.print(f"open {out}/index.html ({len(report.figures)} figures; numbers in {out}/summary.json)",
                      highlight=False)

    @app.command("export")
    @handle_errors
    def export_command(
        out: str = typer.Option("export", "--out", "-o", help="Folder to write into: a new or empty folder, or "
                                "one an earlier export wrote (files of other exports there are kept)."),
        formats: list[str] = typer.Option(list(EXPORT_FORMATS), "--format", "-f",
                                          help="npy, csv (small tables only) or hdf5; repeat for several "
                                               "(default: all three)."),
        method: list[str] = typer.Option(None, "--method", "-m", help="Result kind(s) to export: "
                                         f"{', '.join(exported_kinds())} (default: every one present)."),
        name: str = typer.Option("default", "--name", help="Result name to export."),
        all_names: bool = typer.Option(False, "--all-names", help="Export every result name, not only --name."),
        force: bool = ForceOutputOption,
        store: str = StoreOption,
        quiet: bool = QuietOption,
        as_json: bool = JsonOption,
    ):
        """Write analysis results (correlation matrix, modes, A/B, references, spectra, PCA, errors) as .npy,
        .csv tables and one HDF5 file, streaming large arrays chunk by chunk.

        Examples: `cmdtool export`, `cmdtool export -m cmd -f hdf5 --out cmd_h5`.
        """
        from cmdtool.report.export import export as run_export
        from cmdtool.store import open_store

        st = open_store(store, mode="r")
        summary = run_export(st, out, methods=method or None, name=None if all_names else name, formats=formats,
                             progress=progress_for(quiet or as_json), force=force)
        if as_json:
            print_json(summary.to_dict())
            return
        if not quiet:
            console.print(f"exported {', '.join(summary.results)} to {out}/: {len(summary.files)} files, "
                          f"{summary.bytes_written / 1e6:.2f} MB", highlight=False)
