"""Matplotlib building blocks shared by every figure (the report's and those an analyzer module declares).

Figures are ``matplotlib.figure.Figure`` objects made directly, not through ``pyplot``: nothing is registered in
pyplot's global figure list, so nothing leaks when many figures are made in one process, and no display is
needed (the Agg canvas renders PNG, SVG and PDF). Import this module where a figure is drawn, not at the top of
an analyzer module (matplotlib takes about half a second to import).
"""

from __future__ import annotations

from matplotlib import rc_context
from matplotlib.figure import Figure

# readable at the size the html report shows them (about 900 px wide)
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
         "xtick.labelsize": 9, "ytick.labelsize": 9, "figure.titlesize": 12, "axes.grid": False}


def new_figure(width: float, height: float) -> Figure:
    """An empty Figure of ``width`` × ``height`` inches with constrained layout."""
    return Figure(figsize=(width, height), layout="constrained")


def styled():
    """``with styled(): ...``: draw with the shared STYLE."""
    return rc_context(STYLE)


def grid(n_panels: int, max_cols: int = 4) -> tuple[int, int]:
    """(rows, columns) of a panel grid holding ``n_panels`` panels, at most ``max_cols`` wide."""
    cols = min(max_cols, max(n_panels, 1))
    rows = -(-n_panels // cols)
    return rows, cols


def mode_colors(n_modes: int) -> list:
    """One colour per mode, the same in every figure (qualitative maps while they have enough colours)."""
    import numpy as np
    from matplotlib import colormaps

    if n_modes <= 10:
        return [colormaps["tab10"](k) for k in range(n_modes)]
    if n_modes <= 20:
        return [colormaps["tab20"](k) for k in range(n_modes)]
    return [colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, n_modes)]


__all__ = ["STYLE", "grid", "mode_colors", "new_figure", "styled"]
