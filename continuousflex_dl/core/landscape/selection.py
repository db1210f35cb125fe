"""Regions of the amplitude landscape: a 2-D view of the amplitudes and the particles inside
a polygon (lasso) or a box drawn in it.

A view is linear: the point of a particle of amplitudes ``q`` (K,) Å is
``(q - origin) @ axes.T`` (2,) Å. Two modes are a view with ``origin = 0`` and unit axes;
principal components a view with the cloud's mean and its first two directions. A
selection is reproducible from ``(view, polygon)`` alone, or from the particle ids it gave.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from .trajectory import principal_components

__all__ = ["LinearView", "mode_view", "pca_view", "points_in_polygon", "box_polygon", "select",
           "nearest_point", "format_ids", "parse_ids", "parse_polygon", "format_polygon"]


@dataclass(frozen=True)
class LinearView:
    """A 2-D view of K amplitudes: origin (K,) Å, axes (2, K) (rows of unit norm) and the
    axis labels (units included)."""
    origin: Tuple[float, ...]
    axes: Tuple[Tuple[float, ...], ...]
    labels: Tuple[str, str]

    def project(self, amplitudes: np.ndarray) -> np.ndarray:
        """(M, 2) Å: the points of amplitudes (M, K) Å in this view."""
        q = np.atleast_2d(np.asarray(amplitudes, dtype=float))
        axes = np.asarray(self.axes, dtype=float)
        if q.shape[1] != axes.shape[1]:
            raise ValueError(f"The view is of {axes.shape[1]} modes; the particles have {q.shape[1]} "
                             f"amplitudes: select on particles with the modes of the view.")
        return (q - np.asarray(self.origin, dtype=float)) @ axes.T

    def to_text(self) -> str:
        """One line of numbers, ``origin ; axis 1 ; axis 2`` (Å), :meth:`from_text` reads it."""
        return " ; ".join(" ".join(f"{v:.9g}" for v in row) for row in (self.origin,) + tuple(self.axes))

    @classmethod
    def from_text(cls, text: str, labels: Tuple[str, str] = ("PC 1 (Å)", "PC 2 (Å)")) -> "LinearView":
        rows = [r.split() for r in str(text).split(";")]
        try:
            values = [[float(v) for v in r] for r in rows]
        except ValueError:
            raise ValueError(f"A view is written 'origin ; axis 1 ; axis 2', each K numbers; got {text!r}.")
        if len(values) != 3 or len({len(r) for r in values}) != 1 or not values[0]:
            raise ValueError(f"A view is written 'origin ; axis 1 ; axis 2', each K numbers; got {text!r}.")
        return cls(tuple(values[0]), (tuple(values[1]), tuple(values[2])), tuple(labels))


def mode_view(mode_numbers: Sequence[int], shown: Sequence[int]) -> LinearView:
    """The view of two modes ``shown`` (mode numbers) among the K ``mode_numbers`` of the amplitudes."""
    numbers = [int(m) for m in mode_numbers]
    shown = [int(m) for m in shown]
    if len(shown) != 2 or shown[0] == shown[1]:
        raise ValueError(f"Select in a view of two different modes; got {shown}.")
    missing = [m for m in shown if m not in numbers]
    if missing:
        raise ValueError(f"Modes {missing} are not among the particles' modes {numbers}.")
    axes = np.zeros((2, len(numbers)))
    for row, m in enumerate(shown):
        axes[row, numbers.index(m)] = 1.0
    return LinearView(tuple([0.0] * len(numbers)), tuple(map(tuple, axes)),
                      (f"Mode {shown[0]} amplitude (Å)", f"Mode {shown[1]} amplitude (Å)"))


def pca_view(amplitudes: np.ndarray) -> LinearView:
    """The view of the first two principal components of amplitudes (M, K >= 2) Å."""
    q = np.asarray(amplitudes, dtype=float)
    if q.ndim != 2 or q.shape[1] < 2:
        raise ValueError("Principal components need at least two modes.")
    mean, comps, _ = principal_components(q)
    return LinearView(tuple(mean.tolist()), tuple(map(tuple, comps[:2].tolist())), ("PC 1 (Å)", "PC 2 (Å)"))


def points_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """(M,) bool: which points (M, 2) lie inside the polygon (P >= 3, 2) (even-odd rule;
    the polygon is closed implicitly; a point on an edge may fall either way)."""
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    poly = np.asarray(polygon, dtype=float)
    if poly.ndim != 2 or poly.shape[1] != 2 or len(poly) < 3:
        raise ValueError(f"A polygon needs at least 3 vertices (x, y); got shape {poly.shape}.")
    x, y = pts[:, 0:1], pts[:, 1:2]                    # (M, 1)
    x0, y0 = poly[:, 0], poly[:, 1]                    # (P,)
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = (y0 > y) != (y1 > y)                     # (M, P): the edge spans the point's height
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return np.count_nonzero(crosses & (x < x_at), axis=1) % 2 == 1


def box_polygon(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """(4, 2): the corners of the box between two opposite corners."""
    a, b = sorted((float(x0), float(x1)))
    c, d = sorted((float(y0), float(y1)))
    return np.array([[a, c], [b, c], [b, d], [a, d]])


def select(amplitudes: np.ndarray, view: LinearView, polygon: np.ndarray) -> np.ndarray:
    """(M,) bool: the particles of amplitudes (M, K) Å whose point in ``view`` is in ``polygon`` (Å)."""
    return points_in_polygon(view.project(amplitudes), polygon)


def nearest_point(points: np.ndarray, x: float, y: float, scale: Sequence[float] = (1.0, 1.0)) -> int:
    """Index of the point (M, 2) nearest to (x, y), distances measured in units of ``scale``
    (the axes' spans, so that a click on a stretched axis picks what the eye sees)."""
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    if not len(pts):
        raise ValueError("There are no points to pick from.")
    s = np.where(np.asarray(scale, dtype=float) > 0, scale, 1.0)
    return int(np.argmin((((pts - [x, y]) / s) ** 2).sum(axis=1)))


def format_ids(ids: Sequence[int]) -> str:
    """Particle ids as ranges, e.g. ``'1-4 7 9-10'`` (:func:`parse_ids` reads it back)."""
    values = sorted({int(i) for i in ids})
    parts: List[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return " ".join(parts)


def parse_ids(text: str) -> np.ndarray:
    """Sorted unique ids of ``'1-4 7, 9-10'`` (ranges inclusive)."""
    ids = set()
    for token in re.split(r"[\s,;]+", str(text or "").strip()):
        if not token:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", token)
        if m is None:
            raise ValueError(f"Write particle ids as numbers and ranges, e.g. '1-20 25 30-32'; got {token!r}.")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise ValueError(f"The range {token!r} ends before it starts: write it as '{b}-{a}'.")
        ids.update(range(a, b + 1))
    return np.array(sorted(ids), dtype=np.int64)


def format_polygon(polygon: np.ndarray) -> str:
    """Vertices (P, 2) Å as ``'x y, x y, ...'`` (:func:`parse_polygon` reads it back)."""
    return ", ".join(f"{x:.6g} {y:.6g}" for x, y in np.asarray(polygon, dtype=float))


def parse_polygon(text: str) -> np.ndarray:
    """(P, 2) vertices of ``'x y, x y, x y'`` (Å, at least 3)."""
    try:
        rows = [[float(v) for v in part.split()] for part in str(text or "").split(",") if part.strip()]
    except ValueError:
        rows = []
    if len(rows) < 3 or any(len(r) != 2 for r in rows):
        raise ValueError(f"Write the region as at least three vertices 'x y, x y, x y' (Å in the view's "
                         f"axes); got {text!r}.")
    return np.array(rows)
