"""How amplitudes along normal modes displace a structure: the one place that turns amplitudes
into atom positions, and into their derivatives for a least-squares fit.

Two deformations (:data:`DEFORMATIONS`):

* ``'linear'``: ``x + sum_k q_k v_k`` (DESIGN.md's convention; :func:`.nma.displace`, which this
  calls). Exact for
  small motions; a large rotation of a domain along a mode stretches it (the atoms move along
  the rotation's tangents).
* ``'rigid-blocks'``: NOLB's nonlinear extrapolation (Hoffmann & Grudinin 2017, "NOLB: nonlinear
  rigid block normal mode analysis method", J Chem Theory Comput 13:2123). Every block of atoms
  (a residue: ``Atoms.blocks``, :func:`~continuousflex_dl.core.imaging.structure.residue_blocks`)
  gets from each mode k the least-squares instantaneous rigid motion of its atoms' mode
  displacements, a translation ``t_bk`` of its centroid ``c_b``
  and an angular velocity ``w_bk`` (the velocity of atom i is ``t_bk + w_bk x (x_i - c_b)``).
  Velocities of several modes add linearly, ``t = sum_k q_k t_bk``, ``w = sum_k q_k w_bk``, and the
  finite displacement is the screw motion they generate: the rotation by ``|w|`` (rad) about the
  axis along ``w`` through ``p_b = c_b + (w x t) / |w|^2``, plus the translation ``(t . w^) w^``
  along it. A block the modes turn rigidly about a hinge keeps its shape at any amplitude. What
  of the mode a block's rigid motion does not carry (the atoms' motion within their residue,
  small for elastic-network modes) is added linearly, so that the two deformations agree to
  first order in the amplitudes (they differ by O(q^2)).

  Written with the block's linear velocity ``u = t + w x r`` of an atom at ``r = x - c_b``
  and ``theta = |w|``, the screw displacement is
  ``a u + b w x u + c (w . t) w`` with ``a = sin(theta)/theta``, ``b = (1 - cos(theta))/theta^2``,
  ``c = (theta - sin(theta))/theta^3`` (series near 0, where the axis' point p_b runs away:
  the formula never forms it).

A reference without residues (pseudoatoms of a map) has no blocks: its deformation is linear
(:func:`deformation` says so in the log).

Arrays: coords (N, 3) Å; modes (K, N, 3) unit-norm 3N vectors; amplitudes (..., K) Å; positions
(..., N, 3) Å; Jacobians d x / d q (..., K, N, 3) (Å per Å). torch tensors (any device, float32
or float64) or numpy arrays (computed in float64, returned as numpy).
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from ..imaging.structure import residue_blocks
from .nma import displace

logger = logging.getLogger(__name__)

__all__ = ["DEFORMATIONS", "LINEAR", "RIGID_BLOCKS", "Deformation", "deformation", "deform", "residue_blocks",
           "check_deformation"]

LINEAR, RIGID_BLOCKS = "linear", "rigid-blocks"

#: The deformations a structure can be displaced by (:class:`Deformation`).
DEFORMATIONS = (LINEAR, RIGID_BLOCKS)

#: Below this squared rotation angle (rad^2) the screw coefficients and their derivatives are
#: taken from their Taylor series (within 1e-8 of the closed forms there), above it from their
#: closed forms; both in float64 whatever the dtype of the structure (in float32 the closed form
#: of the derivative of c loses 4e-4 of its value to cancellation just above this limit).
SERIES_BELOW = 0.09


def check_deformation(kind: str) -> str:
    """``kind`` if it names a deformation (:data:`DEFORMATIONS`), else ValueError saying which do."""
    if kind not in DEFORMATIONS:
        raise ValueError(f"Unknown deformation {kind!r}: choose one of {', '.join(DEFORMATIONS)}.")
    return kind


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cross products of the last axes (3) of a and b, broadcast against each other."""
    return torch.linalg.cross(*torch.broadcast_tensors(a, b))


