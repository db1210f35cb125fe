"""Error reports against ground truth, and outlier removal in amplitude space.

Error reports follow the DeepHEMNMA papers' tables (Hamitouche & Jonic 2021,
2022): per normal mode, the mean +/- standard deviation of the absolute
amplitude errors ``|q_pred - q_true|`` (Å), their global mean over all modes
and particles, and the RMSD (Å) between the reference structure and the
reference displaced by those errors (by the means, and by mean -/+ std).
Pose errors are geodesic angles between rotations (degrees) and Euclidean
distances between in-plane shifts (pixels); rotations come from
:mod:`continuousflex_dl.core.imaging.geometry` (Euler ZYZ).

Outlier removal (the papers remove 10 % of the HEMNMA amplitudes) uses the
Mahalanobis distance of each particle's amplitude vector to the cloud.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..imaging.geometry import angular_distance_deg, euler_to_matrix
from ..modes.nma import displace, first_flexible_modes

__all__ = [
    "AmplitudeErrorReport", "PoseErrorReport", "amplitude_errors", "pose_errors",
    "rmsd_of_amplitude_errors", "match_by_id", "write_error_csv", "format_error_table",
    "mahalanobis_distances", "outlier_mask",
]

CSV_COLUMNS = ("quantity", "mode", "mean", "std", "median", "unit", "n")


def _as_2d(name: str, x, k: Optional[int] = None) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim == 1 and k == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (particles, values); got shape {a.shape}.")
    if k is not None and a.shape[1] != k:
        raise ValueError(f"{name} must have {k} columns; got shape {a.shape}.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return a


# ----------------------------------------------------------------------------- amplitudes


@dataclass
class AmplitudeErrorReport:
    """Absolute amplitude errors of M particles over K modes (all in Å).

    mode_numbers: (K,) mode numbers (1-based, as in the NMA; 7 = first flexible).
    abs_errors: (M, K) per-particle absolute errors ``|pred - truth|``.
    mean_abs_error: global mean over all particles and modes.
    per_mode_mean, per_mode_std: (K,) mean and (population, ddof=0) std per mode.
    per_mode_median: (K,) median per mode.
    rmsd_mean, rmsd_mean_minus_std, rmsd_mean_plus_std: RMSD (Å) of the reference
    displaced by per_mode_mean, max(per_mode_mean - std, 0) and per_mode_mean + std
    (None without modes). An absolute error is never negative, so the lower value is
    clipped at 0 per mode and the three are ordered: minus <= mean <= plus.
    rmsd_per_particle: (M,) RMSD (Å) of the reference displaced by each particle's
    signed errors, i.e. the atomic RMSD between its predicted and true conformations
    (None without modes).
    """
    mode_numbers: np.ndarray
    abs_errors: np.ndarray
    mean_abs_error: float
    per_mode_mean: np.ndarray
    per_mode_std: np.ndarray
    per_mode_median: np.ndarray
    rmsd_mean: Optional[float] = None
    rmsd_mean_minus_std: Optional[float] = None
    rmsd_mean_plus_std: Optional[float] = None
    rmsd_per_particle: Optional[np.ndarray] = None

    @property
    def n_particles(self) -> int:
        return int(self.abs_errors.shape[0])

    def rows(self) -> List[dict]:
        """CSV rows (see :data:`CSV_COLUMNS`): one per mode, the global mean, the RMSDs."""
        n = self.n_particles
        out = [dict(quantity="amplitude_abs_error", mode=int(m), mean=float(mu), std=float(sd),
                    median=float(md), unit="A", n=n)
               for m, mu, sd, md in zip(self.mode_numbers, self.per_mode_mean, self.per_mode_std,
                                        self.per_mode_median)]
        out.append(dict(quantity="amplitude_abs_error", mode="all", mean=self.mean_abs_error,
                        std=float(np.std(self.abs_errors)), median=float(np.median(self.abs_errors)),
                        unit="A", n=n))
        for name in ("rmsd_mean", "rmsd_mean_minus_std", "rmsd_mean_plus_std"):
            value = getattr(self, name)
            if value is not None:
                out.append(dict(quantity=name, mode="all", mean=float(value), std="", median="",
                                unit="A", n=n))
        if self.rmsd_per_particle is not None:
            r = self.rmsd_per_particle
            out.append(dict(quantity="rmsd_per_particle", mode="all", mean=float(r.mean()),
                            std=float(r.std()), median=float(np.median(r)), unit="A", n=n))
        return out


def rmsd_of_amplitude_errors(modes: np.ndarray, errors: np.ndarray) -> Union[float, np.ndarray]:
    """RMSD (Å) between a structure and itself displaced by amplitudes ``errors``.

    modes: (K, N, 3) mode vectors (unit-norm as 3N vectors); errors: (K,) or
    (..., K) amplitudes in Å. Returns ``sqrt(mean_atoms |sum_k e_k v_k|^2)``, a
    float for (K,) input, else an array (...). The reference coordinates cancel,
    so they are not needed. For orthonormal modes this equals ``|e| / sqrt(N)``.
    """
    modes = np.asarray(modes, dtype=float)
    errors = np.asarray(errors, dtype=float)
    if modes.ndim != 3 or modes.shape[2] != 3:
        raise ValueError(f"modes must have shape (K, N, 3); got {modes.shape}.")
    if errors.shape[-1:] != (modes.shape[0],):
        raise ValueError(f"errors must have {modes.shape[0]} values (one per mode) in the last "
                         f"axis; got shape {errors.shape}.")
    d = displace(np.zeros(modes.shape[1:]), modes, errors)
    r = np.sqrt(np.mean(np.sum(d ** 2, axis=-1), axis=-1))
    return float(r) if r.ndim == 0 else r


def amplitude_errors(pred: np.ndarray, truth: np.ndarray,
                     mode_numbers: Optional[Sequence[int]] = None,
                     modes: Optional[np.ndarray] = None) -> AmplitudeErrorReport:
    """Error report of predicted amplitudes against the truth.

    pred, truth: (M, K) amplitudes in Å, rows paired (see :func:`match_by_id`).
    mode_numbers: K mode numbers for labels (default 7..6+K).
    modes: optional (K, N, 3) mode vectors to fill the RMSD fields (for the
    per-particle RMSD only their (K, K) Gram matrix is used, so memory stays O(K N)).
    """
    pred = _as_2d("pred", pred)
    truth = _as_2d("truth", truth)
    if pred.shape != truth.shape:
        raise ValueError(f"Predicted and true amplitudes differ in shape: {pred.shape} vs "
                         f"{truth.shape}; pair them by particle id first.")
    m, k = pred.shape
    if m == 0:
        raise ValueError("No particles to compare.")
    if mode_numbers is None:
        mode_numbers = first_flexible_modes(k)
    mode_numbers = np.asarray(mode_numbers, dtype=int)
    if mode_numbers.shape != (k,):
        raise ValueError(f"Expected {k} mode numbers; got {list(mode_numbers)}.")
    err = np.abs(pred - truth)
    mean = err.mean(axis=0)
    std = err.std(axis=0)
    report = AmplitudeErrorReport(mode_numbers=mode_numbers, abs_errors=err,
                                  mean_abs_error=float(err.mean()), per_mode_mean=mean,
                                  per_mode_std=std, per_mode_median=np.median(err, axis=0))
    if modes is not None:
        modes = np.asarray(modes, dtype=float)
        if modes.ndim != 3 or modes.shape[0] != k:
            raise ValueError(f"modes must have shape ({k}, N, 3) to match the amplitudes; "
                             f"got {modes.shape}.")
        r = rmsd_of_amplitude_errors(modes, np.stack([mean, np.maximum(mean - std, 0.0), mean + std]))
        report.rmsd_mean, report.rmsd_mean_minus_std, report.rmsd_mean_plus_std = map(float, r)
        flat = modes.reshape(k, -1)
        e = pred - truth
        squared = np.einsum("mk,kl,ml->m", e, flat @ flat.T, e) / modes.shape[1]
        report.rmsd_per_particle = np.sqrt(np.maximum(squared, 0.0))
    return report


# ----------------------------------------------------------------------------- poses


@dataclass
class PoseErrorReport:
    """Pose errors of M particles.

    angular: (M,) geodesic angle (degrees) between predicted and true rotations.
    shift: (M,) Euclidean distance (px) between shifts, or None.
    """
    angular: np.ndarray
    shift: Optional[np.ndarray] = None

    @property
    def n_particles(self) -> int:
        return int(self.angular.shape[0])

    @property
    def angular_mean(self) -> float:
        return float(np.mean(self.angular))

    @property
    def angular_median(self) -> float:
        return float(np.median(self.angular))

    @property
    def shift_mean(self) -> Optional[float]:
        return None if self.shift is None else float(np.mean(self.shift))

    @property
    def shift_median(self) -> Optional[float]:
        return None if self.shift is None else float(np.median(self.shift))

    def rows(self) -> List[dict]:
        """CSV rows (see :data:`CSV_COLUMNS`)."""
        n = self.n_particles
        out = [dict(quantity="angular_error", mode="", mean=self.angular_mean,
                    std=float(np.std(self.angular)), median=self.angular_median, unit="deg", n=n)]
        if self.shift is not None:
            out.append(dict(quantity="shift_error", mode="", mean=self.shift_mean,
                            std=float(np.std(self.shift)), median=self.shift_median, unit="px", n=n))
        return out


def pose_errors(angles_pred: np.ndarray, angles_true: np.ndarray,
                shifts_pred: Optional[np.ndarray] = None,
                shifts_true: Optional[np.ndarray] = None) -> PoseErrorReport:
    """Angular (geodesic, degrees) and shift (Euclidean, px) errors.

    angles_pred, angles_true: (M, 3) Euler ZYZ (rot, tilt, psi) in degrees.
    shifts_pred, shifts_true: (M, 2) in pixels (both or neither).
    """
    a = _as_2d("angles_pred", angles_pred, 3)
    b = _as_2d("angles_true", angles_true, 3)
    if a.shape != b.shape:
        raise ValueError(f"Predicted and true angles differ in shape: {a.shape} vs {b.shape}.")
    angular = angular_distance_deg(euler_to_matrix(a), euler_to_matrix(b))
    shift = None
    if (shifts_pred is None) != (shifts_true is None):
        raise ValueError("Give both predicted and true shifts, or neither.")
    if shifts_pred is not None:
        s = _as_2d("shifts_pred", shifts_pred, 2)
        t = _as_2d("shifts_true", shifts_true, 2)
        if s.shape[0] != a.shape[0] or t.shape[0] != a.shape[0]:
            raise ValueError("Shifts and angles must have the same number of particles.")
        shift = np.linalg.norm(s - t, axis=1)
    return PoseErrorReport(angular=angular, shift=shift)


# ----------------------------------------------------------------------------- pairing, output


def match_by_id(ids_a: Sequence, values_a: np.ndarray, ids_b: Sequence,
                values_b: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair two sets of per-particle values by particle id.

    ids_a: (Ma,) ids with values_a (Ma, ...); ids_b: (Mb,) with values_b (Mb, ...).
    Returns ``(ids, a, b)``: the ids present in both, in the order of ``ids_a``,
    and the matching rows of each set. Raises ValueError on duplicate ids or
    when no id is shared.
    """
    ids_a = np.asarray(ids_a)
    ids_b = np.asarray(ids_b)
    values_a = np.asarray(values_a)
    values_b = np.asarray(values_b)
    for name, ids, values in (("first", ids_a, values_a), ("second", ids_b, values_b)):
        if ids.ndim != 1 or len(ids) != len(values):
            raise ValueError(f"The {name} set has {len(ids)} ids but {len(values)} value rows.")
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"The {name} set has duplicate particle ids.")
    index_b = {key: i for i, key in enumerate(ids_b.tolist())}
    rows_a = [i for i, key in enumerate(ids_a.tolist()) if key in index_b]
    if not rows_a:
        raise ValueError("The two sets share no particle id.")
    rows_b = [index_b[ids_a[i].item()] for i in rows_a]
    return ids_a[rows_a], values_a[rows_a], values_b[rows_b]


