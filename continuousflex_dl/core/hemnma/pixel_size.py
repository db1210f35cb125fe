"""Does the particles' pixel size fit the reference? A check before HEMNMA aligns them.

A mislabelled pixel size (particles imported at 1 Å/px that are at 2 Å/px) makes every
particle look twice as large as the reference; the alignment then finishes with confident,
wrong amplitudes. The check compares the **rotationally averaged power spectrum** of the set's
images with that of the reference's projections (random views, the set's CTFs applied) drawn
at a grid of trial pixel sizes ``labelled x scale``: the spectrum of a particle falls off at
a spatial frequency set by its size, so the trial whose spectrum, times a gain, plus a smooth
noise background (a + b k^2 in shell index k), fits the set's best tells the pixel size that
fits. The CTF is applied in the frame of the labelled pixel size (it was estimated on the
micrographs with that label, so its rings sit at the right pixel frequencies).

Costs about a second at 64 px: spectra are shift-invariant, so neither poses nor shifts are
needed, and a few hundred images suffice.

:func:`check_pixel_size` returns a :class:`PixelSizeCheck`; :meth:`PixelSizeCheck.verdict`
says what to tell the user (nothing, a warning, or a refusal past :data:`REFUSE_MISMATCH`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..imaging.ctf import CTFParams, ctf_image

__all__ = ["PixelSizeCheck", "check_pixel_size", "check_job_pixel_size", "radial_power_spectrum", "WARN_MISMATCH", "REFUSE_MISMATCH"]

#: A fitted pixel size more than this fraction away from the label gives a warning.
WARN_MISMATCH = 0.15
#: ... and more than this fraction away, a refusal (issue 31: gross mismatch).
REFUSE_MISMATCH = 0.25
#: Trial scales of the pixel size (fitted pixel size / labelled one).
SCALES = np.exp(np.linspace(math.log(0.4), math.log(2.5), 61))
#: The fit is decisive when the best trial's misfit is below this fraction of the misfit of
#: the labelled pixel size or of any trial 25 % away from the best (else: too little signal).
DECISIVE_RATIO = 0.8


@dataclass
class PixelSizeCheck:
    """The outcome of :func:`check_pixel_size`.

    labelled: Å/px of the set; fitted: Å/px whose reference spectrum fits the images best, or
    None when the spectra cannot decide (too little signal); scales (S,) trial scales and
    misfit (S,) their relative misfits (weighted residual / weighted data, 0 = perfect).
    """
    labelled: float
    fitted: Optional[float]
    scales: np.ndarray
    misfit: np.ndarray

    @property
    def mismatch(self) -> float:
        """Relative difference ``fitted / labelled - 1`` (0 when undecided)."""
        return 0.0 if self.fitted is None else self.fitted / self.labelled - 1.0

    def verdict(self) -> tuple:
        """(level, message): level 'ok', 'undecided', 'warning' (mismatch above
        :data:`WARN_MISMATCH`) or 'refuse' (above :data:`REFUSE_MISMATCH`)."""
        if self.fitted is None:
            return "undecided", (f"The pixel size {self.labelled:.3g} Å/px could not be checked: the images' "
                                 f"power spectrum carries too little signal to tell the particles' size.")
        text = (f"The particles look {self.fitted / self.labelled:.2f} times as large as the reference at "
                f"the labelled pixel size {self.labelled:.3g} Å/px: the pixel size that fits the images is "
                f"{self.fitted:.3g} Å/px")
        if abs(self.mismatch) > REFUSE_MISMATCH:
            return "refuse", (text + f". Import the particles (and estimate their CTF) again with the pixel "
                              f"size of the micrographs (about {self.fitted:.3g} Å/px), or check the "
                              f"reference structure.")
        if abs(self.mismatch) > WARN_MISMATCH:
            return "warning", text + " (check the pixel size of the import)."
        return "ok", f"Pixel size checked: the images fit {self.fitted:.3g} Å/px (labelled {self.labelled:.3g})."


def radial_power_spectrum(images: torch.Tensor) -> torch.Tensor:
    """Mean power spectrum of images (B, box, box) in integer frequency shells: (box // 2 + 1,)
    of ``|FFT|^2`` per pixel, shell k holding frequencies in ``[k - 0.5, k + 0.5)`` cycles per
    box (the mean of each image removed first)."""
    box = images.shape[-1]
    x = images - images.mean(dim=(-2, -1), keepdim=True)
    power = (torch.fft.rfft2(x).abs() ** 2).mean(0)                           # (box, box//2+1)
    ky = torch.fft.fftfreq(box, 1.0 / box)[:, None]
    kx = torch.fft.rfftfreq(box, 1.0 / box)[None, :]
    shell = torch.round(torch.sqrt(kx * kx + ky * ky)).long().reshape(-1)
    n = box // 2 + 1
    keep = shell < n
    total = torch.zeros(n, dtype=power.dtype).index_add_(0, shell[keep], power.reshape(-1)[keep])
    count = torch.zeros(n, dtype=power.dtype).index_add_(0, shell[keep], torch.ones_like(power.reshape(-1)[keep]))
    return total / count.clamp(min=1)


def check_pixel_size(images: np.ndarray, coords: np.ndarray, pixel_size: float, ctf: Optional[CTFParams] = None,
                     sigma=1.0, weights: Optional[np.ndarray] = None, seed: int = 0) -> PixelSizeCheck:
    """Fit the pixel size of particle images to a reference structure by their power spectra.

    images: (M, box, box) particle images (any M; a few hundred suffice); coords: (N, 3) Å, the
    reference, centred; pixel_size: the labelled Å/px; ctf: the images' CTF (one or M) or None;
    sigma: atom width(s) Å; weights: (N,) or None; seed: of the atoms kept for the distance
    histogram of large structures (:data:`MOST_ATOMS`). Returns a :class:`PixelSizeCheck`.
    """
    imgs = torch.as_tensor(np.asarray(images), dtype=torch.float64)
    if imgs.ndim != 3 or imgs.shape[-1] != imgs.shape[-2]:
        raise ValueError(f"The images must be a stack (M, box, box), got shape {tuple(imgs.shape)}.")
    if not pixel_size > 0:
        raise ValueError(f"The pixel size must be positive (Å/px), got {pixel_size}.")
    box = imgs.shape[-1]
    data = radial_power_spectrum(imgs).numpy()
    k = np.arange(len(data), dtype=np.float64)
    ctf2 = np.ones_like(k) if ctf is None else _shell_ctf_power(ctf, box, pixel_size)
    spectrum = _spherical_power(coords, sigma, weights, seed)
    band = slice(1, len(data) - 1)                       # DC and the corner shell left out
    misfit = np.array([min(_misfit(data[band], k[band], spectrum(k[band] / (box * pixel_size * s), b) * ctf2[band])
                           for b in ENVELOPES) for s in SCALES])
    best = int(np.argmin(misfit))
    fitted = float(pixel_size * _parabolic_peak(np.log(SCALES), -misfit, best))
    far = np.abs(np.log(SCALES) - np.log(SCALES[best])) > math.log(1.25)
    rivals = misfit[far].min() if far.any() else misfit.max()
    decisive = misfit[best] < DECISIVE_RATIO * rivals
    return PixelSizeCheck(labelled=float(pixel_size), fitted=fitted if decisive else None, scales=SCALES.copy(),
                          misfit=misfit)


#: Envelope B-factors (Å², ``exp(-B nu^2 / 2)`` on the power) tried with every scale: the
#: particles are blurrier than the reference's Gaussian atoms (B-factors, motion, the detector).
ENVELOPES = (0.0, 25.0, 50.0, 100.0, 200.0)
#: The distance histogram of larger structures uses this many atoms, drawn at random.
MOST_ATOMS = 3000
#: Bin of the distance histogram, Å.
DISTANCE_BIN = 0.25


def _spherical_power(coords, sigma, weights, seed):
    """``power(nu, b)``: the spherically averaged power ``|F(nu)|^2`` of the reference's
    Gaussian atoms at spatial frequencies nu (Å⁻¹), times ``exp(-b nu^2 / 2)``: Debye's
    formula over the histogram of atom-pair distances. By the central-slice theorem, the
    power of projections in random views averaged over a frequency shell is this."""
    from scipy.spatial.distance import pdist
    x = np.asarray(coords, dtype=np.float64)
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(x) > MOST_ATOMS:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), MOST_ATOMS, replace=False))
        x, w = x[keep], w[keep]
    dist = pdist(x)
    ii, jj = np.triu_indices(len(x), 1)
    hist = np.bincount(np.round(dist / DISTANCE_BIN).astype(int), weights=2 * w[ii] * w[jj])
    r = np.arange(len(hist)) * DISTANCE_BIN
    self_term = float((w * w).sum())
    s2 = float(np.mean(np.broadcast_to(np.asarray(sigma, dtype=np.float64), (len(coords),)) ** 2))

    def power(nu: np.ndarray, b: float) -> np.ndarray:
        debye = self_term + (hist[None, :] * np.sinc(2 * nu[:, None] * r[None, :])).sum(1)
        return debye * np.exp(-4 * np.pi ** 2 * s2 * nu ** 2 - 0.5 * b * nu ** 2)
    return power


def _shell_ctf_power(ctf: CTFParams, box: int, pixel_size: float, most: int = 256) -> np.ndarray:
    """(box // 2 + 1,) the CTF's square averaged over frequency shells and over (at most
    ``most``, evenly spread) images."""
    pick = np.unique(np.linspace(0, ctf.batch_size - 1, min(most, ctf.batch_size)).round().astype(int))
    c = ctf_image(ctf.select(pick) if ctf.batch_size > 1 else ctf, box, pixel_size, dtype=torch.float64)
    ky = torch.fft.fftfreq(box, 1.0 / box)[:, None]
    kx = torch.fft.rfftfreq(box, 1.0 / box)[None, :]
    shell = torch.round(torch.sqrt(kx * kx + ky * ky)).long().reshape(-1)
    n = box // 2 + 1
    keep = shell < n
    sq = (c ** 2).mean(0).reshape(-1)
    total = torch.zeros(n, dtype=sq.dtype).index_add_(0, shell[keep], sq[keep])
    count = torch.zeros(n, dtype=sq.dtype).index_add_(0, shell[keep], torch.ones_like(sq[keep]))
    return (total / count.clamp(min=1)).numpy()


def _misfit(data: np.ndarray, k: np.ndarray, ref: np.ndarray) -> float:
    """Relative misfit of ``data ~ g ref + a + b k^2`` (g >= 0), each shell weighted by 1 /
    data (relative errors): the RMS relative residual over the shells."""
    w = 1.0 / np.maximum(data, 1e-30)
    basis = np.stack([ref, np.ones_like(k), k * k], 1) * w[:, None]
    target = data * w
    coef, *_ = np.linalg.lstsq(basis, target, rcond=None)
    if coef[0] < 0:                                      # a negative gain is no fit of the particle
        coef[1:], *_ = np.linalg.lstsq(basis[:, 1:], target, rcond=None)
        coef[0] = 0.0
    return float(np.sqrt(np.mean((target - basis @ coef) ** 2)))
def _parabolic_peak(x: np.ndarray, y: np.ndarray, i: int) -> float:
    """exp of the vertex of the parabola through the points i-1, i, i+1 of y(x) (x the log
    scales): the scale at the best fit, between grid points."""
    if i == 0 or i == len(x) - 1:
        return float(np.exp(x[i]))
    y0, y1, y2 = y[i - 1], y[i], y[i + 1]
    denom = y0 - 2 * y1 + y2
    step = 0.0 if denom >= 0 else 0.5 * (y0 - y2) / denom
    return float(np.exp(x[i] + np.clip(step, -0.5, 0.5) * (x[i + 1] - x[i])))


#: Particles (evenly spread over the set) whose spectrum :func:`check_job_pixel_size` reads.
CHECK_PARTICLES = 300


def check_job_pixel_size(job) -> PixelSizeCheck:
    """:func:`check_pixel_size` of an :class:`~alignment_job.AlignmentJob`: up to
    :data:`CHECK_PARTICLES` of its images, spread over the set, against its reference."""
    m = len(job.ids)
    rows = np.unique(np.linspace(0, m - 1, min(CHECK_PARTICLES, m)).round().astype(int))
    ctf = None if job.ctf is None else job.ctf.select(rows)
    return check_pixel_size(job.read_rows(rows), job.reference.coords, job.pixel_size, ctf=ctf,
                            sigma=job.reference.sigma, weights=job.reference.weights)
