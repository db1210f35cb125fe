"""The deformable model: projections of a Gaussian-atom structure displaced along normal modes
(:class:`~continuousflex_dl.core.modes.deformation.Deformation`, linear or by rigid blocks),
rotated and shifted, with their analytic Jacobians; the coarse-grained copy the global search
uses; the Fourier filters and the NCC they are compared with.

Parameters of a problem, in the Jacobian's column order: the K amplitudes (Å), a left
axis-angle rotation update (3, rad) and the shift (2, px of the model's image size, the pose's
shift: RELION's origin, :func:`geometry.particle_offset_px`).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ...imaging.geometry import particle_offset_px
from ...imaging.projection import pixel_profiles, profile_reach, project_gaussians
from ...modes.deformation import LINEAR, Deformation

__all__ = ["coarse_grain", "DeformableModel", "apply_filter", "rodrigues", "normalised_cross_correlation",
           "JACOBIAN_BLOCK_BYTES", "PROFILE_BLOCK_BYTES"]


def coarse_grain(coords: np.ndarray, modes: np.ndarray, sigma: np.ndarray, weights: np.ndarray,
                 cell: float):
    """Group atoms into beads: one per occupied cubic cell of ``cell`` Å.

    coords (N, 3) Å; modes (K, N, 3); sigma, weights (N,). A bead sits at the
    weighted mean of its atoms and moves with their weighted mean mode
    displacement (exact for the centre of mass); its width combines the atom
    widths and the spread of its atoms. Returns (coords (P, 3), modes (K, P, 3),
    sigma (P,), weights (P,)).
    """
    keys = np.floor(coords / cell).astype(np.int64)
    _, label = np.unique(keys, axis=0, return_inverse=True)
    label = label.reshape(-1)
    p = int(label.max()) + 1
    wsum = np.bincount(label, weights=weights, minlength=p)

    def wmean(values):  # (N, d) -> (P, d)
        return np.stack([np.bincount(label, weights=weights * v, minlength=p) for v in values.T], -1) \
            / wsum[:, None]

    bead = wmean(coords)
    spread = wmean(np.sum((coords - bead[label]) ** 2, axis=1, keepdims=True) / 3.0)[:, 0]
    bsigma = np.sqrt(wmean(sigma[:, None] ** 2)[:, 0] + spread)
    bmodes = np.stack([wmean(m) for m in modes]) if len(modes) else np.zeros((0, p, 3))
    return bead, bmodes, bsigma, wsum


#: On a CPU, :meth:`DeformableModel.project_with_jacobian` forms the Jacobians of this many bytes of
#: intermediate products at a time (about a problem of 1,700 atoms at 64 px).
JACOBIAN_BLOCK_BYTES = 4 << 20

#: On a CPU, projections (:meth:`DeformableModel.project`) take as many problems at a time as keep two
#: of their pixel profiles, (B, N, n) float32 each, within this many bytes
#: (:meth:`DeformableModel.problems_at_once`), so they stay in the cache between the steps that make and
#: use them. 4AKE at 64 px (1,656 atoms), blocks of 4 instead of 512 (one Intel Xeon thread):
#: a projection 1.98 -> 0.66 ms.
PROFILE_BLOCK_BYTES = 4 << 20


class DeformableModel:
    """Projections of a deformable Gaussian-atom model and their Jacobians at one image size.

    coords: (N, 3) Å; modes: (K, N, 3); sigma: (N,) Å atom widths; weights: (N,); box: px of
    the projections, pixel_size: Å/px there. Atoms are displaced by the
    :class:`~continuousflex_dl.core.modes.deformation.Deformation` ``deformation`` (``'linear'``,
    or ``'rigid-blocks'`` with ``blocks`` (N,), the atoms' residues).
    """

    def __init__(self, coords, modes, sigma, weights, box, pixel_size, device, dtype=torch.float32,
                 deformation: str = LINEAR, blocks=None):
        self.coords = torch.as_tensor(coords, dtype=dtype, device=device)
        self.modes = torch.as_tensor(modes, dtype=dtype, device=device)
        # Fitted in float64 on the CPU, then moved (the blocks' rigid velocities are a small solve).
        self.deformation = Deformation(np.asarray(coords, dtype=np.float64), np.asarray(modes, dtype=np.float64),
                                       deformation, blocks).to(device=device, dtype=dtype)
        self.sigma_px = torch.as_tensor(sigma, dtype=dtype, device=device) / pixel_size
        self.weights = torch.as_tensor(weights, dtype=dtype, device=device)
        self.box, self.pixel_size = int(box), float(pixel_size)
        # The parameters that move the atoms along y (all but a rotation about y and a shift in
        # x) and along x (all but a rotation about x and a shift in y): the Jacobian's columns.
        k, d = self.modes.shape[0], self.n_params
        self._on_y = torch.as_tensor([i for i in range(d) if i not in (k + 1, k + 3)], device=device)
        self._on_x = torch.as_tensor([i for i in range(d) if i not in (k, k + 4)], device=device)

    @property
    def n_params(self) -> int:
        return self.modes.shape[0] + 5

    def problems_at_once(self, most: int) -> int:
        """How many problems (poses) to project together, at most ``most`` (all of them on a
        GPU): on a CPU, as many as keep two pixel profiles within :data:`PROFILE_BLOCK_BYTES`."""
        if self.coords.is_cuda:
            return max(1, int(most))
        return max(1, min(int(most), PROFILE_BLOCK_BYTES // (8 * self.coords.shape[0] * self.box)))

    def project(self, rot, q, shifts):
        """(B, box, box) projections for rotations (B,3,3), amplitudes (B,K), shifts (B,2) px.
        In blocks of :meth:`problems_at_once`."""
        b = rot.shape[0]
        block = self.problems_at_once(b)
        out = []
        for b0 in range(0, b, block):
            sl = slice(b0, b0 + block)
            x = self.deformation(q[sl])
            out.append(project_gaussians(x, rot[sl], shifts[sl], self.box, self.pixel_size,
                                         sigma=self.sigma_px * self.pixel_size, weights=self.weights))
        return out[0] if len(out) == 1 else torch.cat(out)

    def project_with_jacobian(self, rot, q, shifts):
        """Projections (B, n, n) and derivatives (B, K + 5, n, n) with respect to
        amplitudes (per Å), a left axis-angle rotation update (per rad) and shifts (per px)."""
        px, py, _, dpx, dpy = self._positions(rot, q, shifts)
        # J_d = dGy^T diag(w dpy_d) Gx + Gy^T diag(w dpx_d) dGx, each term over the parameters
        # that move the atoms along its axis only (a rotation about x or a shift in y leaves
        # px alone; about y or in x, py), in blocks of problems whose right factors (N, E, n)
        # stay in the cache (on a CPU: a block of 16 problems took twice the time per problem).
        b, d, n, n_atoms = dpx.shape[0], dpx.shape[1], self.box, dpx.shape[2]
        on_y, on_x = self._on_y, self._on_x
        e = len(on_y)
        wy = (dpy[:, on_y].transpose(1, 2) * self.weights[:, None]).contiguous()
        wx = (dpx[:, on_x].transpose(1, 2) * self.weights[:, None]).contiguous()
        # The profiles and products are formed only over the rows and columns the block's atoms
        # reach (the profiles are zero beyond their windows, so this is exact): 4AKE covers about
        # two thirds of each axis of a 64 px image.
        image = torch.zeros(b, n, n, dtype=px.dtype, device=px.device)
        jac = torch.zeros(b, d, n, n, dtype=px.dtype, device=px.device)
        block = b if px.is_cuda else max(1, JACOBIAN_BLOCK_BYTES // (8 * n_atoms * e * n))
        for b0 in range(0, b, block):
            sl = slice(b0, b0 + block)
            ys, xs = profile_reach(py[sl], n, self.sigma_px), profile_reach(px[sl], n, self.sigma_px)
            gx, dgx = pixel_profiles(px[sl], n, self.sigma_px, derivative=True, pixels=xs)
            gy, dgy = pixel_profiles(py[sl], n, self.sigma_px, derivative=True, pixels=ys)
            bb, ny, nx = gx.shape[0], gy.shape[-1], gx.shape[-1]
            image[sl, ys, xs] = torch.matmul(gy.transpose(1, 2) * self.weights, gx)
            right_y = (wy[sl, :, :, None] * gx[:, :, None]).reshape(bb, n_atoms, e * nx)
            right_x = (wx[sl, :, :, None] * dgx[:, :, None]).reshape(bb, n_atoms, e * nx)
            along_y = torch.bmm(dgy.transpose(1, 2), right_y)
            along_x = torch.bmm(gy.transpose(1, 2), right_x)
            window = jac[sl, :, ys, xs]
            window.index_add_(1, on_y, along_y.reshape(bb, ny, e, nx).transpose(1, 2))
            window.index_add_(1, on_x, along_x.reshape(bb, ny, e, nx).transpose(1, 2))
        return image, jac

    def _positions(self, rot, q, shifts):
        """Pixel positions px, py (B, N) of the atoms, their rotated coordinates y (B, N, 3) Å
        and the derivatives (B, D, N) of px and py with respect to the parameters."""
        ps = self.pixel_size
        x = self.deformation(q)
        y = torch.matmul(x, rot.transpose(1, 2))                         # (B, N, 3) rotated, Å
        offset = particle_offset_px(shifts) + self.box // 2
        px = y[..., 0] / ps + offset[:, 0:1]
        py = y[..., 1] / ps + offset[:, 1:2]
        if self.deformation.kind == LINEAR:
            vrot = torch.einsum("bij,knj->bkni", rot[:, :2, :], self.modes) / ps   # (B, K, N, 2)
        else:
            vrot = torch.einsum("bij,bknj->bkni", rot[:, :2, :], self.deformation.jacobian(q)) / ps
        zero, d_shift = torch.zeros_like(px), particle_offset_px(torch.ones_like(px))
        yx, yy, yz = y[..., 0] / ps, y[..., 1] / ps, y[..., 2] / ps
        dpx = torch.cat([vrot[..., 0], torch.stack([zero, yz, -yy, d_shift, zero], 1)], 1)
        dpy = torch.cat([vrot[..., 1], torch.stack([-yz, zero, yx, zero, d_shift], 1)], 1)
        return px, py, y, dpx, dpy


def apply_filter(x: torch.Tensor, filt: Optional[torch.Tensor]) -> torch.Tensor:
    """Multiply the spectrum of images (B, ..., n, n) by filt (B, n, n//2+1) (None: unchanged)."""
    if filt is None:
        return x
    n = x.shape[-1]
    f = filt if x.ndim == 3 else filt.reshape(filt.shape[:1] + (1,) * (x.ndim - 3) + filt.shape[1:])
    return torch.fft.irfft2(torch.fft.rfft2(x) * f, s=(n, n))


def rodrigues(w: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (B, 3, 3) of axis-angle vectors (B, 3) (radians)."""
    theta2 = (w * w).sum(-1)[:, None, None]
    theta = torch.sqrt(theta2 + 1e-30)
    a = torch.where(theta2 < 1e-12, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(theta2 < 1e-12, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / (theta2 + 1e-30))
    z = torch.zeros_like(w[:, 0])
    k = torch.stack([torch.stack([z, -w[:, 2], w[:, 1]], -1),
                     torch.stack([w[:, 2], z, -w[:, 0]], -1),
                     torch.stack([-w[:, 1], w[:, 0], z], -1)], -2)
    eye = torch.eye(3, dtype=w.dtype, device=w.device)
    return eye + a * k + b * (k @ k)


def normalised_cross_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """NCC of image pairs (..., n, n) -> (...): Pearson correlation over all pixels."""
    a = a - a.mean(dim=(-2, -1), keepdim=True)
    b = b - b.mean(dim=(-2, -1), keepdim=True)
    num = (a * b).sum(dim=(-2, -1))
    return num / torch.sqrt((a * a).sum(dim=(-2, -1)) * (b * b).sum(dim=(-2, -1)) + 1e-30)