def _screw_coefficients(s: torch.Tensor):
    """a, b, c of the screw displacement (module docstring) and their derivatives with respect to
    s = theta^2, elementwise for s (...) >= 0."""
    small = s < SERIES_BELOW
    ss = torch.where(small, s, torch.zeros_like(s))                 # series argument
    sl = torch.where(small, torch.full_like(s, 1.0), s)              # closed-form argument (kept away from 0)
    th = torch.sqrt(sl)
    sin, cos = torch.sin(th), torch.cos(th)
    a = torch.where(small, 1 - ss / 6 + ss * ss / 120 - ss ** 3 / 5040, sin / th)
    b = torch.where(small, 0.5 - ss / 24 + ss * ss / 720 - ss ** 3 / 40320, (1 - cos) / sl)
    c = torch.where(small, 1.0 / 6 - ss / 120 + ss * ss / 5040 - ss ** 3 / 362880, (th - sin) / (sl * th))
    da = torch.where(small, -1.0 / 6 + ss / 60 - ss * ss / 1680, (th * cos - sin) / (2 * sl * th))
    db = torch.where(small, -1.0 / 24 + ss / 360 - ss * ss / 13440, (th * sin - 2 * (1 - cos)) / (2 * sl * sl))
    dc = torch.where(small, -1.0 / 120 + ss / 2520 - ss * ss / 120960,
                     ((1 - cos) * th - 3 * (th - sin)) / (2 * sl * sl * th))
    return a, b, c, da, db, dc


