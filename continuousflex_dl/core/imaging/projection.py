"""Differentiable projections and density maps of Gaussian atoms.

Every atom ``n`` is an isotropic 3-D Gaussian of standard deviation ``sigma_n``
(Å) integrating to ``weight_n``. Pose convention (see :mod:`geometry`): an atom
at ``r`` (Å, reference frame, origin at the box centre) lands at pixel
coordinates ``[x, y] = (A @ r)[:2] / pixel_size - shift + box // 2`` of an
image indexed ``[y, x]``, and the density is summed along ``z``.

Each pixel holds the *integral* of the projected Gaussian over the pixel
(differences of ``erf`` at the pixel edges), so widths much smaller than a
pixel are handled and the pixels of an image sum to the weights of the atoms
inside it. The 2-D Gaussian is separable, so an image is the matrix product
``Gy^T diag(w) Gx`` of 1-D profiles ``Gx, Gy`` (N, box): one batched matmul,
differentiable with respect to coordinates, rotations and shifts.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch

from .geometry import particle_offset_px

__all__ = ["fourier_crop", "project_gaussians", "density_map", "pixel_profiles", "profile_reach"]

ArrayLike = Union[np.ndarray, torch.Tensor, float]


def _as_tensor(x, dtype=None, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dtype=dtype or x.dtype, device=device or x.device)
    return torch.as_tensor(np.asarray(x), dtype=dtype or torch.float32, device=device)


def _coords_tensor(coords) -> torch.Tensor:
    """Coordinates as a tensor: a tensor keeps its dtype/device, numpy becomes float32 on the CPU."""
    return coords if isinstance(coords, torch.Tensor) else _as_tensor(coords, torch.float32, torch.device("cpu"))


def pixel_profiles(positions: torch.Tensor, box: int, sigma_px: torch.Tensor,
                   derivative: bool = False, pixels: Optional[slice] = None):
    """Pixel-integrated 1-D Gaussian profiles.

    positions: (..., N) centres in pixel coordinates (pixel ``i`` covers ``[i - 1/2, i + 1/2]``);
    sigma_px: (N,) or broadcastable widths in pixels (> 0).
    Returns ``G`` (..., N, box) with ``G[..., n, i]`` the integral over pixel ``i`` of a
    unit Gaussian centred at ``positions[..., n]``; with ``derivative=True`` also
    ``dG/dposition`` of the same shape. pixels: only these pixels (a slice of the box, e.g.
    :func:`profile_reach`), the last axis their length.
    """
    first, stop = (0, box) if pixels is None else (pixels.start, pixels.stop)
    inv = 1.0 / (sigma_px * math.sqrt(2.0))
    half = _window_half(sigma_px)
    if 2 * half + 1 < box:
        return _windowed_profiles(positions, first, stop, inv, half, derivative)
    return _profiles_on(torch.arange(first, stop + 1, dtype=positions.dtype, device=positions.device) - 0.5,
                        positions[..., None], inv[..., None], derivative)


def profile_reach(positions: torch.Tensor, box: int, sigma_px: torch.Tensor) -> slice:
    """The pixels (a slice of the box) beyond which every profile of :func:`pixel_profiles` at
    ``positions`` is zero (all of them where the profiles are not windowed)."""
    half = _window_half(sigma_px)
    if 2 * half + 1 >= box or positions.numel() == 0:
        return slice(0, box)
    c = torch.round(torch.stack([positions.min(), positions.max()])).tolist()
    return slice(min(box, max(0, int(c[0]) - half)), max(0, min(box, int(c[1]) + half + 1)))


def _window_half(sigma_px: torch.Tensor) -> int:
    """Half the width (px) of the window in which profiles are evaluated (:data:`WINDOW_SIGMAS`)."""
    return int(math.ceil(WINDOW_SIGMAS * float(torch.max(sigma_px.detach())))) + 1


#: Profiles are evaluated within this many widths of each centre (the Gaussian mass
#: beyond 6 widths, 2e-9, is below float32 resolution).
WINDOW_SIGMAS = 6.0


def _profiles_on(edges: torch.Tensor, positions: torch.Tensor, inv: torch.Tensor, derivative: bool):
    """Integrals of unit Gaussians (centres ``positions``, ``inv = 1 / (sigma sqrt 2)``) between
    consecutive ``edges`` (broadcast; last axis = edges), and with ``derivative`` their
    derivatives in position: a pair then."""
    t = (edges - positions) * inv
    cdf = torch.erf(t)
    g = 0.5 * (cdf[..., 1:] - cdf[..., :-1])
    if not derivative:
        return g
    # d/dp 0.5 erf((e - p) / (s sqrt 2)) = -exp(-t^2) / (s sqrt(2 pi)) = -pdf.
    pdf = torch.exp(-t * t) * (inv / math.sqrt(math.pi))
    return g, -(pdf[..., 1:] - pdf[..., :-1])


def _windowed_profiles(positions: torch.Tensor, first: int, stop: int, inv: torch.Tensor, half: int,
                       derivative: bool = False):
    """:func:`pixel_profiles` on pixels ``first`` to ``stop - 1``, evaluated only on the
    2 * half + 1 pixels around each centre (erf and exp are the cost of projection; this
    evaluates ~10 instead of box + 1 per atom)."""
    k = torch.arange(-half, half + 2, dtype=positions.dtype, device=positions.device)
    c = torch.round(positions)
    values = _profiles_on(c[..., None] + (k - 0.5), positions[..., None], inv[..., None], derivative)
    idx = c[..., None].long() + (k[:-1].long() - first)
    inside = (idx >= 0) & (idx < stop - first)
    idx = idx.clamp_(0, max(stop - first - 1, 0))
    out = []
    for v in (values if derivative else (values,)):
        full = torch.zeros(positions.shape + (stop - first,), dtype=positions.dtype, device=positions.device)
        out.append(full.scatter_add_(-1, idx, v * inside))
    return tuple(out) if derivative else out[0]


def _check_common(box: int, pixel_size: float) -> int:
    if int(box) != box or box < 1:
        raise ValueError(f"The box size must be a positive integer number of pixels, got {box}.")
    if not pixel_size > 0:
        raise ValueError(f"The pixel size must be positive (Å/px), got {pixel_size}.")
    return int(box)


def _atom_params(sigma, weights, n: int, dtype, device):
    sigma_t = _as_tensor(sigma, dtype, device).reshape(-1)
    if sigma_t.numel() == 1:
        sigma_t = sigma_t.expand(n)
    if sigma_t.shape[0] != n:
        raise ValueError(f"sigma must be a number or one width per atom ({n}), got {sigma_t.shape[0]}.")
    if torch.any(sigma_t <= 0):
        raise ValueError("Atom widths sigma must be positive (Å).")
    if weights is None:
        w = torch.ones(n, dtype=dtype, device=device)
    else:
        w = _as_tensor(weights, dtype, device).reshape(-1)
        if w.shape[0] != n:
            raise ValueError(f"weights must have one value per atom ({n}), got {w.shape[0]}.")
    return sigma_t, w


def project_gaussians(coords: ArrayLike, rotations: ArrayLike, shifts: ArrayLike, box: int,
                      pixel_size: float, sigma: ArrayLike = 1.0,
                      weights: Optional[ArrayLike] = None) -> torch.Tensor:
    """Projections of Gaussian atoms for a batch of poses.

    coords: (N, 3) or (B, N, 3) Å in the reference frame (already centred).
    rotations: (B, 3, 3) matrices ``A`` (:func:`geometry.euler_to_matrix`).
    shifts: (B, 2) pixels ``(shiftX, shiftY)``, RELION's origin: the particle centre sits at
    box centre minus the shift (:func:`geometry.particle_offset_px`).
    box: image size in pixels (odd or even); pixel_size: Å/px.
    sigma: Å, a number or (N,); weights: (N,) or None (ones).
    Returns (B, box, box) indexed ``[y, x]``; each atom integrates to its weight.
    dtype/device follow ``coords`` when it is a tensor (float32 for numpy input).
    """
    box = _check_common(box, pixel_size)
    coords_t = _coords_tensor(coords)
    dtype, device = coords_t.dtype, coords_t.device
    rot = _as_tensor(rotations, dtype, device)
    sh = _as_tensor(shifts, dtype, device)
    if rot.ndim != 3 or rot.shape[1:] != (3, 3):
        raise ValueError(f"rotations must have shape (B, 3, 3), got {tuple(rot.shape)}.")
    b = rot.shape[0]
    if sh.shape != (b, 2):
        raise ValueError(f"shifts must have shape ({b}, 2) (shiftX, shiftY in px), got {tuple(sh.shape)}.")
    if coords_t.ndim == 2:
        coords_t = coords_t[None]
    if coords_t.ndim != 3 or coords_t.shape[-1] != 3 or coords_t.shape[0] not in (1, b):
        raise ValueError(f"coords must have shape (N, 3) or ({b}, N, 3), got {tuple(coords_t.shape)}.")
    n = coords_t.shape[1]
    sigma_t, w = _atom_params(sigma, weights, n, dtype, device)
    # Only x and y of A @ r are needed: (B, N, 2).
    xy = torch.matmul(coords_t, rot[:, :2, :].transpose(1, 2)) / pixel_size
    offset = particle_offset_px(sh) + box // 2
    px = xy[..., 0] + offset[:, 0:1]
    py = xy[..., 1] + offset[:, 1:2]
    s_px = sigma_t / pixel_size
    gx = pixel_profiles(px, box, s_px)            # (B, N, box)
    gy = pixel_profiles(py, box, s_px)            # (B, N, box)
    return torch.matmul(gy.transpose(1, 2) * w, gx)


def density_map(coords: ArrayLike, box: int, pixel_size: float, sigma: ArrayLike = 1.0,
                weights: Optional[ArrayLike] = None, chunk: int = 2048) -> torch.Tensor:
    """3-D map of the same Gaussians, (box, box, box) indexed ``[z, y, x]``.

    coords: (N, 3) Å, reference frame (voxel ``(iz, iy, ix)`` is at
    ``((ix, iy, iz) - box // 2) * pixel_size``). Each voxel holds the integral of
    the density over the voxel, so voxels sum to the weights of the atoms inside.
    chunk: atoms processed at once (bounds memory to ``chunk * box**2`` values).
    dtype/device follow ``coords`` when it is a tensor.
    """
    box = _check_common(box, pixel_size)
    c = _coords_tensor(coords)
    dtype, device = c.dtype, c.device
    if c.ndim != 2 or c.shape[1] != 3:
        raise ValueError(f"coords must have shape (N, 3), got {tuple(c.shape)}.")
    n = c.shape[0]
    sigma_t, w = _atom_params(sigma, weights, n, dtype, device)
    pos = c / pixel_size + box // 2
    s_px = sigma_t / pixel_size
    vol = torch.zeros(box, box, box, dtype=dtype, device=device)
    for start in range(0, n, max(1, int(chunk))):
        sl = slice(start, start + chunk)
        gx = pixel_profiles(pos[sl, 0], box, s_px[sl])      # (n, box)
        gy = pixel_profiles(pos[sl, 1], box, s_px[sl])
        gz = pixel_profiles(pos[sl, 2], box, s_px[sl])
        # vol[z, y, x] += sum_n w_n gz[n, z] gy[n, y] gx[n, x]
        yx = (gy[:, :, None] * gx[:, None, :]).reshape(gx.shape[0], -1)   # (n, box*box)
        vol += torch.matmul(gz.transpose(0, 1) * w[sl], yx).reshape(box, box, box)
    return vol


def fourier_crop(images: torch.Tensor, size: int, *, preserve: str, correct_pixel_blur: bool) -> torch.Tensor:
    """Reduce images (B, n, n) to (B, size, size) by Fourier cropping, keeping the box in Å
    (the pixel size becomes ``pixel_size * n / size``): the one Fourier crop of the package.

    The box centre ``n // 2`` maps to ``size // 2``. The Nyquist row/column of an even
    ``size`` is dropped, also at ``size == n`` (callers that want the images unchanged then
    skip the call). Both choices are explicit:

    preserve: ``'sum'`` keeps the pixel sum (pixels hold integrals: projections; HEMNMA's
        alignment), ``'mean'`` keeps the pixel values, the sum times ``(size / n)^2`` (images
        that hold densities: the network's preprocessing).
    correct_pixel_blur: True multiplies the spectrum by ``sinc(f * new_px) / sinc(f * old_px)``,
        so the result matches pixel-integrated projections computed directly at the coarser
        pixel; False leaves the spectrum as it is, so white noise stays white.
    """
    n = images.shape[-1]
    if images.shape[-2] != n:
        raise ValueError(f"Fourier cropping needs square images, got {tuple(images.shape[-2:])}.")
    if size > n or size < 2:
        raise ValueError(f"Cannot Fourier-crop images of {n} px to {size} px (2 to {n} px).")
    if preserve not in ("sum", "mean"):
        raise ValueError(f"preserve must be 'sum' or 'mean', not {preserve!r}.")
    x = torch.roll(images, shifts=(-(n // 2), -(n // 2)), dims=(-2, -1))
    ft = torch.fft.rfft2(x)
    rows = torch.as_tensor(np.round(np.fft.fftfreq(size) * size).astype(np.int64) % n, device=images.device)
    ft = ft[..., rows, : size // 2 + 1]
    f = torch.fft.fftfreq(size, device=images.device, dtype=images.dtype)
    fx = torch.fft.rfftfreq(size, device=images.device, dtype=images.dtype)
    filt = torch.ones(size, size // 2 + 1, device=images.device, dtype=images.dtype)
    if correct_pixel_blur:
        ratio = size / n
        filt = (torch.sinc(f)[:, None] * torch.sinc(fx)[None, :]
                / (torch.sinc(f * ratio)[:, None] * torch.sinc(fx * ratio)[None, :]))
    if size % 2 == 0:
        filt[size // 2, :] = 0
        filt[:, size // 2] = 0
    out = torch.fft.irfft2(ft * filt, s=(size, size))
    out = torch.roll(out, shifts=(size // 2, size // 2), dims=(-2, -1))
    return out * (size * size / (n * n)) if preserve == "mean" else out
