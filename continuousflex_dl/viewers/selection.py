"""Selection in the amplitude landscape: lasso or box a region of a 2-D view into a subset
protocol run (:class:`~continuousflex_dl.protocols.FlexDLProtSubset`), click a point for the
structure at that point.

:class:`LandscapeSelection` holds the logic and the figure and works headless (tests drive
it with vertices); :class:`SelectionView` only wires matplotlib's LassoSelector /
RectangleSelector and a few Tk buttons to it.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from pyworkflow.viewer import View

from .. import convert
from ..core.imaging.structure import write_coordinates_pdb
from ..core.landscape.selection import (LinearView, box_polygon, format_polygon, mode_view, nearest_point,
                                        parse_polygon, pca_view, points_in_polygon)
from ..core.modes.nma import displace

logger = logging.getLogger(__name__)

__all__ = ["LandscapeSelection", "SelectionView", "structure_figure", "CHIMERAX"]

#: The program that opens a clicked structure when it is on PATH.
CHIMERAX = "chimerax"
COLOUR, SELECTED_COLOUR = "tab:blue", "tab:orange"


class LandscapeSelection:
    """The particles of a SetOfParticlesFlex as points of a 2-D :class:`LinearView`
    (Å), the current selection and what follows from it (a subset run, a structure).

    particles: the set; view: its 2-D view (:meth:`for_view` builds one as the landscape
    viewer shows it); shown_modes: the two mode numbers of a view of modes (None: another view,
    recorded by its numbers)."""

    def __init__(self, particles, view: LinearView, title: str = "", shown_modes: Optional[Sequence[int]] = None):
        self.particles = particles
        self.arrays = convert.read_particles(particles, need_amplitudes=True)
        self.mode_numbers = self.arrays.amplitude_modes()
        self.view = view
        self.points = view.project(self.arrays.amplitudes)          # (M, 2) Å
        self.selected = np.zeros(len(self.points), dtype=bool)
        self.polygon: Optional[np.ndarray] = None
        self.title = title
        self.shown_modes = list(shown_modes) if shown_modes is not None else None
        self.figure: Optional[Figure] = None
        self._scatter = None

    @classmethod
    def for_view(cls, particles, shown: Sequence[int] = (), pca: bool = False, others: Sequence = (),
                 title: str = "") -> "LandscapeSelection":
        """The view the landscape viewer shows: the first two of the ``shown`` mode numbers (empty:
        the first two modes), or the first two principal components of the amplitudes of
        ``particles`` and the ``others`` (arrays (M_i, K) Å) together, as the point cloud has them."""
        arrays = convert.read_particles(particles, need_amplitudes=True)
        numbers = arrays.amplitude_modes()
        if pca:
            view = pca_view(np.concatenate([arrays.amplitudes] + [np.asarray(o) for o in others]))
            view = LinearView.from_text(view.to_text(), view.labels)  # the numbers the subset run reads
            shown = None
        else:
            shown = list(shown) or numbers[:2]
            if len(shown) < 2:
                raise ValueError("Select in a view of two modes: write two mode numbers in 'Modes to show' "
                                 "(with three, the first two are used), or view the principal components.")
            shown = shown[:2]
            view = mode_view(numbers, shown)
        return cls(particles, view, title, shown)

    # ------------------------------------------------------------------ selecting
    def select_polygon(self, vertices) -> int:
        """Select the particles inside ``vertices`` (P >= 3, 2) Å; returns how many. A lasso
        of fewer than 3 distinct vertices (a click) leaves the selection as it was."""
        poly = np.asarray(vertices, dtype=float).reshape(-1, 2)
        if len(np.unique(poly, axis=0)) < 3:
            return int(self.selected.sum())
        poly = parse_polygon(format_polygon(poly))  # as the subset run will read it back
        self.polygon = poly
        self.selected = points_in_polygon(self.points, poly)
        self._redraw()
        return int(self.selected.sum())

    def select_box(self, x0: float, y0: float, x1: float, y1: float) -> int:
        """Select the particles in the box between two corners (Å); returns how many."""
        if x0 == x1 or y0 == y1:
            return int(self.selected.sum())
        return self.select_polygon(box_polygon(x0, y0, x1, y1))

    @property
    def selected_ids(self) -> np.ndarray:
        return self.arrays.ids[self.selected]

    def nearest(self, x: float, y: float) -> int:
        """Row of the particle nearest to (x, y) Å, distances scaled by the spread of the points."""
        return nearest_point(self.points, x, y, scale=np.ptp(self.points, axis=0))

    def subset_params(self) -> dict:
        """The FlexDLProtSubset parameters that reproduce the selection."""
        if self.polygon is None or not self.selected.any():
            raise ValueError("Nothing is selected: drag a lasso or a box around some points first.")
        from ..protocols.protocol_subset import AXES_MODES, AXES_PCA, SELECT_REGION
        out = dict(selectBy=SELECT_REGION, polygon=format_polygon(self.polygon))
        if self.shown_modes is not None:
            out.update(viewAxes=AXES_MODES, viewModes=" ".join(map(str, self.shown_modes)))
        else:
            out.update(viewAxes=AXES_PCA, pcaView=self.view.to_text())
        return out

    def make_subset(self, project, particles_pointer, wait: bool = False):
        """Create and launch a FlexDLProtSubset run of the selection on ``particles_pointer`` (a
        Pointer to this set, as the form makes it: run + output name). Returns the protocol."""
        from ..protocols import FlexDLProtSubset
        params = self.subset_params()
        prot = project.newProtocol(FlexDLProtSubset, **params)
        prot.setObjLabel(f"landscape subset ({int(self.selected.sum())} particles)")
        prot.inputParticles.copy(particles_pointer)
        project.launchProtocol(prot, wait=wait)
        return prot

    # ------------------------------------------------------------------ structures
    def structure_at(self, row: int, modes_set, folder) -> Path:
        """Write the reference displaced by the amplitudes of the particle at ``row`` as
        ``structure_particle<ID>.pdb`` in ``folder`` (the frame of the reference file);
        returns its path. Needs no ProDy."""
        if modes_set is None:
            raise ValueError("The structure needs the normal modes of the amplitudes: choose them in "
                             "'Normal modes' (Errors tab).")
        atoms, modes = convert.read_modes_plain(modes_set, self.mode_numbers)
        coords = displace(atoms.coords, modes, self.arrays.amplitudes[row])
        path = Path(folder) / f"structure_particle{int(self.arrays.ids[row])}.pdb"
        return write_coordinates_pdb(path, modes_set.getPdb().getFileName(), coords)

    def describe(self, row: int) -> str:
        """'particle 12: mode 7 13.2 Å, mode 8 -4.0 Å'."""
        q = self.arrays.amplitudes[row]
        text = ", ".join(f"mode {m} {v:.1f} Å" for m, v in zip(self.mode_numbers, q))
        return f"particle {int(self.arrays.ids[row])}: {text}"

    # ------------------------------------------------------------------ figure
    def make_figure(self, figsize=(6.4, 5.6)) -> Figure:
        """The scatter of the points (selected ones orange), axes labelled in Å."""
        fig = Figure(figsize=figsize, layout="constrained")
        ax = fig.add_subplot()
        self._scatter = ax.scatter(*self.points.T, s=12, linewidths=0, color=COLOUR, picker=True, pickradius=4)
        ax.set_xlabel(self.view.labels[0])
        ax.set_ylabel(self.view.labels[1])
        ax.set_title(self.title or f"{len(self.points)} particles", fontsize=10)
        self.figure = fig
        self._redraw()
        return fig

    def _redraw(self):
        if self._scatter is None:
            return
        self._scatter.set_color([SELECTED_COLOUR if s else COLOUR for s in self.selected])
        self.figure.canvas.draw_idle()


def structure_figure(reference: np.ndarray, displaced: np.ndarray, title: str = "", most: int = 2000) -> Figure:
    """3-D scatter of a displaced structure (N, 3) Å, each atom coloured by its displacement from
    the reference (N, 3) Å (drawn faint grey behind), at most ``most`` atoms (evenly spaced)."""
    step = max(1, len(reference) // most)
    ref, moved = np.asarray(reference)[::step], np.asarray(displaced)[::step]
    fig = Figure(figsize=(6.0, 5.2), layout="constrained")
    ax = fig.add_subplot(projection="3d")
    ax.scatter(*ref.T, s=2, color="0.75", alpha=0.3, label="reference")
    points = ax.scatter(*moved.T, s=4, c=np.linalg.norm(moved - ref, axis=1), cmap="viridis",
                        label="at the clicked point")
    fig.colorbar(points, ax=ax, shrink=0.6, pad=0.1, label="Displacement (Å)")
    for name, set_label in zip("xyz", (ax.set_xlabel, ax.set_ylabel, ax.set_zlabel)):
        set_label(f"{name} (Å)")
    ax.legend(fontsize=8, loc="upper left")
    if title:
        ax.set_title(title, fontsize=9)
    return fig


class SelectionView(View):
    """A window on a :class:`LandscapeSelection`: lasso or box to select, 'Create subset' to run
    FlexDLProtSubset, a click on a point to save (and show, in ChimeraX when installed) the
    structure there. make_subset(): called by the button, returns the launched protocol."""

    def __init__(self, selection: LandscapeSelection, make_subset, modes_set, folder, tkParent=None):
        View.__init__(self)
        self.selection = selection
        self._make_subset = make_subset
        self._modes_set = modes_set
        self._folder = folder
        self._parent = tkParent
        self.window = None
        self.status = None
        self.last_structure: Optional[Path] = None
        self.last_subset = None
        self.structure_views = []

    def show(self):
        import tkinter as tk
        from matplotlib.backends.backend_tkagg import FigureCanvasTkAgg, NavigationToolbar2Tk
        from matplotlib.widgets import LassoSelector, RectangleSelector
        sel = self.selection
        window = tk.Toplevel(self._parent) if self._parent is not None else tk.Tk()
        window.title("Select particles in the landscape")
        fig = sel.make_figure()
        canvas = FigureCanvasTkAgg(fig, master=window)
        NavigationToolbar2Tk(canvas, window).update()
        bar = tk.Frame(window)
        bar.pack(side=tk.TOP, fill=tk.X)
        self.tool = tk.StringVar(window, "lasso")
        for value, text in (("lasso", "Lasso"), ("box", "Box")):
            tk.Radiobutton(bar, text=text, value=value, variable=self.tool,
                           command=self._switch).pack(side=tk.LEFT, padx=4)
        tk.Button(bar, text="Create subset", command=self.create_subset).pack(side=tk.LEFT, padx=8)
        self.status = tk.StringVar(window, "Drag around points to select them; click a point for its structure.")
        tk.Label(bar, textvariable=self.status, anchor="w").pack(side=tk.LEFT, fill=tk.X, expand=True)
        canvas.get_tk_widget().pack(fill=tk.BOTH, expand=True)
        ax = fig.axes[0]
        self.lasso = LassoSelector(ax, lambda verts: self._selected(sel.select_polygon(verts)))
        self.box = RectangleSelector(ax, lambda a, b: self._selected(sel.select_box(a.xdata, a.ydata,
                                                                                  b.xdata, b.ydata)),
                                     useblit=False, interactive=False)
        self.box.set_active(False)
        canvas.mpl_connect("pick_event", self._picked)
        canvas.draw()
        self.canvas = canvas
        self.window = window

    def _switch(self):
        self.lasso.set_active(self.tool.get() == "lasso")
        self.box.set_active(self.tool.get() == "box")

    def _selected(self, n: int):
        self.status.set(f"{n} of {len(self.selection.points)} particles selected.")
        self.canvas.draw_idle()

    def _picked(self, event):
        if event.mouseevent.xdata is None:
            return
        self.show_structure(self.selection.nearest(event.mouseevent.xdata, event.mouseevent.ydata))

    def show_structure(self, row: int) -> Path:
        """Save the structure at particle ``row``; open it in ChimeraX, or in a 3-D plot without it."""
        sel = self.selection
        try:
            path = sel.structure_at(row, self._modes_set, self._folder)
        except ValueError as exc:
            self.status.set(str(exc))
            return None
        self.last_structure = path
        chimerax = shutil.which(CHIMERAX)
        if chimerax:
            subprocess.Popen([chimerax, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.status.set(f"{sel.describe(row)}: {path} (opened in ChimeraX)")
        else:
            from .views import FigureView
            atoms, modes = convert.read_modes_plain(self._modes_set, sel.mode_numbers)
            figure = structure_figure(atoms.coords, displace(atoms.coords, modes, sel.arrays.amplitudes[row]),
                                      sel.describe(row))
            view = FigureView(figure, f"Structure of {sel.describe(row).split(':')[0]}", self.window)
            view.show()
            self.structure_views.append(view)
            self.status.set(f"{sel.describe(row)}: saved in {path}")
        return path

    def create_subset(self):
        """The 'Create subset' button: launch the subset run, or say why not."""
        try:
            self.last_subset = self._make_subset()
        except ValueError as exc:
            self.status.set(str(exc))
            return None
        self.status.set(f"Launched '{self.last_subset.getObjLabel()}': its output appears in the project.")
        return self.last_subset


def writable_folder(*candidates) -> str:
    """The first of the folders that exists and is writable ('.' if none)."""
    for folder in candidates:
        if folder and os.path.isdir(folder) and os.access(folder, os.W_OK):
            return os.path.abspath(folder)
    return os.path.abspath(".")
