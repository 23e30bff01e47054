"""`cmdtool rechunk`"""

from __future__ import annotations

import typer

from cmdtool.store import format as fmt

from ..common import JsonOption, QuietOption, StoreOption, console, handle_errors, print_json, progress_for


def register(app: typer.Typer) -> None:
    @app.command("rechunk")
    @handle_errors
    def rechunk(
        store: str = StoreOption,
        chunk_rows: int = typer.Option(None, "--chunk-rows", help="Rows per chunk. Default: about 8 MiB of float32 "
                                       "per chunk at the chosen width.", show_default=False),
        chunk_columns: int = typer.Option(None, "--chunk-columns", help="Checkpoints per chunk. Default: every "
                                          "checkpoint in the store (at most 256), what the analyses read.",
                                          show_default=False),
        codec: str = typer.Option(None, "--codec", help="lz4 (bit-shuffled LZ4) or none; crc32c checksums either "
                                  "way. Default: keep the store's.", show_default=False),
        memory_budget: str = typer.Option(fmt.INGEST_MEMORY_BUDGET, "--memory-budget",
                                          help="Memory for the row blocks copied at once, e.g. 512MiB, 4G."),
        quiet: bool = QuietOption,
        as_json: bool = JsonOption,
    ):
        """Rewrite the store's chunks for the analyses' read pattern (row blocks over all checkpoints), streaming and in bounded memory.

        A store ingested with a small --memory-budget for a large model has narrow chunks (a few checkpoints wide); every later pass then reads many small chunks. Rechunk once after ingest. Values, labels and saved analyses are unchanged (their revision stays valid). Safe to interrupt: the new arrays are written aside and swapped in at the end; a killed rechunk leaves the store as it was. Needs free disk for one more copy of the trajectories while it runs.

        Examples: cmdtool rechunk; cmdtool rechunk --chunk-columns 64 --codec none.
        """  # noqa: E501
        from cmdtool.store.rechunk import rechunk as run_rechunk
        from cmdtool.utils.units import format_bytes

        report = run_rechunk(store, chunk_rows=chunk_rows, chunk_columns=chunk_columns, codec=codec,
                             memory_budget=memory_budget, progress=progress_for(quiet or as_json))
        if as_json:
            print_json(report.to_json())
        elif not quiet:
            if report.unchanged:
                console.print(f"{report.store}: chunks already {report.new_chunks[0]} x {report.new_chunks[1]} "
                              f"({report.new_codec}), nothing to do")
                return
            console.print(f"{report.store}: chunks {report.old_chunks[0]} x {report.old_chunks[1]} "
                          f"({report.old_codec}) -> {report.new_chunks[0]} x {report.new_chunks[1]} "
                          f"({report.new_codec}); trajectories {format_bytes(report.bytes_before)} -> "
                          f"{format_bytes(report.bytes_after)} in {report.seconds:.1f} s")
