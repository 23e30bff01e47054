"""Rich rendering of what the library returns as plain data (summary tables and lines)."""

from __future__ import annotations

from rich.table import Table

from .common import console, print_table


def print_blocks(blocks) -> None:
    """Print :func:`~cmdtool_cli.summaries.summary_blocks`: tables and lines, in order."""
    for block in blocks:
        if isinstance(block, str):
            console.print(block, highlight=False)
            continue
        table = Table(title=block.title, show_edge=False)
        for name, justify in block.columns:
            table.add_column(name, justify=justify)
        for row in block.rows:
            table.add_row(*row)
        print_table(table)