Report = Union[AmplitudeErrorReport, PoseErrorReport]


def write_error_csv(path: Union[str, os.PathLike], report: Union[Report, Sequence[Report]]) -> Path:
    """Write one or several reports as CSV with columns
    ``quantity, mode, mean, std, median, unit, n``. Returns the path."""
    reports = [report] if isinstance(report, (AmplitudeErrorReport, PoseErrorReport)) else list(report)
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in reports:
            for row in r.rows():
                writer.writerow(row)
    return path


def _fmt(value, digits: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value or "–"
    if isinstance(value, (tuple, list, np.ndarray)) and len(value) == 2:
        return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"
    if isinstance(value, float) and math.isnan(value):
        return "–"
    return f"{float(value):.{digits}f}"


def format_error_table(report: Union[Report, Mapping[str, Report]], paper_row: Optional[Mapping] = None,
                       label: str = "This run", paper_label: str = "Paper",
                       digits: int = 2) -> str:
    """Markdown table of one report, or of several as rows (``{row label: report}``,
    e.g. 'HEMNMA vs GT', 'DeepHEMNMA vs GT'), optionally with the paper's numbers
    as a last row.

    Amplitude report columns: ``Mode <m> (Å)`` (mean ± std of absolute errors)
    for each mode, ``All (Å)`` (global mean), ``RMSD (Å)`` (reference displaced
    by the per-mode means; with ``[mean-std, mean+std]``, the lower one clipped at 0
    per mode, when available).
    ``paper_row`` keys: mode numbers (int) -> ``(mean, std)`` or a number,
    ``'all'`` and ``'rmsd'`` -> number or string. Several amplitude reports
    must share their mode numbers.

    Pose report columns: angular error mean / median (°), shift error
    mean / median (px); ``paper_row`` keys ``'angular_mean'``,
    ``'angular_median'``, ``'shift_mean'``, ``'shift_median'``.
    """
    reports = dict(report) if isinstance(report, Mapping) else {label: report}
    if not reports:
        raise ValueError("No error report to format.")
    first = next(iter(reports.values()))
    paper_row = dict(paper_row or {})
    rows = []
    if isinstance(first, AmplitudeErrorReport):
        modes = [int(m) for m in first.mode_numbers]
        header = [""] + [f"Mode {m} (Å)" for m in modes] + ["All (Å)", "RMSD (Å)"]
        for name, r in reports.items():
            if not isinstance(r, AmplitudeErrorReport) or [int(m) for m in r.mode_numbers] != modes:
                raise ValueError("All amplitude reports in one table must cover the same modes.")
            rmsd = _fmt(r.rmsd_mean, digits)
            if r.rmsd_mean_minus_std is not None and r.rmsd_mean_plus_std is not None:
                rmsd += f" [{r.rmsd_mean_minus_std:.{digits}f}, {r.rmsd_mean_plus_std:.{digits}f}]"
            rows.append([name] + [_fmt((mu, sd), digits) for mu, sd in zip(r.per_mode_mean, r.per_mode_std)]
                        + [_fmt(r.mean_abs_error, digits), rmsd])
        theirs = ([paper_label] + [_fmt(paper_row.get(m), digits) for m in modes]
                  + [_fmt(paper_row.get("all"), digits), _fmt(paper_row.get("rmsd"), digits)])
    elif isinstance(first, PoseErrorReport):
        keys = ["angular_mean", "angular_median", "shift_mean", "shift_median"]
        header = ["", "Angle mean (°)", "Angle median (°)", "Shift mean (px)", "Shift median (px)"]
        for name, r in reports.items():
            if not isinstance(r, PoseErrorReport):
                raise ValueError("Do not mix amplitude and pose reports in one table.")
            rows.append([name] + [_fmt(getattr(r, key), digits) for key in keys])
        theirs = [paper_label] + [_fmt(paper_row.get(key), digits) for key in keys]
    else:
        raise ValueError(f"Cannot format a {type(first).__name__}; expected an error report.")
    if paper_row:
        rows.append(theirs)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# ----------------------------------------------------------------------------- outliers


def mahalanobis_distances(amplitudes: np.ndarray, robust: bool = False,
                          support_fraction: float = 0.75, iterations: int = 30,
                          n_starts: int = 10,
                          seed: Union[int, np.random.Generator] = 0) -> np.ndarray:
    """Mahalanobis distance of each amplitude vector to the cloud.

    amplitudes: (M, K) in Å. Returns (M,) distances (dimensionless, in units of
    the cloud's standard deviations): ``sqrt((x - mu)^T C^+ (x - mu))`` with the
    mean ``mu`` and covariance ``C`` (ddof=1) of the cloud; ``C^+`` is the
    pseudo-inverse, so a degenerate (flat) cloud is handled.

    robust: estimate ``mu`` and ``C`` from the ``h = support_fraction * M``
    points with the smallest covariance determinant, found as in FastMCD
    (Rousseeuw & Van Driessen 1999) by concentration steps (keep the h points
    closest to the current estimate, re-estimate, repeat) from several starts:
    the whole set, the h points nearest the coordinate-wise median in
    median-absolute-deviation units, and ``n_starts`` random (K + 1)-subsets
    drawn with ``seed``. Far outliers, even clustered ones, then do not
    inflate ``C``. No consistency correction is applied to ``C``, so robust
    distances of inliers run somewhat larger than plain ones; use them to rank
    (``outlier_mask(..., fraction=...)``) rather than with a chi-square cut.
    Raises ValueError for fewer than K + 1 points.
    """
    x = _as_2d("amplitudes", amplitudes)
    m, k = x.shape
    if m < k + 1:
        raise ValueError(f"Mahalanobis distances need at least K + 1 = {k + 1} particles for "
                         f"{k} modes; got {m}.")
    if not 0.5 <= support_fraction <= 1.0:
        raise ValueError(f"support_fraction must be within [0.5, 1]; got {support_fraction}.")

    def estimate(subset: np.ndarray):
        mu = subset.mean(axis=0)
        cov = np.atleast_2d(np.cov(subset, rowvar=False))
        return mu, cov

    def distances(mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
        inv = np.linalg.pinv(cov, hermitian=True)
        d = x - mu
        return np.sqrt(np.maximum(np.einsum("mi,ij,mj->m", d, inv, d), 0.0))

    mu, cov = estimate(x)
    if not robust:
        return distances(mu, cov)

    def score(c: np.ndarray):  # highest rank first, then smallest (pseudo-)determinant
        ev = np.linalg.eigvalsh(c)
        pos = ev[ev > 1e-12 * max(ev.max(), 1e-300)]
        return (-len(pos), float(np.sum(np.log(pos))))

    h = max(k + 1, int(math.ceil(support_fraction * m)))
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    med = np.median(x, axis=0)
    mad = np.median(np.abs(x - med), axis=0)
    mad[mad == 0] = 1.0
    starts = [np.arange(m), np.argsort(np.sum(((x - med) / mad) ** 2, axis=1), kind="stable")[:h]]
    starts += [rng.choice(m, size=k + 1, replace=False) for _ in range(n_starts)]

    def c_steps(mu, cov, chosen, n):
        for _ in range(n):
            new = np.sort(np.argsort(distances(mu, cov), kind="stable")[:h])
            if chosen is not None and np.array_equal(new, chosen):
                break
            chosen = new
            mu, cov = estimate(x[chosen])
        return score(cov), mu, cov, chosen

    # FastMCD strategy: two concentration steps from every start, then iterate
    # the three best to convergence and keep the smallest determinant.
    trials = [c_steps(*estimate(x[start]), None, 2) for start in starts]
    trials.sort(key=lambda t: t[0])
    best = min((c_steps(mu, cov, chosen, iterations) for _, mu, cov, chosen in trials[:3]),
               key=lambda t: t[0])
    return distances(best[1], best[2])


def outlier_mask(distances: np.ndarray, threshold: Optional[float] = None,
                 fraction: Optional[float] = None) -> np.ndarray:
    """Keep-mask (M,) bool: True for inliers.

    distances: (M,) e.g. from :func:`mahalanobis_distances`. Give exactly one of
    ``threshold`` (keep distances <= threshold, in Mahalanobis units) or
    ``fraction`` (remove the ``round(fraction * M)`` largest distances, e.g.
    0.1 as in the DeepHEMNMA papers).
    """
    d = np.asarray(distances, dtype=float)
    if d.ndim != 1:
        raise ValueError(f"distances must be 1-D; got shape {d.shape}.")
    if (threshold is None) == (fraction is None):
        raise ValueError("Give either a distance threshold or a fraction of outliers to remove.")
    if threshold is not None:
        if threshold < 0:
            raise ValueError(f"The distance threshold must be positive; got {threshold}.")
        return d <= threshold
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"The fraction of outliers to remove must be within [0, 1); got {fraction}.")
    n_remove = int(round(fraction * len(d)))
    keep = np.ones(len(d), dtype=bool)
    if n_remove:
        keep[np.argsort(-d, kind="stable")[:n_remove]] = False
    return keep
