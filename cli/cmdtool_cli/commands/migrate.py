"""`cmdtool migrate`"""

from __future__ import annotations

import typer

from ..common import JsonOption, QuietOption, StoreOption, console, handle_errors, print_json


def register(app: typer.Typer) -> None:
    @app.command("migrate")
    @handle_errors
    def migrate(store: str = StoreOption, quiet: bool = QuietOption, as_json: bool = JsonOption):
        """Upgrade a store written by an older cmdtool to the current format, in place (values unchanged, results kept). Any command that writes to the store does this by itself; reading needs no upgrade. Format 2 makes the store open in xarray and dask (dimension names, epoch and tensor coordinates). docs/store.md, "Format versions"."""  # noqa: E501
        from cmdtool.store import format as fmt
        from cmdtool.store import open_store

        before = open_store(store).format_version
        st = open_store(store, mode="r+")  # opening for writing migrates
        report = {"store": str(st.path), "from_version": before, "format_version": st.format_version,
                  "migrated": before != st.format_version}
        if as_json:
            print_json(report)
        elif not quiet:
            console.print(f"{st.path}: format v{before} -> v{fmt.FORMAT_VERSION}" if report["migrated"]
                          else f"{st.path}: already format v{st.format_version}, nothing to do")
