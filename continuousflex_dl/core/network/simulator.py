"""Particles simulated on the fly, matched to a data set: DeepHEMNMA's training stream.

The image model is the synthesizer's (:mod:`.synthesis`): the reference displaced
along its normal modes (``nma.displace``), projected as Gaussian atoms at a pose
(``projection.project_gaussians``, RELION's shift convention), modulated by a
CTF (``ctf.apply_ctf``) and added to noise. What is *matched* to the data set:

* CTFs: rows drawn at random from the particles' own CTF parameters
  (a :class:`~.ctf.CTFParams` of the set), so the defocus distribution is the set's;
* noise: its level and radial power spectrum, estimated from the particles by
  :func:`estimate_noise` (the particles' mean radial power spectrum fitted as a
  scaled spectrum of clean simulated projections plus a smooth noise spectrum);
* amplitudes: a kernel density around the particles' amplitude estimates
  (HEMNMA or ground truth; :class:`EstimatesPrior`), or uniform over their
  range widened by a margin, or over a given symmetric range (:class:`AmplitudePrior`);
* poses: uniform on SO(3) (or uniform projection directions without in-plane
  rotation), shifts uniform within the alignment's range
  (``synthesis.sample_orientations`` / ``sample_shifts``).

Noise is stationary and the same for every image (a detector's dose does not
depend on the particle), unlike ``synthesis.add_noise``, which fixes each
image's SNR; its level is stated in the projector's units
(:class:`NoiseModel`). Images are made at the particles' box and pixel size, so
they go through the same preprocessing as the particles (``dataset.prepare_images``).

Every batch is new: batch ``b`` of epoch ``e`` is drawn from the random stream
``(seed, e, b)``, so the stream is reproducible from the seed and a stopped
training resumes at any batch without replaying the stream; epoch 0 is kept
for a fixed validation set. All random numbers are drawn with numpy on the
CPU, so a stream is the same on every device; the images are computed on ``device``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ..imaging.ctf import CTFParams, apply_ctf, ctf_image
from ..imaging.geometry import euler_to_matrix
from ..modes.nma import default_amplitude_range, displace
from ..modes.reference import Reference  # noqa: F401  (re-exported: the simulator's input)
from ..imaging.projection import project_gaussians
from ..modes.synthesis import sample_orientations, sample_shifts

logger = logging.getLogger(__name__)

__all__ = ["Reference", "AmplitudePrior", "EstimatesPrior", "NoiseModel", "SimulatedBatch", "ParticleSimulator",
           "radial_shells", "radial_power_spectrum", "estimate_noise", "match_simulator",
           "default_amplitude_range", "VALIDATION_EPOCH"]

#: The epoch index of the fixed simulated validation set (training epochs start at 1).
VALIDATION_EPOCH = 0

#: Bound on atoms x images x (box + 1) per projector call (its profile tensors), ~16 MiB each.
_PROJECTION_ELEMENTS = 2 ** 22


@dataclass
class AmplitudePrior:
    """Amplitudes uniform in the box ``[low, high]`` (each (K,) Å)."""
    low: np.ndarray
    high: np.ndarray

    def __post_init__(self):
        self.low = np.atleast_1d(np.asarray(self.low, dtype=np.float64))
        self.high = np.atleast_1d(np.asarray(self.high, dtype=np.float64))
        if self.low.shape != self.high.shape or self.low.ndim != 1:
            raise ValueError(f"Amplitude bounds must be two (K,) arrays, got {self.low.shape} and "
                             f"{self.high.shape}.")
        if not np.all(np.isfinite(self.low) & np.isfinite(self.high) & (self.high > self.low)):
            raise ValueError(f"Each amplitude range must be finite with high > low, got "
                             f"{self.low.tolist()} to {self.high.tolist()} Å.")

    @classmethod
    def from_estimates(cls, amplitudes: np.ndarray, margin: float = 0.1,
                       quantile: float = 0.01) -> "AmplitudePrior":
        """The range of amplitude estimates (M, K) Å, robust to outliers: the ``quantile`` and
        ``1 - quantile`` quantiles per mode, widened by ``margin`` times their span each side."""
        q = np.asarray(amplitudes, dtype=np.float64)
        if q.ndim != 2 or len(q) < 2 or not np.all(np.isfinite(q)):
            raise ValueError("Amplitude estimates must be a finite (M, K) array with M >= 2.")
        low, high = np.quantile(q, quantile, axis=0), np.quantile(q, 1.0 - quantile, axis=0)
        span = np.maximum(high - low, 1e-3)
        return cls(low - margin * span, high + margin * span)

    @classmethod
    def symmetric(cls, amplitude_range: Union[float, Sequence[float]], n_modes: int) -> "AmplitudePrior":
        """Uniform in [-R, R] Å per mode (R a number or (K,))."""
        r = np.broadcast_to(np.asarray(amplitude_range, dtype=np.float64), (n_modes,))
        return cls(-r, r)

    @property
    def n_modes(self) -> int:
        return int(self.low.shape[0])

    @property
    def mean(self) -> np.ndarray:
        """(K,) Å, the mean of the uniform distribution."""
        return 0.5 * (self.low + self.high)

    @property
    def std(self) -> np.ndarray:
        """(K,) Å, the standard deviation of the uniform distribution."""
        return (self.high - self.low) / math.sqrt(12.0)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, K) amplitudes in Å."""
        return self.low + (self.high - self.low) * rng.random((n, self.n_modes))


