"""Direct Fourier inversion: particle images with poses and CTFs -> a 3-D map, its two half
maps and their Fourier shell correlation (FSC).

Image model (RELION's ``ObservationModel::predictObservation``, fixed in :mod:`.geometry`):
an atom at ``r`` (Å, reference frame, origin at the box centre) lands at pixel
``(A @ r)[:2] / pixel_size - shift + box // 2`` of an image indexed ``[y, x]``, with
``A = euler_to_matrix(rot, tilt, psi)`` and ``shift`` = RELION's rlnOrigin / Xmipp's
shiftX, Y (px); the image is then multiplied by the CTF in Fourier space
(:func:`.ctf.ctf_image`, positive at zero frequency; particles white on black).
By the Fourier slice theorem, once the displacement ``-shift`` is undone, the 2-D Fourier
transform of an image is ``CTF(k) * V(A.T @ (kx, ky, 0))``, a central slice of the 3-D
transform ``V`` of the map.

Reconstruction (:class:`Reconstructor`, :func:`reconstruct`), for each half set ``h`` of the
particles (a random, seeded split, :func:`split_halves`):

1. each image is padded to ``M = pad_factor * box`` px (even), Fourier transformed about its
   centre and multiplied by the phase that undoes its displacement;
2. ``CTF * F`` and ``CTF^2`` are inserted as central slices into the padded 3-D ``rfft``
   grid by trilinear gridding (``torch_fourier_slice.insert_central_slices_rfft_3d_multichannel``)
   and summed over the particles: ``N_h(k)``, ``D_h(k)``; particles are streamed in chunks,
   so memory does not grow with their number;
3. Wiener filter ``V_h = N_h / (D_h + lambda_h(|k|))`` with
   ``lambda_h = <D_h>_shell / (T * SNR_h(|k|))`` and ``SNR_h = FSC / (1 - FSC)`` from a first
   pass with ``lambda = 1e-3 <D_h>_shell`` (RELION's tau^2 from the FSC); the full map uses
   ``N_1 + N_2``, ``D_1 + D_2`` and ``SNR = 2 FSC / (1 - FSC)``; ``T`` is ``wiener_fudge``;
4. inverse transform, division by ``sinc^2`` per axis (the trilinear gridding kernel,
   in units of the padded box) and cropping to ``box``;
5. a soft spherical mask (:func:`soft_spherical_mask`) on the full map and on the half maps
   for their FSC (gold standard: the halves never meet); resolution where the FSC falls
   below 0.143 (:func:`resolution_at`).

Maps are (box, box, box) indexed ``[z, y, x]``, voxel ``(iz, iy, ix)`` at
``((ix, iy, iz) - box // 2) * pixel_size`` Å, the convention of
:func:`.projection.density_map`. Scale: noise-free images without CTF give a map whose
voxels hold the values of ``density_map`` of the same atoms (voxel integrals), because a
pixel of a projection holds the integral over its column of voxels.
Frequencies are in 1/Å, resolutions in Å, shifts in px, angles in degrees.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..imaging.ctf import CTFParams, ctf_image
from ..progress import Progress, report
from ..imaging.geometry import euler_to_matrix, particle_offset_px

logger = logging.getLogger(__name__)

__all__ = [
    "FSC_THRESHOLD", "split_halves", "soft_spherical_mask", "fsc", "resolution_at", "lowpass",
    "map_correlation", "model_map_correlation", "Reconstructor", "ReconstructionResult", "reconstruct",
    "centred_origin", "read_fsc_csv",
]

#: Gold-standard FSC threshold between independent half maps (Rosenthal & Henderson 2003).
FSC_THRESHOLD = 0.143

#: Points (image Fourier samples) given to one call of the slice inserter. Its temporaries
#: take about 0.6 KiB per point (measured), so a call holds about 0.6 GiB; fewer points per
#: call cost more time, as each call also allocates a full padded grid (at 128 px, 2^18
#: points: 170 ms CPU per particle, 2^20: 107 ms).
_INSERT_POINTS = 2 ** 20

#: Wiener term of the first pass, as a fraction of the mean CTF^2 weight of the shell.
_FIRST_PASS_LAMBDA = 1e-3

ArrayLike = Union[np.ndarray, torch.Tensor]


# --------------------------------------------------------------------------- small tools

def split_halves(n: int, seed: int = 0) -> np.ndarray:
    """Random gold-standard split of ``n`` particles: (n,) int8 of 0 / 1, half each
    (the first half one more when n is odd). Same ``seed`` -> same split."""
    if int(n) != n or n < 2:
        raise ValueError(f"Two half sets need at least 2 particles, got {n}.")
    order = np.random.default_rng(int(seed)).permutation(int(n))
    halves = np.empty(int(n), dtype=np.int8)
    halves[order] = np.arange(int(n)) % 2
    return halves


def soft_spherical_mask(box: int, radius_px: float, edge_px: float = 3.0,
                        device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Soft spherical mask (box, box, box) float32 centred on voxel ``box // 2``: 1 within
    ``radius_px``, a raised cosine down to 0 over ``edge_px`` px, 0 beyond."""
    if not radius_px > 0:
        raise ValueError(f"The mask radius must be positive (px), got {radius_px}.")
    if not edge_px >= 0:
        raise ValueError(f"The mask edge must be >= 0 px, got {edge_px}.")
    c = torch.arange(box, dtype=torch.float32, device=device) - box // 2
    r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    if edge_px == 0:
        return (r <= radius_px).to(torch.float32)
    t = ((r - radius_px) / edge_px).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * t))


