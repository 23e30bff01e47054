"""What ``cmdtool decompose`` prints for a fitted analyzer: tables and lines, rendered by :mod:`.render`.

The analyzer gives its learned state and :meth:`~cmdtool.analyzers.base.Analyzer.summary` (plain data, which
``--json`` prints as is); this module lays them out for a terminal, one function per method in
:data:`BLOCKS`. A method without one (e.g. a third-party analyzer) gets :func:`generic_blocks`: its summary's
numbers in a two-column table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class SummaryTable:
    """A table as plain data (``columns``: (name, justify)); :func:`~cmdtool_cli.render.print_blocks` draws it."""

    title: str
    columns: list[tuple[str, str]]
    rows: list[list[str]]


def summary_blocks(analyzer) -> list:
    """The tables and lines ``cmdtool decompose`` prints for ``analyzer``, in order."""
    return BLOCKS.get(analyzer.method, generic_blocks)(analyzer)


def generic_blocks(analyzer) -> list:
    summary = analyzer.summary()
    table = SummaryTable(f"{analyzer.method} / {analyzer.name_ or 'unsaved'}", [("figure", "left"),
                                                                                ("value", "right")], [])
    for key, value in summary.items():
        if key != "method" and not isinstance(value, (list, dict)):
            table.rows.append([key, f"{value:.4g}" if isinstance(value, float) else str(value)])
    return [table]


def error_line(summary: dict) -> str:
    """The line of errors, size and time printed under a Gram model's table (DMD, PCA, POD)."""
    return (f"relative error {summary['relative_error']:.4g} (to motion {summary['relative_error_motion']:.4g}), "
            f"final epoch {summary['final_epoch_error']:.4g}, worst epoch {summary['worst_epoch_error']:.4g}; "
            f"stored floats {summary['stored_floats']:,}; {summary['fit_seconds']:.2f} s")


def cmd_blocks(cmd) -> list:
    """PosthocCMD: the modes with their sizes and reference weights, the errors (post-hoc and online), the time."""
    from cmdtool.analyzers.cmd.drift import DriftReport

    cmd._check_fitted()
    m = cmd.metrics_
    names = cmd.store_.layout.row_names(cmd.reference_indices_)
    total = max(sum(m["mode_sizes"]), 1)
    table = SummaryTable(f"CMD, {m['modes']} modes, epochs {cmd.labels_[0]}..{cmd.labels_[-1]}",
                         [("mode", "right"), ("weights", "right"), ("share", "right"),
                          ("reference weight", "left")], [])
    for k, (size, name) in enumerate(zip(m["mode_sizes"], names)):
        table.rows.append([str(k), f"{size:,}", f"{100 * size / total:.1f}%", name])
    lines = [f"relative error ‖W−Ŵ‖/‖W‖ {m['relative_error']:.4g}, relative to motion "
             f"‖W−Ŵ‖/‖W−mean_t W‖ {m['relative_error_motion']:.4g}, last epoch "
             f"{m['epoch_relative_error'][-1]:.4g}"]
    if m["kept_rows"]:
        lines.append(f"{m['kept_rows']:,} BatchNorm running-stat values kept from the source (--bn-stats source)")
    if m["nonfinite_rows"]:
        lines.append(f"{m['nonfinite_rows']:,} weights with NaN/Inf were not modelled (kept as stored)")
    if "online" in m:
        o = m["online"]
        lines.append(f"online (warm-up {o['warmup']}): relative error {o['relative_error']:.4g}, "
                     f"to motion {o['relative_error_motion']:.4g}, last epoch "
                     f"{o['epoch_relative_error'][-1]:.4g}")
        drift = o.get("drift")
        if drift and drift["drifted"]:
            lines.append("warning: " + DriftReport.from_dict(drift).message())
    timings = cmd.timings_
    lines.append(f"time {timings.get('fit_seconds', float('nan')):.2f} s "
                 f"(sampling pass {timings.get('sampling_pass_seconds', 0):.2f} s, clustering "
                 f"{timings.get('clustering_seconds', 0):.2f} s, fit pass "
                 f"{timings.get('fit_pass_seconds', 0):.2f} s)")
    return [table, *lines]


