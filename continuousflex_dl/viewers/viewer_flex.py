"""Viewer of amplitude landscapes: point clouds of SetOfParticlesFlex, overlays, error reports.

The module functions work on Scipion sets without any window (tests and
scripts call them); :class:`FlexDLFlexViewer` wires them to a form. Set reading and
error reports live in :mod:`continuousflex_dl.reports` (re-exported here).
"""
import logging
import os
import re
from typing import Optional, Sequence

import numpy as np
from pwem.objects import SetOfParticlesFlex
from pyworkflow.object import Pointer
from pyworkflow.protocol import params
from pyworkflow.viewer import DESKTOP_TKINTER, ProtocolViewer

from .. import convert
from ..protocols import (FlexDLProtAlign, FlexDLProtCluster, FlexDLProtOutliers, FlexDLProtPredict,
                         FlexDLProtSynthesize, FlexDLProtTrajectory)
from ..reports import (ATTRIBUTE_LABELS, ERROR_TABLE_NOTE, error_reports, error_summary_lines, error_table,  # noqa: F401
                       errors_to_truth, find_ground_truth, flex_arrays, flex_source, matched_amplitudes, output_name,
                       producer, read_attribute, related_sets, set_label, write_error_reports_csv)
from . import gallery, plots
from .selection import LandscapeSelection, SelectionView, writable_folder
from .views import ErrorDialogs, FigureView, TableRowsView

logger = logging.getLogger(__name__)

__all__ = ["FlexDLFlexViewer", "flex_source", "set_label", "read_attribute", "flex_arrays",
           "matched_amplitudes", "cloud_figure", "find_ground_truth", "error_reports", "error_table",
           "write_error_reports_csv", "error_summary_lines"]

COLOR_SET, COLOR_ATTRIBUTE, COLOR_MODE, COLOR_ERROR, COLOR_UNCERTAINTY = 0, 1, 2, 3, 4
COLOR_LABELS = ["set", "particle attribute", "amplitude of a mode", "error to ground truth",
                "amplitude uncertainty"]
DIMS_MODES, DIMS_PCA = 0, 1


def _dims(mode_numbers: Sequence[int], shown: str):
    """Column indices of up to three mode numbers written in ``shown`` ('' -> the first three)."""
    numbers = [int(m) for m in re.split(r"[\s,;]+", str(shown or "").strip()) if m]
    if not numbers:
        return list(range(min(3, len(mode_numbers))))
    missing = [m for m in numbers if m not in mode_numbers]
    if missing:
        raise ValueError(f"Modes {missing} are not among the particles' modes {list(mode_numbers)}.")
    if len(numbers) > 3:
        raise ValueError("Choose at most three modes to show, or view the principal components.")
    return [list(mode_numbers).index(m) for m in numbers]


