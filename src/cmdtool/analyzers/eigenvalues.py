"""The Koopman classes of DMD eigenvalues (paper 003 Sec. 3.1) and the eigenvalue figure, shared by DMD
(:mod:`.dmd`), KGA (:mod:`.kga`), the report and the training-time KGA optimizer."""

from __future__ import annotations

import numpy as np

from .base import FigureSpec

STABLE, NEUTRAL, UNSTABLE = 0, 1, 2
CLASS_NAMES = {STABLE: "stable", NEUTRAL: "neutral", UNSTABLE: "unstable"}


def classify_eigenvalues(eigenvalues: np.ndarray, eps: float) -> np.ndarray:
    """Class code per eigenvalue (paper 003 Sec. 3.1): 0 stable, 1 neutral, 2 unstable."""
    modulus = np.abs(np.asarray(eigenvalues))
    classes = np.full(modulus.shape, NEUTRAL, dtype=np.int8)
    classes[modulus < 1.0 - eps] = STABLE
    classes[modulus > 1.0 + eps] = UNSTABLE
    return classes


DEFAULT_CLASS_EPS = 0.01  # KGA's default ε: the neutral band a DMD spectrum is drawn with when no KGA result exists


def eigenvalue_numbers(view) -> dict:
    """The eigenvalue figure's key numbers: the rank, ε and the count of each class."""
    if view.method == "kga":
        classes, eps = np.asarray(view.small("classes")), float(view.config.get("eps", DEFAULT_CLASS_EPS))
    else:
        classes, eps = classify_eigenvalues(view.small("eigenvalues"), DEFAULT_CLASS_EPS), DEFAULT_CLASS_EPS
    return {"rank": view.attrs.get("rank", view.value("rank")), "eps": eps,
            **{name: int(np.sum(classes == code)) for code, name in CLASS_NAMES.items()}}


EIGENVALUE_FIGURE = FigureSpec(
    "eigenvalues", "DMD eigenvalues by Koopman class",
    "DMD eigenvalues λ_k on the complex plane with the unit circle, coloured by KGA class (paper 003 Sec. 3.1, "
    "Fig. 2): neutral within 1 ± ε, stable inside, unstable outside. Marker area grows with |b_k|. Right: zoom "
    "near λ = 1.",
    "cmdtool.report.figures:eigenvalues_figure", numbers=eigenvalue_numbers,
    missing_note="eigenvalue figure skipped",
    note=lambda view: f"eigenvalue classes drawn at ε = {DEFAULT_CLASS_EPS:g} from DMD: no kga result; run "
                      f"`cmdtool decompose -m kga`")
