"""Paths and clusters in the space of normal-mode amplitudes, and the
structures along them.

Amplitudes are (M, K) arrays in Å (one row per particle, one column per
chosen mode, in the order of the modes). A path is a (F, K) array of
amplitude vectors; :func:`trajectory_frames` turns it into (F, N, 3)
displaced structures (``x + sum_k q_k v_k``, see :mod:`.nma`) that
:func:`continuousflex_dl.core.imaging.structure.write_multimodel_pdb` writes out.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..modes.nma import displace

__all__ = [
    "principal_components", "principal_path", "path_through_points", "kmeans",
    "select_by_ranges", "nearest_particles", "nearest_points", "trajectory_frames", "write_points",
]


def _amplitudes(x, name: str = "amplitudes") -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (particles, modes) array; got shape {a.shape}.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return a


def principal_components(amplitudes: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of an amplitude cloud.

    amplitudes: (M, K) Å. Returns ``(mean (K,), components (K, K), variances (K,))``:
    rows of ``components`` are orthonormal directions by decreasing variance
    (Å², ddof=1 when M > 1), each signed so that its largest-magnitude entry
    is positive (deterministic).
    """
    x = _amplitudes(amplitudes)
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / max(len(x) - 1, 1)  # (K, K): cheap for any number of particles
    var, vecs = np.linalg.eigh(cov)
    var, vt = np.maximum(var[::-1], 0.0), vecs[:, ::-1].T
    k = x.shape[1]
    idx = np.argmax(np.abs(vt), axis=1)
    signs = np.sign(vt[np.arange(k), idx])
    signs[signs == 0] = 1.0
    return mean, vt * signs[:, None], var


def principal_path(amplitudes: np.ndarray, n_frames: int, extent: str = "percentile",
                   percentiles: Tuple[float, float] = (2.0, 98.0), n_std: float = 2.0) -> np.ndarray:
    """Straight path along the first principal component of the cloud.

    amplitudes: (M, K) Å; n_frames >= 2. The path runs through the cloud mean
    along PC 1, between the projections given by ``extent``:
    'percentile' (``percentiles`` of the projections, default 2-98 %),
    'range' (min to max) or 'std' (mean -/+ ``n_std`` standard deviations).
    Returns (n_frames, K) Å, from the negative to the positive end of PC 1.
    """
    x = _amplitudes(amplitudes)
    if n_frames < 2:
        raise ValueError(f"A path needs at least 2 frames; got {n_frames}.")
    if len(x) < 2:
        raise ValueError("A principal path needs at least 2 particles.")
    mean, comps, var = principal_components(x)
    t = (x - mean) @ comps[0]
    if extent == "percentile":
        lo, hi = percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"Percentiles must satisfy 0 <= low < high <= 100; got {percentiles}.")
        a, b = np.percentile(t, [lo, hi])
    elif extent == "range":
        a, b = t.min(), t.max()
    elif extent == "std":
        sd = float(np.sqrt(var[0]))
        a, b = -n_std * sd, n_std * sd
    else:
        raise ValueError(f"Unknown extent {extent!r}; use 'percentile', 'range' or 'std'.")
    return mean + np.linspace(a, b, n_frames)[:, None] * comps[0]


def path_through_points(points: np.ndarray, n_frames: int) -> np.ndarray:
    """Piecewise-linear path through ``points`` (P, K), sampled at ``n_frames``
    positions equally spaced in arc length (Euclidean, Å). The first and last
    frames are the first and last points. Returns (n_frames, K)."""
    p = _amplitudes(points, "points")
    if len(p) < 2:
        raise ValueError("A path needs at least 2 points.")
    if n_frames < 2:
        raise ValueError(f"A path needs at least 2 frames; got {n_frames}.")
    seg = np.linalg.norm(np.diff(p, axis=0), axis=1)
    keep = np.concatenate([[True], seg > 0])  # drop repeated consecutive points
    p = p[keep]
    if len(p) == 1:
        return np.repeat(p, n_frames, axis=0)
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))])
    targets = np.linspace(0.0, s[-1], n_frames)
    return np.stack([np.interp(targets, s, p[:, j]) for j in range(p.shape[1])], axis=1)


def write_points(path, points: np.ndarray, mode_numbers: Sequence[int]) -> None:
    """Save points (P, K) Å as text with a header naming the modes (readable by np.loadtxt)."""
    header = "amplitudes (A) of modes " + " ".join(str(int(m)) for m in mode_numbers)
    np.savetxt(path, np.atleast_2d(points), fmt="%.6f", header=header)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centres = [x[rng.integers(len(x))]]
    d2 = np.sum((x - centres[0]) ** 2, axis=1)
    for _ in range(1, k):
        total = d2.sum()
        i = rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))
        centres.append(x[i])
        d2 = np.minimum(d2, np.sum((x - x[i]) ** 2, axis=1))
    return np.array(centres)