def cloud_figure(sets: Sequence, shown: str = "", pca: bool = False, color_by: int = COLOR_SET,
                 color_attribute: str = convert.SCORE_ATTR, color_mode: Optional[int] = None,
                 truth=None, path: Optional[np.ndarray] = None, path_label: str = "trajectory",
                 title: str = "", labels: Optional[Sequence[str]] = None):
    """Point cloud Figure of SetOfParticlesFlex ``sets`` (the first is the main set; the
    others are overlaid, matched to it by particle id).

    shown: up to three mode numbers ('7 9'; '' = the first three) unless ``pca``.
    color_by: COLOR_SET (one colour per set), COLOR_ATTRIBUTE (``color_attribute``
    of the main set's particles), COLOR_MODE (amplitude of mode ``color_mode``, Å) or
    COLOR_ERROR (Euclidean amplitude error, Å, of the main set against ``truth``) or
    COLOR_UNCERTAINTY (HEMNMA's amplitude uncertainty, the root sum of squares of the
    per-mode standard deviations, Å); these colour the main set only. path: optional (F, K) Å drawn over the clouds.
    labels: legend names, one per set (default :func:`set_label`). Colours and drawing
    order follow each set's amplitude source (:func:`plots.set_styles`).
    """
    arrays = flex_arrays(sets, labels)
    sources = {label: flex_source(s) for label, s in zip(arrays, sets)}
    first = next(iter(arrays.values()))
    numbers = first.amplitude_modes()
    data = matched_amplitudes(arrays)
    main = next(iter(data))
    colours, cbar = None, ""
    if color_by == COLOR_ATTRIBUTE:
        colours = {main: read_attribute(sets[0], color_attribute)}
        cbar = ATTRIBUTE_LABELS.get(color_attribute, color_attribute)
    elif color_by == COLOR_MODE:
        if color_mode not in numbers:
            raise ValueError(f"Mode {color_mode} is not among the particles' modes {numbers}.")
        colours = {main: data[main][:, numbers.index(color_mode)]}
        cbar = plots.mode_label(color_mode)
    elif color_by == COLOR_ERROR:
        if truth is None:
            raise ValueError("Colouring by error needs a ground-truth set.")
        colours, cbar = {main: errors_to_truth(first, truth)}, "Amplitude error (Å)"
    elif color_by == COLOR_UNCERTAINTY:
        if first.amplitude_std is None:
            raise ValueError(f"The particles carry no amplitude uncertainty ({convert.ZFLEX_STD_ATTR}): it "
                             f"comes with this plugin's HEMNMA alignment.")
        colours, cbar = {main: np.linalg.norm(first.amplitude_std, axis=1)}, "Amplitude uncertainty (Å)"
    dims = "pca" if pca else _dims(numbers, shown)
    return plots.plot_point_cloud(data, numbers, dims=dims, color_by=colours, colorbar_label=cbar,
                                  path=path, path_label=path_label, title=title, sources=sources)


# ----------------------------------------------------------------------------- the viewer

#: Protocols whose results this viewer shows by default ('Analyze results').
TARGET_PROTOCOLS = [FlexDLProtSynthesize, FlexDLProtAlign, FlexDLProtOutliers, FlexDLProtPredict,
                    FlexDLProtTrajectory, FlexDLProtCluster]


