"""``cmdtool report``: every figure the store's analyses allow, an ``index.html`` and a ``summary.json``.

Which results: for each kind (cmd, dmd, kga, pca, evaluation) the one named ``name``; when there is none of that
name but exactly one of the kind, that one (said in a note). A figure whose analysis is missing is skipped with a
note that says which command makes it; the notes are printed, listed in the html and in ``summary.json``. A store
with no analysis at all is a usage error (exit 2): a report of notes only would tell the user nothing that the
error message does not.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CmdtoolError, UsageError
from ..output_folder import OutputFolder
from ..progress import NullProgress
from ..store.store import now_iso
from . import figures as F

REPORTED_KINDS = ("cmd", "dmd", "kga", "pca", "evaluation")
FORMATS = ("png", "svg", "pdf")
MAKE = {  # the command that produces each kind, for the notes of skipped figures
    "cmd": "cmdtool decompose -m cmd",
    "dmd": "cmdtool decompose -m dmd",
    "kga": "cmdtool decompose -m kga",
    "pca": "cmdtool decompose -m pca",
    "evaluation": "cmdtool evaluate",
}


@dataclass
class FigureEntry:
    id: str
    title: str
    caption: str
    source: list                    # "<kind>/<name>" of the results drawn
    files: dict = field(default_factory=dict)  # format -> file name inside the report folder
    numbers: dict = field(default_factory=dict)


@dataclass
class Report:
    out_dir: str
    figures: list
    notes: list
    summary: dict

    def to_dict(self) -> dict:
        return self.summary


def pick_results(store, name: str, notes: list) -> dict:
    """The result of each reported kind to draw (see the module note); missing kinds are left out."""
    chosen = {}
    for kind in REPORTED_KINDS:
        names = [n for _, n in store.results.list(kind)]
        if name in names:
            chosen[kind] = store.results.get(kind, name)
        elif len(names) == 1:
            chosen[kind] = store.results.get(kind, names[0])
            notes.append(f"no {kind} result named {name!r}: using the only one, {names[0]!r}")
        elif names:
            notes.append(f"{kind} figures skipped: no {kind} result named {name!r} (present: {', '.join(names)}; "
                         f"choose one with --name)")
    return chosen


def _fmt(value, spec=".4g") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return format(value, spec) if isinstance(value, (int, float, np.number)) else str(value)


def headline(result, n_values: int) -> dict:
    """Key numbers of one analysis result (json-able)."""
    m = result.metrics
    out = {"kind": result.kind, "name": result.name}
    if result.kind == "evaluation":
        records = result.attrs.get("records") or []
        last = {}
        for r in records:
            method = str(r.get("method"))
            if method not in last or int(r["epoch"]) >= int(last[method]["epoch"]):
                last[method] = r
        out["final_epoch_metrics"] = {k: {"epoch": int(v["epoch"]), **(v.get("metrics") or {})}
                                      for k, v in last.items()}
        out["records"] = len(records)
        return out
    errors = m.get("epoch_relative_error") or []
    stored = m.get("stored_floats")
    out.update(relative_error=m.get("relative_error"), relative_error_motion=m.get("relative_error_motion"),
               final_epoch_error=errors[-1] if errors else None, stored_floats=stored,
               compression_ratio=(n_values / stored) if stored else None,
               epochs=[int(result.attrs["labels"][0]), int(result.attrs["labels"][-1])]
               if result.attrs.get("labels") else None)
    if result.kind == "cmd":
        out.update(modes=m.get("modes"), mode_sizes=m.get("mode_sizes"), sampled=m.get("sampled"))
        if m.get("online"):
            o = m["online"]
            out["online"] = {"warmup": o.get("warmup"), "relative_error": o.get("relative_error"),
                             "relative_error_motion": o.get("relative_error_motion"),
                             "final_epoch_error": (o.get("epoch_relative_error") or [None])[-1]}
    elif result.kind in ("dmd", "kga"):
        out["rank"] = result.attrs.get("rank")
        if result.kind == "kga":
            classes = result["classes"]
            out["classes"] = {"stable": int(np.sum(classes == 0)), "neutral": int(np.sum(classes == 1)),
                              "unstable": int(np.sum(classes == 2))}
            out["masked_fraction"] = result.attrs.get("masked_fraction")
    elif result.kind == "pca":
        ratio = result["explained_variance_ratio"]
        out.update(dims=result.attrs.get("dims"), explained_variance_ratio_first=[float(x) for x in ratio[:3]],
                   explained_variance_ratio_total=float(ratio.sum()))
    return out


def _plan(chosen: dict, store, notes: list) -> list:
    """(id, title, caption, sources, numbers, make_figure) for every figure the chosen results allow."""
    plan = []
    cmd, dmd, kga, pca, evaluation = (chosen.get(k) for k in REPORTED_KINDS)
    src = lambda *rs: [f"{r.kind}/{r.name}" for r in rs if r is not None]  # noqa: E731
    if cmd is not None:
        m = cmd.metrics
        sample_holder = {}

        def sample():  # read once, shared by the two trajectory figures
            if "sample" not in sample_holder:
                sample_holder["sample"] = F.load_cmd_sample(cmd, store)
            return sample_holder["sample"]

        plan += [
            ("cmd_correlation", "Clustered correlation matrix (CMD)",
             f"|corr| between the {m.get('sampled', 0):,} sampled weight trajectories (paper 000 Eq. 4), rows and "
             f"columns ordered by mode and, inside a mode, by the complete-linkage dendrogram: block-diagonal by "
             f"mode (paper 000 Fig. 1, 9). White lines separate the modes.",
             src(cmd), {"modes": m.get("modes"), "sampled weights": m.get("sampled")},
             lambda: F.correlation_matrix_figure(cmd)),
            ("cmd_modes", "Modes: reference and members (CMD)",
             "Per mode, the reference weight's trajectory (black) and the mean ± std of the sampled weights "
             "assigned to the mode, each trajectory min-max normalised to [0, 1] (paper 000 App. A.2; members with "
             "a < 0 are mirrored first). corr1: mean pairwise |corr| inside the mode's sample; corr2: corr of the "
             "members' mean with the reference (paper 000 Fig. 6).",
             src(cmd), {"mode sizes": m.get("mode_sizes")},
             lambda: F.mode_trajectories_figure(cmd, store, sample())),
            ("cmd_reconstructions", "Weights and their CMD reconstruction",
             "Three sampled weights per mode (solid) and their CMD model a_i r_m(t) + b_i (dashed), in weight "
             "units (paper 000 Fig. 7).",
             src(cmd), {"relative error": m.get("relative_error"),
                        "relative error to motion": m.get("relative_error_motion")},
             lambda: F.reconstruction_examples_figure(cmd, store, sample())),
            ("cmd_layer_modes", "Modes per layer (CMD)",
             "Share of each tensor's weights in each mode (paper 000 Fig. 10b); grey hatched: values CMD keeps as "
             "stored (BatchNorm running statistics under --bn-stats source).",
             src(cmd), {"kept rows": m.get("kept_rows"), "modelled rows": m.get("modelled_rows")},
             lambda: F.layer_modes_figure(cmd)),
        ]
    else:
        notes.append(f"CMD figures skipped (correlation matrix, modes, reconstructions, modes per layer): no cmd "
                     f"result; run `{MAKE['cmd']}`")
    error_sources = [r for r in (cmd, dmd, kga, pca) if r is not None]
    if error_sources:
        series = F.epoch_error_series(error_sources)
        numbers = {s["label"]: {"final epoch": float(s["errors"][-1]), "overall": s["relative_error"]}
                   for s in series}
        plan.append(("epoch_errors", "Reconstruction error per epoch",
                     "‖w_t − ŵ_t‖ / ‖w_t‖ per checkpoint for every model in the store (log scale). Online CMD equals "
                     "the original weights during its warm-up, so its curve starts at the end of the warm-up. A "
                     "KGA result is drawn only without a DMD result (its reconstruction is DMD's).",
                     src(*error_sources), numbers, lambda: F.epoch_error_figure(error_sources)))
    spectrum = kga if kga is not None else dmd
    if spectrum is not None:
        classes, eps, from_kga = F.eigenvalue_classes(F.ResultView(spectrum))
        counts = {F.CLASS_STYLE[c][0].split(" ")[0]: int(np.sum(classes == c)) for c in F.CLASS_STYLE}
        if not from_kga:
            notes.append(f"eigenvalue classes drawn at ε = {eps:g} from DMD: no kga result; run `{MAKE['kga']}`")
        plan.append(("eigenvalues", "DMD eigenvalues by Koopman class",
                     "DMD eigenvalues λ_k on the complex plane with the unit circle, coloured by KGA class (paper 003 "
                     "Sec. 3.1, Fig. 2): neutral within 1 ± ε, stable inside, unstable outside. Marker area grows "
                     "with |b_k|. Right: zoom near λ = 1.",
                     src(spectrum), {"rank": spectrum.attrs.get("rank"), "eps": eps, **counts},
                     lambda: F.eigenvalues_figure(spectrum)))
    else:
        notes.append(f"eigenvalue figure skipped: no dmd or kga result; run `{MAKE['dmd']}`")
    if kga is not None:
        plan.append(("kwm_masks", "KWM masked fraction per tensor",
                     "Weights whose non-neutral DMD component stays below ε over the last s epochs are masked out "
                     "of KGA (paper 003 Eq. 15); bars give each tensor's masked share.",
                     src(kga), {"masked fraction": kga.attrs.get("masked_fraction")},
                     lambda: F.kwm_mask_figure(kga)))
    else:
        notes.append(f"KWM mask figure skipped: no kga result; run `{MAKE['kga']}`")
    if pca is not None:
        ratio = pca["explained_variance_ratio"]
        plan += [
            ("pca_variance", "PCA explained variance",
             "Explained-variance ratio of each principal direction of the checkpoints (P-BFGS / DLDR subspace) "
             "and the cumulative ratio.",
             src(pca), {"directions": pca.attrs.get("dims"), "first": float(ratio[0]), "total": float(ratio.sum())},
             lambda: F.pca_variance_figure(pca)),
            ("pca_path", "Checkpoints in the first two PCA coordinates",
             "Each checkpoint's coordinates on the first two principal directions (weight units), coloured by "
             "epoch: the training path.",
             src(pca), {"PC1 + PC2 share": float(ratio[:2].sum())}, lambda: F.pca_path_figure(pca)),
        ]
    else:
        notes.append(f"PCA figures skipped: no pca result; run `{MAKE['pca']}`")
    if evaluation is not None:
        plan.append(("evaluation", "Metrics per epoch",
                     "Each metric of the evaluation result per epoch, one line per set of weights (original "
                     "checkpoints, CMD/DMD/PCA models, EMA/SWA averages, as present).",
                     src(evaluation), headline(evaluation, 0)["final_epoch_metrics"],
                     lambda: F.evaluation_figure(evaluation)))
    else:
        notes.append(f"metric curves skipped: no evaluation result; run `{MAKE['evaluation']}`")
    return plan


def build_report(store, out_dir="report", name: str = "default", formats=("png",), dpi: int = 110,
                 progress=None, force: bool = False) -> Report:
    """Write the figures (``formats``: png, svg, pdf), ``index.html`` and ``summary.json`` into ``out_dir``.

    ``force``: also write into a non-empty folder that cmdtool did not mark as its own (see
    :mod:`cmdtool.output_folder`)."""
    formats = list(dict.fromkeys(f.lower().lstrip(".") for f in formats)) or ["png"]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UsageError(f"unknown figure format {unknown[0]!r}: choose from {', '.join(FORMATS)}")
    progress = progress or NullProgress()
    notes: list[str] = []
    chosen = pick_results(store, name, notes)
    if not chosen:
        present = ", ".join(f"{k}/{n}" for k, n in store.results.list() if k != "gram") or "none"
        raise UsageError(f"store {store.path} holds no analysis results to report (results present: {present}); "
                         f"run `cmdtool decompose` first, e.g. `cmdtool decompose -m cmd -m dmd -m kga -m pca`")
    # The output-folder rule (cmdtool.output_folder): only files an earlier report wrote are replaced, never
    # inside the store or a source folder; staged and published whole, index.html last, so a killed run never
    # leaves an index.html that points at half-written or stale figures.
    folder = OutputFolder(out_dir, "report", force=force, store=store, replace=True,
                          last=("summary.json", "index.html"))
    with folder as staging:
        report = _write_report(store, chosen, notes, staging, formats, dpi, progress)
    report.out_dir = str(folder.path)
    return report


def _write_report(store, chosen, notes, out: Path, formats, dpi, progress) -> Report:
    plan = _plan(chosen, store, notes)
    entries: list[FigureEntry] = []
    with progress.task("report figures", total=len(plan), unit="figures") as task:
        for fig_id, title, caption, sources, numbers, make in plan:
            try:
                fig = make()
            except CmdtoolError as exc:  # e.g. an evaluation result without records: a note, not a crash
                notes.append(f"{title} skipped: {exc}")
                task.advance(1)
                continue
            entry = FigureEntry(fig_id, title, caption, sources, numbers=_jsonable(numbers))
            for fmt in formats:
                filename = f"{fig_id}.{fmt}"
                fig.savefig(out / filename, dpi=dpi)
                entry.files[fmt] = filename
            fig.clear()  # free the artists now; the Figure is not registered with pyplot, so nothing else holds it
            entries.append(entry)
            task.advance(1)
    n_values = store.n_rows * store.n_checkpoints
    summary = {
        "created_at": now_iso(),
        "store": str(store.path),
        "store_revision": store.revision,
        "weights": store.n_rows,
        "checkpoints": store.n_checkpoints,
        "epochs": [int(store.labels[0]), int(store.labels[-1])] if store.n_checkpoints else None,
        "results": {f"{r.kind}/{r.name}": headline(r, n_values) for r in chosen.values()},
        "figures": [asdict(e) for e in entries],
        "notes": notes,
    }
    summary = _jsonable(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "index.html").write_text(render_html(summary))
    return Report(str(out), entries, notes, summary)


def _jsonable(value):
    from ..store.results import _jsonable as to_json

    return to_json(value)


# ---------------------------------------------------------------------------------------------- html
_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; margin-top: 0.4em; }
.notes li { color: #8a5a00; } .small { font-size: 0.85em; color: #666; }
"""


