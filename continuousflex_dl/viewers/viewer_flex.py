"""Viewer of amplitude landscapes: point clouds of SetOfParticlesFlex, overlays, error reports.

The module functions work on Scipion sets without any window (tests and
scripts call them); :class:`FlexDLFlexViewer` wires them to a form.
"""
import csv
import os
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
from pwem.objects import SetOfParticlesFlex
from pyworkflow.protocol import params
from pyworkflow.viewer import DESKTOP_TKINTER, ProtocolViewer

from .. import convert
from ..core import analysis
from ..protocols.protocol_cluster import FlexDLProtCluster
from ..protocols.protocol_trajectory import FlexDLProtTrajectory
from . import plots
from .views import FigureView, TableRowsView

__all__ = ["FlexDLFlexViewer", "flex_source", "set_label", "read_attribute", "flex_arrays",
           "matched_amplitudes", "cloud_figure", "find_ground_truth", "error_reports", "error_table",
           "write_error_reports_csv", "error_summary_lines"]

COLOR_SET, COLOR_ATTRIBUTE, COLOR_MODE, COLOR_ERROR = 0, 1, 2, 3
COLOR_LABELS = ["set", "particle attribute", "amplitude of a mode", "error to ground truth"]
DIMS_MODES, DIMS_PCA = 0, 1


# ----------------------------------------------------------------------------- sets -> arrays

def flex_source(particles) -> str:
    """Where a set's amplitudes came from (FlexInfo ``amplitudeSource``), or ''."""
    info = particles.getFlexInfo() if hasattr(particles, "getFlexInfo") else None
    if info is None or not hasattr(info, "amplitudeSource"):
        return ""
    return str(info.getAttr("amplitudeSource") or "")


def set_label(particles, default: str = "particles") -> str:
    """A short name for a set in legends and tables: its source, else its object label."""
    return flex_source(particles) or particles.getObjLabel() or default


def read_attribute(particles, name: str) -> np.ndarray:
    """Per-particle values (M,) of a Float attribute (e.g. '_cfdlScore'), in id order.
    Raises ValueError naming the attribute when a particle lacks it."""
    values = []
    for p in particles.iterItems(orderBy="id"):
        attr = getattr(p, name, None)
        value = attr.get() if hasattr(attr, "get") else attr
        if value is None:
            raise ValueError(f"The particles have no attribute {name!r}: try '_cfdlScore' (HEMNMA "
                             f"alignment score) or '_cfdlMahalanobis' (outlier distance).")
        values.append(float(value))
    return np.asarray(values)


def flex_arrays(sets: Sequence) -> "OrderedDict[str, convert.ParticleArrays]":
    """Read several SetOfParticlesFlex of the same modes: ``{unique label: ParticleArrays}``
    in the given order. Raises ValueError when a set has no amplitudes or other modes."""
    out = OrderedDict()
    numbers = None
    for i, s in enumerate(sets):
        arrays = convert.read_particles(s, need_amplitudes=True)
        modes = arrays.mode_numbers or list(range(7, 7 + arrays.amplitudes.shape[1]))
        if numbers is None:
            numbers = modes
        elif list(modes) != list(numbers):
            raise ValueError(f"'{set_label(s)}' has amplitudes of modes {modes}, the first set of "
                             f"modes {numbers}: overlay sets of the same modes only.")
        label = set_label(s, f"set {i + 1}")
        n = 2
        while label in out:
            label = f"{set_label(s, 'set')} ({n})"
            n += 1
        out[label] = arrays
    return out


