"""Figures of the analyses in a trajectory store, as matplotlib ``Figure`` objects (usable from Python).

Every function takes a committed :class:`~cmdtool.store.results.Result`, a fitted analyzer (saved or not) or a
:class:`~cmdtool.analyzers.base.ResultView` of either, and returns a :class:`matplotlib.figure.Figure`; the caller
saves it (``fig.savefig("x.png")``) or shows it. Figures are built without ``pyplot`` (see
:mod:`cmdtool.utils.plotting`): nothing leaks when many reports are made in one process and no display is needed. The
analyzers declare which of these figures their results get (``figures`` of each analyzer class); the report
draws those, plus the figures that span methods (:func:`epoch_error_figure`, :func:`evaluation_figure`).

Memory: the figures use the small arrays a result keeps (K×K correlation, M×T references, T×T spectra) and, for
member trajectories, the rows of the CMD sample only (:func:`load_cmd_sample`, at most ``max_rows`` rows read
with ``store.read_rows``). Nothing N-long or N×T is loaded.

The figures follow paper 000 (CMD: Fig. 1/9 correlation matrix, Fig. 6 mode trajectories, Fig. 7 reconstructions,
Fig. 10b modes per layer) and paper 003 (Fig. 2: DMD eigenvalues on the unit circle, coloured by class).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib import rc_context
from matplotlib.figure import Figure

from ..analyzers.base import ResultView
from ..analyzers.eigenvalues import DEFAULT_CLASS_EPS
from ..errors import UsageError
from ..utils.plotting import STYLE, grid as _grid, mode_colors, new_figure as _figure, styled

CLASS_STYLE = {  # KGA class code -> (name, colour, marker); codes as in cmdtool.analyzers.kga
    0: ("stable (|λ| < 1−ε)", "tab:blue", "o"),
    1: ("neutral (1−ε ≤ |λ| ≤ 1+ε)", "tab:green", "s"),
    2: ("unstable (|λ| > 1+ε)", "tab:red", "^"),
}
ZOOM_MAX_HALF_WIDTH = 0.25  # the eigenvalue zoom shows at most |λ − 1| <= this


def declared_figure(spec, view: ResultView) -> Figure:
    """Draw an analyzer's declared figure (:class:`~cmdtool.analyzers.base.FigureSpec`) of ``view``: its ``draw``,
    ``"module:function"``, is imported here, only when the report draws it."""
    import importlib

    module, _, function = spec.draw.partition(":")
    return getattr(importlib.import_module(module), function)(view)


# ---------------------------------------------------------------------------------------------- inputs
def _require(view: ResultView, methods: tuple[str, ...], what: str) -> None:
    if view.method not in methods:
        raise UsageError(f"{what} needs a {' or '.join(methods)} result, got a {view.method} result")


# ---------------------------------------------------------------------------------------------- CMD
def clustered_order(sample_modes: np.ndarray, linkage: np.ndarray) -> np.ndarray:
    """Order of the sampled weights by mode (mode 0 first), by dendrogram leaf order inside a mode: the
    |correlation| matrix in this order is block-diagonal by mode (paper 000 Fig. 1, 9)."""
    from scipy.cluster.hierarchy import leaves_list

    sample_modes = np.asarray(sample_modes)
    position = np.empty(len(sample_modes), dtype=np.int64)
    if len(sample_modes) > 1:
        position[leaves_list(np.asarray(linkage, dtype=np.float64))] = np.arange(len(sample_modes))
    else:
        position[:] = 0
    return np.lexsort((position, sample_modes))


def correlation_matrix_figure(cmd, max_pixels: int = 400) -> Figure:
    """|corr| of the K sampled trajectories (C1, Eq. 4), rows and columns ordered by mode (Fig. 1, 9)."""
    view = ResultView(cmd)
    _require(view, ("cmd",), "the correlation matrix")
    correlation = view.small("correlation")
    sample_modes = view.small("sample_modes").astype(np.int64)
    order = clustered_order(sample_modes, view.small("linkage"))
    ordered = correlation[np.ix_(order, order)]
    modes = sample_modes[order]
    # more rows than pixels: average s×s blocks (the figure shows ~500 px; this keeps the PNG small and
    # shows block structure rather than noise). Tick positions stay in sample units through `extent`.
    step = -(-len(order) // max_pixels)
    if step > 1:
        size = -(-len(order) // step) * step
        padded = np.full((size, size), np.nan)
        padded[:len(order), :len(order)] = ordered
        ordered = np.nanmean(padded.reshape(size // step, step, size // step, step), axis=(1, 3))
    n_modes = int(view.metrics.get("modes", modes.max() + 1))
    bounds = np.flatnonzero(np.diff(modes)) + 1
    with rc_context(STYLE):
        fig = _figure(7.2, 6.2)
        ax = fig.add_subplot()
        # after the averaging the image has fewer pixels than the axes: nearest keeps blocks sharp (and small)
        image = ax.imshow(ordered, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest",
                          extent=(-0.5, step * ordered.shape[1] - 0.5, step * ordered.shape[0] - 0.5, -0.5))
        for b in bounds:  # mode boundaries
            ax.axhline(b - 0.5, color="white", lw=0.6)
            ax.axvline(b - 0.5, color="white", lw=0.6)
        starts = np.concatenate([[0], bounds])
        stops = np.concatenate([bounds, [len(modes)]])
        centres = (starts + stops - 1) / 2
        # label only modes wide enough to carry a tick label
        wide = (stops - starts) >= max(1, len(modes) // 60)
        ax.set_xticks(centres[wide], [str(m) for m in modes[starts][wide]])
        ax.set_yticks(centres[wide], [str(m) for m in modes[starts][wide]])
        ax.set_xlabel("sampled weight, ordered by mode (tick: mode number)")
        ax.set_ylabel("sampled weight, ordered by mode")
        ax.set_title(f"Clustered |correlation| of {len(modes):,} sampled weight trajectories "
                     f"({n_modes} modes)" + (f"\n(shown as means of {step}×{step} blocks)" if step > 1 else ""))
        fig.colorbar(image, ax=ax, shrink=0.85, label="|corr(w_i, w_j)| (dimensionless)")
    return fig


@dataclass
class CMDSample:
    """Rows of the CMD sample with their fitted mode and coefficients (what the trajectory figures draw)."""

    indices: np.ndarray        # (k,) store rows
    values: np.ndarray         # (k, T) float32 trajectories over the fitted window
    modes: np.ndarray          # (k,) mode assigned by the fit pass (Eq. 5); < 0: not modelled
    a: np.ndarray              # (k,)
    b: np.ndarray              # (k,)
    references: np.ndarray     # (M, T) reference trajectories
    reference_indices: np.ndarray
    labels: np.ndarray         # (T,) epoch labels
    names: list                # (k,) weight names, e.g. "3.weight[2,1,0,0]"
    mode_sizes: list           # weights per mode over the whole network


def load_cmd_sample(cmd, store=None, max_rows: int = 2000, seed: int = 0) -> CMDSample:
    """Read the CMD sample's trajectories (at most ``max_rows`` of them, a fixed-seed subset) and look up their
    mode, a and b in the stored N-long arrays (only the chunks holding those rows are read). Read once per view:
    the figures of one report share it."""
    view = ResultView(cmd)
    _require(view, ("cmd",), "the CMD sample")
    store = view.store(store)
    key = ("cmd_sample", str(store.path), max_rows, seed)
    if key not in view.cache:
        view.cache[key] = _read_cmd_sample(view, store, max_rows, seed)
    return view.cache[key]


def _read_cmd_sample(view: ResultView, store, max_rows: int, seed: int) -> CMDSample:
    indices = np.asarray(view.small("sampled_indices"), dtype=np.int64)
    if len(indices) > max_rows:
        rng = np.random.default_rng(seed)
        indices = np.sort(rng.choice(indices, size=max_rows, replace=False))
    values = store.read_rows(indices, view.window)
    modes = np.asarray(view.lazy("mode").get_orthogonal_selection((indices,)), dtype=np.int64)
    a = np.asarray(view.lazy("A").get_orthogonal_selection((indices,)), dtype=np.float64)
    b = np.asarray(view.lazy("B").get_orthogonal_selection((indices,)), dtype=np.float64)
    return CMDSample(indices, values, modes, a, b, view.small("reference_trajectories").astype(np.float64),
                     view.small("reference_indices"), view.labels, store.layout.row_names(indices),
                     list(view.metrics.get("mode_sizes", [])))


def normalise_unit_range(values: np.ndarray) -> np.ndarray:
    """Paper 000 App. A.2: w̃ = (w − min w) / (max w − min w), per trajectory; constant rows give NaN."""
    values = np.asarray(values, dtype=np.float64)
    low = values.min(axis=-1, keepdims=True)
    span = values.max(axis=-1, keepdims=True) - low
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(span > 0, (values - low) / np.where(span > 0, span, 1.0), np.nan)


def mode_statistics(sample: CMDSample, mode: int, correlation=None, sample_modes=None) -> dict:
    """Normalised member mean/std, the normalised reference and the paper's corr1/corr2 (Fig. 6) of one mode.

    Members anti-correlated with the reference (a < 0) are mirrored before the App. A.2 normalisation, so they
    do not cancel the mean: CMD models them as −|a|·r + b, i.e. the same dynamics upside down.
    """
    members = (sample.modes == mode) & np.isfinite(sample.values).all(axis=1)
    aligned = np.where(sample.a[members, None] < 0, -sample.values[members], sample.values[members])
    normalised = normalise_unit_range(aligned)
    normalised = normalised[np.isfinite(normalised).all(axis=1)]
    reference = normalise_unit_range(sample.references[mode])
    out = {"members": int(len(normalised)), "reference": reference,
           "mean": normalised.mean(axis=0) if len(normalised) else None,
           "std": normalised.std(axis=0) if len(normalised) else None, "corr1": None, "corr2": None}
    if len(normalised) > 1 and np.ptp(out["mean"]) > 0 and np.all(np.isfinite(reference)):
        out["corr2"] = float(np.corrcoef(out["mean"], reference)[0, 1])
    if correlation is not None and sample_modes is not None:
        inside = np.flatnonzero(np.asarray(sample_modes) == mode)
        if len(inside) > 1:
            block = np.asarray(correlation)[np.ix_(inside, inside)]
            out["corr1"] = float(block[np.triu_indices(len(inside), 1)].mean())
    return out


def mode_trajectories_figure(cmd, store=None, sample: CMDSample | None = None, max_modes: int = 12) -> Figure:
    """Per mode: the reference trajectory and the mean ± std of its sampled members, each normalised to [0, 1]
    as in App. A.2 (paper 000 Fig. 6, 8). Titles give the mode's size and the paper's corr1 / corr2."""
    view = ResultView(cmd)
    _require(view, ("cmd",), "the mode trajectories")
    sample = sample or load_cmd_sample(view, store)
    correlation, sample_modes = view.small("correlation"), view.small("sample_modes")
    n_modes = min(len(sample.references), max_modes)
    colors = mode_colors(len(sample.references))
    rows, cols = _grid(n_modes, 4)
    with rc_context(STYLE):
        fig = _figure(3.0 * cols, 2.6 * rows + 0.5)
        axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
        for m in range(rows * cols):
            ax = axes.flat[m]
            if m >= n_modes:
                ax.set_visible(False)
                continue
            stats = mode_statistics(sample, m, correlation, sample_modes)
            if stats["mean"] is not None:
                ax.fill_between(sample.labels, stats["mean"] - stats["std"], stats["mean"] + stats["std"],
                                color=colors[m], alpha=0.25, lw=0, label="members: mean ± std")
                ax.plot(sample.labels, stats["mean"], color=colors[m], lw=1.2, ls="--", label="members: mean")
            ax.plot(sample.labels, stats["reference"], color="black", lw=1.4, label="reference weight")
            size = sample.mode_sizes[m] if m < len(sample.mode_sizes) else None
            detail = [f"{size:,} weight{'s' if size != 1 else ''}" if size is not None else None,
                      f"corr1 {stats['corr1']:.2f}" if stats["corr1"] is not None else None,
                      f"corr2 {stats['corr2']:.2f}" if stats["corr2"] is not None else None]
            ax.set_title(f"mode {m}" + (f" · {detail[0]}" if detail[0] else "") + "\n"
                         + " · ".join(d for d in detail[1:] if d), fontsize=9)
            if not np.all(np.isfinite(stats["reference"])):
                ax.text(0.5, 0.6, "constant reference\n(this mode does not move)", transform=ax.transAxes,
                        ha="center", fontsize=8)
            elif stats["members"] == 0:
                ax.text(0.5, 0.5, "no moving sampled member", transform=ax.transAxes, ha="center", fontsize=8)
            ax.set_ylim(-0.25, 1.25)
            if m % cols == 0:
                ax.set_ylabel("normalised weight\n(min-max, [0, 1])")
            if m // cols == rows - 1 or m + cols >= n_modes:
                ax.set_xlabel("epoch")
                ax.xaxis.set_tick_params(labelbottom=True)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=3)
        shown = f" (first {n_modes} of {len(sample.references)})" if n_modes < len(sample.references) else ""
        fig.suptitle(f"CMD modes{shown}: reference trajectory and sampled members "
                     f"({len(sample.indices):,} sampled weights)")
    return fig


def reconstruction_examples_figure(cmd, store=None, sample: CMDSample | None = None, per_mode: int = 3,
                                   max_modes: int = 8, seed: int = 0) -> Figure:
    """A few sampled weights per mode (raw values) with their CMD reconstruction a_i r_m(t) + b_i (Fig. 7)."""
    view = ResultView(cmd)
    _require(view, ("cmd",), "the reconstruction examples")
    sample = sample or load_cmd_sample(view, store)
    n_modes = min(len(sample.references), max_modes)
    rng = np.random.default_rng(seed)
    rows, cols = _grid(n_modes, 4)
    with rc_context(STYLE):
        fig = _figure(3.0 * cols, 2.4 * rows + 0.6)
        axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
        line_colors = ["tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink"]
        for m in range(rows * cols):
            ax = axes.flat[m]
            if m >= n_modes:
                ax.set_visible(False)
                continue
            members = np.flatnonzero(sample.modes == m)
            chosen = np.sort(rng.choice(members, size=min(per_mode, len(members)), replace=False)) \
                if len(members) else members
            for j, row in enumerate(chosen):
                color = line_colors[j % len(line_colors)]
                model = sample.a[row] * sample.references[m] + sample.b[row]
                ax.plot(sample.labels, sample.values[row], color=color, lw=1.0, alpha=0.9)
                ax.plot(sample.labels, model, color=color, lw=1.6, ls="--")
            ax.set_title(f"mode {m}", fontsize=9)
            if not len(chosen):
                ax.text(0.5, 0.5, "no sampled member", transform=ax.transAxes, ha="center", fontsize=8)
            if m % cols == 0:
                ax.set_ylabel("weight value")
            if m // cols == rows - 1 or m + cols >= n_modes:
                ax.set_xlabel("epoch")
                ax.xaxis.set_tick_params(labelbottom=True)
        from matplotlib.lines import Line2D

        fig.legend([Line2D([], [], color="grey", lw=1.0), Line2D([], [], color="grey", lw=1.6, ls="--")],
                   ["stored trajectory (SGD)", "CMD reconstruction a·r(t) + b"], loc="outside lower center",
                   ncols=2)
        fig.suptitle(f"CMD reconstruction of {per_mode} sampled weights per mode (colour = one weight)")
    return fig


def layer_modes_figure(cmd, max_layers: int = 60) -> Figure:
    """Share of each layer's weights in each mode, stacked (paper 000 Fig. 10b). Tensors CMD does not model
    (BatchNorm statistics under ``--bn-stats source``) are drawn as one grey bar."""
    view = ResultView(cmd)
    _require(view, ("cmd",), "the modes-per-layer figure")
    counts = np.asarray(view.small("layer_mode_counts"), dtype=np.float64)   # (layers, M)
    layers = view.metrics.get("layers", {})
    names = list(layers) if len(layers) == counts.shape[0] else [f"tensor {k}" for k in range(counts.shape[0])]
    sizes = np.array([layers[n]["rows"] if n in layers else counts[k].sum() for k, n in enumerate(names)],
                     dtype=np.float64)
    if len(names) > max_layers:  # keep the largest tensors; say so in the title
        keep = np.sort(np.argsort(sizes)[::-1][:max_layers])
        names, counts, sizes = [names[k] for k in keep], counts[keep], sizes[keep]
    n_layers, n_modes = counts.shape
    shares = counts / np.maximum(sizes[:, None], 1)
    not_modelled = np.clip(1.0 - shares.sum(axis=1), 0.0, 1.0)
    colors = mode_colors(n_modes)
    with rc_context(STYLE):
        fig = _figure(8.0, 1.2 + 0.28 * n_layers)
        ax = fig.add_subplot()
        y = np.arange(n_layers)
        left = np.zeros(n_layers)
        for m in range(n_modes):
            ax.barh(y, 100 * shares[:, m], left=100 * left, color=colors[m], label=f"mode {m}", height=0.8)
            left += shares[:, m]
        if not_modelled.max() > 1e-9:
            ax.barh(y, 100 * not_modelled, left=100 * left, color="lightgrey", hatch="//", height=0.8,
                    label="not modelled (kept as stored)")
        ax.set_yticks(y, [f"{n} ({int(s):,})" for n, s in zip(names, sizes)])
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("share of the tensor's weights (%)")
        ax.set_ylabel("tensor (number of weights)")
        ax.set_title("How each tensor's weights spread over the CMD modes")
        fig.legend(loc="outside right upper", fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------- errors
def epoch_error_series(results) -> list[dict]:
    """Per-epoch relative errors ‖w_t − ŵ_t‖/‖w_t‖ of every model among ``results`` (results or fitted analyzers
    of registered methods), as each analyzer gives them (CMD: post-hoc and online). A method that extends another
    one present (KGA, whose model is DMD's) is left out."""
    from ..analyzers import analyzer_classes

    classes = analyzer_classes()
    views = [ResultView(r) for r in results]
    present = {v.method for v in views}
    several_names = len({v.name for v in views}) > 1
    series = []
    for view in views:
        cls = classes.get(view.method)
        if cls is None or cls.extends in present:
            continue
        for entry in cls.error_series(view):
            if several_names:
                entry["label"] += f" ({view.name})"
            series.append(entry)
    return series


def epoch_error_figure(results) -> Figure:
    """Reconstruction error per epoch of every method present (log scale)."""
    series = epoch_error_series(results)
    if not series:
        raise UsageError("no result with per-epoch errors (of a registered analyzer)")
    with rc_context(STYLE):
        fig = _figure(7.5, 4.3)
        ax = fig.add_subplot()
        markers = ["o", "s", "^", "D", "v", "P", "X"]
        for k, s in enumerate(series):
            # an exact fit (error 0) would vanish from log axes: draw it at the float64 floor instead
            errors = np.where(np.isfinite(s["errors"]), np.maximum(s["errors"], 1e-16), np.nan)
            ax.plot(s["labels"], errors, marker=markers[k % len(markers)], markersize=3, lw=1.3, label=s["label"])
            if "warmup_label" in s:
                ax.axvline(s["warmup_label"], color="grey", ls=":", lw=1)
                ax.annotate("end of online warm-up", (s["warmup_label"], 1), xycoords=("data", "axes fraction"),
                            xytext=(3, -12), textcoords="offset points", fontsize=8, color="grey")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("relative error ‖w_t − ŵ_t‖ / ‖w_t‖")
        ax.set_title("Reconstruction error per epoch")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    return fig


# ---------------------------------------------------------------------------------------------- DMD / KGA
def eigenvalue_classes(view: ResultView) -> tuple[np.ndarray, float, bool]:
    """(class per eigenvalue, ε, from_kga): a KGA result's classes, or DMD's classified at KGA's default ε."""
    from ..analyzers.eigenvalues import classify_eigenvalues

    if view.method == "kga":
        return np.asarray(view.small("classes"), dtype=np.int64), float(view.config.get("eps", DEFAULT_CLASS_EPS)), True
    return classify_eigenvalues(view.small("eigenvalues"), DEFAULT_CLASS_EPS).astype(np.int64), DEFAULT_CLASS_EPS, False


def eigenvalues_figure(dmd_or_kga) -> Figure:
    """DMD eigenvalues on the complex plane with the unit circle, coloured by KGA class (paper 003 Fig. 2).
    Left: the whole unit disc; right: a zoom on the eigenvalues, with the neutral band 1 ± ε. Marker area
    grows with the amplitude |b_k|."""
    view = ResultView(dmd_or_kga)
    _require(view, ("dmd", "kga"), "the eigenvalue figure")
    eigenvalues = np.asarray(view.small("eigenvalues"), dtype=np.complex128)
    amplitudes = np.abs(np.asarray(view.small("amplitudes")))
    classes, eps, from_kga = eigenvalue_classes(view)
    sizes = 20 + 140 * np.sqrt(amplitudes / amplitudes.max()) if amplitudes.size and amplitudes.max() > 0 \
        else np.full(eigenvalues.shape, 40.0)
    theta = np.linspace(0, 2 * np.pi, 721)
    with rc_context(STYLE):
        fig = _figure(10.0, 4.8)
        axes = fig.subplots(1, 2)
        for ax, zoom in zip(axes, (False, True)):
            for radius, style in ((1.0, dict(color="black", lw=1.0)), (1 - eps, dict(color="grey", lw=0.7, ls="--")),
                                  (1 + eps, dict(color="grey", lw=0.7, ls="--"))):
                ax.plot(radius * np.cos(theta), radius * np.sin(theta), **style)
            for code, (name, color, marker) in CLASS_STYLE.items():
                sel = classes == code
                if sel.any():
                    ax.scatter(eigenvalues.real[sel], eigenvalues.imag[sel], s=sizes[sel], c=color, marker=marker,
                               edgecolors="black", linewidths=0.4, alpha=0.85,
                               label=f"{name}: {int(sel.sum())}", zorder=3)
            ax.axhline(0, color="lightgrey", lw=0.6, zorder=0)
            ax.axvline(0, color="lightgrey", lw=0.6, zorder=0)
            ax.set_xlabel("Re λ")
            ax.set_ylabel("Im λ")
            ax.set_aspect("equal")
            if zoom:
                # training dynamics live near λ = 1 (slow modes); the zoom shows them against the band 1 ± ε
                distance = np.abs(eigenvalues - 1.0)
                near = distance[distance <= ZOOM_MAX_HALF_WIDTH]
                half = float(np.clip(1.15 * near.max() if near.size else 0.0, 5 * eps, ZOOM_MAX_HALF_WIDTH))
                ax.set_xlim(1.0 - half, 1.0 + half)
                ax.set_ylim(-half, half)
                ax.set_title(f"zoom near λ = 1 (dashed: 1 ± ε); {int(near.size)} of {eigenvalues.size} shown")
            else:
                ax.set_xlim(-1.25, 1.25)
                ax.set_ylim(-1.25, 1.25)
                ax.set_title("unit circle")
        axes[0].legend(loc="lower left", fontsize=8)
        source = f"KGA classes, ε = {eps:g}" if from_kga else f"classes at ε = {eps:g} (no KGA result)"
        fig.suptitle(f"DMD eigenvalues (rank {eigenvalues.size}; {source}; marker size ∝ √|b_k|)")
    return fig


def kwm_mask_figure(kga, max_layers: int = 60) -> Figure:
    """Fraction of each tensor's weights that KWM masks out of KGA (paper 003 Eq. 15)."""
    view = ResultView(kga)
    _require(view, ("kga",), "the KWM mask figure")
    masked = np.asarray(view.small("masked_per_tensor"), dtype=np.float64)
    sizes = np.asarray(view.small("tensor_sizes"), dtype=np.float64)
    names = list(view.value("tensor_names") or [f"tensor {k}" for k in range(len(sizes))])
    overall = float(masked.sum() / max(sizes.sum(), 1))
    if len(names) > max_layers:
        keep = np.sort(np.argsort(sizes)[::-1][:max_layers])
        names, masked, sizes = [names[k] for k in keep], masked[keep], sizes[keep]
    fraction = masked / np.maximum(sizes, 1)
    with rc_context(STYLE):
        fig = _figure(7.5, 1.3 + 0.28 * len(names))
        ax = fig.add_subplot()
        y = np.arange(len(names))
        ax.barh(y, 100 * fraction, color="tab:purple", height=0.7)
        for yy, f, m in zip(y, fraction, masked):
            ax.text(100 * f + 1, yy, f"{100 * f:.1f}% ({int(m):,})", va="center", fontsize=8)
        ax.set_yticks(y, [f"{n} ({int(s):,})" for n, s in zip(names, sizes)])
        ax.invert_yaxis()
        ax.set_xlim(0, 115)
        ax.set_xlabel("weights masked out by KWM (% of the tensor)")
        ax.set_ylabel("tensor (number of weights)")
        window = view.config.get("window")
        ax.set_title(f"KWM masks: {100 * overall:.1f}% of all weights masked"
                     + (f" (window s = {window} epochs)" if window is not None else ""))
    return fig


# ---------------------------------------------------------------------------------------------- PCA
def pca_variance_figure(pca, max_dims: int = 40) -> Figure:
    """Explained-variance ratio per principal direction, with the cumulative ratio."""
    view = ResultView(pca)
    _require(view, ("pca",), "the PCA variance figure")
    ratio = np.asarray(view.small("explained_variance_ratio"), dtype=np.float64)[:max_dims]
    k = np.arange(1, len(ratio) + 1)
    with rc_context(STYLE):
        fig = _figure(7.5, 4.0)
        ax = fig.add_subplot()
        ax.bar(k, 100 * ratio, color="tab:blue", label="per direction")
        ax.plot(k, 100 * np.cumsum(ratio), color="tab:red", marker="o", markersize=3, label="cumulative")
        ax.set_xlabel("principal direction k")
        ax.set_ylabel("explained variance (% of the total)")
        ax.set_ylim(0, 105)
        ax.set_title(f"PCA of the checkpoints: the first direction explains {100 * ratio[0]:.1f}%, "
                     f"{len(ratio)} explain {100 * ratio.sum():.1f}%")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(loc="center right")
    return fig


def pca_path_figure(pca) -> Figure:
    """The checkpoints' path in the first two PCA coordinates, coloured by epoch."""
    view = ResultView(pca)
    _require(view, ("pca",), "the PCA path figure")
    coordinates = np.asarray(view.small("coordinates"), dtype=np.float64)
    ratio = np.asarray(view.small("explained_variance_ratio"), dtype=np.float64)
    labels = view.labels
    second = coordinates[:, 1] if coordinates.shape[1] > 1 else np.zeros(len(coordinates))
    with rc_context(STYLE):
        fig = _figure(6.5, 5.0)
        ax = fig.add_subplot()
        ax.plot(coordinates[:, 0], second, color="lightgrey", lw=1.0, zorder=1)
        points = ax.scatter(coordinates[:, 0], second, c=labels, cmap="viridis", s=22, zorder=2)
        for idx, text in ((0, f"epoch {labels[0]}"), (-1, f"epoch {labels[-1]}")):
            ax.annotate(text, (coordinates[idx, 0], second[idx]), textcoords="offset points", xytext=(6, 6),
                        fontsize=9)
        ax.set_xlabel(f"PC 1 coordinate (weight units; {100 * ratio[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC 2 coordinate (weight units; {100 * ratio[1]:.1f}% of variance)"
                      if len(ratio) > 1 else "PC 2 (not fitted)")
        ax.set_title("Training path of the checkpoints in the first two principal directions")
        ax.margins(0.12)  # room for the epoch annotations
        ax.grid(True, alpha=0.3)
        fig.colorbar(points, ax=ax, label="epoch")
    return fig


# ---------------------------------------------------------------------------------------------- evaluation
def evaluation_records(evaluation) -> list[dict]:
    """The ``records`` of an evaluation result: ``{"method", "epoch", "metrics": {name: value}}`` each."""
    view = ResultView(evaluation)
    records = view.attrs.get("records")
    if not isinstance(records, list):
        raise UsageError(f"evaluation result {view.name!r} holds no 'records' list")
    return records


def evaluation_figure(evaluation) -> Figure:
    """One panel per metric, one line per method (original, cmd, cmd-online, dmd, pca, ema, swa, ...)."""
    records = evaluation_records(evaluation)
    metric_names = list(dict.fromkeys(name for r in records for name in (r.get("metrics") or {})))
    if not metric_names:
        raise UsageError("the evaluation result's records hold no metric values")
    methods = list(dict.fromkeys(str(r["method"]) for r in records))
    rows, cols = _grid(len(metric_names), 3)
    preferred = {"original": "black", "cmd": "tab:blue", "cmd-online": "tab:cyan", "dmd": "tab:red",
                 "pca": "tab:green", "ema": "tab:orange", "swa": "tab:purple"}
    spare = iter(["tab:brown", "tab:pink", "tab:olive", "tab:gray"] * 10)
    colors = {m: preferred.get(m) or next(spare) for m in methods}
    with rc_context(STYLE):
        fig = _figure(4.4 * cols, 3.4 * rows + 0.5)
        axes = fig.subplots(rows, cols, squeeze=False)
        for k in range(rows * cols):
            ax = axes.flat[k]
            if k >= len(metric_names):
                ax.set_visible(False)
                continue
            metric = metric_names[k]
            for method in methods:
                points = sorted((int(r["epoch"]), float(r["metrics"][metric])) for r in records
                                if str(r["method"]) == method and metric in (r.get("metrics") or {})
                                and r["metrics"][metric] is not None)
                if not points:
                    continue
                x, y = zip(*points)
                # the original run on top, thin, without markers: models that track it closely stay visible
                is_original = method == "original"
                ax.plot(x, y, marker=None if is_original else "o", markersize=3, lw=1.2 if is_original else 1.4,
                        color=colors[method], label=method, zorder=5 if is_original else 2)
            ax.set_title(metric)
            ax.set_xlabel("epoch")
            ax.set_ylabel(_metric_label(metric, records))
            ax.grid(True, alpha=0.3)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        if len(handles) > 1:
            fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 7))
        fig.suptitle("Evaluation of the original and modelled checkpoints per epoch")
    return fig