def _number(value) -> str:
    if isinstance(value, float):
        return _fmt(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(_number(v) for v in value[:20]) + (" ..." if len(value) > 20 else "")
    if isinstance(value, dict):
        return "; ".join(f"{k} {_number(v)}" for k, v in value.items())
    return "-" if value is None else str(value)


def render_html(summary: dict) -> str:
    """A self-contained page: key numbers, every figure with its caption, the notes."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>cmdtool report</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>cmdtool report</h1>",
             f"<p class='small'>store <code>{esc(summary['store'])}</code> (revision {summary['store_revision']}): "
             f"{summary['weights']:,} weights × {summary['checkpoints']} checkpoints"
             + (f", epochs {summary['epochs'][0]}..{summary['epochs'][1]}" if summary.get("epochs") else "")
             + f"; made {esc(summary['created_at'])}</p>"]
    models = [h for h in summary["results"].values() if h["kind"] != "evaluation"]
    if models:
        parts.append("<h2>Key numbers</h2><table><tr><th>result</th><th>‖W−Ŵ‖/‖W‖</th><th>‖W−Ŵ‖/‖W−mean‖</th>"
                     "<th>last epoch</th><th>stored floats</th><th>compression</th><th>details</th></tr>")
        for h in models:
            details = {k: v for k, v in h.items() if k in ("modes", "rank", "dims", "classes", "masked_fraction",
                                                           "explained_variance_ratio_total", "online")}
            ratio = h.get("compression_ratio")
            parts.append(f"<tr><td>{esc(h['kind'])}/{esc(h['name'])}</td><td>{_fmt(h.get('relative_error'))}</td>"
                         f"<td>{_fmt(h.get('relative_error_motion'))}</td><td>{_fmt(h.get('final_epoch_error'))}</td>"
                         f"<td>{_number(h.get('stored_floats'))}</td>"
                         f"<td>{_fmt(ratio, '.1f') + '×' if ratio else '-'}</td>"
                         f"<td>{esc(_number(details))}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Figures</h2>" if summary["figures"] else "<h2>Figures</h2><p>No figure could be made.</p>")
    for fig in summary["figures"]:
        image = fig["files"].get("png") or fig["files"].get("svg")
        others = " ".join(f"<a href='{esc(f)}'>{esc(fmt)}</a>" for fmt, f in fig["files"].items())
        parts.append(f"<h3 id='{esc(fig['id'])}'>{esc(fig['title'])}</h3><figure>")
        if image:
            parts.append(f"<img src='{esc(image)}' alt='{esc(fig['title'])}'>")
        numbers = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(_number(v))}</td></tr>"
                          for k, v in fig["numbers"].items())
        parts.append(f"<figcaption>{esc(fig['caption'])} <span class='small'>Source: "
                     f"{esc(', '.join(fig['source']))}. Files: {others}</span></figcaption></figure>")
        if numbers:
            parts.append(f"<table>{numbers}</table>")
    if summary["notes"]:
        parts.append("<h2>Notes</h2><ul class='notes'>"
                     + "".join(f"<li>{esc(n)}</li>" for n in summary["notes"]) + "</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
