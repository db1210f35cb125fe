"""Fourier shell correlation curves: arrays in, :class:`matplotlib.figure.Figure` out (no pyplot,
no Scipion; the reconstruction viewer shows the figure, tests save it headless)."""
from __future__ import annotations

from typing import Mapping, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure

from ..core.landscape.reconstruction import FSC_THRESHOLD, resolution_at

__all__ = ["plot_fsc"]


def plot_fsc(curves: Mapping[str, Tuple[np.ndarray, np.ndarray]],
             thresholds: Sequence[float] = (FSC_THRESHOLD,)) -> Figure:
    """FSC against spatial frequency, one line per curve, with each threshold drawn and the
    resolution where the curve crosses it given in the legend.

    curves: ``{label: (frequency (S,) 1/Å, fsc (S,))}``; thresholds: FSC values (0.143 for
    half maps, 0.5 against a reference map). The top axis reads resolution in Å.
    """
    if not curves:
        raise ValueError("No FSC curve to plot.")
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    f_max = 0.0
    for label, (freq, curve) in curves.items():
        freq, curve = np.asarray(freq, dtype=float), np.asarray(curve, dtype=float)
        if freq.shape != curve.shape or freq.ndim != 1 or len(freq) < 2:
            raise ValueError(f"Curve {label!r}: frequency and FSC must be 1-D arrays of the same length.")
        marks = ", ".join(f"{resolution_at(freq, curve, t):.2f} Å at {t:g}" for t in thresholds)
        ax.plot(freq, curve, "-", lw=1.5, label=f"{label} ({marks})")
        f_max = max(f_max, float(freq[-1]))
    for t in thresholds:
        ax.axhline(t, color="0.5", lw=0.8, ls="--")
    ax.axhline(0.0, color="0.8", lw=0.6)
    ax.set_xlim(0.0, f_max)
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.05)
    ax.set_xlabel("Spatial frequency (1/Å)")
    ax.set_ylabel("Fourier shell correlation")
    ticks = [t for t in ax.get_xticks() if 0 < t <= f_max]
    top = ax.twiny()
    top.set_xlim(ax.get_xlim())
    top.set_xticks(ticks)
    top.set_xticklabels(["%.1f" % (1.0 / t) for t in ticks])
    top.set_xlabel("Resolution (Å)")
    ax.legend(loc="upper right", fontsize="small")
    return fig