class Deformation:
    """Positions and Jacobians of a structure displaced along its modes (module docstring).

    coords: (N, 3) Å; modes: (K, N, 3); kind: one of :data:`DEFORMATIONS`; blocks: (N,) block label
    of every atom (:func:`residue_blocks`), needed by ``'rigid-blocks'``. torch tensors keep their
    device and dtype; numpy arrays become float64 tensors on the CPU (:meth:`__call__` and
    :meth:`jacobian` give back numpy for numpy amplitudes).
    """

    def __init__(self, coords, modes, kind: str = LINEAR, blocks: Optional[np.ndarray] = None):
        self.kind = check_deformation(kind)
        self.coords = torch.as_tensor(coords) if isinstance(coords, torch.Tensor) else \
            torch.as_tensor(np.asarray(coords, dtype=np.float64))
        self.modes = torch.as_tensor(modes, dtype=self.coords.dtype, device=self.coords.device)
        n = self.coords.shape[0]
        if self.coords.ndim != 2 or self.coords.shape[1] != 3 or self.modes.ndim != 3 or \
                self.modes.shape[1:] != self.coords.shape:
            raise ValueError(f"Expected coords (N, 3) and modes (K, N, 3); got {tuple(self.coords.shape)} "
                             f"and {tuple(self.modes.shape)}.")
        if kind == RIGID_BLOCKS:
            if blocks is None:
                raise ValueError("The rigid-block deformation needs the atoms' blocks (residues): "
                                 "residue_blocks(residue numbers, chain ids).")
            blocks = np.asarray(blocks).reshape(-1)
            if blocks.shape != (n,):
                raise ValueError(f"Need one block label per atom ({n}), got {blocks.shape}.")
            self._fit_blocks(np.unique(blocks, return_inverse=True)[1].reshape(-1))

    @property
    def n_modes(self) -> int:
        return int(self.modes.shape[0])

    def to(self, device=None, dtype=None) -> "Deformation":
        """This deformation with its arrays on ``device`` in ``dtype``."""
        out = object.__new__(Deformation)
        out.__dict__.update({k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                             if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()})
        return out

    def _fit_blocks(self, label: np.ndarray) -> None:
        """Least-squares rigid velocities of every block for every mode (equal atom weights):
        t (K, P, 3) the mean displacement, w (K, P, 3) = I^-1 sum r x v with I the block's inertia
        tensor (regularised: a block of one atom or of collinear atoms turns by the least-norm w)."""
        x = self.coords.detach().cpu().double().numpy()
        v = self.modes.detach().cpu().double().numpy()
        p = int(label.max()) + 1
        count = np.bincount(label, minlength=p).astype(np.float64)

        def block_sum(values):            # (..., N, 3) -> (..., P, 3)
            out = np.zeros(values.shape[:-2] + (p, 3))
            np.add.at(out, label if values.ndim == 2 else (slice(None), label), values)
            return out

        centre = block_sum(x) / count[:, None]                                     # (P, 3)
        r = x - centre[label]                                                      # (N, 3)
        t = block_sum(v) / count[:, None]                                          # (K, P, 3)
        inertia = np.zeros((p, 3, 3))
        np.add.at(inertia, label, np.einsum("ni,ni->n", r, r)[:, None, None] * np.eye(3)
                  - r[:, :, None] * r[:, None, :])
        torque = block_sum(np.cross(r[None], v))                                   # (K, P, 3)
        trace = np.trace(inertia, axis1=1, axis2=2)
        reg = inertia + (1e-9 * trace + 1e-12)[:, None, None] * np.eye(3)
        w = np.einsum("pij,kpj->kpi", np.linalg.inv(reg), torque)                 # (K, P, 3)
        fitted = t[:, label] + np.cross(w[:, label], r[None])                      # (K, N, 3)
        kw = dict(dtype=self.coords.dtype, device=self.coords.device)
        self.r = torch.as_tensor(r, **kw)
        self.t_modes = torch.as_tensor(t[:, label], **kw)                          # (K, N, 3) per atom
        self.w_modes = torch.as_tensor(w[:, label], **kw)
        self.residual = torch.as_tensor(v - fitted, **kw)                          # (K, N, 3)
        self.u_modes = torch.as_tensor(fitted, **kw)                               # t_k + w_k x r

    # ------------------------------------------------------------------------------- values
    def __call__(self, amplitudes):
        """Positions (..., N, 3) Å at amplitudes (..., K) Å."""
        q, as_numpy = self._amplitudes(amplitudes)
        if self.kind == LINEAR:
            x = displace(self.coords, self.modes, q)
        else:
            t, w, u, s, coef = self._screw(q)
            a, b, c = coef[:3]
            x = self.coords + a * u + b * _cross(w, u) + c * (w * t).sum(-1, keepdim=True) * w \
                + torch.einsum("...k,knd->...nd", q, self.residual)
        return x.cpu().numpy() if as_numpy else x

    def jacobian(self, amplitudes):
        """d positions / d amplitudes (..., K, N, 3) at amplitudes (..., K) Å."""
        q, as_numpy = self._amplitudes(amplitudes)
        if self.kind == LINEAR:
            jac = self.modes.expand(q.shape[:-1] + self.modes.shape)
        else:
            t, w, u, s, (a, b, c, da, db, dc) = self._screw(q)
            e = (Ellipsis, None, slice(None), slice(None))          # (..., N, 3) -> (..., 1, N, 3)
            t, w, u = t[e], w[e], u[e]
            a, b, c, da, db, dc = (z[e] for z in (a, b, c, da, db, dc))
            wk, tk, uk = self.w_modes, self.t_modes, self.u_modes                # (K, N, 3)
            ds = 2 * (w * wk).sum(-1, keepdim=True)                              # (..., K, N, 1)
            wt = (w * t).sum(-1, keepdim=True)
            jac = (da * ds * u + a * uk
                   + db * ds * _cross(w, u) + b * (_cross(wk, u) + _cross(w, uk))
                   + dc * ds * wt * w + c * ((wk * t).sum(-1, keepdim=True) + (w * tk).sum(-1, keepdim=True)) * w
                   + c * wt * wk + self.residual)
        return jac.cpu().numpy() if as_numpy else jac

    def _amplitudes(self, amplitudes):
        as_numpy = not isinstance(amplitudes, torch.Tensor)
        q = torch.as_tensor(np.asarray(amplitudes, dtype=np.float64)) if as_numpy else amplitudes
        q = q.to(device=self.coords.device, dtype=self.coords.dtype)
        if q.shape[-1:] != (self.n_modes,):
            raise ValueError(f"Expected amplitudes (..., {self.n_modes}), got {tuple(q.shape)}.")
        return q, as_numpy

    def _screw(self, q):
        """Per atom (..., N, 3): the block's translation t and angular velocity w at amplitudes q,
        the linear velocity u = t + w x r, |w|^2 (..., N, 1) and the screw coefficients."""
        t = torch.einsum("...k,knd->...nd", q, self.t_modes)
        w = torch.einsum("...k,knd->...nd", q, self.w_modes)
        u = t + _cross(w, self.r)
        s = (w * w).sum(-1, keepdim=True)
        return t, w, u, s, tuple(c.to(q.dtype) for c in _screw_coefficients(s.double()))


def deformation(coords, modes, kind: str = LINEAR, blocks: Optional[np.ndarray] = None) -> Deformation:
    """The :class:`Deformation` of ``kind``; ``'rigid-blocks'`` without blocks (a reference of
    pseudoatoms, no residues) falls back to ``'linear'``, with a warning in the log."""
    if check_deformation(kind) == RIGID_BLOCKS and blocks is None:
        logger.warning("The reference has no residues (pseudoatoms?): it is displaced linearly along its modes, "
                       "not by rigid blocks.")
        kind = LINEAR
    return Deformation(coords, modes, kind, blocks)


def deform(coords, modes, amplitudes, kind: str = LINEAR, blocks: Optional[np.ndarray] = None):
    """Positions (..., N, 3) Å of ``coords`` (N, 3) displaced along ``modes`` (K, N, 3) by
    ``amplitudes`` (..., K) Å with the deformation ``kind`` (:func:`deformation`)."""
    return deformation(coords, modes, kind, blocks)(amplitudes)
