"""`cmdtool verify`"""

from __future__ import annotations

import typer

from ..common import (JsonOption, QuietOption, StoreOption, console, fail, handle_errors, print_json, progress_for,
                      with_scheduler)


def register(app: typer.Typer) -> None:
    @app.command("verify")
    @handle_errors
    @with_scheduler
    def verify(store: str = StoreOption, quiet: bool = QuietOption, as_json: bool = JsonOption):
        """Check a whole store: decode every chunk (crc32c checksums) and look for missing chunks and unreadable results. Exit code 1 if anything is damaged."""  # noqa: E501
        from cmdtool.store.summary import store_metadata
        from cmdtool.store.verify import verify_store

        st = store_metadata(store)  # metadata and chunk files are all verify reads: no zarr import
        report = verify_store(st, progress=progress_for(quiet or as_json))
        if as_json:
            print_json(report.to_json())
            if not report.ok:
                raise typer.Exit(1)
            return
        if report.ok:
            if not quiet:
                console.print(f"{st.path}: ok ({report.chunks_checked} chunks checked)")
            return
        for damage in report.damage:
            console.print(f"damaged: {damage.describe()}")
        fail(f"{st.path}: {len(report.damage)} damaged chunk(s); re-ingest the affected epochs into a new store", 1)