def _as_volume(x: ArrayLike, name: str) -> torch.Tensor:
    v = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, dtype=np.float64))
    if v.ndim != 3 or len(set(v.shape)) != 1:
        raise ValueError(f"{name} must be a cubic map (n, n, n), got shape {tuple(v.shape)}.")
    return v.to(torch.float64)


def _shell_index(box: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shell (rounded radius in Fourier voxels) and rfft multiplicity (1 or 2) of each
    coefficient of ``torch.fft.rfftn`` of a (box,)*3 map; both (box, box, box // 2 + 1)."""
    f = torch.fft.fftfreq(box, device=device, dtype=torch.float64) * box
    fx = torch.fft.rfftfreq(box, device=device, dtype=torch.float64) * box
    r = torch.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2)
    mult = torch.full((box // 2 + 1,), 2.0, dtype=torch.float64, device=device)
    mult[0] = 1.0
    if box % 2 == 0:
        mult[-1] = 1.0
    return torch.round(r).long(), mult.expand(box, box, -1)


def fsc(map1: ArrayLike, map2: ArrayLike, pixel_size: float) -> Tuple[np.ndarray, np.ndarray]:
    """Fourier shell correlation of two maps (n, n, n) of ``pixel_size`` Å/voxel.

    Shells are 1 Fourier voxel wide, ``s = 0 .. n // 2`` (Nyquist). Returns
    ``(frequency (S,) 1/Å = s / (n * pixel_size), fsc (S,))``.
    """
    a, b = _as_volume(map1, "map1"), _as_volume(map2, "map2")
    if a.shape != b.shape:
        raise ValueError(f"The maps have different shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    if not pixel_size > 0:
        raise ValueError(f"The pixel size must be positive (Å/px), got {pixel_size}.")
    n = a.shape[0]
    b = b.to(a.device)
    fa, fb = torch.fft.rfftn(a), torch.fft.rfftn(b)
    shell, mult = _shell_index(n, a.device)
    keep = shell <= n // 2
    s, size = shell[keep], n // 2 + 1
    cross = torch.bincount(s, (mult * (fa * fb.conj()).real)[keep], size)
    pa = torch.bincount(s, (mult * fa.abs() ** 2)[keep], size)
    pb = torch.bincount(s, (mult * fb.abs() ** 2)[keep], size)
    denom = torch.sqrt(pa * pb)
    curve = torch.where(denom > 0, cross / denom.clamp_min(1e-300), torch.zeros_like(cross))
    freq = np.arange(size) / (n * float(pixel_size))
    return freq, curve.cpu().numpy()


def resolution_at(frequency: np.ndarray, curve: np.ndarray, threshold: float = FSC_THRESHOLD) -> float:
    """Resolution (Å) where ``curve`` first falls below ``threshold`` after the origin shell,
    interpolated linearly in frequency; ``1 / frequency[-1]`` (Nyquist) when it never does.

    frequency: (S,) 1/Å increasing from 0; curve: (S,) FSC values.
    """
    f = np.asarray(frequency, dtype=float)
    c = np.asarray(curve, dtype=float)
    if f.ndim != 1 or f.shape != c.shape or len(f) < 2:
        raise ValueError("frequency and curve must be 1-D arrays of the same length (>= 2).")
    below = np.flatnonzero(c[1:] < threshold)
    if len(below) == 0:
        return float(1.0 / f[-1])
    s = int(below[0]) + 1
    t = (c[s - 1] - threshold) / (c[s - 1] - c[s]) if c[s - 1] != c[s] else 0.0
    crossing = f[s - 1] + min(max(t, 0.0), 1.0) * (f[s] - f[s - 1])
    return float(1.0 / crossing) if crossing > 0 else math.inf


def lowpass(volume: ArrayLike, pixel_size: float, resolution: float, edge_shells: float = 2.0) -> np.ndarray:
    """``volume`` (n, n, n) low-pass filtered at ``resolution`` Å: Fourier coefficients kept up
    to 1/resolution, a raised-cosine fall over ``edge_shells`` Fourier voxels beyond. Returns
    float32 numpy."""
    v = _as_volume(volume, "volume")
    if not resolution > 0:
        raise ValueError(f"The resolution must be positive (Å), got {resolution}.")
    n = v.shape[0]
    f = torch.fft.fftfreq(n, device=v.device, dtype=torch.float64) * n
    fx = torch.fft.rfftfreq(n, device=v.device, dtype=torch.float64) * n
    r = torch.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2)
    cut = n * float(pixel_size) / float(resolution)
    t = ((r - cut) / max(float(edge_shells), 1e-6)).clamp(0.0, 1.0)
    filt = 0.5 * (1.0 + torch.cos(math.pi * t))
    return torch.fft.irfftn(torch.fft.rfftn(v) * filt, s=v.shape).to(torch.float32).cpu().numpy()


def map_correlation(map1: ArrayLike, map2: ArrayLike, mask: Optional[ArrayLike] = None) -> float:
    """Pearson correlation of two maps (n, n, n) over the voxels where ``mask`` > 0.5
    (all voxels when None)."""
    a, b = _as_volume(map1, "map1"), _as_volume(map2, "map2")
    if a.shape != b.shape:
        raise ValueError(f"The maps have different shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    b = b.to(a.device)
    if mask is not None:
        keep = _as_volume(mask, "mask").to(a.device) > 0.5
        if keep.shape != a.shape:
            raise ValueError(f"The mask has shape {tuple(keep.shape)}, the maps {tuple(a.shape)}.")
        a, b = a[keep], b[keep]
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    denom = float(torch.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / denom if denom > 0 else 0.0


def model_map_correlation(coords: ArrayLike, volume: ArrayLike, pixel_size: float, resolution: float,
                          sigma: Union[float, np.ndarray] = 1.0, weights: Optional[np.ndarray] = None,
                          mask: Optional[ArrayLike] = None) -> float:
    """How well an atomic model fits a map: the correlation (:func:`map_correlation`, within
    ``mask``) of ``volume`` (n, n, n) with the density of the model's Gaussian atoms
    (:func:`.projection.density_map`, ``sigma`` Å, ``weights``) low-passed at the map's
    ``resolution`` Å (:func:`lowpass`).

    coords: (N, 3) Å in the map's frame: the reference centred as for projection and
    synthesis (:func:`.structure.centre` of the *undeformed* reference), then displaced.
    """
    from ..imaging.projection import density_map
    vol = _as_volume(volume, "volume")
    c = torch.as_tensor(np.asarray(coords, dtype=np.float64) if not isinstance(coords, torch.Tensor) else coords,
                        dtype=torch.float64)
    model = density_map(c, vol.shape[0], pixel_size, sigma=sigma, weights=weights)
    return map_correlation(vol, lowpass(model, pixel_size, resolution), mask)


# --------------------------------------------------------------------------- the accumulator

class Reconstructor:
    """Sums of CTF-weighted central slices of two half sets in a padded 3-D Fourier grid.

    box: image size (px, >= 8, odd or even); pixel_size: Å/px; pad_factor: the images are
    zero-padded to ``M = pad_factor * box`` px rounded up to an even size (2 as RELION; more
    reduces interpolation error, at pad_factor^3 the memory); device: where the grids live.
    Memory: 2 halves x 2 grids of M x M x (M/2 + 1) values (about 270 MiB at box 128), plus
    up to about 0.6 GiB of temporaries while inserting (``_INSERT_POINTS``), whatever the
    number of particles.

    Use :meth:`insert` for each chunk of particles, then :meth:`finish`.
    """

    def __init__(self, box: int, pixel_size: float, pad_factor: float = 2.0,
                 device: Union[str, torch.device] = "cpu"):
        if int(box) != box or box < 8:
            raise ValueError(f"The box must be an integer of at least 8 px, got {box}.")
        if not pixel_size > 0:
            raise ValueError(f"The pixel size must be positive (Å/px), got {pixel_size}.")
        if not 1.0 <= pad_factor <= 4.0:
            raise ValueError(f"The padding factor must be in [1, 4], got {pad_factor} (2 is usual).")
        self.box = int(box)
        self.pixel_size = float(pixel_size)
        self.padded = max(2 * int(math.ceil(pad_factor * self.box / 2.0)), self.box + self.box % 2)
        self.device = torch.device(device)
        m = self.padded
        shape = (2, m, m, m // 2 + 1)
        self._data = torch.zeros(shape, dtype=torch.complex64, device=self.device)      # sum CTF F
        self._weight = torch.zeros(shape, dtype=torch.float32, device=self.device)      # sum CTF^2
        self.counts = np.zeros(2, dtype=np.int64)
        self._ky = torch.fft.fftfreq(m, device=self.device, dtype=torch.float32)[:, None]  # cycles/px
        self._kx = torch.fft.rfftfreq(m, device=self.device, dtype=torch.float32)[None, :]

    def insert(self, images: ArrayLike, angles_deg: ArrayLike, shifts_px: ArrayLike,
               halves: ArrayLike, ctf: Optional[CTFParams] = None) -> None:
        """Add a chunk of B particles.

        images: (B, box, box) pixel values, indexed [y, x]; angles_deg: (B, 3) Euler ZYZ
        (rot, tilt, psi) deg; shifts_px: (B, 2) (shiftX, shiftY) px as RELION's rlnOrigin
        (Scipion's ALIGN_PROJ shifts, :func:`.geometry.scipion_matrix_to_pose`); halves: (B,)
        0 or 1; ctf: the images' CTFs (B entries, or one shared), or None when the images
        carry no CTF (weights 1).
        """
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if x.ndim != 3 or x.shape[1:] != (self.box, self.box):
            raise ValueError(f"Images must have shape (B, {self.box}, {self.box}), got {tuple(x.shape)}.")
        b = x.shape[0]
        angles = np.asarray(angles_deg, dtype=np.float64)
        shifts = np.asarray(shifts_px, dtype=np.float64)
        halves = np.asarray(halves).astype(np.int64)
        if angles.shape != (b, 3) or shifts.shape != (b, 2) or halves.shape != (b,):
            raise ValueError(f"For {b} images give angles ({b}, 3) deg, shifts ({b}, 2) px and halves "
                             f"({b},); got {angles.shape}, {shifts.shape} and {halves.shape}.")
        if not np.isin(halves, (0, 1)).all():
            raise ValueError("Half-set labels must be 0 or 1.")
        if ctf is not None and ctf.batch_size not in (1, b):
            raise ValueError(f"The CTF describes {ctf.batch_size} images, the chunk has {b}.")
        if not (np.isfinite(angles).all() and np.isfinite(shifts).all()):
            raise ValueError("Some particles have non-finite angles or shifts; remove them first.")
        slices = self._slices(x.to(self.device, torch.float32), shifts, ctf)
        # k3 = A.T @ (kx, ky, 0): the inserter rotates xyz slice coordinates by the given matrix.
        rot_t = torch.as_tensor(np.swapaxes(euler_to_matrix(angles), -1, -2), dtype=torch.float32,
                                device=self.device)
        from torch_fourier_slice import insert_central_slices_rfft_3d_multichannel
        m = self.padded
        step = max(1, _INSERT_POINTS // (m * (m // 2 + 1)))
        for h in (0, 1):
            index = torch.as_tensor(np.flatnonzero(halves == h), device=self.device)
            for start in range(0, len(index), step):
                sel = index[start:start + step]
                grid, _ = insert_central_slices_rfft_3d_multichannel(
                    slices[sel], (m, m, m), rot_t[sel], fftfreq_max=0.5)
                self._data[h] += grid[0]
                self._weight[h] += grid[1].real
            self.counts[h] += len(index)

    def _slices(self, images: torch.Tensor, shifts: np.ndarray, ctf: Optional[CTFParams]) -> torch.Tensor:
        """(B, 2, M, M//2+1) complex64: [CTF * F, CTF^2] of the padded images with the
        displacement undone, in the inserter's layout (rfft2, fftshifted along ky)."""
        m, n = self.padded, self.box
        lo = m // 2 - n // 2
        x = F.pad(images, (lo, m - n - lo, lo, m - n - lo))
        x = torch.roll(x, shifts=(-(m // 2), -(m // 2)), dims=(-2, -1))  # image centre -> index 0
        ft = torch.fft.rfft2(x)
        # The particle is displaced by o = particle_offset_px(shift) from the box centre
        # (RELION's rlnOrigin); exp(+2 pi i k.o) undoes a displacement by o.
        offset = torch.as_tensor(particle_offset_px(shifts), dtype=torch.float32, device=self.device)
        phase = 2.0 * math.pi * (self._kx * offset[:, 0, None, None] + self._ky * offset[:, 1, None, None])
        ft = ft * torch.polar(torch.ones_like(phase), phase)
        if ctf is None:
            c = torch.ones((1, m, m // 2 + 1), dtype=torch.float32, device=self.device)
        else:
            c = ctf_image(ctf, m, self.pixel_size, device=self.device)
        out = torch.stack([ft * c, (c * c).to(torch.complex64).expand_as(ft)], dim=1)
        return torch.fft.fftshift(out, dim=-2)

    # ------------------------------------------------------------------ finishing

    def finish(self, mask_radius_px: Optional[float] = None, mask_edge_px: float = 3.0,
               wiener_fudge: float = 1.0) -> "ReconstructionResult":
        """Maps from the sums so far (see the module docstring, steps 3-5).

        mask_radius_px: radius of the soft spherical mask (px; default ``box / 2 - edge - 1``);
        mask_edge_px: width of its raised-cosine edge (px); wiener_fudge: ``T``, > 1 trusts
        the data more (sharper, noisier), < 1 smooths more.
        """
        if self.counts.min() < 1:
            raise ValueError(f"Both half sets need particles; they hold {self.counts.tolist()}.")
        if not wiener_fudge > 0:
            raise ValueError(f"The Wiener fudge factor T must be positive, got {wiener_fudge}.")
        n = self.box
        if mask_radius_px is None:
            mask_radius_px = n / 2.0 - mask_edge_px - 1.0
        if not 0 < mask_radius_px <= n / 2.0 * math.sqrt(3.0):
            raise ValueError(f"The mask radius must be in (0, {n / 2:g}] px for a box of {n} px, "
                             f"got {mask_radius_px:g}.")
        mask = soft_spherical_mask(n, mask_radius_px, mask_edge_px, self.device)
        shell, counts = self._padded_shells()
        mean_d = [self._shell_mean(self._weight[h], shell, counts) for h in (0, 1)]
        first = [self._real(self._data[h], self._weight[h] + _FIRST_PASS_LAMBDA * mean_d[h])
                 for h in (0, 1)]
        freq, curve = fsc(first[0] * mask, first[1] * mask, self.pixel_size)
        # FSC at the padded shells: padded radius r (voxels of M) is r * n / M shells of the map.
        fsc_padded = np.interp(np.arange(counts.numel()) * n / self.padded, np.arange(len(curve)), curve)
        fsc_padded = torch.as_tensor(np.clip(fsc_padded, 1e-3, 0.999), device=self.device)
        snr_half = (fsc_padded / (1.0 - fsc_padded))[shell].to(torch.float32)
        halves = [self._real(self._data[h], self._weight[h] + mean_d[h] / (wiener_fudge * snr_half))
                  for h in (0, 1)]
        full = self._real(self._data[0] + self._data[1], self._weight[0] + self._weight[1]
                          + (mean_d[0] + mean_d[1]) / (wiener_fudge * 2.0 * snr_half))
        freq, curve = fsc(halves[0] * mask, halves[1] * mask, self.pixel_size)
        return ReconstructionResult(
            volume=(full * mask).cpu().numpy(), half_maps=torch.stack(halves).cpu().numpy(),
            pixel_size=self.pixel_size, frequency=freq, fsc=curve,
            resolution=resolution_at(freq, curve), particles=self.counts.copy(),
            mask_radius_px=float(mask_radius_px), mask_edge_px=float(mask_edge_px))

    def _padded_shells(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Shell index (M, M, M//2+1) of the padded grid (inserter layout) and voxels per shell."""
        m = self.padded
        f = torch.fft.fftshift(torch.fft.fftfreq(m, device=self.device)) * m
        fx = torch.fft.rfftfreq(m, device=self.device) * m
        r = torch.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2)
        shell = torch.round(r).long()
        return shell, torch.bincount(shell.flatten())

    @staticmethod
    def _shell_mean(weight: torch.Tensor, shell: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Mean of ``weight`` over each shell, broadcast back to the grid."""
        sums = torch.bincount(shell.flatten(), weight.flatten().to(torch.float64), counts.numel())
        return (sums / counts.clamp_min(1)).to(torch.float32)[shell]

    def _real(self, data: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
        """Real-space map (box,)*3 of ``data / denominator`` (0 where the denominator is 0),
        gridding-corrected and cropped."""
        from torch_fourier_slice.volume_utils import separable_sinc2_correction
        m, n = self.padded, self.box
        ratio = torch.where(denominator > 0, data / denominator.clamp_min(1e-30), torch.zeros_like(data))
        ratio = torch.fft.ifftshift(ratio, dim=(0, 1))
        vol = torch.fft.fftshift(torch.fft.irfftn(ratio, s=(m, m, m)))
        vol = vol / separable_sinc2_correction((m, m, m), device=self.device)
        lo = m // 2 - n // 2
        return vol[lo:lo + n, lo:lo + n, lo:lo + n]


# --------------------------------------------------------------------------- result and driver

@dataclass
class ReconstructionResult:
    """A reconstruction: volume (n, n, n) float32 [z, y, x] (Wiener-filtered, masked);
    half_maps (2, n, n, n) float32 (Wiener-filtered, unmasked); pixel_size Å/voxel;
    frequency (S,) 1/Å and fsc (S,) between the masked half maps; resolution Å at FSC 0.143;
    particles (2,) per half set; mask_radius_px, mask_edge_px of the soft spherical mask."""
    volume: np.ndarray
    half_maps: np.ndarray
    pixel_size: float
    frequency: np.ndarray
    fsc: np.ndarray
    resolution: float
    particles: np.ndarray
    mask_radius_px: float
    mask_edge_px: float

    @property
    def box(self) -> int:
        return int(self.volume.shape[-1])

    def mask(self) -> np.ndarray:
        """The soft spherical mask (n, n, n) float32 applied to the volume."""
        return soft_spherical_mask(self.box, self.mask_radius_px, self.mask_edge_px).numpy()

    def write(self, folder: Union[str, os.PathLike], prefix: str = "map") -> Dict[str, str]:
        """Write ``<prefix>.mrc``, ``<prefix>_half1.mrc``, ``<prefix>_half2.mrc`` (voxel size
        and header origin set, :func:`.pseudoatoms.write_map`) and ``<prefix>_fsc.csv``
        (:func:`read_fsc_csv`) into ``folder``; returns their paths by key ``map``,
        ``half1``, ``half2``, ``fsc``."""
        from ..modes.pseudoatoms import write_map
        folder = Path(folder)
        origin = centred_origin(self.box, self.pixel_size)
        paths = {"map": folder / f"{prefix}.mrc", "half1": folder / f"{prefix}_half1.mrc",
                 "half2": folder / f"{prefix}_half2.mrc", "fsc": folder / f"{prefix}_fsc.csv"}
        write_map(paths["map"], self.volume, self.pixel_size, origin=origin)
        for k in (0, 1):
            write_map(paths[f"half{k + 1}"], self.half_maps[k], self.pixel_size, origin=origin)
        with np.errstate(divide="ignore"):
            res = np.where(self.frequency > 0, 1.0 / np.maximum(self.frequency, 1e-300), np.inf)
        header = (f"shell,frequency_1_per_A,resolution_A,fsc\n# particles {int(self.particles[0])} + "
                  f"{int(self.particles[1])}; resolution at FSC {FSC_THRESHOLD}: {self.resolution:.3f} A")
        rows = np.column_stack([np.arange(len(self.fsc)), self.frequency, res, self.fsc])
        tmp = paths["fsc"].with_suffix(".csv.tmp")
        np.savetxt(tmp, rows, delimiter=",", fmt=["%d", "%.6f", "%.4f", "%.6f"], header=header, comments="")
        os.replace(tmp, paths["fsc"])
        return {k: str(v) for k, v in paths.items()}


def centred_origin(box: int, pixel_size: float) -> Tuple[float, float, float]:
    """MRC header / Scipion origin (x, y, z) Å that puts voxel ``box // 2`` at 0 Å, so
    ChimeraX shows a map in the frame of the centred reference (``-(box // 2) * pixel_size``)."""
    value = -(int(box) // 2) * float(pixel_size)
    return value, value, value


def read_fsc_csv(path: Union[str, os.PathLike]) -> Tuple[np.ndarray, np.ndarray]:
    """Read what :meth:`ReconstructionResult.write` wrote: ``(frequency (S,) 1/Å, fsc (S,))``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"FSC file not found: {path}")
    data = np.atleast_2d(np.loadtxt(path, delimiter=",", comments="#", skiprows=1))
    return data[:, 1], data[:, 3]


def _chunk_default(box: int) -> int:
    return max(16, min(512, 2 ** 22 // (box * box)))


def reconstruct(images, angles_deg: np.ndarray, shifts_px: np.ndarray, pixel_size: float,
                ctf: Optional[CTFParams] = None, *, halves: Optional[np.ndarray] = None, seed: int = 0,
                pad_factor: float = 2.0, mask_radius_px: Optional[float] = None,
                mask_edge_px: float = 3.0, wiener_fudge: float = 1.0, chunk_size: Optional[int] = None,
                device: Union[str, torch.device] = "cpu",
                progress: Optional[Progress] = None) -> ReconstructionResult:
    """Reconstruct a map and its half maps from ``n`` particle images with known poses.

    images: an array (n, box, box), a list of (stack path, 0-based index) pairs, or an image
    source of :mod:`.dataset` (read ``chunk_size`` at a time, default about 16 MiB of
    pixels); angles_deg (n, 3) Euler ZYZ deg; shifts_px (n, 2) px as RELION's rlnOrigin;
    pixel_size Å/px; ctf: CTFParams with n entries (or one shared), or None for images
    without CTF. halves: (n,) 0/1 gold-standard split, default :func:`split_halves` (``seed``).
    Other arguments: :class:`Reconstructor` and :meth:`Reconstructor.finish`.
    ``progress(done, n, message)`` (:data:`~continuousflex_dl.core.progress.Progress`) with the
    particles inserted after each chunk. Returns a :class:`ReconstructionResult`.
    """
    from ..imaging.dataset import as_image_source
    source = as_image_source(images)
    n = len(source)
    angles = np.asarray(angles_deg, dtype=np.float64)
    shifts = np.asarray(shifts_px, dtype=np.float64)
    if angles.shape != (n, 3) or shifts.shape != (n, 2):
        raise ValueError(f"{n} images need angles ({n}, 3) deg and shifts ({n}, 2) px; got "
                         f"{angles.shape} and {shifts.shape}.")
    if ctf is not None and ctf.batch_size not in (1, n):
        raise ValueError(f"The CTF parameters describe {ctf.batch_size} images, not {n}.")
    halves = split_halves(n, seed) if halves is None else np.asarray(halves)
    if halves.shape != (n,):
        raise ValueError(f"Give one half-set label (0 or 1) per image: {n}, got {halves.shape}.")
    rec = Reconstructor(source.image_size, pixel_size, pad_factor=pad_factor, device=device)
    chunk = int(chunk_size or _chunk_default(source.image_size))
    if chunk < 1:
        raise ValueError(f"The chunk size must be a positive number of images, got {chunk_size}.")
    for start in range(0, n, chunk):
        idx = np.arange(start, min(n, start + chunk))
        params = None if ctf is None else (ctf if ctf.batch_size == 1 else ctf.select(idx))
        rec.insert(source.read(idx), angles[idx], shifts[idx], halves[idx], params)
        report(progress, int(idx[-1]) + 1, n, f"inserted {int(idx[-1]) + 1}/{n} particles")
        logger.info("Inserted %d / %d particles", int(idx[-1]) + 1, n)
    return rec.finish(mask_radius_px=mask_radius_px, mask_edge_px=mask_edge_px, wiener_fudge=wiener_fudge)