def matched_amplitudes(arrays: Dict[str, "convert.ParticleArrays"]) -> Dict[str, np.ndarray]:
    """Amplitudes of every set restricted to the particles of the first set (matched by id).
    Returns ``{label: (M_i, K)}``; the first set is kept whole."""
    items = list(arrays.items())
    first_label, first = items[0]
    out = {first_label: first.amplitudes}
    for label, a in items[1:]:
        _, _, values = analysis.match_by_id(first.ids, first.amplitudes, a.ids, a.amplitudes)
        out[label] = values
    return out


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
                 color_attribute: str = "_cfdlScore", color_mode: Optional[int] = None,
                 truth=None, path: Optional[np.ndarray] = None, path_label: str = "trajectory",
                 title: str = ""):
    """Point cloud Figure of SetOfParticlesFlex ``sets`` (the first is the main set; the
    others are overlaid, matched to it by particle id).

    shown: up to three mode numbers ('7 9'; '' = the first three) unless ``pca``.
    color_by: COLOR_SET (one colour per set), COLOR_ATTRIBUTE (``color_attribute``
    of the main set's particles), COLOR_MODE (amplitude of mode ``color_mode``, Å) or
    COLOR_ERROR (Euclidean amplitude error, Å, of the main set against ``truth``);
    these colour the main set only. path: optional (F, K) Å drawn over the clouds.
    """
    arrays = flex_arrays(sets)
    first = next(iter(arrays.values()))
    numbers = first.mode_numbers or list(range(7, 7 + first.amplitudes.shape[1]))
    data = matched_amplitudes(arrays)
    main = next(iter(data))
    colours, cbar = None, ""
    if color_by == COLOR_ATTRIBUTE:
        colours, cbar = {main: read_attribute(sets[0], color_attribute)}, color_attribute
    elif color_by == COLOR_MODE:
        if color_mode not in numbers:
            raise ValueError(f"Mode {color_mode} is not among the particles' modes {numbers}.")
        colours = {main: data[main][:, numbers.index(color_mode)]}
        cbar = plots.mode_label(color_mode)
    elif color_by == COLOR_ERROR:
        if truth is None:
            raise ValueError("Colouring by error needs a ground-truth set.")
        t = convert.read_particles(truth, need_amplitudes=True)
        ids, pred, true = analysis.match_by_id(first.ids, first.amplitudes, t.ids, t.amplitudes)
        if len(ids) != len(first.ids):
            raise ValueError("The ground truth lacks some particles of the main set.")
        colours, cbar = {main: np.linalg.norm(pred - true, axis=1)}, "Amplitude error (Å)"
    dims = "pca" if pca else _dims(numbers, shown)
    return plots.plot_point_cloud(data, numbers, dims=dims, color_by=colours, colorbar_label=cbar,
                                  path=path, path_label=path_label, title=title)


# ----------------------------------------------------------------------------- error reports

def find_ground_truth(sets: Sequence):
    """Index of the first set whose FlexInfo says 'ground truth', or None."""
    for i, s in enumerate(sets):
        if flex_source(s) == convert.SOURCE_GROUND_TRUTH:
            return i
    return None


def error_reports(truth, others: Sequence, modes_set=None) -> "OrderedDict[str, tuple]":
    """Error reports of SetOfParticlesFlex ``others`` against ``truth`` (matched by id).

    modes_set: optional SetOfNormalModes holding the particles' modes, to fill the
    RMSD (Å) of the reference displaced by the mean errors (and mean -/+ std).
    Returns ``{label: (AmplitudeErrorReport, PoseErrorReport or None)}``; poses are
    compared when both sets carry them (angles in degrees, shifts in px).
    """
    if not others:
        raise ValueError("No set to compare with the ground truth.")
    t = convert.read_particles(truth, need_amplitudes=True)
    numbers = t.mode_numbers or list(range(7, 7 + t.amplitudes.shape[1]))
    modes = convert.read_modes(modes_set, numbers)[1] if modes_set is not None else None
    out = OrderedDict()
    for label, a in flex_arrays(others).items():
        if a.mode_numbers is not None and list(a.mode_numbers) != list(numbers):
            raise ValueError(f"'{label}' has amplitudes of modes {a.mode_numbers}, the ground truth "
                             f"of modes {numbers}.")
        rows = np.arange(len(a.ids))
        ids, rows_a, rows_t = analysis.match_by_id(a.ids, rows, t.ids, np.arange(len(t.ids)))
        amp = analysis.amplitude_errors(a.amplitudes[rows_a], t.amplitudes[rows_t], numbers, modes)
        pose = None
        if a.angles is not None and t.angles is not None:
            shifts = a.shifts is not None and t.shifts is not None
            pose = analysis.pose_errors(a.angles[rows_a], t.angles[rows_t],
                                        a.shifts[rows_a] if shifts else None,
                                        t.shifts[rows_t] if shifts else None)
        out[label] = (amp, pose)
    return out


