"""Rotations and poses: the one place that fixes the projection convention.

Convention (Xmipp / RELION, and Scipion's ALIGN_PROJ ``Transform``):

* Euler angles ``(rot, tilt, psi)`` in degrees, ZYZ, define the matrix
  ``A = Rz(psi) @ Ry(tilt) @ Rz(rot)`` written with *passive* elementary
  rotations ``Rz(a) = [[cos a, sin a, 0], [-sin a, cos a, 0], [0, 0, 1]]`` and
  ``Ry(b) = [[cos b, 0, -sin b], [0, 1, 0], [sin b, 0, cos b]]``
  (RELION's and Xmipp's ``Euler_angles2matrix``).
* Image formation (RELION's ``ObservationModel::predictObservation``): a
  point ``r`` of the reference (Å, origin at the box centre) lands at
  ``(A @ r)[:2] / pixel_size - shift`` (pixels from the box centre) in the
  particle image, then is summed along the viewing direction ``z``. So the
  angles rotate the reference into the observation, and the shift
  ``(shiftX, shiftY)`` in pixels is RELION's origin (``rlnOriginX/Y``, and
  ``rlnOriginX/YAngst`` divided by the pixel size) and Xmipp's ``shiftX/Y``:
  it shifts the observation into the reference projection, and the particle
  centre sits at **box centre minus shift** (:func:`particle_offset_px`).
* Image arrays are indexed ``[y, x]``; pixel ``(iy, ix)`` has coordinates
  ``(ix - n // 2, iy - n // 2)`` (the FFT centre), volumes ``[z, y, x]``.
* Scipion stores the pose of a projection as the 4x4 matrix
  ``T = inv([[A, -s], [0, 1]])`` with ``s = (shiftX, shiftY, 0)``, i.e.
  ``T[:3, :3] = A.T`` and ``T[:3, 3] = A.T @ s``, the same as Scipion's
  Xmipp and RELION converters (``matrixFromGeometry(..., inverseTransform=True)``),
  which write ``rlnOrigin = -translation(inv(T)) = shift``.

Versions before 0.2 placed the particle at box centre *plus* shift: their
poses have mirrored shifts in every other program.

Functions accept numpy arrays or torch tensors of any leading batch shape.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch

__all__ = [
    "euler_to_matrix", "matrix_to_euler", "pose_to_scipion_matrix",
    "scipion_matrix_to_pose", "particle_offset_px", "random_rotations", "angular_distance_deg",
]


def _lib(x):
    return torch if isinstance(x, torch.Tensor) else np


def euler_to_matrix(angles_deg):
    """Rotation matrices ``A`` from Euler ZYZ angles.

    angles_deg: (..., 3) ``(rot, tilt, psi)`` in degrees (numpy or torch).
    Returns (..., 3, 3) of the same library and dtype.
    """
    xp = _lib(angles_deg)
    a = angles_deg * (math.pi / 180.0)
    ca, cb, cg = xp.cos(a[..., 0]), xp.cos(a[..., 1]), xp.cos(a[..., 2])
    sa, sb, sg = xp.sin(a[..., 0]), xp.sin(a[..., 1]), xp.sin(a[..., 2])
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
        [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
        [sc, ss, cb],
    ]
    return xp.stack([xp.stack(r, -1) for r in rows], -2)


def matrix_to_euler(matrix):
    """Euler ZYZ ``(rot, tilt, psi)`` in degrees from rotation matrices ``A``.

    matrix: (..., 3, 3). Returns (..., 3); tilt in [0, 180]. At tilt 0 or 180
    the split between rot and psi is arbitrary; rot is set to 0 there.
    """
    xp = _lib(matrix)
    m = matrix
    tilt = xp.arccos(xp.clip(m[..., 2, 2], -1.0, 1.0)) if xp is np else torch.acos(
        torch.clamp(m[..., 2, 2], -1.0, 1.0))
    sb = xp.sqrt(m[..., 2, 0] ** 2 + m[..., 2, 1] ** 2)
    regular = sb > 1e-6
    rot = xp.arctan2(m[..., 2, 1], m[..., 2, 0])
    psi = xp.arctan2(m[..., 1, 2], -m[..., 0, 2])
    # Gimbal lock: A = Rz(psi + rot) or Rz(psi - rot) Ry(180); put everything in psi.
    psi_lock = xp.arctan2(-m[..., 1, 0], m[..., 0, 0]) if xp is np else torch.atan2(
        -m[..., 1, 0], m[..., 0, 0])
    zero = rot * 0
    rot = xp.where(regular, rot, zero)
    psi = xp.where(regular, psi, psi_lock)
    return xp.stack([rot, tilt, psi], -1) * (180.0 / math.pi)


def pose_to_scipion_matrix(angles_deg: np.ndarray, shifts_px: np.ndarray) -> np.ndarray:
    """Scipion ALIGN_PROJ 4x4 matrix from Euler angles (deg) and shifts (px).

    angles_deg: (..., 3); shifts_px: (..., 2) or (..., 3). Returns (..., 4, 4).
    """
    angles_deg = np.asarray(angles_deg, dtype=float)
    shifts = np.zeros(angles_deg.shape[:-1] + (3,))
    s = np.asarray(shifts_px, dtype=float)
    shifts[..., :s.shape[-1]] = s
    a = euler_to_matrix(angles_deg)
    at = np.swapaxes(a, -1, -2)
    out = np.zeros(angles_deg.shape[:-1] + (4, 4))
    out[..., :3, :3] = at
    out[..., :3, 3] = np.einsum("...ij,...j->...i", at, shifts)
    out[..., 3, 3] = 1.0
    return out


def scipion_matrix_to_pose(matrix: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pose_to_scipion_matrix`.

    matrix: (..., 4, 4). Returns ``(angles_deg (..., 3), shifts_px (..., 2))``.
    """
    matrix = np.asarray(matrix, dtype=float)
    a = np.swapaxes(matrix[..., :3, :3], -1, -2)
    shifts = np.einsum("...ij,...j->...i", a, matrix[..., :3, 3])
    return matrix_to_euler(a), shifts[..., :2]


def particle_offset_px(shifts_px):
    """Offset (px) of the particle centre from the box centre for pose shifts (px), and back.

    shifts_px: (..., 2) ``(shiftX, shiftY)`` (numpy or torch). Returns ``-shifts_px``: the
    origin shifts the observation into the reference projection, so the particle sits at
    box centre minus the shift (RELION). The map is its own inverse: a particle seen
    ``d`` px from the box centre has the shifts ``particle_offset_px(d)``.
    """
    return -shifts_px


def random_rotations(n: int, generator: np.random.Generator) -> np.ndarray:
    """``n`` rotation matrices uniform on SO(3) (Haar measure), shape (n, 3, 3).

    Uses uniformly distributed unit quaternions (Shoemake 1992).
    """
    u1, u2, u3 = generator.random((3, n))
    q = np.stack([
        np.sqrt(1 - u1) * np.sin(2 * np.pi * u2),
        np.sqrt(1 - u1) * np.cos(2 * np.pi * u2),
        np.sqrt(u1) * np.sin(2 * np.pi * u3),
        np.sqrt(u1) * np.cos(2 * np.pi * u3),
    ], -1)
    x, y, z, w = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def angular_distance_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Geodesic distance in degrees between rotation matrices (..., 3, 3)."""
    r = np.einsum("...ji,...jk->...ik", a, b)
    cos = (np.trace(r, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