def dmd_blocks(dmd) -> list:
    """DMD: the first 20 eigenvalues with their moduli and amplitudes, then the errors."""
    s = dmd.summary()
    title = f"{dmd.method} / {dmd.name_ or ''}: rank {s['rank']}"
    if s["rank"] != s["rank_requested"]:
        title += f" (asked {s['rank_requested']}; the rest is below the Gram path's roundoff)"
    table = SummaryTable(title, [("λ", "right"), ("|λ|", "right"), ("|b|", "right")], [])
    for row in s["eigenvalues"][:20]:
        re, im = row["eigenvalue"]
        table.rows.append([f"{re:+.5f}{im:+.5f}j", f"{row['modulus']:.5f}", f"{row['amplitude']:.4g}"])
    return [table, error_line(s)]


def kga_blocks(kga) -> list:
    """KGA: the eigenvalues with their classes, the class counts and masked share, the masked share per tensor."""
    s = kga.summary()
    table = SummaryTable(f"kga / {kga.name_ or ''}: rank {s['rank']}, eps {kga.eps}",
                         [("λ", "right"), ("|λ|", "right"), ("|b|", "right"), ("class", "right")], [])
    for row in s["eigenvalues"][:20]:
        re, im = row["eigenvalue"]
        table.rows.append([f"{re:+.5f}{im:+.5f}j", f"{row['modulus']:.5f}", f"{row['amplitude']:.4g}",
                           row["class"]])
    counts = s["classes"]
    line = (f"modes: {counts['stable']} stable, {counts['neutral']} neutral, {counts['unstable']} unstable; KWM "
            f"(window {kga.window}): {s['masked_fraction']:.1%} of weights masked out")
    layers = SummaryTable("KWM masked fraction per tensor", [("tensor", "left"), ("masked", "right"),
                                                              ("size", "right"), ("fraction", "right")], [])
    for name, row in list(s["masked_per_tensor"].items())[:40]:
        layers.rows.append([name, f"{row['masked']:,}", f"{row['size']:,}", f"{row['fraction']:.1%}"])
    return [table, line, layers]


def pca_blocks(pca) -> list:
    """PCA: the first 12 directions' explained variance, then the errors."""
    s = pca.summary()
    table = SummaryTable(f"pca / {pca.name_ or ''}: {s['dims']} directions "
                         f"({s['explained_variance_ratio_total']:.2%} of the variance)",
                         [("direction", "right"), ("explained variance", "right"), ("ratio", "right"),
                          ("cumulative", "right")], [])
    cumulative = np.cumsum(pca.explained_variance_ratio_)
    for k in range(min(pca.dims_, 12)):
        table.rows.append([str(k + 1), f"{pca.explained_variance_[k]:.4g}",
                           f"{pca.explained_variance_ratio_[k]:.2%}", f"{cumulative[k]:.2%}"])
    lines = [table, error_line(s)]
    if pca.reproduces_the_data():
        lines.append(f"warning: {pca.dims_} directions = T − 1 for T = {len(pca.coordinates_)} checkpoints: "
                     f"they span every centred checkpoint, so this model is the data itself (its error is "
                     f"roundoff); choose fewer with --dims, or --dims 0 for the threshold rule")
    return lines


def pod_blocks(pod) -> list:
    """POD: the first 12 singular values and their energy shares, then the errors."""
    s = pod.summary()
    total = float(np.sum(pod.singular_values_**2))
    table = SummaryTable(f"pod / {pod.name_ or ''}: rank {s['rank']} ({s['energy']:.4%} of Σσ²)",
                         [("mode", "right"), ("σ", "right"), ("σ²/Σσ²", "right"), ("cumulative", "right")], [])
    cumulative = 0.0
    for k, sigma in enumerate(pod.singular_values_[:min(pod.rank_, 12)]):
        cumulative += sigma**2 / total
        table.rows.append([str(k + 1), f"{sigma:.4g}", f"{sigma**2 / total:.4%}", f"{cumulative:.4%}"])
    return [table, error_line(s)]


# method name -> the function laying out its summary
BLOCKS: dict[str, Callable[[object], list]] = {"cmd": cmd_blocks, "dmd": dmd_blocks, "kga": kga_blocks,
                                               "pca": pca_blocks, "pod": pod_blocks}

__all__ = ["BLOCKS", "SummaryTable", "error_line", "generic_blocks", "summary_blocks"]