class FlexDLFlexViewer(ErrorDialogs, ProtocolViewer):
    """Amplitude landscapes: point clouds (overlaid sets matched by particle id) and
    errors against a ground truth. Opened on a run, it overlays the ground truth and the
    other amplitude sources of the same particles found in the project, and gives RMSDs
    with the run's normal modes."""
    _label = "amplitude landscape viewer"
    _targets = [SetOfParticlesFlex] + TARGET_PROTOCOLS
    _environments = [DESKTOP_TKINTER]
    def _defineParams(self, form):
        form.addSection(label="Point cloud")
        form.addParam("overlaySets", params.MultiPointerParam, pointerClass="SetOfParticlesFlex",
                      allowsNull=True, minNumObjects=0, maxNumObjects=5, label="Sets to overlay",
                      help="Other sets of the same particles (ground truth, HEMNMA, DeepHEMNMA), "
                           "matched to the main set by particle id. Filled with those the project "
                           "holds. Colours: ground truth black (drawn on top), HEMNMA blue, "
                           "DeepHEMNMA red, others green, purple...")
        form.addParam("dimensions", params.EnumParam, choices=["chosen modes", "principal components"],
                      default=DIMS_MODES, display=params.EnumParam.DISPLAY_HLIST, label="Axes",
                      help="Up to three chosen modes (one: histogram, two: scatter, three: 3-D), or "
                           "the first principal components of all shown sets together.")
        form.addParam("modesToShow", params.StringParam, default="", condition="dimensions == 0",
                      label="Modes to show", help="Up to three mode numbers, e.g. '7 9'. Empty: the "
                                                  "first three modes of the particles.")
        form.addParam("colorBy", params.EnumParam, choices=COLOR_LABELS, default=COLOR_SET,
                      label="Colour by",
                      help="set: one colour per set. particle attribute: a number stored on each "
                           "particle ('_cfdlScore': HEMNMA score, '_flexdl_poseReliability': "
                           "probability that HEMNMA's pose is within 10°, '_cfdlMahalanobis': outlier "
                           "distance). amplitude of a mode. error to ground truth: Euclidean "
                           "distance (Å) of the main set's amplitudes to the truth. amplitude "
                           "uncertainty: HEMNMA's standard deviations of the amplitudes (root sum of "
                           "squares over the modes, Å).")
        form.addParam("colorAttribute", params.StringParam, default=convert.SCORE_ATTR,
                      condition="colorBy == 1", label="Attribute",
                      help=f"The particle attribute that colours the points: {convert.SCORE_ATTR} (HEMNMA "
                           f"score), {convert.RELIABILITY_ATTR} (pose reliability, 0-1) or _cfdlMahalanobis "
                           f"(outlier distance, σ).")
        form.addParam("colorMode", params.IntParam, default=7, condition="colorBy == 2",
                      label="Mode")
        form.addParam("displayCloud", params.LabelParam, label="Show the point cloud")
        form.addParam("displaySelection", params.LabelParam, label="Select particles (lasso, box) or a structure",
                      help="The main set on two of the modes to show (the first two), or on the first two "
                           "principal components. Drag a lasso or a box around points, then 'Create "
                           "subset' runs a landscape subset protocol with that region (it appears in the "
                           "project; its output feeds reconstruction, training and trajectories). Click "
                           "a point: the reference displaced by that particle's amplitudes is saved as a "
                           "PDB file and opened in ChimeraX when it is installed (else plotted).")
        form.addSection(label="Errors")
        form.addParam("groundTruth", params.PointerParam, pointerClass="SetOfParticlesFlex",
                      allowsNull=True, label="Ground truth",
                      help="Filled with the synthesis output these particles come from. Empty: "
                           "the shown set whose amplitudes are marked 'ground truth'; the other "
                           "shown sets are compared with it.")
        form.addParam("errorModes", params.PointerParam, pointerClass="SetOfNormalModes",
                      allowsNull=True, label="Normal modes (for RMSD)",
                      help="The modes of the amplitudes (filled with those of the run), to give "
                           "each particle's error as an atomic RMSD (Å).")
        form.addParam("displayErrors", params.LabelParam, label="Error table (and CSV)")
        form.addParam("displayErrorHistograms", params.LabelParam, label="Error histograms")
        form.addSection(label="Images")
        form.addParam("galleryCount", params.IntParam, default=8, validators=[params.Range(1, 64)],
                      label="Particles to show",
                      help="How many particles the gallery shows, the first ones in the chosen order. Each "
                           "is shown beside the projection of the model fitted to it (the reference of "
                           "'Normal modes' deformed by its amplitudes, in its pose, under its CTF, scaled "
                           "to it) and the residual (particle minus model).")
        form.addParam("gallerySort", params.EnumParam, choices=gallery.SORT_KEYS, default=gallery.SORT_SCORE,
                      label="Order by",
                      help="alignment score: HEMNMA's normalised cross-correlation (0-1). reliability: "
                           "the particles' reliability when they carry one. amplitude norm: the length "
                           "of the amplitude vector (Å). error to ground truth: distance (Å) to the "
                           "amplitudes of 'Ground truth'. relative residual: the residual's energy over "
                           "the particle's (0-1; computed for every particle, slower on large sets).")
        form.addParam("galleryLargestFirst", params.BooleanParam, default=False, label="Largest first?",
                      help="No: the smallest values first (the worst scores). Yes: the largest first "
                           "(the largest errors, residuals or amplitudes).")
        form.addParam("displayGallery", params.LabelParam, label="Particles beside their fitted model",
                      help="Opens the gallery (needs only Tk and matplotlib).")

    def _getVisualizeDict(self):
        return {"displayCloud": self._showCloud, "displayErrors": self._showErrors,
                "displayErrorHistograms": self._showErrorHistograms, "displaySelection": self._showSelection,
                "displayGallery": self._showGallery}

    # ------------------------------------------------------------------ inputs
    def setProtocol(self, protocol):
        super().setProtocol(protocol)
        try:
            self._prefill()
        except Exception:  # noqa: BLE001 - the viewer still opens; the user fills the form
            logger.exception("Could not find the sets related to %s", protocol)

    def _pointerTo(self, obj, prot=None, name=None) -> Pointer:
        """A pointer as the form makes it (run + output name) when the producer is known."""
        prot = prot or producer(obj, self.getProject())
        name = name or (output_name(prot, obj) if prot is not None else None)
        return Pointer(prot, extended=name) if name else Pointer(obj)

    def _prefill(self):
        """Overlays, ground truth and modes from the project's lineage of the main set."""
        main = self._mainSet()
        if main is None:
            return
        related = related_sets(main, self.getProject(), self.protocol if self._targetIsRun() else None)
        if not len(self.overlaySets):
            for obj, prot, name in related.overlays:
                self.overlaySets.append(self._pointerTo(obj, prot, name))
        if self.groundTruth.get() is None and related.truth is not None:
            self.groundTruth.copy(self._pointerTo(related.truth))
        if self.errorModes.get() is None and related.modes is not None:
            self.errorModes.copy(self._pointerTo(related.modes))
        if getattr(main.getFirstItem(), convert.SCORE_ATTR, None) is None:
            self.gallerySort.set(gallery.SORT_AMPLITUDE)  # no alignment score (a prediction, a synthesis)

    def _targetIsRun(self) -> bool:
        return not isinstance(self.protocol, SetOfParticlesFlex)

    def _mainSet(self):
        """The set analysed: the target set, a run's output set of amplitudes, else its input."""
        target = self.protocol
        if isinstance(target, SetOfParticlesFlex):
            return target
        out = getattr(target, "outputParticles", None)
        if isinstance(out, SetOfParticlesFlex):
            return out
        pointer = getattr(target, "inputParticles", None)
        return pointer.get() if pointer is not None else None

    def _overlays(self) -> list:
        return [p.get() for p in self.overlaySets if p.get() is not None]

    def _shownSets(self) -> list:
        main = self._mainSet()
        if main is None:
            raise ValueError("This run has no particles with amplitudes yet.")
        return [main] + self._overlays()

    def _labels(self, sets) -> list:
        return [set_label(s, f"set {i + 1}", self.getProject()) for i, s in enumerate(sets)]

    def _path(self):
        """(path (F, K) Å, label) drawn over the cloud for trajectory/cluster protocols."""
        target = self.protocol
        try:
            if isinstance(target, FlexDLProtTrajectory):
                return np.atleast_2d(np.loadtxt(target._getExtraPath("path_points.txt"))), "trajectory"
            if isinstance(target, FlexDLProtCluster):
                centres = np.load(target._getExtraPath("clusters.npz"))["centres"]
                return centres[np.all(np.isfinite(centres), axis=1)], "cluster centres"
        except OSError:
            pass
        return None, ""

    def _truthAndOthers(self):
        sets = self._shownSets()
        truth = self.groundTruth.get()
        if truth is not None:
            key = (truth.getObjId(), truth.getFileName())
            others = [s for s in sets if (s.getObjId(), s.getFileName()) != key]
            if not others:
                raise ValueError("The ground truth is the only set shown: overlay a set to compare.")
            return truth, others
        i = find_ground_truth(sets)
        if i is None:
            raise ValueError("No ground truth: choose one in 'Ground truth', or overlay the set "
                             "of the synthesis protocol.")
        others = sets[:i] + sets[i + 1:]
        if not others:
            raise ValueError("The ground truth is the only set shown: overlay a set to compare.")
        return sets[i], others

    # ------------------------------------------------------------------ views
    def cloudFigure(self):
        """The point cloud Figure for the current form values (headless)."""
        truth = None
        if self.colorBy.get() == COLOR_ERROR:
            truth = self._truthAndOthers()[0]
        path, path_label = self._path()
        sets = self._shownSets()
        labels = self._labels(sets)
        return cloud_figure(sets, self.modesToShow.get(),
                            self.dimensions.get() == DIMS_PCA, self.colorBy.get(),
                            self.colorAttribute.get(), self.colorMode.get(), truth, path, path_label,
                            title=labels[0], labels=labels)

    def _showCloud(self, param=None):
        return [FigureView(self.cloudFigure(), "Amplitude point cloud", self._tkRoot)]

    def errorReports(self):
        """``{label: (amplitude report, pose report)}`` for the current form values (headless)."""
        truth, others = self._truthAndOthers()
        return error_reports(truth, others, self.errorModes.get(), self._labels(others))

    def _csvPath(self) -> str:
        """In the extra folder of the run analysed (the target run, or the run that made the
        target set), else in the project's temporary folder (the viewer's working folder)."""
        run = self.protocol if self._targetIsRun() else producer(self.protocol, self.getProject())
        folder = run._getExtraPath() if run is not None else self.getWorkingDir()
        if not folder or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            folder = self.getWorkingDir() or "."
        name = re.sub(r"[^A-Za-z0-9.-]+", "_", self._labels([self._mainSet()])[0]).strip("_")
        return os.path.abspath(os.path.join(folder, f"errors_{name or 'particles'}.csv"))

    def _showErrors(self, param=None):
        reports = self.errorReports()
        self.csvFile = write_error_reports_csv(self._csvPath(), reports)
        header, rows = error_table(reports)
        return [TableRowsView(header, rows, "Errors against the ground truth",
                              message=f"{ERROR_TABLE_NOTE}\nCSV: {self.csvFile}", tkParent=self._tkRoot)]

    def _showErrorHistograms(self, param=None):
        return [FigureView(plots.plot_error_histograms(amp, title=label), f"Errors of {label}", self._tkRoot)
                for label, (amp, _) in self.errorReports().items()]


    # ------------------------------------------------------------------ selection and images
    def _runFolder(self) -> str:
        """The extra folder of the run analysed (else the viewer's working folder): where the
        viewer writes its files."""
        run = self.protocol if self._targetIsRun() else producer(self.protocol, self.getProject())
        return writable_folder(run._getExtraPath() if run is not None else None, self.getWorkingDir())

    def landscapeSelection(self) -> LandscapeSelection:
        """The selection on the main set in the view of the form (headless)."""
        sets = self._shownSets()
        pca = self.dimensions.get() == DIMS_PCA
        others = []
        if pca:
            arrays = flex_arrays(sets, self._labels(sets))
            others = list(matched_amplitudes(arrays).values())[1:]
        numbers = convert.flex_mode_numbers(sets[0]) or []
        shown = [numbers[i] for i in _dims(numbers, self.modesToShow.get())] if numbers and not pca else []
        return LandscapeSelection.for_view(sets[0], shown, pca, others, title=self._labels(sets)[:1][0])

    def makeSubset(self, selection: LandscapeSelection, wait: bool = False):
        """Launch the subset run of ``selection`` on the main set; returns the protocol."""
        return selection.make_subset(self.getProject(), self._pointerTo(self._mainSet()), wait=wait)

    def _showSelection(self, param=None):
        selection = self.landscapeSelection()
        return [SelectionView(selection, lambda: self.makeSubset(selection), self.errorModes.get(),
                              self._runFolder(), self._tkRoot)]

    def _invert(self) -> bool:
        """Whether the run that aligned (or predicted) the main set read its images inverted."""
        obj, project = self._mainSet(), self.getProject()
        for _ in range(10):
            prot = producer(obj, project) if obj is not None else None
            if prot is None:
                return False
            if hasattr(prot, "invertContrast"):
                return bool(prot.invertContrast.get())
            pointer = getattr(prot, "inputParticles", None)
            obj = pointer.get() if pointer is not None else None
        return False

    def particleGallery(self) -> "gallery.Gallery":
        """The gallery of the form's values (headless)."""
        truth = self.groundTruth.get() if self.gallerySort.get() == gallery.SORT_ERROR else None
        main = self._mainSet()
        if main is None:
            raise ValueError("This run has no particles with amplitudes yet.")
        return gallery.particle_gallery(main, self.errorModes.get(), self.galleryCount.get(),
                                        self.gallerySort.get(), self.galleryLargestFirst.get(), truth,
                                        self._invert())

    def _showGallery(self, param=None):
        label = self._labels([self._mainSet()])[0]
        return [FigureView(gallery.gallery_figure(self.particleGallery()), f"Particles of {label}", self._tkRoot)]