def _metric_label(metric: str, records: list[dict]) -> str:
    """Axis label with the unit where the name tells it (accuracies: fraction or %, from the values' range)."""
    if "acc" not in metric.lower():
        return metric
    values = [float(r["metrics"][metric]) for r in records
              if isinstance(r.get("metrics"), dict) and r["metrics"].get(metric) is not None]
    return f"{metric} ({'fraction correct' if values and max(values) <= 1.0 else '%'})"


# ---------------------------------------------------------------------------------------------- compare
def comparison_figure(comparison) -> Figure:
    """Per-epoch relative error of every method of a ``cmdtool compare`` run (log scale), with each model's size."""
    fig = Figure(figsize=(7, 4), layout="tight")
    ax = fig.add_subplot()
    for row in comparison.methods:
        errors = np.maximum(np.asarray(row.epoch_relative_error), 1e-12)  # exact fits would vanish on log axes
        ax.plot(comparison.labels, errors, marker="o", markersize=3,
                label=f"{row.method} ({row.stored_floats:,} floats)")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("‖w_t − ŵ_t‖ / ‖w_t‖")
    ax.set_title(f"reconstruction error per epoch (N = {comparison.n_rows:,})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


# ---------------------------------------------------------------------------------------------- POD
def pod_spectrum_figure(view: ResultView, max_values: int = 60) -> Figure:
    """POD: singular values σ_k / σ_1 of the window and the share of Σσ² that k modes leave out (log scale), with the
    kept rank."""
    view = ResultView(view)
    sigma = np.asarray(view.small("singular_values"), dtype=np.float64)
    rank = int(view.value("rank"))
    total = max(float(np.sum(sigma**2)), np.finfo(float).tiny)
    left_out = 1.0 - np.cumsum(sigma**2) / total           # after keeping k modes
    shown = min(len(sigma), max(max_values, rank))
    k = np.arange(1, shown + 1)
    with styled():
        fig = _figure(7.5, 4.0)
        ax = fig.add_subplot()
        ax.semilogy(k, np.maximum(sigma[:shown] / sigma[0], 1e-16), "o-", markersize=3, color="tab:blue",
                    label="singular value σ_k / σ_1")
        ax.semilogy(k[:-1], np.maximum(left_out[:shown - 1], 1e-16), "s-", markersize=3, color="tab:red",
                    label="share of Σσ² left out by k modes")
        ax.axvline(rank, color="grey", ls="--", lw=1, label=f"rank kept: {rank}")
        ax.set_xlabel("mode k")
        ax.set_ylabel("relative size (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper right")
        ax.set_title(f"POD spectrum: {rank} modes keep {100 * (1 - left_out[rank - 1]):.4f}% of Σσ²")
    return fig


def pod_coefficients_figure(view: ResultView, max_modes: int = 6) -> Figure:
    """POD: time coefficients C[:, k] = σ_k V[:, k] of the first modes over the epochs (weight units)."""
    view = ResultView(view)
    coefficients = np.asarray(view.small("coefficients"), dtype=np.float64)
    labels = view.labels
    with styled():
        fig = _figure(7.5, 4.0)
        axes = fig.subplots(1, 2)
        axes[0].plot(labels, coefficients[:, 0], color="black", lw=1.4)
        axes[0].set_title("mode 1 (carries the mean)")
        for k in range(1, min(max_modes, coefficients.shape[1])):
            axes[1].plot(labels, coefficients[:, k], lw=1.2, label=f"mode {k + 1}")
        if coefficients.shape[1] > 1:
            axes[1].legend(fontsize=8)
        axes[1].set_title("modes 2.. (the motion)")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel("coefficient σ_k v_k(t)")
        fig.suptitle("POD time coefficients of the checkpoints")
    return fig


__all__ = ["CMDSample", "ResultView", "clustered_order", "comparison_figure", "correlation_matrix_figure",
           "declared_figure", "epoch_error_figure", "epoch_error_series", "eigenvalues_figure", "evaluation_figure",
           "evaluation_records", "kwm_mask_figure", "layer_modes_figure", "load_cmd_sample", "mode_colors",
           "mode_statistics", "mode_trajectories_figure", "normalise_unit_range", "pca_path_figure",
           "pca_variance_figure", "pod_coefficients_figure", "pod_spectrum_figure", "reconstruction_examples_figure"]