def error_table(reports) -> tuple:
    """``(header, rows)`` of error reports for a table: one row per set, mean ± std per mode
    (Å), the global mean (Å), the RMSD (Å), angular (°) and shift (px) mean errors."""
    first = next(iter(reports.values()))[0]
    header = (["Set", "Particles"] + [f"Mode {m} (Å)" for m in first.mode_numbers]
              + ["All (Å)", "RMSD (Å)", "Angle (°)", "Shift (px)"])
    rows = []
    for label, (amp, pose) in reports.items():
        rmsd = "–" if amp.rmsd_mean is None else (
            f"{amp.rmsd_mean:.2f} [{amp.rmsd_mean_minus_std:.2f}, {amp.rmsd_mean_plus_std:.2f}]")
        rows.append([label, amp.n_particles]
                    + [f"{mu:.2f} ± {sd:.2f}" for mu, sd in zip(amp.per_mode_mean, amp.per_mode_std)]
                    + [f"{amp.mean_abs_error:.2f}", rmsd,
                       "–" if pose is None else f"{pose.angular_mean:.2f}",
                       "–" if pose is None or pose.shift is None else f"{pose.shift_mean:.2f}"])
    return header, rows


def write_error_reports_csv(path, reports) -> str:
    """One CSV of several sets' reports: columns ``set`` + :data:`analysis.CSV_COLUMNS`."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=("set",) + analysis.CSV_COLUMNS)
        writer.writeheader()
        for label, (amp, pose) in reports.items():
            for r in amp.rows() + (pose.rows() if pose is not None else []):
                writer.writerow(dict(r, set=label))
    return str(path)


def error_summary_lines(particles, truth, modes_set=None, require_truth: bool = True) -> List[str]:
    """Lines for a protocol's _summary: the error report of ``particles`` against ``truth``
    (e.g. a HEMNMA output against its synthesized input). With ``require_truth``, returns
    [] unless ``truth`` is marked 'ground truth' (FlexInfo) and carries amplitudes, so a
    protocol can call it on any input."""
    if require_truth:
        if truth is None or flex_source(truth) != convert.SOURCE_GROUND_TRUTH:
            return []
        try:
            reports = error_reports(truth, [particles], modes_set)
        except ValueError:
            return []
    else:
        reports = error_reports(truth, [particles], modes_set)
    (amp, pose), = reports.values()
    lines = [f"Amplitude errors against the ground truth ({amp.n_particles} particles): "
             f"{amp.mean_abs_error:.2f} Å on average; per mode "
             + ", ".join(f"{m}: {mu:.2f} ± {sd:.2f} Å" for m, mu, sd in
                         zip(amp.mode_numbers, amp.per_mode_mean, amp.per_mode_std)) + "."]
    if amp.rmsd_mean is not None:
        lines.append(f"RMSD of the reference displaced by the mean errors: {amp.rmsd_mean:.2f} Å "
                     f"(mean -/+ std: {amp.rmsd_mean_minus_std:.2f}-{amp.rmsd_mean_plus_std:.2f} Å).")
    if pose is not None:
        text = f"Angular error {pose.angular_mean:.2f}° (median {pose.angular_median:.2f}°)"
        if pose.shift is not None:
            text += f", shift error {pose.shift_mean:.2f} px (median {pose.shift_median:.2f} px)"
        lines.append(text + ".")
    return lines


# ----------------------------------------------------------------------------- the viewer

class FlexDLFlexViewer(ProtocolViewer):
    """Amplitude landscapes: point clouds (overlaid sets matched by particle id) and
    errors against a ground truth."""
    _label = "amplitude landscape viewer"
    _targets = [SetOfParticlesFlex, FlexDLProtTrajectory, FlexDLProtCluster]
    _environments = [DESKTOP_TKINTER]

    def _defineParams(self, form):
        form.addSection(label="Point cloud")
        form.addParam("overlaySets", params.MultiPointerParam, pointerClass="SetOfParticlesFlex",
                      allowsNull=True, minNumObjects=0, maxNumObjects=5, label="Sets to overlay",
                      help="Other sets of the same particles (ground truth, HEMNMA, DeepHEMNMA), "
                           "matched to the main set by particle id.")
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
                           "particle ('_cfdlScore': HEMNMA score, '_cfdlMahalanobis': outlier "
                           "distance). amplitude of a mode. error to ground truth: Euclidean "
                           "distance (Å) of the main set's amplitudes to the truth.")
        form.addParam("colorAttribute", params.StringParam, default="_cfdlScore",
                      condition="colorBy == 1", label="Attribute")
        form.addParam("colorMode", params.IntParam, default=7, condition="colorBy == 2",
                      label="Mode")
        form.addParam("displayCloud", params.LabelParam, label="Show the point cloud")
        form.addSection(label="Errors")
        form.addParam("groundTruth", params.PointerParam, pointerClass="SetOfParticlesFlex",
                      allowsNull=True, label="Ground truth",
                      help="Empty: the shown set whose amplitudes are marked 'ground truth' (e.g. "
                           "the synthesis output); the other shown sets are compared with it.")
        form.addParam("errorModes", params.PointerParam, pointerClass="SetOfNormalModes",
                      allowsNull=True, label="Normal modes (for RMSD)",
                      help="The modes of the amplitudes, to give the errors as atomic RMSD (Å).")
        form.addParam("displayErrors", params.LabelParam, label="Error table (and CSV)")
        form.addParam("displayErrorHistograms", params.LabelParam, label="Error histograms")

    def _getVisualizeDict(self):
        return {"displayCloud": self._showCloud, "displayErrors": self._showErrors,
                "displayErrorHistograms": self._showErrorHistograms}

    # ------------------------------------------------------------------ inputs
    def _mainSet(self):
        target = self.protocol
        if isinstance(target, SetOfParticlesFlex):
            return target
        if hasattr(target, "inputParticles"):
            return target.inputParticles.get()
        return getattr(target, "outputParticles", None)

    def _overlays(self) -> list:
        return [p.get() for p in self.overlaySets if p.get() is not None]

    def _shownSets(self) -> list:
        return [self._mainSet()] + self._overlays()

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
        if self.groundTruth.get() is not None:
            return self.groundTruth.get(), sets
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
        return cloud_figure(self._shownSets(), self.modesToShow.get(),
                            self.dimensions.get() == DIMS_PCA, self.colorBy.get(),
                            self.colorAttribute.get(), self.colorMode.get(), truth, path, path_label,
                            title=set_label(self._mainSet()))

    def _showCloud(self, param=None):
        try:
            fig = self.cloudFigure()
        except ValueError as exc:
            return [self.errorMessage(str(exc))]
        return [FigureView(fig, "Amplitude point cloud", self._tkRoot)]

    def errorReports(self):
        """``{label: (amplitude report, pose report)}`` for the current form values (headless)."""
        truth, others = self._truthAndOthers()
        return error_reports(truth, others, self.errorModes.get())

    def _csvPath(self) -> str:
        """Beside the main set's database (its run folder), else in the viewer's working folder."""
        main = self._mainSet()
        folder = os.path.dirname(main.getFileName() or "")
        if not folder or not os.access(folder, os.W_OK):
            folder = self.getWorkingDir() or "."
        name = os.path.splitext(os.path.basename(main.getFileName() or "particles"))[0]
        return os.path.join(folder, "%s_errors.csv" % name)

    def _showErrors(self, param=None):
        try:
            reports = self.errorReports()
        except ValueError as exc:
            return [self.errorMessage(str(exc))]
        self.csvFile = write_error_reports_csv(self._csvPath(), reports)
        header, rows = error_table(reports)
        return [TableRowsView(header, rows, "Errors against the ground truth (CSV: %s)" % self.csvFile)]

    def _showErrorHistograms(self, param=None):
        try:
            reports = self.errorReports()
        except ValueError as exc:
            return [self.errorMessage(str(exc))]
        return [FigureView(plots.plot_error_histograms(amp, title=label), f"Errors of {label}", self._tkRoot)
                for label, (amp, _) in reports.items()]

