"""The image-level check: particles beside the projection of the model fitted to each
(the reference deformed by its amplitudes, in its pose, under its CTF) and the residual.

:func:`particle_gallery` chooses and computes (Scipion sets in, arrays out: headless);
:func:`gallery_figure` draws; the landscape viewer shows the figure in a Tk window. Needs
neither Java, Xmipp nor Qt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from matplotlib.figure import Figure

from .. import convert
from ..core.hemnma.model_images import ModelImages, fitted_model_images
from ..core.imaging.dataset import MrcsImageSource
from ..core.imaging.structure import centre
from ..reports import errors_to_truth, read_attribute

__all__ = ["SORT_KEYS", "Gallery", "sort_values", "particle_gallery", "gallery_figure"]

SORT_SCORE, SORT_RELIABILITY, SORT_AMPLITUDE, SORT_ERROR, SORT_RESIDUAL = range(5)
#: Form labels of the sort keys, in the order of the SORT_* constants.
SORT_KEYS = ["alignment score", "reliability", "amplitude norm (Å)", "error to ground truth (Å)",
             "relative residual"]
_FIELDS = ("particles", "models", "residuals", "scale", "offset", "relative_residual")
#: Particles whose model images are computed at once (memory: this many boxes times the atoms).
BATCH = 32


@dataclass
class Gallery:
    """ids: (n,) particle ids in display order; values: (n,) the sort key of each, named
    ``key``; images: their :class:`ModelImages` (particles, models, residuals (n, box, box))."""
    ids: np.ndarray
    values: np.ndarray
    key: str
    images: ModelImages

    def titles(self) -> list:
        """One line per particle: its id and sort value."""
        return [f"particle {i}: {self.key} {v:.3g}" for i, v in zip(self.ids, self.values)]


def sort_values(particles, arrays, key: int, truth=None) -> Optional[np.ndarray]:
    """(M,) values of sort ``key`` (SORT_*) of the particles (``arrays``: their
    convert.ParticleArrays, id order), or None for SORT_RESIDUAL (computed with the images).
    Raises ValueError with the fix when the particles lack what the key needs."""
    if key == SORT_SCORE:
        if getattr(particles.getFirstItem(), convert.SCORE_ATTR, None) is None:
            raise ValueError("The particles carry no alignment score: sort them by amplitude, or show "
                             "the output of this plugin's HEMNMA alignment.")
        return read_attribute(particles, convert.SCORE_ATTR)
    if key == SORT_RELIABILITY:
        if arrays.reliability is None:
            raise ValueError(f"The particles carry no pose reliability ({convert.RELIABILITY_ATTR}): align them "
                             "with this plugin's HEMNMA (it calibrates one), or sort them by another key.")
        return arrays.reliability
    if key == SORT_AMPLITUDE:
        return np.linalg.norm(arrays.amplitudes, axis=1)
    if key == SORT_ERROR:
        if truth is None:
            raise ValueError("Sorting by error needs the ground truth: choose it in 'Ground truth'.")
        return errors_to_truth(arrays, truth)
    if key == SORT_RESIDUAL:
        return None
    raise ValueError(f"Unknown sort key {key}; choose one of {SORT_KEYS}.")


def _model_images(arrays, rows, atoms, modes, invert: bool) -> ModelImages:
    """ModelImages of the particles at ``rows`` of ``arrays`` (computed BATCH at a time)."""
    source = MrcsImageSource([(arrays.stacks[r], int(arrays.indices[r])) for r in rows], invert=invert)
    parts = []
    coords = centre(atoms.coords)
    for start in range(0, len(rows), BATCH):
        sel = np.asarray(rows[start:start + BATCH])
        images = source.read(np.arange(start, start + len(sel)))
        ctf = arrays.ctf.select(sel) if arrays.ctf is not None else None
        parts.append(fitted_model_images(images, coords, modes, arrays.amplitudes[sel], arrays.angles[sel],
                                         arrays.shifts[sel], arrays.pixel_size, ctf=ctf,
                                         sigma=atoms.sigma, weights=atoms.weights))
    return ModelImages(*[np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS])


def particle_gallery(particles, modes_set, n: int = 8, sort_by: int = SORT_SCORE, largest_first: bool = False,
                     truth=None, invert: bool = False) -> Gallery:
    """The ``n`` first particles of the SetOfParticlesFlex ``particles`` in the order of
    ``sort_by`` (SORT_*; ``largest_first``: descending), each with the projection of its
    fitted model and the residual. ``modes_set``: the SetOfNormalModes of the amplitudes
    (its structure is the reference, read without ProDy); ``truth``: the ground-truth set
    (for SORT_ERROR); ``invert``: read the images with the opposite sign (as the alignment
    read them). The particles need amplitudes and poses (HEMNMA, DeepHEMNMA, synthesis)."""
    if modes_set is None:
        raise ValueError("The gallery needs the normal modes of the amplitudes: choose them in 'Normal modes'.")
    if n < 1:
        raise ValueError(f"Show at least one particle; got {n}.")
    arrays = convert.read_particles(particles, need_amplitudes=True)
    if arrays.angles is None:
        raise ValueError("The particles carry no poses (ALIGN_PROJ): align them first, or predict their "
                         "amplitudes on particles with poses.")
    numbers = arrays.amplitude_modes()
    atoms, modes = convert.read_modes_plain(modes_set, numbers)
    values = sort_values(particles, arrays, sort_by, truth)
    everything = None
    if values is None:  # the residual of every particle
        everything = _model_images(arrays, np.arange(len(arrays.ids)), atoms, modes, invert)
        values = everything.relative_residual
    order = np.argsort(-values if largest_first else values, kind="stable")[:int(n)]
    if everything is None:
        images = _model_images(arrays, order, atoms, modes, invert)
    else:
        images = ModelImages(*[getattr(everything, f)[order] for f in _FIELDS])
    return Gallery(ids=arrays.ids[order], values=values[order], key=SORT_KEYS[sort_by], images=images)


def gallery_figure(gallery: Gallery, panel_size: float = 1.6, rows_per_column: int = 4) -> Figure:
    """One row per particle: particle | fitted model | residual (the residual on the
    particle's grey scale, so its size compares with the particle's), titled with the
    particle's id and sort value; ``rows_per_column`` particles down, then the next column
    of triples (so that the window fits a screen). Axes are named ``'particle'``,
    ``'model'``, ``'residual'`` (``ax.get_label()``) in display order, for scripts and tests."""
    im = gallery.images
    n = len(gallery.ids)
    rows = min(n, rows_per_column)
    groups = -(-n // rows)
    fig = Figure(figsize=(groups * (3 * panel_size + 0.5) + 0.3, rows * panel_size + 0.5), layout="constrained")
    grid = fig.add_gridspec(rows, 3 * groups)
    columns = (("particle", im.particles), ("model", im.models), ("residual", im.residuals))
    headings = {"particle": "Particle", "model": "Fitted model", "residual": "Residual"}
    for i, title in enumerate(gallery.titles()):
        row, group = i % rows, i // rows
        lo, hi = np.percentile(im.particles[i], [1, 99])
        for col, (name, stack) in enumerate(columns):
            ax = fig.add_subplot(grid[row, 3 * group + col], label=name)
            shown = stack[i] if name != "residual" else stack[i] - stack[i].mean() + im.particles[i].mean()
            ax.imshow(shown, cmap="gray", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(title.replace(": ", "\n"), fontsize=7)
            if row == 0:
                ax.set_title(headings[name], fontsize=9)
    return fig