@dataclass
class EstimatesPrior:
    """Amplitudes drawn around the particles' own estimates: a Gaussian kernel density.

    estimates: (M, K) Å, e.g. HEMNMA's amplitudes of the training particles;
    bandwidth: (K,) Å, the kernel's standard deviation per mode. A draw is a
    random estimate plus Gaussian noise of that width, so the simulated
    conformations follow the set's (a curve stays a curve) instead of filling
    the box around it. low/high: the range of the estimates, for reports.
    """
    estimates: np.ndarray
    bandwidth: np.ndarray

    def __post_init__(self):
        self.estimates = np.asarray(self.estimates, dtype=np.float64)
        if self.estimates.ndim != 2 or len(self.estimates) < 2 or not np.all(np.isfinite(self.estimates)):
            raise ValueError("Amplitude estimates must be a finite (M, K) array with M >= 2.")
        self.bandwidth = np.broadcast_to(np.asarray(self.bandwidth, dtype=np.float64),
                                         (self.n_modes,)).copy()
        if not np.all(np.isfinite(self.bandwidth) & (self.bandwidth >= 0)):
            raise ValueError(f"Kernel widths must be finite and non-negative, got {self.bandwidth.tolist()} Å.")

    @classmethod
    def from_estimates(cls, amplitudes: np.ndarray) -> "EstimatesPrior":
        """Kernel widths by Scott's rule, ``std * M ** (-1 / (K + 4))`` per mode, with a robust
        std (the interquartile range / 1.349) so that outlying estimates do not widen them."""
        q = np.asarray(amplitudes, dtype=np.float64)
        if q.ndim != 2 or len(q) < 2 or not np.all(np.isfinite(q)):
            raise ValueError("Amplitude estimates must be a finite (M, K) array with M >= 2.")
        iqr = np.subtract(*np.quantile(q, [0.75, 0.25], axis=0)) / 1.349
        spread = np.minimum(q.std(axis=0), np.where(iqr > 0, iqr, np.inf))
        return cls(q, np.maximum(spread, 1e-3) * len(q) ** (-1.0 / (q.shape[1] + 4)))

    @property
    def n_modes(self) -> int:
        return int(self.estimates.shape[1])

    @property
    def low(self) -> np.ndarray:
        return self.estimates.min(axis=0)

    @property
    def high(self) -> np.ndarray:
        return self.estimates.max(axis=0)

    @property
    def mean(self) -> np.ndarray:
        """(K,) Å, the mean of the kernel density."""
        return self.estimates.mean(axis=0)

    @property
    def std(self) -> np.ndarray:
        """(K,) Å, the standard deviation of the kernel density."""
        return np.sqrt(self.estimates.var(axis=0) + self.bandwidth ** 2)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, K) amplitudes in Å."""
        rows = self.estimates[rng.integers(0, len(self.estimates), n)]
        return rows + self.bandwidth * rng.standard_normal((n, self.n_modes))


#: An amplitude prior: anything with ``n_modes``, ``low``/``high``/``mean``/``std`` (K,) Å and ``sample``.
Prior = Union[AmplitudePrior, EstimatesPrior]


def radial_shells(box: int, half: bool = True, device=None) -> torch.Tensor:
    """Shell index ``round(|k|)`` (Fourier pixels) of each frequency of a (box, box) image:
    (box, box // 2 + 1) in ``torch.fft.rfft2`` layout (``half``) or (box, box) for ``fft2``."""
    ky = torch.fft.fftfreq(box, device=device, dtype=torch.float64) * box
    kx = (torch.fft.rfftfreq(box, device=device, dtype=torch.float64) if half else
          torch.fft.fftfreq(box, device=device, dtype=torch.float64)) * box
    return torch.round(torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)).long()


