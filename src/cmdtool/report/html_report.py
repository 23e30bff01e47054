"""``cmdtool report``: every figure the store's analyses allow, an ``index.html`` and a ``summary.json``.

What is drawn comes from the analyzer registry: each analyzer declares its figures (``figures``), its key numbers
(``headline``) and its per-epoch errors (``error_series``); the report adds the figures that span methods (the
error per epoch of every model, the metric curves of an evaluation).

Which results: for each kind (every registered analyzer, and evaluation) the one named ``name``; when there is
none of that name but exactly one of the kind, that one (said in a note). A figure whose analysis is missing is
skipped with a note that says which command makes it (when its analyzer asks for one); the notes are printed,
listed in the html and in ``summary.json``. A store with no analysis at all is a usage error (exit 2): a report
of notes only would tell the user nothing that the error message does not.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..analyzers import analyzer_classes
from ..analyzers.base import ResultView
from ..errors import CmdtoolError, UsageError
from ..utils.output_folder import OutputFolder
from ..utils.progress import NullProgress
from ..store.results import jsonable
from ..utils.units import now_iso
from . import figures as F

EVALUATION = "evaluation"
FORMATS = ("png", "svg", "pdf")


def reported_kinds() -> tuple[str, ...]:
    """Every registered analyzer, in registry order, then the evaluation records."""
    return tuple(analyzer_classes()) + (EVALUATION,)


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
    for kind in reported_kinds():
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
    """Key numbers of one analysis result (json-able): the shared figures, and those its analyzer adds."""
    m = result.metrics
    out = {"kind": result.kind, "name": result.name}
    if result.kind == EVALUATION:
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
    cls = analyzer_classes().get(result.kind)
    if cls is not None:
        out.update(cls.headline(ResultView(result)))
    return out


def _plan(chosen: dict, store, notes: list) -> list:
    """(id, title, caption, sources, numbers, make_figure) for every figure the chosen results allow.

    Each analyzer's declared figures in registry order (a figure id several analyzers declare is drawn once, by
    the one that extends the others when both have results: KGA's eigenvalues over DMD's), the error per epoch of
    every model after the first analyzer's figures, and the metric curves last.
    """
    classes = analyzer_classes()
    views = {kind: ResultView(result, store) for kind, result in chosen.items() if kind in classes}
    declared: dict[str, list[str]] = {}  # figure id -> the kinds that declare it
    for kind, cls in classes.items():
        for spec in cls.figures:
            declared.setdefault(spec.id, []).append(kind)
    plan, noted = [], set()
    for position, (kind, cls) in enumerate(classes.items()):
        for spec in cls.figures:
            drawers = [k for k in declared[spec.id] if k in views]
            if not drawers:
                if spec.missing_note and spec.id not in noted:
                    first = classes[declared[spec.id][0]]
                    note = (f"{spec.missing_note}: no {' or '.join(declared[spec.id])} result; run "
                            f"`{first.command()}`")
                    if note not in notes:
                        notes.append(note)
                noted.add(spec.id)
                continue
            extending = [k for k in drawers if classes[k].extends in drawers]
            if kind != (extending or drawers)[0]:
                continue  # drawn by another analyzer's result
            view = views[kind]
            if spec.note is not None and (extra := spec.note(view)):
                notes.append(extra)
            caption = spec.caption(view) if callable(spec.caption) else spec.caption
            numbers = spec.numbers(view) if spec.numbers is not None else {}
            plan.append((spec.id, spec.title, caption, [f"{view.method}/{view.name}"], numbers,
                         lambda spec=spec, view=view: F.declared_figure(spec, view)))
        if position == 0:
            plan += _error_figure(views)
    evaluation = chosen.get(EVALUATION)
    if evaluation is not None:
        plan.append(("evaluation", "Metrics per epoch",
                     "Each metric of the evaluation result per epoch, one line per set of weights (original "
                     "checkpoints, the models' reconstructions, EMA/SWA averages, as present).",
                     [f"{evaluation.kind}/{evaluation.name}"], headline(evaluation, 0)["final_epoch_metrics"],
                     lambda: F.evaluation_figure(evaluation)))
    else:
        notes.append("metric curves skipped: no evaluation result; run `cmdtool evaluate`")
    return plan


def _error_figure(views: dict) -> list:
    """The per-epoch error of every model in the store, when there is one."""
    sources = list(views.values())
    if not sources:
        return []
    series = F.epoch_error_series(sources)
    numbers = {s["label"]: {"final epoch": float(s["errors"][-1]), "overall": s["relative_error"]} for s in series}
    return [("epoch_errors", "Reconstruction error per epoch",
             "‖w_t − ŵ_t‖ / ‖w_t‖ per checkpoint for every model in the store (log scale). Online CMD equals the "
             "original weights during its warm-up, so its curve starts at the end of the warm-up. A method that "
             "extends another (KGA: DMD's model) is drawn only without the other's result.",
             [f"{v.method}/{v.name}" for v in sources], numbers, lambda: F.epoch_error_figure(sources))]


def build_report(store, out_dir="report", name: str = "default", formats=("png",), dpi: int = 110,
                 progress=None, force: bool = False) -> Report:
    """Write the figures (``formats``: png, svg, pdf), ``index.html`` and ``summary.json`` into ``out_dir``.

    ``force``: also write into a non-empty folder that cmdtool did not mark as its own (see
    :mod:`cmdtool.utils.output_folder`)."""
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
    # The output-folder rule (cmdtool.utils.output_folder): only files an earlier report wrote are replaced, never
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
            entry = FigureEntry(fig_id, title, caption, sources, numbers=jsonable(numbers))
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
    summary = jsonable(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "index.html").write_text(render_html(summary))
    return Report(str(out), entries, notes, summary)


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
    models = [h for h in summary["results"].values() if h["kind"] != EVALUATION]
    if models:
        parts.append("<h2>Key numbers</h2><table><tr><th>result</th><th>‖W−Ŵ‖/‖W‖</th><th>‖W−Ŵ‖/‖W−mean‖</th>"
                     "<th>last epoch</th><th>stored floats</th><th>compression</th><th>details</th></tr>")
        classes = analyzer_classes()
        for h in models:
            details = {k: h[k] for k in getattr(classes.get(h["kind"]), "key_numbers", ()) if k in h}
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
