"""Sets of particles with amplitudes as arrays, and their error reports against a ground truth.

Used by the landscape viewer and by protocols' summaries (no GUI code here).
"""
import csv
from collections import OrderedDict
from typing import Dict, List, Sequence

import numpy as np

from . import convert
from .core import analysis
from .convert import flex_source

__all__ = ["flex_source", "set_label", "read_attribute", "flex_arrays", "matched_amplitudes",
           "find_ground_truth", "error_reports", "error_table", "write_error_reports_csv",
           "error_summary_lines"]


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
