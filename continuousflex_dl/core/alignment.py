"""HEMNMA: combined elastic (normal-mode amplitudes) and rigid (pose) alignment of particle images.

For every particle image the method finds the normal-mode amplitudes ``q``
(Å), the Euler angles and the in-plane shifts whose Gaussian-atom projection
(:mod:`projection`, CTF applied when given) best matches the image in the
least-squares sense with a free scale and offset, i.e. the largest normalised
cross-correlation (NCC). Three stages, all batched over images:

1. **Global search** at ``search_size`` px on a coarse-grained copy of the
   structure (atoms grouped into beads of ``bead_cell`` search pixels): a
   quasi-uniform set of rotations (Fibonacci directions x in-plane angles,
   ``angular_step_deg`` apart; the in-plane angles by rotating the images of
   each direction) times a star of amplitude seeds (the centre of the
   amplitude box and bin centres along each mode), scored against every image
   by FFT cross-correlation over all shifts within ``max_shift_px``. The
   projections are shared by all images; a CTF is applied to the image side
   (a real CTF commutes with correlation) and to the reference norms.
2. For the ``n_candidates`` best distinct rotations of each image, a grid of
   amplitudes (``amplitude_grid`` values per mode) with shift search, then
   **local refinement** at the search size: Levenberg-Marquardt on
   amplitudes, a small axis-angle rotation update and shifts together, with
   analytic Jacobians of the projector, on low-passed images
   (``search_lowpass``) to widen the basin of convergence.
3. The ``n_final`` best of those are refined again with all atoms at
   ``working_size`` px; the one with the highest NCC is returned.

Images larger than the working size are reduced by Fourier cropping (the box
in Å is unchanged), with a correction of the pixel-integration blur so that
a cropped image equals a projection computed directly at the coarser pixel.

Pose convention: :mod:`geometry` (Euler ZYZ in degrees, shifts in pixels of
the *input* images, ``[x, y] = (A r)[:2] / pixel_size - shift + box // 2``: the shift is
RELION's origin).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch

from .geometry import angular_distance_deg, euler_to_matrix, matrix_to_euler, particle_offset_px
from .projection import fourier_crop, pixel_profiles, project_gaussians

logger = logging.getLogger(__name__)

__all__ = ["AlignmentResult", "align_particles", "check_contrast", "rotation_grid", "fourier_crop",
           "coarse_grain", "normalised_cross_correlation"]

ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclass
class AlignmentResult:
    """HEMNMA alignment of M images with K modes.

    amplitudes: (M, K) Å; angles: (M, 3) Euler ZYZ (rot, tilt, psi) degrees;
    shifts: (M, 2) (shiftX, shiftY) in pixels of the input images;
    score: (M,) normalised cross-correlation of the image with its best
    projection at the working size (1 = perfect match; also the HEMNMA 'cost'
    as 1 - score).
    amplitude_std: (M, K) Å, the standard deviation of each amplitude at the optimum
    (Laplace approximation under white noise, the pose free); angle_std: (M,) degrees,
    the RMS length of the rotation uncertainty (three axis-angle components); shift_std:
    (M,) px of the input images, the RMS length of the shift uncertainty. NaN when unknown.
    """
    amplitudes: np.ndarray
    angles: np.ndarray
    shifts: np.ndarray
    score: np.ndarray
    amplitude_std: Optional[np.ndarray] = None
    angle_std: Optional[np.ndarray] = None
    shift_std: Optional[np.ndarray] = None

    @property
    def rotations(self) -> np.ndarray:
        """(M, 3, 3) rotation matrices A of the angles."""
        return euler_to_matrix(self.angles)

    def to_dict(self) -> dict:
        """Plain numpy arrays by name (for ``np.savez`` or conversion to Scipion objects)."""
        out = {"amplitudes": self.amplitudes, "angles": self.angles,
               "shifts": self.shifts, "score": self.score}
        for name in ("amplitude_std", "angle_std", "shift_std"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


# ----------------------------------------------------------------------------- helpers

def rotation_grid(step_deg: float, return_n_psi: bool = False):
    """Quasi-uniform rotations about ``step_deg`` apart, (R, 3, 3).

    Projection directions on a Fibonacci sphere (about ``4 pi / step^2`` of them)
    times in-plane angles ``psi`` every ``step_deg`` degrees (``psi`` varies fastest,
    starting at 0). With ``return_n_psi`` also returns the number of ``psi`` values.
    """
    if not 0 < step_deg <= 90:
        raise ValueError(f"The angular step must be in (0, 90] degrees, got {step_deg}.")
    step = math.radians(step_deg)
    n_dir = max(2, int(round(4 * math.pi / step ** 2)))
    i = np.arange(n_dir) + 0.5
    tilt = np.degrees(np.arccos(1 - 2 * i / n_dir))
    rot = np.degrees(np.mod(i * math.pi * (3 - math.sqrt(5)), 2 * math.pi))
    n_psi = max(1, int(round(360.0 / step_deg)))
    psi = np.arange(n_psi) * (360.0 / n_psi)
    angles = np.stack([np.repeat(rot, n_psi), np.repeat(tilt, n_psi), np.tile(psi, n_dir)], -1)
    mats = euler_to_matrix(angles)
    return (mats, n_psi) if return_n_psi else mats


def _rotate_in_plane(images: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """Images (P, n, n) rotated in plane about the centre ``n // 2`` by every angle of
    ``psi`` (radians): (P * len(psi), n, n), psi fastest. Matches adding ``psi`` to the
    Euler angle psi of a projection (bilinear interpolation)."""
    p, n = images.shape[0], images.shape[-1]
    c = n // 2
    idx = torch.arange(n, dtype=images.dtype, device=images.device) - c
    y, x = torch.meshgrid(idx, idx, indexing="ij")
    cos, sin = torch.cos(psi)[:, None, None], torch.sin(psi)[:, None, None]
    # Output pixel p' samples the input at Rz(psi)^T p' (passive Rz of geometry.py).
    xs, ys = cos * x - sin * y, sin * x + cos * y
    grid = torch.stack([(xs + c) * (2.0 / (n - 1)) - 1, (ys + c) * (2.0 / (n - 1)) - 1], -1)
    grid = grid[None].expand(p, -1, -1, -1, -1).reshape(p * len(psi), n, n, 2)
    src = images[:, None].expand(-1, len(psi), -1, -1).reshape(p * len(psi), 1, n, n)
    out = torch.nn.functional.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                                          align_corners=True)
    return out[:, 0]


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


def normalised_cross_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """NCC of image pairs (..., n, n) -> (...): Pearson correlation over all pixels."""
    a = a - a.mean(dim=(-2, -1), keepdim=True)
    b = b - b.mean(dim=(-2, -1), keepdim=True)
    num = (a * b).sum(dim=(-2, -1))
    return num / torch.sqrt((a * a).sum(dim=(-2, -1)) * (b * b).sum(dim=(-2, -1)) + 1e-30)


def _rodrigues(w: torch.Tensor) -> torch.Tensor:
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


def _half_plane_weights(n: int, device, dtype) -> torch.Tensor:
    """Parseval weights of an rfft2 half-plane (n, n//2+1): columns counted twice except 0 and Nyquist."""
    w = torch.full((n // 2 + 1,), 2.0, device=device, dtype=dtype)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return w


# ----------------------------------------------------------------------------- model + Jacobian

class _Model:
    """Projections of a deformable Gaussian-atom model and their Jacobians at one image size."""

    def __init__(self, coords, modes, sigma, weights, box, pixel_size, device, dtype=torch.float32):
        self.coords = torch.as_tensor(coords, dtype=dtype, device=device)
        self.modes = torch.as_tensor(modes, dtype=dtype, device=device)
        self.sigma_px = torch.as_tensor(sigma, dtype=dtype, device=device) / pixel_size
        self.weights = torch.as_tensor(weights, dtype=dtype, device=device)
        self.box, self.pixel_size = int(box), float(pixel_size)

    @property
    def n_params(self) -> int:
        return self.modes.shape[0] + 5

    def project(self, rot, q, shifts):
        """(B, box, box) projections for rotations (B,3,3), amplitudes (B,K), shifts (B,2) px."""
        x = self.coords + torch.einsum("bk,knd->bnd", q, self.modes)
        return project_gaussians(x, rot, shifts, self.box, self.pixel_size,
                                 sigma=self.sigma_px * self.pixel_size, weights=self.weights)

    def project_with_jacobian(self, rot, q, shifts):
        """Projections (B, n, n) and derivatives (B, K + 5, n, n) with respect to
        amplitudes (per Å), a left axis-angle rotation update (per rad) and shifts (per px)."""
        ps, c = self.pixel_size, self.box // 2
        x = self.coords + torch.einsum("bk,knd->bnd", q, self.modes)
        y = torch.matmul(x, rot.transpose(1, 2))                         # (B, N, 3) rotated, Å
        offset = particle_offset_px(shifts) + c
        px = y[..., 0] / ps + offset[:, 0:1]
        py = y[..., 1] / ps + offset[:, 1:2]
        gx, dgx = pixel_profiles(px, self.box, self.sigma_px, derivative=True)
        gy, dgy = pixel_profiles(py, self.box, self.sigma_px, derivative=True)
        image = torch.matmul(gy.transpose(1, 2) * self.weights, gx)
        # d(px, py)/d(params): (B, D, N) each.
        vrot = torch.einsum("bij,knj->bkni", rot[:, :2, :], self.modes) / ps   # (B, K, N, 2)
        zero, d_shift = torch.zeros_like(px), particle_offset_px(torch.ones_like(px))
        yx, yy, yz = y[..., 0] / ps, y[..., 1] / ps, y[..., 2] / ps
        dpx = torch.cat([vrot[..., 0], torch.stack([zero, yz, -yy, d_shift, zero], 1)], 1)
        dpy = torch.cat([vrot[..., 1], torch.stack([-yz, zero, yx, zero, d_shift], 1)], 1)
        # J_d = dGy^T diag(w dpy_d) Gx + Gy^T diag(w dpx_d) dGx: two batched products whose
        # right factors (B, N, D, n) are written contiguous, so no copy of them is made.
        b, d, n, n_atoms = dpx.shape[0], dpx.shape[1], self.box, dpx.shape[2]
        right = torch.empty(2, b, n_atoms, d, n, dtype=gx.dtype, device=gx.device)
        torch.mul((self.weights * dpy).transpose(1, 2)[..., None], gx[:, :, None, :], out=right[0])
        torch.mul((self.weights * dpx).transpose(1, 2)[..., None], dgx[:, :, None, :], out=right[1])
        jac = torch.baddbmm(torch.bmm(dgy.transpose(1, 2), right[0].reshape(b, n_atoms, d * n)),
                            gy.transpose(1, 2), right[1].reshape(b, n_atoms, d * n))
        return image, jac.reshape(b, n, d, n).transpose(1, 2)


def _apply_filter(x: torch.Tensor, filt: Optional[torch.Tensor]) -> torch.Tensor:
    """Multiply the spectrum of images (B, ..., n, n) by filt (B, n, n//2+1) (None: unchanged)."""
    if filt is None:
        return x
    n = x.shape[-1]
    f = filt if x.ndim == 3 else filt.reshape(filt.shape[:1] + (1,) * (x.ndim - 3) + filt.shape[1:])
    return torch.fft.irfft2(torch.fft.rfft2(x) * f, s=(n, n))


def _refine(model: _Model, images: torch.Tensor, filt: Optional[torch.Tensor], rot, q, shifts,
            q_lo, q_hi, max_shift, iters: int, chunk: int):
    """Levenberg-Marquardt on (amplitudes, rotation, shifts) for B problems; returns the
    refined (rot, q, shifts), the NCC of each problem and the standard deviations (B, K + 5)
    of the parameters at the optimum (:func:`_laplace_std`)."""
    parts = []
    for start in range(0, images.shape[0], chunk):
        sl = slice(start, start + chunk)
        parts.append(_refine_chunk(model, images[sl], None if filt is None else filt[sl],
                                   rot[sl], q[sl], shifts[sl], q_lo, q_hi, max_shift, iters))
    return tuple(torch.cat([p[i] for p in parts]) for i in range(5))


def _laplace_std(jtj: torch.Tensor, cost: torch.Tensor, n_pixels: int) -> torch.Tensor:
    """Standard deviations (B, D) of the D parameters at a least-squares optimum (Laplace /
    Gauss-Newton approximation of the posterior under white Gaussian noise): the covariance
    is ``s^2 (J^T J)^-1`` with the noise variance ``s^2 = cost / (n_pixels - D - 2)`` (the
    parameters, the scale and the offset were fitted). jtj: (B, D + 1, D + 1) including the
    scale; cost: (B,) residual sum of squares."""
    d = jtj.shape[1] - 1
    var = cost.double() / max(n_pixels - d - 2, 1)
    eye = torch.eye(d + 1, dtype=jtj.dtype, device=jtj.device)
    cov = torch.linalg.inv(jtj + eye * (1e-12 * torch.diagonal(jtj, dim1=1, dim2=2).amax(1))[:, None, None])
    return torch.sqrt(torch.clamp(torch.diagonal(cov, dim1=1, dim2=2)[:, :d], min=0.0) * var[:, None])


def _system(model: _Model, images: torch.Tensor, filt: torch.Tensor, rot, q, shifts):
    """Least-squares cost with the optimal scale and offset, NCC, and the normal equations
    (B, D+1, D+1), (B, D+1) of the parameters plus the scale."""
    p, j = model.project_with_jacobian(rot, q, shifts)
    p, j = _apply_filter(p, filt), _apply_filter(j, filt)
    b = p.shape[0]
    pf = p.reshape(b, -1)
    pf = pf - pf.mean(1, keepdim=True)
    im = images.reshape(b, -1)
    im = im - im.mean(1, keepdim=True)
    jf = j.reshape(b, j.shape[1], -1)
    jf = jf - jf.mean(2, keepdim=True)       # the free offset, eliminated exactly
    pp, pi, ii = (pf * pf).sum(1), (pf * im).sum(1), (im * im).sum(1)
    scale = pi / (pp + 1e-30)
    resid = im - scale[:, None] * pf
    cost = (resid * resid).sum(1)
    ncc = pi / torch.sqrt(pp * ii + 1e-30)
    full = torch.cat([scale[:, None, None] * jf, pf[:, None]], 1)
    jtj = torch.matmul(full, full.transpose(1, 2)).double()
    jtr = torch.matmul(full, resid[..., None])[..., 0].double()
    return cost, ncc, jtj, jtr, ii


def _refine_chunk(model: _Model, images, filt, rot, q, shifts, q_lo, q_hi, max_shift, iters,
                  tol: float = 1e-6):
    k = model.modes.shape[0]
    cost, ncc, jtj, jtr, energy = _system(model, images, filt, rot, q, shifts)
    lam = torch.full((images.shape[0],), 1e-3, dtype=torch.float64, device=images.device)
    eye = torch.eye(jtj.shape[1], dtype=torch.float64, device=images.device)
    done = torch.zeros_like(cost, dtype=torch.bool)
    for _ in range(iters):
        diag = torch.diagonal(jtj, dim1=1, dim2=2)
        damp = lam[:, None] * diag + 1e-9 * diag.amax(1, keepdim=True)
        delta = torch.linalg.solve(jtj + eye * damp[:, :, None], jtr).to(images.dtype)
        q_t = torch.minimum(torch.maximum(q + delta[:, :k], q_lo), q_hi)
        rot_t = torch.matmul(_rodrigues(delta[:, k:k + 3]), rot)
        s_t = (shifts + delta[:, k + 3:k + 5]).clamp(-max_shift, max_shift)
        c2, n2, jtj2, jtr2, _ = _system(model, images, filt, rot_t, q_t, s_t)
        better = c2 < cost
        bm = better[:, None]
        q, shifts = torch.where(bm, q_t, q), torch.where(bm, s_t, shifts)
        rot = torch.where(better[:, None, None], rot_t, rot)
        gain = (cost - c2) / (cost + 1e-30)
        cost, ncc = torch.where(better, c2, cost), torch.where(better, n2, ncc)
        jtj = torch.where(better[:, None, None], jtj2, jtj)
        jtr = torch.where(bm, jtr2, jtr)
        lam = torch.where(better, lam * 0.3, lam * 10).clamp(1e-8, 1e8)
        # Converged: an accepted step that gains almost nothing, steps rejected at large
        # damping, or a fit at the float32 precision of the image.
        done |= (better & (gain < tol)) | (lam > 1e4) | (cost < 1e-7 * energy)
        if bool(torch.all(done)):
            break
    return rot, q, shifts, ncc, _laplace_std(jtj, cost, images[0].numel())


def _nyquist_mask(n: int, device, dtype) -> torch.Tensor:
    mask = torch.ones(n, n // 2 + 1, device=device, dtype=dtype)
    if n % 2 == 0:
        mask[n // 2, :] = 0
        mask[:, n // 2] = 0
    return mask


def _filters(ctf, m: int, n: int, pixel_size: float, device, dtype) -> torch.Tensor:
    """(M, n, n//2+1): CTF (or 1) times the Nyquist mask used for the images."""
    mask = _nyquist_mask(n, device, dtype)
    if ctf is None:
        return mask.expand(m, -1, -1)
    from .ctf import ctf_image
    if ctf.batch_size not in (1, m):
        raise ValueError(f"The CTF describes {ctf.batch_size} images but {m} images were given.")
    c = ctf_image(ctf, n, pixel_size, device=device, dtype=dtype) * mask
    return c.expand(m, -1, -1)


def _global_search(ref_ft: torch.Tensor, img: torch.Tensor,
                   filt: torch.Tensor, max_shift: float, chunk: int = 256):
    """NCC of every image (M, n, n) with every reference spectrum (P, n, n//2+1) over integer
    shifts within ``max_shift`` px. Returns scores (M, P), the best shifts (M, P, 2) px and
    each image's best anti-correlation (M,): the largest ``-NCC`` over references and shifts,
    which beats the best score when the image's contrast is inverted."""
    m, n = img.shape[0], img.shape[-1]
    window, flat = _shift_window(max_shift, n, img.device)
    img = img - img.mean(dim=(-2, -1), keepdim=True)
    f_img = torch.fft.rfft2(img) * filt
    img_norm = torch.sqrt((img * img).sum(dim=(-2, -1)))
    wgt = _half_plane_weights(n, img.device, img.dtype)
    filt2 = (filt * filt * wgt).reshape(m, -1) / (n * n)
    scores = torch.empty(m, ref_ft.shape[0], dtype=img.dtype, device=img.device)
    best = torch.empty(m, ref_ft.shape[0], 2, dtype=img.dtype, device=img.device)
    anti = torch.full((m,), -math.inf, dtype=img.dtype, device=img.device)
    for start in range(0, ref_ft.shape[0], chunk):
        f_ref = ref_ft[start:start + chunk]
        power = (f_ref.real ** 2 + f_ref.imag ** 2).reshape(f_ref.shape[0], -1)
        ref_norm = torch.sqrt(torch.matmul(filt2, power.T) + 1e-30)      # (M, Pc)
        for i0 in range(0, m, 16):
            cc = torch.fft.irfft2(f_img[i0:i0 + 16, None] * f_ref.conj()[None], s=(n, n))
            cc = cc.reshape(cc.shape[0], cc.shape[1], -1)[..., flat]     # (Mc, Pc, S)
            val, arg = cc.max(-1)
            norm = img_norm[i0:i0 + 16, None] * ref_norm[i0:i0 + 16]
            scores[i0:i0 + 16, start:start + chunk] = val / norm
            best[i0:i0 + 16, start:start + chunk] = window[arg].to(img.dtype)
            neg = (-cc.min(-1).values / norm).max(-1).values
            anti[i0:i0 + 16] = torch.maximum(anti[i0:i0 + 16], neg)
    return scores, best, anti


#: Fewest images of a batch on which inverted contrast is judged, and the fraction of them
#: whose best anti-correlation must beat their best correlation. Images of a hopeless SNR
#: split about evenly; inverted particles at SNR 0.1 do so for nearly all.
POLARITY_MIN_IMAGES, POLARITY_FRACTION = 10, 0.75


def check_contrast(best: np.ndarray, anti: np.ndarray) -> None:
    """Refuse particles whose contrast is inverted (dark protein on a bright background).

    best, anti: (M,) each image's best correlation and best anti-correlation with the
    reference projections (:func:`_global_search`). Raises ValueError when, of at least
    :data:`POLARITY_MIN_IMAGES` images, more than :data:`POLARITY_FRACTION` match the
    reference better with the opposite sign.
    """
    best, anti = np.asarray(best, dtype=float), np.asarray(anti, dtype=float)
    inverted = anti > best
    if len(best) >= POLARITY_MIN_IMAGES and inverted.mean() > POLARITY_FRACTION:
        raise ValueError(
            f"The particles look contrast-inverted (dark protein on a bright background): "
            f"{int(inverted.sum())} of {len(best)} images match the reference better with the "
            f"opposite sign (median correlation {np.median(best):.3f}, anti-correlation "
            f"{np.median(anti):.3f}). Set 'Invert contrast' to Yes (or invert the stack) and "
            f"run again; this plugin expects white particles on black, as RELION does.")


def _shift_window(max_shift: float, n: int, device):
    """The integer particle displacements within ``max_shift`` px of the box centre, as pose
    shifts (S, 2) px, and their flat indices (S,) in an n x n cross-correlation map."""
    r = int(math.ceil(max_shift))
    d = torch.arange(-r, r + 1, device=device)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    keep = (dx * dx + dy * dy) <= (max_shift + 0.5) ** 2
    dx, dy = dx[keep], dy[keep]
    return particle_offset_px(torch.stack([dx, dy], -1)), (dy % n) * n + (dx % n)


def _amplitude_grid_search(model: _Model, img: torch.Tensor, filt: torch.Tensor, rot: torch.Tensor,
                           grid: torch.Tensor, max_shift: float, chunk: int = 8):
    """For B candidate poses (rot (B,3,3)) of images img (B, n, n), the best of the G
    amplitude vectors ``grid`` (G, K) and its integer shift: returns (q (B,K), shifts (B,2), ncc (B,))."""
    b_all, n, g = img.shape[0], img.shape[-1], grid.shape[0]
    window, flat = _shift_window(max_shift, n, img.device)
    wgt = _half_plane_weights(n, img.device, img.dtype)
    out_q, out_s, out_c = [], [], []
    for b0 in range(0, b_all, chunk):
        im = img[b0:b0 + chunk]
        b = im.shape[0]
        im = im - im.mean(dim=(-2, -1), keepdim=True)
        f_img = torch.fft.rfft2(im) * filt[b0:b0 + chunk]
        rr = rot[b0:b0 + chunk].repeat_interleave(g, 0)
        qq = grid.repeat(b, 1)
        ref = model.project(rr, qq, torch.zeros(b * g, 2, device=img.device, dtype=img.dtype))
        f_ref = torch.fft.rfft2(ref).reshape(b, g, n, n // 2 + 1)
        f_ref[..., 0, 0] = 0
        power = (f_ref.real ** 2 + f_ref.imag ** 2) * (filt[b0:b0 + chunk, None] ** 2) * wgt
        ref_norm = torch.sqrt(power.sum(dim=(-2, -1)) / (n * n) + 1e-30)           # (b, g)
        cc = torch.fft.irfft2(f_img[:, None] * f_ref.conj(), s=(n, n)).reshape(b, g, -1)[..., flat]
        val, arg = cc.max(-1)
        ncc = val / (torch.sqrt((im * im).sum(dim=(-2, -1)))[:, None] * ref_norm)
        best = ncc.argmax(1)
        ar = torch.arange(b, device=img.device)
        out_q.append(grid[best])
        out_s.append(window[arg[ar, best]].to(img.dtype))
        out_c.append(ncc[ar, best])
    return torch.cat(out_q), torch.cat(out_s), torch.cat(out_c)


def _distinct_candidates(scores: np.ndarray, rot_index: np.ndarray, rots: np.ndarray,
                         n_keep: int, min_angle: float) -> np.ndarray:
    """Indices of the ``n_keep`` best references of one image whose rotations differ by
    more than ``min_angle`` degrees (greedy non-maximum suppression)."""
    order = np.argsort(-scores)[: max(50, 30 * n_keep)]
    chosen = []
    for i in order:
        if all(angular_distance_deg(rots[rot_index[i]], rots[rot_index[j]]) > min_angle
               for j in chosen):
            chosen.append(i)
            if len(chosen) == n_keep:
                break
    while len(chosen) < n_keep:          # fewer distinct ones than asked: repeat the best
        chosen.append(chosen[0])
    return np.array(chosen)


def _as_images(images, device) -> torch.Tensor:
    t = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    t = t.to(device=device, dtype=torch.float32)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[-1] != t.shape[-2]:
        raise ValueError(f"Images must be square, shape (M, box, box); got {tuple(t.shape)}.")
    return t


def align_particles(images: ArrayLike, coords: np.ndarray, modes: np.ndarray, pixel_size: float, *,
                    ctf=None, sigma: Union[float, np.ndarray] = 1.0,
                    weights: Optional[np.ndarray] = None, max_shift_px: float = 5.0,
                    amplitude_range: Optional[np.ndarray] = None, working_size: int = 64,
                    search_size: int = 32, angular_step_deg: float = 15.0,
                    amplitude_seeds: int = 3, amplitude_grid: int = 3,
                    n_candidates: int = 8, n_final: int = 1,
                    search_iters: int = 10, refine_iters: int = 15, bead_cell: float = 1.5,
                    search_lowpass: Optional[float] = 0.25,
                    batch_size: int = 128,
                    device: Union[str, torch.device] = "cpu", seed: int = 0,
                    progress: Optional[Callable[[float, str], None]] = None) -> AlignmentResult:
    """HEMNMA elastic and rigid alignment of particle images (see the module docstring).

    images: (M, box, box) particle images (numpy or torch), indexed ``[y, x]``.
    coords: (N, 3) Å reference structure, centred (:func:`structure.centre`).
    modes: (K, N, 3) the chosen normal modes (unit-norm 3N vectors), K may be 0.
    pixel_size: Å/px of the images.
    ctf: :class:`ctf.CTFParams` of the images (one or M values) or None.
    sigma: atom width(s) Å, (N,) or a number; weights: (N,) or None.
    max_shift_px: largest |shift| searched, pixels of the input images.
    amplitude_range: (K, 2) lowest and highest amplitude (Å) of each mode; default
        ``+-5 sqrt(N)`` Å (atoms moved by 5 Å RMS).
    working_size / search_size: image sizes (px) of the final refinement and of the
        global search (reduced by Fourier cropping; never above the input box).
    angular_step_deg: spacing of the global rotation grid; amplitude_seeds: values per
        mode in the star of amplitude seeds of the global search; amplitude_grid: values
        per mode of the grid tried at every candidate pose (at most ~256 combinations);
        n_candidates: distinct poses refined per image at the search size; n_final: of
        those, refined at the working size.
    search_iters / refine_iters: Levenberg-Marquardt iterations of the two refinements.
    bead_cell: bead size of the search model, in search pixels.
    search_lowpass: width (cycles/px at the search size) of the Gaussian low-pass applied
        in the search-size refinement (widens its basin of convergence); None: off.
    batch_size: images aligned at once (bounds memory).
    seed: the method is deterministic; kept for the project's seeding rule.
    progress: optional ``callback(fraction_done, message)``.
    Returns an :class:`AlignmentResult`.
    """
    del seed  # no random choices
    device = torch.device(device)
    imgs = _as_images(images, device)
    m, box = imgs.shape[0], imgs.shape[-1]
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must have shape (N, 3) Å, got {coords.shape}.")
    n_atoms = len(coords)
    modes = np.asarray(modes, dtype=np.float64)
    if modes.ndim == 2 and modes.size == 0:
        modes = modes.reshape(0, n_atoms, 3)
    if modes.ndim != 3 or modes.shape[1:] != (n_atoms, 3):
        raise ValueError(f"modes must have shape (K, {n_atoms}, 3), got {modes.shape}.")
    k = modes.shape[0]
    if not pixel_size > 0:
        raise ValueError(f"The pixel size must be positive (Å/px), got {pixel_size}.")
    if max_shift_px < 0:
        raise ValueError(f"The maximum shift must be >= 0 px, got {max_shift_px}.")
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (n_atoms,)).copy()
    wts = np.ones(n_atoms) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if wts.shape != (n_atoms,):
        raise ValueError(f"weights must have one value per atom ({n_atoms}).")
    if amplitude_range is None:
        amplitude_range = np.tile([-5.0 * math.sqrt(n_atoms), 5.0 * math.sqrt(n_atoms)], (k, 1))
    amplitude_range = np.asarray(amplitude_range, dtype=np.float64).reshape(k, 2)
    if np.any(amplitude_range[:, 1] < amplitude_range[:, 0]):
        raise ValueError("Each amplitude range must be (lowest, highest) with lowest <= highest.")
    if ctf is not None and ctf.batch_size not in (1, m):
        raise ValueError(f"The CTF describes {ctf.batch_size} images but {m} images were given.")
    work = min(int(working_size), box)
    search = min(int(search_size), work)
    if search < 8:
        raise ValueError(f"The search size must be at least 8 px, got {search}.")
    ps_w, ps_s = pixel_size * box / work, pixel_size * box / search
    report = progress or (lambda f, msg: None)
    t0 = time.time()

    # Models: beads of about one search pixel for the search, all atoms for the final fit.
    bead = coarse_grain(coords, modes, sig, wts, cell=bead_cell * ps_s)
    model_s = _Model(*bead, search, ps_s, device)
    model_w = _Model(coords, modes, sig, wts, work, ps_w, device)
    logger.info("HEMNMA: %d images of %d px, %d atoms (%d beads), %d modes; search %d px, work %d px",
                m, box, n_atoms, len(bead[0]), k, search, work)

    # Reference spectra of the global search: rotations x amplitude seeds.
    lo, hi = amplitude_range[:, 0], amplitude_range[:, 1]
    mid = 0.5 * (lo + hi)
    seeds = [mid]
    if amplitude_seeds > 1:
        frac = (np.arange(amplitude_seeds) + 0.5) / amplitude_seeds
        for i in range(k):
            for f in frac:
                s = mid.copy()
                s[i] = lo[i] + f * (hi[i] - lo[i])
                if not np.allclose(s, mid):
                    seeds.append(s)
    seeds = np.array(seeds).reshape(len(seeds), k)
    rots, n_psi = rotation_grid(angular_step_deg, return_n_psi=True)
    rot_t = torch.as_tensor(rots, dtype=torch.float32, device=device)
    directions = rot_t[::n_psi]                 # psi = 0 of every projection direction
    psi = torch.arange(n_psi, device=device, dtype=torch.float32) * (2 * math.pi / n_psi)
    ref_ft, ref_rot, ref_seed = [], [], []
    for si, sd in enumerate(seeds):
        q = torch.as_tensor(sd, dtype=torch.float32, device=device).expand(len(directions), k)
        for start in range(0, len(directions), 256):
            sl = slice(start, start + 256)
            p = model_s.project(directions[sl], q[sl], torch.zeros(directions[sl].shape[0], 2,
                                                                     device=device))
            p = _rotate_in_plane(p, psi)                                      # (Pc * n_psi, n, n)
            p = p - p.mean(dim=(-2, -1), keepdim=True)
            ref_ft.append(torch.fft.rfft2(p))
        ref_rot.append(np.arange(len(rots)))
        ref_seed.append(np.full(len(rots), si))
    ref_ft = torch.cat(ref_ft)
    ref_rot, ref_seed = np.concatenate(ref_rot), np.concatenate(ref_seed)
    logger.info("HEMNMA: %d reference projections (%d rotations x %d amplitude seeds) in %.1f s",
                len(ref_ft), len(rots), len(seeds), time.time() - t0)
    report(0.0, f"{len(ref_ft)} reference projections ready")

    # Amplitude grid tried at every candidate pose: bin centres, at most ~256 combinations.
    n_grid = max(2, min(int(amplitude_grid), int(256 ** (1.0 / max(k, 1)) + 1e-9)))
    axes = [lo[i] + (np.arange(n_grid) + 0.5) / n_grid * (hi[i] - lo[i]) for i in range(k)]
    grid = torch.as_tensor(np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, k) if k
                           else np.zeros((1, 0)), dtype=torch.float32, device=device)
    # Gaussian low-pass of the search-size refinement: wider basins of convergence.
    ky = torch.fft.fftfreq(search, device=device)[:, None]
    kx = torch.fft.rfftfreq(search, device=device)[None, :]
    smooth = torch.exp(-(kx * kx + ky * ky) / (2 * search_lowpass ** 2)) if search_lowpass else 1.0
    q_lo = torch.as_tensor(lo, dtype=torch.float32, device=device)
    q_hi = torch.as_tensor(hi, dtype=torch.float32, device=device)
    out_q, out_rot, out_s, out_score, out_std = [], [], [], [], []
    for b0 in range(0, m, batch_size):
        batch = imgs[b0:b0 + batch_size]
        mb = batch.shape[0]
        ctf_b = None if ctf is None else (ctf if ctf.batch_size == 1 else ctf.select(slice(b0, b0 + mb)))
        img_s, img_w = fourier_crop(batch, search), fourier_crop(batch, work)
        filt_s = _filters(ctf_b, mb, search, ps_s, device, torch.float32)
        filt_w = _filters(ctf_b, mb, work, ps_w, device, torch.float32)
        scores, best_shift, anti = _global_search(ref_ft, img_s, filt_s, max_shift_px * search / box)
        scores_np = scores.cpu().numpy()
        check_contrast(scores_np.max(1), anti.cpu().numpy())
        pick = np.stack([_distinct_candidates(scores_np[i], ref_rot, rots, n_candidates,
                                              angular_step_deg) for i in range(mb)])  # (mb, C)
        owner = np.repeat(np.arange(mb), n_candidates)
        flat = pick.reshape(-1)
        rot0 = rot_t[torch.as_tensor(ref_rot[flat], device=device)]
        own_t = torch.as_tensor(owner, device=device)
        if k:
            q0, s0, _ = _amplitude_grid_search(model_s, img_s[own_t], filt_s[own_t], rot0, grid,
                                               max_shift_px * search / box)
        else:
            q0 = torch.zeros(len(flat), 0, device=device)
            s0 = best_shift[own_t, torch.as_tensor(flat, device=device)]
        logger.debug("HEMNMA: global search done (%.1f s)", time.time() - t0)
        r1, q1, s1, ncc1, _ = _refine(model_s, img_s[own_t], (filt_s * smooth)[own_t], rot0, q0, s0,
                                   q_lo, q_hi,
                                   max_shift_px * search / box * 1.1, search_iters, chunk=64)
        # The n_final best per image go to the working size.
        order = torch.argsort(ncc1.reshape(mb, n_candidates), dim=1, descending=True)[:, :n_final]
        sel = (order + torch.arange(mb, device=device)[:, None] * n_candidates).reshape(-1)
        own2 = own_t[sel]
        logger.debug("HEMNMA: search-size refinement done (%.1f s)", time.time() - t0)
        r2, q2, s2, ncc2, std2 = _refine(model_w, img_w[own2], filt_w[own2], r1[sel], q1[sel],
                                   s1[sel] * (work / search), q_lo, q_hi,
                                   max_shift_px * work / box * 1.1, refine_iters, chunk=16)
        best = torch.argmax(ncc2.reshape(mb, n_final), dim=1) + torch.arange(mb, device=device) * n_final
        out_q.append(q2[best]), out_rot.append(r2[best])
        out_s.append(s2[best] * (box / work)), out_score.append(ncc2[best])
        out_std.append(std2[best] * torch.as_tensor([1.0] * k + [180.0 / math.pi] * 3 + [box / work] * 2,
                                                    dtype=std2.dtype, device=device))
        done = min(m, b0 + mb)
        report(done / m, f"aligned {done}/{m} images")
        logger.info("HEMNMA: aligned %d/%d images (%.1f s)", done, m, time.time() - t0)
    rot = torch.cat(out_rot).double().cpu().numpy()
    std = torch.cat(out_std).cpu().numpy()
    return AlignmentResult(amplitudes=torch.cat(out_q).double().cpu().numpy(),
                           angles=matrix_to_euler(rot),
                           shifts=torch.cat(out_s).double().cpu().numpy(),
                           score=torch.cat(out_score).double().cpu().numpy(),
                           amplitude_std=std[:, :k],
                           angle_std=np.sqrt((std[:, k:k + 3] ** 2).sum(1)),
                           shift_std=np.sqrt((std[:, k + 3:k + 5] ** 2).sum(1)))