def radial_power_spectrum(images: torch.Tensor) -> torch.Tensor:
    """Mean radial power spectrum of images (B, N, N): (n_shells,) float64 with
    ``n_shells = max shell index + 1`` (:func:`radial_shells`), each shell the mean of
    ``|rfft2(x - mean(x))|^2 / N^2`` over its frequencies and the images (per pixel
    variance units: white noise of variance s^2 gives s^2 in every shell but 0)."""
    if images.ndim != 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"Expected square images (B, N, N), got shape {tuple(images.shape)}.")
    n = images.shape[-1]
    x = images.to(torch.float64)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    power = (torch.fft.rfft2(x).abs() ** 2).mean(0) / (n * n)
    shells = radial_shells(n, device=x.device).reshape(-1)
    total = torch.zeros(int(shells.max()) + 1, dtype=torch.float64, device=x.device)
    total.index_add_(0, shells, power.reshape(-1))
    count = torch.bincount(shells, minlength=len(total)).to(torch.float64)
    return (total / count.clamp_min(1)).cpu()


@dataclass
class NoiseModel:
    """Stationary Gaussian noise of a radial power spectrum, in the projector's units.

    power: (n_shells,) noise power per frequency shell of (box, box) images
    (:func:`radial_power_spectrum` units, i.e. per-pixel variance for white noise)
    in the units of ``project_gaussians`` at the particles' pixel size.
    snr: the particles' estimated SNR (var(clean) / var(noise) over the box, DESIGN.md);
    scale: particle pixel value per projector unit (the fitted signal scale).
    """
    power: np.ndarray
    snr: float = float("nan")
    scale: float = 1.0

    def __post_init__(self):
        self.power = np.asarray(self.power, dtype=np.float64).reshape(-1)
        if not len(self.power) or not np.all(np.isfinite(self.power)) or np.any(self.power < 0):
            raise ValueError("The noise power spectrum must be finite, non-negative values.")

    @classmethod
    def white(cls, variance: float, box: int) -> "NoiseModel":
        """White noise of per-pixel ``variance`` (projector units) for (box, box) images."""
        if not variance > 0:
            raise ValueError(f"The noise variance must be positive, got {variance}.")
        return cls(np.full(int(radial_shells(box).max()) + 1, float(variance)))

    def variance(self, box: int) -> float:
        """Per-pixel noise variance (projector units) of (box, box) images."""
        return float(self._power_image(box, full=True).mean())

    def _power_image(self, box: int, full: bool = False, device=None) -> torch.Tensor:
        shells = radial_shells(box, half=not full, device=device).clamp_max(len(self.power) - 1)
        return torch.as_tensor(self.power, device=device)[shells]

    def sample(self, shape: Sequence[int], rng: np.random.Generator,
               device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """Noise images ``shape`` = (B, box, box) float32 on ``device`` (white numpy normals,
        coloured in Fourier space by the square root of the spectrum)."""
        b, n = int(shape[0]), int(shape[-1])
        white = torch.from_numpy(rng.standard_normal((b, n, n), dtype=np.float32)).to(device)
        amplitude = torch.sqrt(self._power_image(n, device=device)).to(torch.float32)
        return torch.fft.irfft2(torch.fft.rfft2(white) * amplitude, s=(n, n))


@dataclass
class SimulatedBatch:
    """One batch of simulated particles and their truth.

    images: (B, N, N) float32 on the simulator's device; amplitudes: (B, K) Å;
    angles: (B, 3) Euler ZYZ degrees; shifts: (B, 2) px (RELION's origin);
    ctf: the CTF of each image (B) or None; ctf_images: (B, N, N // 2 + 1) of it
    (``ctf.ctf_image``, rfft2 layout) or None.
    """
    images: torch.Tensor
    amplitudes: np.ndarray
    angles: np.ndarray
    shifts: np.ndarray
    ctf: Optional[CTFParams]
    ctf_images: Optional[torch.Tensor]


class ParticleSimulator:
    """A reproducible, endless stream of particle images matched to a data set.

    reference: the structure and its modes; box (px) and pixel_size (Å/px): the
    particles'; ctf: the particles' CTFs (one row per particle, drawn at random)
    or None; amplitudes: the prior; in_plane: uniform SO(3) (else uniform
    projection directions with psi = 0); max_shift_px: shifts uniform in
    [-S, S]^2 px; noise: a :class:`NoiseModel` (None: clean images); seed; device.
    """

    def __init__(self, reference: Reference, box: int, pixel_size: float, ctf: Optional[CTFParams],
                 amplitudes: Prior, in_plane: bool = True, max_shift_px: float = 0.0,
                 noise: Optional[NoiseModel] = None, seed: int = 0,
                 device: Union[str, torch.device] = "cpu"):
        if int(box) != box or box < 8:
            raise ValueError(f"The box must be an integer of at least 8 px, got {box}.")
        if not pixel_size > 0:
            raise ValueError(f"The pixel size must be positive (Å/px), got {pixel_size}.")
        if amplitudes.n_modes != reference.n_modes:
            raise ValueError(f"The amplitude prior has {amplitudes.n_modes} modes, the reference "
                             f"{reference.n_modes}.")
        if not 0 <= max_shift_px < box / 2:
            raise ValueError(f"The maximum shift must be in [0, box/2) px, got {max_shift_px}.")
        self.reference, self.box, self.pixel_size = reference, int(box), float(pixel_size)
        self.ctf, self.amplitudes, self.in_plane = ctf, amplitudes, bool(in_plane)
        self.max_shift_px, self.noise, self.seed = float(max_shift_px), noise, int(seed)
        self.device = torch.device(device)
        self._coords = torch.as_tensor(reference.coords, dtype=torch.float32, device=self.device)
        self._modes = torch.as_tensor(reference.modes, dtype=torch.float32, device=self.device)
        self._sigma = (reference.sigma if np.ndim(reference.sigma) == 0 else
                       torch.as_tensor(np.asarray(reference.sigma), dtype=torch.float32, device=self.device))
        self._weights = (None if reference.weights is None else
                         torch.as_tensor(np.asarray(reference.weights), dtype=torch.float32, device=self.device))

    def with_noise(self, noise: Optional[NoiseModel]) -> "ParticleSimulator":
        """The same simulator with another noise model."""
        return ParticleSimulator(self.reference, self.box, self.pixel_size, self.ctf, self.amplitudes,
                                 self.in_plane, self.max_shift_px, noise, self.seed, self.device)

    def rng(self, epoch: int, index: int) -> np.random.Generator:
        """The random stream of batch ``index`` of ``epoch`` (a function of (seed, epoch, index) only)."""
        return np.random.default_rng([self.seed, int(epoch), int(index)])

    def batch(self, epoch: int, index: int, size: int, noise_scale: float = 1.0) -> SimulatedBatch:
        """Batch ``index`` of ``epoch``: ``size`` new images (:class:`SimulatedBatch`), the noise's
        standard deviation times ``noise_scale``."""
        return self.draw(size, self.rng(epoch, index), noise_scale)

    def draw(self, n: int, rng: np.random.Generator, noise_scale: float = 1.0) -> SimulatedBatch:
        """``n`` images from the random stream ``rng``, the noise's standard deviation times
        ``noise_scale`` (0: clean images)."""
        if int(n) != n or n < 1:
            raise ValueError(f"The number of images must be a positive integer, got {n}.")
        n = int(n)
        angles = sample_orientations(n, rng, in_plane=self.in_plane)
        shifts = sample_shifts(n, self.max_shift_px, rng)
        amps = self.amplitudes.sample(n, rng)
        ctf = None if self.ctf is None else self.ctf.select(rng.integers(0, self.ctf.batch_size, n))
        images = self._project(amps, angles, shifts)
        ctf_images = None
        if ctf is not None:
            ctf_images = ctf_image(ctf, self.box, self.pixel_size, device=self.device)
            images = apply_ctf(images, ctf_images)
        if noise_scale > 0 and self.noise is not None and np.any(self.noise.power > 0):
            images = images + self.noise.sample(images.shape, rng, self.device) * float(noise_scale)
        return SimulatedBatch(images, amps, angles, shifts, ctf, ctf_images)

    def batches(self, epoch: int, n_images: int, batch_size: int, start: int = 0) -> Iterator[SimulatedBatch]:
        """The batches of an epoch of ``n_images`` images (the last one smaller), from batch ``start``."""
        n_batches = (int(n_images) + batch_size - 1) // batch_size
        for b in range(start, n_batches):
            yield self.batch(epoch, b, min(batch_size, int(n_images) - b * batch_size))

    def _project(self, amps: np.ndarray, angles: np.ndarray, shifts: np.ndarray) -> torch.Tensor:
        n_atoms = self._coords.shape[0]
        amp_t = torch.as_tensor(amps, dtype=torch.float32, device=self.device)
        xyz = displace(self._coords, self._modes, amp_t) if self.reference.n_modes else self._coords[None]
        rot = torch.as_tensor(euler_to_matrix(angles), dtype=torch.float32, device=self.device)
        sh = torch.as_tensor(shifts, dtype=torch.float32, device=self.device)
        step = max(1, _PROJECTION_ELEMENTS // (n_atoms * (self.box + 1)))
        return torch.cat([
            project_gaussians(xyz[i:i + step] if len(xyz) > 1 else xyz, rot[i:i + step], sh[i:i + step],
                              self.box, self.pixel_size, sigma=self._sigma, weights=self._weights)
            for i in range(0, len(amps), step)]).to(torch.float32)


#: Knots of the piecewise-linear noise spectrum fitted by :func:`estimate_noise`.
NOISE_KNOTS = 3


def estimate_noise(particle_spectrum: np.ndarray, clean_spectrum: np.ndarray, clean_variance: float,
                   box: int, knots: int = NOISE_KNOTS) -> NoiseModel:
    """The particles' signal scale and noise spectrum from their mean radial power spectrum.

    particle_spectrum: (S,) of the particles (their units), clean_spectrum: (S,) of
    clean simulated projections with the particles' CTFs (projector units), both
    :func:`radial_power_spectrum` of (box, box) images; clean_variance: the mean
    per-image pixel variance of those projections (projector units).
    Model: ``P(r) = a^2 C(r) + n(r)`` for shells 1..box // 2 with ``n`` piecewise
    linear over ``knots`` equally spaced shells (1: white noise), fitted by
    non-negative least squares with relative weights (each shell weighted by the
    square root of its frequency count over P(r)); higher shells take the last
    knot's value. Returns a :class:`NoiseModel` in projector units (``n / a^2``)
    with ``scale = a`` and ``snr = a^2 clean_variance / var(noise)`` (inf, and zero power,
    for noise-free particles).
    """
    from scipy.optimize import nnls
    p = np.asarray(particle_spectrum, dtype=np.float64)
    c = np.asarray(clean_spectrum, dtype=np.float64)
    if p.shape != c.shape or p.ndim != 1:
        raise ValueError(f"The particle and clean spectra must have the same (S,) shape, got {p.shape} "
                         f"and {c.shape}.")
    top = box // 2
    if len(p) <= top or knots < 1 or top < knots:
        raise ValueError(f"Spectra of {len(p)} shells and {knots} knots do not fit a {box} px box.")
    nodes = np.linspace(1.0, top, knots) if knots > 1 else np.array([1.0])
    hats = _hat_basis(np.arange(len(p), dtype=np.float64), nodes)       # (S, knots)
    count = torch.bincount(radial_shells(box).reshape(-1), minlength=len(p)).numpy()[1:top + 1]
    w = np.sqrt(count) / np.maximum(p[1:top + 1], 1e-300)
    design = np.column_stack([c[1:top + 1], hats[1:top + 1]]) * w[:, None]
    solution, _ = nnls(design, p[1:top + 1] * w)
    a2, coef = solution[0], solution[1:]
    if not a2 > 0:
        raise ValueError("No particle signal was found in the images' power spectrum: check that the "
                         "reference, its pixel size and the CTFs match the particles.")
    model = NoiseModel(hats @ coef / a2, scale=math.sqrt(a2))
    if not model.variance(box) > 0:
        logger.warning("No noise was found in the particles' power spectrum: simulating noise-free images")
        model.snr = math.inf
        return model
    model.snr = clean_variance / model.variance(box)
    logger.info("Estimated from the particles' power spectrum: SNR %.3g, signal scale %.4g, noise "
                "variance %.4g per pixel (particle units); fit over %d shells", model.snr, model.scale,
                model.variance(box) * a2, top)
    return model


def _hat_basis(x: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation weights (len(x), len(nodes)); constant beyond the end nodes."""
    eye = np.eye(len(nodes))
    return np.stack([np.interp(x, nodes, eye[j]) for j in range(len(nodes))], axis=1)


def match_simulator(reference: Reference, images, box: int, pixel_size: float, ctf: Optional[CTFParams],
                    amplitudes: Prior, in_plane: bool = True, max_shift_px: float = 0.0,
                    seed: int = 0, device: Union[str, torch.device] = "cpu",
                    n_particles: int = 2000, n_clean: int = 512, batch_size: int = 128,
                    knots: int = NOISE_KNOTS) -> ParticleSimulator:
    """A :class:`ParticleSimulator` whose noise is estimated from the particles.

    images: an image source of the particles (``dataset.as_image_source``), (box, box)
    at ``pixel_size``; up to ``n_particles`` of them (chosen with ``seed``) give the
    particle spectrum, ``n_clean`` clean simulated images the clean spectrum
    (:func:`estimate_noise`). Other arguments as :class:`ParticleSimulator`.
    """
    from ..imaging.dataset import as_image_source
    source = as_image_source(images)
    if source.image_size != box:
        raise ValueError(f"The particles are {source.image_size} px, the simulator {box} px.")
    clean_sim = ParticleSimulator(reference, box, pixel_size, ctf, amplitudes, in_plane, max_shift_px,
                                  None, seed, device)
    rng = np.random.default_rng([int(seed), 7919])
    chosen = np.sort(rng.choice(len(source), size=min(n_particles, len(source)), replace=False))
    particle = 0.0
    for start in range(0, len(chosen), batch_size):
        idx = chosen[start:start + batch_size]
        x = torch.as_tensor(source.read(idx), device=clean_sim.device)
        particle = particle + radial_power_spectrum(x).numpy() * len(idx)
    particle = particle / len(chosen)
    clean, variance, done = 0.0, 0.0, 0
    while done < n_clean:
        b = clean_sim.draw(min(batch_size, n_clean - done), rng, noise_scale=0.0)
        clean = clean + radial_power_spectrum(b.images).numpy() * len(b.images)
        variance += float(b.images.double().var(dim=(-2, -1), unbiased=False).sum())
        done += len(b.images)
    noise = estimate_noise(particle, clean / done, variance / done, box, knots)
    return clean_sim.with_noise(noise)