def _assign(x: np.ndarray, centres: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    d2 = (np.sum(x ** 2, axis=1)[:, None] - 2 * x @ centres.T + np.sum(centres ** 2, axis=1)[None])
    labels = np.argmin(d2, axis=1)
    return labels, np.maximum(d2[np.arange(len(x)), labels], 0.0)


def kmeans(amplitudes: np.ndarray, k: int, seed: Union[int, np.random.Generator] = 0,
           n_init: int = 4, max_iter: int = 100, tol: float = 1e-4) -> Tuple[np.ndarray, np.ndarray]:
    """k-means clustering (Lloyd's algorithm, k-means++ initialisation).

    amplitudes: (M, K) Å; k clusters (1 <= k <= M); seed: int or numpy
    Generator (same seed -> same result). The best of ``n_init`` runs (lowest
    within-cluster sum of squares) is kept; a run stops when no label changes
    or no centre moves by more than ``tol`` times the mean variance of the
    amplitudes (squared distance, as scikit-learn). Clusters are numbered by
    decreasing size (ties: by centre coordinates), so labels are reproducible.
    Returns ``(labels (M,) int, centres (k, K) Å)``.
    """
    x = _amplitudes(amplitudes)
    if not 1 <= k <= len(x):
        raise ValueError(f"The number of clusters must be between 1 and the number of particles "
                         f"({len(x)}); got {k}.")
    if n_init < 1:
        raise ValueError(f"n_init must be at least 1; got {n_init}.")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    stop = tol * float(np.mean(np.var(x, axis=0)))
    best = None
    for _ in range(n_init):
        centres = _kmeans_pp(x, k, rng)
        labels = None
        for _ in range(max_iter):
            new_labels, d2 = _assign(x, centres)
            if labels is not None and np.array_equal(new_labels, labels):
                break
            labels = new_labels
            counts = np.bincount(labels, minlength=k)
            sums = np.stack([np.bincount(labels, weights=x[:, j], minlength=k)
                             for j in range(x.shape[1])], axis=1)
            new = centres.copy()
            full = counts > 0
            new[full] = sums[full] / counts[full, None]
            for j in np.flatnonzero(~full):  # empty cluster: restart it on the farthest point
                far = int(np.argmax(d2))
                new[j] = x[far]
                d2[far] = 0.0
            shift = np.max(np.sum((new - centres) ** 2, axis=1))
            centres = new
            if shift <= stop:
                break
        labels, d2 = _assign(x, centres)
        inertia = float(d2.sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels, centres)
    _, labels, centres = best
    sizes = np.bincount(labels, minlength=k)
    order = np.lexsort(tuple(centres.T[::-1]) + (-sizes,))
    relabel = np.empty(k, dtype=int)
    relabel[order] = np.arange(k)
    return relabel[labels], centres[order]


def select_by_ranges(amplitudes: np.ndarray,
                     ranges: Mapping[int, Tuple[Optional[float], Optional[float]]]) -> np.ndarray:
    """Particles whose amplitudes lie within given ranges.

    amplitudes: (M, K) Å; ranges: ``{column index (0-based, in the order of
    the chosen modes): (low, high)}`` in Å, inclusive; ``None`` leaves a side
    open. Returns a bool mask (M,) true where every listed column is in range.
    """
    x = _amplitudes(amplitudes)
    keep = np.ones(len(x), dtype=bool)
    for index, (lo, hi) in ranges.items():
        if not 0 <= int(index) < x.shape[1]:
            raise ValueError(f"Mode index {index} is out of range: the amplitudes have "
                             f"{x.shape[1]} modes (indices 0..{x.shape[1] - 1}).")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"Empty range ({lo}, {hi}) for mode index {index}.")
        col = x[:, int(index)]
        if lo is not None:
            keep &= col >= lo
        if hi is not None:
            keep &= col <= hi
    return keep


def nearest_particles(amplitudes: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Index of the particle closest (Euclidean, Å) to each point, e.g. to each
    k-means centre or path frame: amplitudes (M, K), points (P, K) -> (P,) int."""
    x = _amplitudes(amplitudes)
    p = _amplitudes(points, "points")
    if p.shape[1] != x.shape[1]:
        raise ValueError(f"The points have {p.shape[1]} amplitudes but the particles have {x.shape[1]}.")
    return _assign(p, x)[0]


def nearest_points(amplitudes: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Index of the point closest (Euclidean, Å) to each particle, e.g. the path frame whose
    particles are reconstructed together: amplitudes (M, K), points (P, K) -> (M,) int."""
    x = _amplitudes(amplitudes)
    p = _amplitudes(points, "points")
    if p.shape[1] != x.shape[1]:
        raise ValueError(f"The points have {p.shape[1]} amplitudes but the particles have {x.shape[1]}.")
    return _assign(x, p)[0]


def trajectory_frames(coords: np.ndarray, modes: np.ndarray, path: np.ndarray) -> np.ndarray:
    """Structures along a path: coords (N, 3) Å, modes (K, N, 3), path (F, K) Å
    -> (F, N, 3) Å, ``coords + sum_k path[f, k] modes[k]``."""
    coords = np.asarray(coords, dtype=float)
    modes = np.asarray(modes, dtype=float)
    path = _amplitudes(path, "path")
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must have shape (N, 3); got {coords.shape}.")
    if modes.ndim != 3 or modes.shape[1:] != coords.shape:
        raise ValueError(f"modes must have shape (K, {coords.shape[0]}, 3); got {modes.shape}.")
    if path.shape[1] != modes.shape[0]:
        raise ValueError(f"The path has {path.shape[1]} amplitudes per frame but there are "
                         f"{modes.shape[0]} modes.")
    return displace(coords, modes, path)
