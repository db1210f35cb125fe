"""How far to trust each HEMNMA answer: a calibrated pose reliability and an honest σ.

HEMNMA's score (the normalised cross-correlation of a particle with its best projection) ranks
right poses above wrong ones, but says nothing on its own about *how likely* a pose is right:
that depends on the set's signal, its CTFs, the reference and the search. And the Laplace σ of
the amplitudes (:func:`alignment._laplace_std`) holds only where the pose is right and the
image model matches the images; at SNR 0.01 most poses are wrong and σ covered 30 % of the
errors (issue 31), on images from another simulator 60-80 % (issue 26).

This module calibrates both **on particles simulated to look like the set** (a parametric
bootstrap), after the alignment, from its gathered answers:

1. **Spectral model of the set** (:func:`spectral_model`): the set's images against the
   projections of their own answers (CTF applied), shell by shell in frequency: the gain
   ``E(k)`` of the signal the reference explains (the images' envelope, B-factors, detector
   and model mismatch included) and the power ``N(k)`` of what it does not (noise).
2. **Calibration particles** with known answers (:func:`calibration_particles`): the
   reference in random poses, amplitudes, shifts and CTFs drawn from the set's answers, shaped
   by ``E(k)`` and given noise of spectrum ``N(k)``; and **null images**: noise with the set's
   power spectrum and no particle. Both are aligned by the same search as the set.
3. **Reliability** (:func:`calibrate`): the probability that a pose lies within
   :data:`RIGHT_POSE_DEG` of the truth given its score, a logistic fit on the calibration
   particles, applied to the set's scores. The set's mean reliability is the expected
   fraction of right poses; below :data:`MIN_MEAN_RELIABILITY` the set carries too little
   signal to fix poses and :meth:`Reliability.warnings` says so (with how its scores compare
   with the null images').
4. **Honest σ**: the Laplace σ inflated by ``kappa`` per mode, the spread of the calibration
   particles' right-pose errors over their σ (``median |z| / 0.674``, at least 1), mixed
   with the spread of wrong-pose answers by the reliability:
   ``sigma^2 = p (kappa sigma_L)^2 + (1 - p) sigma_wrong^2``.

Everything is post-processing on an :class:`~alignment.AlignmentResult` and a callable that
aligns images as the set was aligned; it costs the alignment of :data:`CALIBRATION_PARTICLES`
+ :data:`NULL_IMAGES` extra images, whatever the size of the set.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np
import torch

from ..imaging.ctf import CTFParams, ctf_image
from ..imaging.geometry import angular_distance_deg, euler_to_matrix, matrix_to_euler, random_rotations
from ..imaging.projection import project_gaussians
from .alignment import AlignmentResult
from ..modes.deformation import LINEAR, deform
from .pixel_size import radial_power_spectrum

logger = logging.getLogger(__name__)

__all__ = ["Reliability", "SpectralModel", "spectral_model", "calibration_particles", "null_images", "calibrate",
           "reliability_from_scores", "RIGHT_POSE_DEG", "RELIABLE", "MIN_MEAN_RELIABILITY",
           "CALIBRATION_PARTICLES", "NULL_IMAGES"]

#: A pose is right when within this many degrees of the truth (issue 26's measure).
RIGHT_POSE_DEG = 10.0
#: A particle counts as reliable from this reliability on.
RELIABLE = 0.5
#: Below this mean reliability the set as a whole carries too little signal to fix poses.
MIN_MEAN_RELIABILITY = 0.5
#: Simulated particles with known answers aligned to calibrate (their number bounds the
#: calibration's precision: the fraction of right poses of 64 is known to +-0.06).
CALIBRATION_PARTICLES = 64
#: Noise images of the set's spectrum aligned to compare the set's scores with.
NULL_IMAGES = 16
#: Set particles (evenly spread) the spectral model is measured on.
SPECTRUM_PARTICLES = 256
#: A Gaussian's median |z|: the Laplace σ is inflated by median |z| / this.
MEDIAN_ABS_Z = 0.6745

AlignFn = Callable[[np.ndarray, Optional[CTFParams]], AlignmentResult]


@dataclass
class SpectralModel:
    """The set's images as ``E(k) x`` (projection of the answer, CTF applied) ``+ noise of power
    N(k)``, per frequency shell k (cycles per box, ``0 .. box // 2``): gain (box // 2 + 1,)
    and noise (box // 2 + 1,) mean ``|rfft2|^2`` per Fourier pixel; power (box // 2 + 1,) the
    images' own mean power per shell; box: px of the images."""
    box: int
    gain: np.ndarray
    noise: np.ndarray
    power: np.ndarray


@dataclass
class Reliability:
    """Per-particle trust in HEMNMA answers (M particles, K modes), from :func:`calibrate`.

    reliability: (M,) probability that the pose is within :data:`RIGHT_POSE_DEG`;
    amplitude_std: (M, K) Å, the honest standard deviation of each amplitude; laplace_std:
    (M, K) Å, the alignment's own; kappa: (K,) the inflation of the Laplace σ of right poses;
    wrong_std: (K,) Å, the spread of wrong poses' amplitude errors; null_scores: (Q,) the
    scores of noise images; calibration: figures of the calibration particles (their number,
    fraction of right poses, the logistic coefficients).
    """
    reliability: np.ndarray
    amplitude_std: np.ndarray
    laplace_std: np.ndarray
    kappa: np.ndarray
    wrong_std: np.ndarray
    null_scores: np.ndarray
    calibration: dict = field(default_factory=dict)

    #: The arrays of :meth:`to_dict` (the calibration figures go as JSON text).
    ARRAYS = ("reliability", "amplitude_std", "laplace_std", "kappa", "wrong_std", "null_scores")

    def to_dict(self, prefix: str = "reliability_") -> dict:
        """Plain arrays by ``prefix + name`` (for ``np.savez`` beside an AlignmentResult's)."""
        out = {prefix + name: np.asarray(getattr(self, name)) for name in self.ARRAYS}
        out[prefix + "calibration"] = np.asarray(json.dumps(self.calibration))
        return out

    @classmethod
    def from_dict(cls, data, prefix: str = "reliability_") -> Optional["Reliability"]:
        """The Reliability saved by :meth:`to_dict` in ``data`` (a mapping or an NpzFile), or
        None when it holds none."""
        if prefix + "reliability" not in data:
            return None
        return cls(**{name: np.asarray(data[prefix + name]) for name in cls.ARRAYS},
                   calibration=json.loads(str(data[prefix + "calibration"])))

    @property
    def n_reliable(self) -> int:
        """How many particles have a reliability of at least :data:`RELIABLE`."""
        return int(np.sum(self.reliability >= RELIABLE))

    def signal_auc(self, scores: np.ndarray) -> float:
        """Probability that a set particle's score beats a null image's (0.5: indistinguishable)."""
        return _auc(np.asarray(scores), self.null_scores)

    def warnings(self, scores: np.ndarray) -> List[str]:
        """What the user must know: the set carries too little signal to fix poses."""
        mean = float(self.reliability.mean())
        if mean >= MIN_MEAN_RELIABILITY:
            return []
        return [f"WARNING: this set carries too little signal to fix the particles' poses: only about "
                f"{100 * mean:.0f} % of them are expected to be right (mean reliability {mean:.2f}; a set "
                f"particle's score beats a noise image's with probability {self.signal_auc(scores):.2f}, 0.5 "
                f"meaning no signal). The amplitudes of unreliable particles are close to guesses (their σ "
                f"says so): keep the reliable ones (outlier removal, smallest reliability), or collect or "
                f"select particles with more signal."]

    def summary_lines(self, scores: np.ndarray, mode_numbers) -> List[str]:
        """Lines for a protocol's summary and log."""
        lines = [f"Pose reliability (calibrated probability that the pose is within {RIGHT_POSE_DEG:g}°): mean "
                 f"{self.reliability.mean():.2f}; {self.n_reliable} of {len(self.reliability)} particles "
                 f"reliable (≥ {RELIABLE:g}). Scores of noise images: median {np.median(self.null_scores):.3f}.",
                 "Honest amplitude σ (median): " + ", ".join(
                     f"mode {m}: {s:.1f} Å (Laplace {s0:.1f} × {k:.2f} where the pose is right)"
                     for m, s, s0, k in zip(mode_numbers, np.median(self.amplitude_std, 0),
                                            np.median(self.laplace_std, 0), self.kappa))]
        return self.warnings(scores) + lines


# ------------------------------------------------------------------------------------ the set
def _projections(result: AlignmentResult, rows: np.ndarray, coords, modes, box: int, pixel_size: float,
                 ctf: Optional[CTFParams], sigma, weights, deformation: str = LINEAR, blocks=None) -> torch.Tensor:
    """(B, box, box) float64 projections of the answers of ``rows``, the CTF applied; the
    structures displaced by the alignment's ``deformation`` (:mod:`~..modes.deformation`)."""
    x = deform(coords, modes, result.amplitudes[rows], deformation, blocks)
    proj = project_gaussians(torch.as_tensor(x, dtype=torch.float64), euler_to_matrix(result.angles[rows]),
                             result.shifts[rows], box, pixel_size, sigma=sigma, weights=weights)
    if ctf is not None:
        c = ctf_image(ctf.select(rows) if ctf.batch_size > 1 else ctf, box, pixel_size, dtype=torch.float64)
        proj = torch.fft.irfft2(torch.fft.rfft2(proj) * c, s=(box, box))
    return proj


def _shells(box: int) -> torch.Tensor:
    """(box, box // 2 + 1) the frequency shell of every rfft2 pixel, capped at box // 2."""
    ky = torch.fft.fftfreq(box, 1.0 / box)[:, None]
    kx = torch.fft.rfftfreq(box, 1.0 / box)[None, :]
    return torch.round(torch.sqrt(kx * kx + ky * ky)).long().clamp(max=box // 2)


def _shell_sum(values: torch.Tensor, shell: torch.Tensor) -> np.ndarray:
    """(n_shells,) sums of ``values`` (..., box, box // 2 + 1) over images and shells."""
    n = int(shell.max()) + 1
    v = values.reshape(-1, shell.numel()).sum(0)
    return torch.zeros(n, dtype=v.dtype).index_add_(0, shell.reshape(-1), v).numpy()


def spectral_model(images: np.ndarray, result: AlignmentResult, coords: np.ndarray, modes: np.ndarray,
                   pixel_size: float, ctf: Optional[CTFParams] = None, sigma=1.0,
                   weights: Optional[np.ndarray] = None, rows: Optional[np.ndarray] = None,
                   deformation: str = LINEAR, blocks: Optional[np.ndarray] = None) -> SpectralModel:
    """The :class:`SpectralModel` of particle images (B, box, box) and their answers (``rows``
    (B,) of ``result``, default all): per shell, the least-squares gain of the images on the
    projections of their answers (CTF applied), and the power of the rest. ctf: the set's, one
    or one per row of ``result`` (selected here at ``rows``), or None; deformation, blocks: how
    the answers' amplitudes displace the reference (the alignment's)."""
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    box = images.shape[-1]
    img = torch.as_tensor(np.asarray(images), dtype=torch.float64)
    img = img - img.mean(dim=(-2, -1), keepdim=True)
    proj = _projections(result, rows, coords, modes, box, pixel_size, ctf, sigma, weights, deformation, blocks)
    fi, fp = torch.fft.rfft2(img), torch.fft.rfft2(proj - proj.mean(dim=(-2, -1), keepdim=True))
    shell = _shells(box)
    count = _shell_sum(torch.ones(1, *shell.shape, dtype=torch.float64), shell) * len(rows)
    cross = _shell_sum((fi * fp.conj()).real, shell)
    pp = _shell_sum(fp.abs() ** 2, shell)
    gain = np.clip(cross / np.maximum(pp, 1e-30), 0.0, None)
    resid = _shell_sum((fi - torch.as_tensor(gain)[shell] * fp).abs() ** 2, shell)
    power = radial_power_spectrum(img).numpy()
    return SpectralModel(box=box, gain=gain, noise=resid / np.maximum(count, 1), power=power[:len(gain)])


# ------------------------------------------------------------------- calibration particles
def calibration_particles(model: SpectralModel, result: AlignmentResult, coords: np.ndarray, modes: np.ndarray,
                          pixel_size: float, ctf: Optional[CTFParams], n: int, rng: np.random.Generator,
                          sigma=1.0, weights: Optional[np.ndarray] = None, deformation: str = LINEAR,
                          blocks: Optional[np.ndarray] = None):
    """n particles (n, box, box) float32 like the set: the reference at random rotations, with
    amplitudes, shifts and CTFs of random set particles, each shell scaled by the set's gain
    and given Gaussian noise of the set's noise power. Returns (images, truth, ctf): truth an
    :class:`AlignmentResult` of the known answers, ctf the particles' CTFParams (or None)."""
    box = model.box
    pick = rng.integers(0, len(result.score), n)
    truth = AlignmentResult(amplitudes=result.amplitudes[pick].copy(), angles=np.zeros((n, 3)),
                            shifts=result.shifts[pick].copy(), score=np.zeros(n))
    truth.angles = matrix_to_euler(random_rotations(n, rng))
    sim_ctf = _rows_ctf(ctf, pick)
    proj = _projections(truth, np.arange(n), coords, modes, box, pixel_size, sim_ctf, sigma, weights,
                        deformation, blocks)
    return _shape(proj, model, rng, signal=True), truth, sim_ctf


def null_images(model: SpectralModel, n: int, rng: np.random.Generator) -> np.ndarray:
    """n images (n, box, box) float32 of Gaussian noise with the set's power spectrum, no particle."""
    box = model.box
    return _shape(torch.zeros(n, box, box, dtype=torch.float64), model, rng, signal=False)


def _shape(proj: torch.Tensor, model: SpectralModel, rng: np.random.Generator, signal: bool) -> np.ndarray:
    """Images ``E(k) proj + noise``: noise of power N(k) (signal) or of the images' power (not)."""
    box = proj.shape[-1]
    shell = _shells(box)
    power = model.noise if signal else model.power
    white = torch.as_tensor(rng.normal(size=proj.shape))                  # unit variance per pixel
    noise_ft = torch.fft.rfft2(white) * torch.as_tensor(np.sqrt(np.maximum(power, 0.0)) / box)[shell]
    ft = noise_ft + (torch.fft.rfft2(proj) * torch.as_tensor(model.gain)[shell] if signal else 0.0)
    return torch.fft.irfft2(ft, s=(box, box)).numpy().astype(np.float32)


# ------------------------------------------------------------------------------- calibrate
def calibrate(images: np.ndarray, result: AlignmentResult, coords: np.ndarray, modes: np.ndarray,
              pixel_size: float, align: AlignFn, ctf: Optional[CTFParams] = None, sigma=1.0,
              weights: Optional[np.ndarray] = None, rows: Optional[np.ndarray] = None,
              n_calibration: int = CALIBRATION_PARTICLES, n_null: int = NULL_IMAGES, seed: int = 0,
              deformation: str = LINEAR, blocks: Optional[np.ndarray] = None) -> Reliability:
    """The :class:`Reliability` of a set's HEMNMA answers (module docstring).

    images: (B, box, box) some of the set's images (evenly spread; :data:`SPECTRUM_PARTICLES`
    suffice), ``rows`` their rows in ``result`` (default: all, in order); result: the set's
    :class:`AlignmentResult` (M particles); coords (N, 3) Å centred, modes (K, N, 3), pixel_size
    Å/px, ctf (the set's: one or M), sigma, weights, blocks: the alignment's reference, deformation
    its (:mod:`~..modes.deformation`); align:
    ``align(images, ctf) -> AlignmentResult`` aligning as the set was aligned (same search,
    options, device); seed: of the calibration particles and null images.
    """
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    if len(rows) != len(images):
        raise ValueError(f"{len(images)} images were given for {len(rows)} rows of the result.")
    if result.amplitude_std is None:
        raise ValueError("The alignment result has no amplitude uncertainty: align again with this version.")
    coords, modes = np.asarray(coords, dtype=np.float64), np.asarray(modes, dtype=np.float64)
    rng = np.random.default_rng(seed)
    model = spectral_model(images, result, coords, modes, pixel_size, ctf, sigma, weights, rows=rows,
                           deformation=deformation, blocks=blocks)
    sims, truth, sim_ctf = calibration_particles(model, result, coords, modes, pixel_size, ctf, n_calibration, rng,
                                                 sigma, weights, deformation, blocks)
    fit = align(sims, sim_ctf)
    right = angular_distance_deg(fit.rotations, truth.rotations) < RIGHT_POSE_DEG
    null = align(null_images(model, n_null, rng), _rows_ctf(ctf, np.arange(n_null) % len(result.score))).score
    coef = _logistic(fit.score, right)
    reliability = reliability_from_scores(result.score, coef)
    err = fit.amplitudes - truth.amplitudes
    kappa = np.ones(modes.shape[0])
    if right.sum() >= 8 and modes.shape[0]:
        z = np.abs(err[right]) / np.maximum(fit.amplitude_std[right], 1e-12)
        kappa = np.maximum(1.0, np.median(z, 0) / MEDIAN_ABS_Z)
    if (~right).sum() >= 5:
        wrong = np.sqrt(np.mean(err[~right] ** 2, 0))
    else:   # too few wrong poses to measure: an answer and a truth drawn apart from the set
        wrong = np.sqrt(2.0) * result.amplitudes.std(0)
    p = reliability[:, None]
    std = np.sqrt(p * (kappa * result.amplitude_std) ** 2 + (1 - p) * np.maximum(wrong, result.amplitude_std) ** 2)
    calibration = {"particles": int(n_calibration), "right_fraction": float(right.mean()),
                   "logistic": [float(c) for c in coef], "median_score": float(np.median(fit.score))}
    out = Reliability(reliability=reliability, amplitude_std=std, laplace_std=np.array(result.amplitude_std),
                      kappa=kappa, wrong_std=wrong, null_scores=null, calibration=calibration)
    logger.info("Reliability: %d calibration particles, %.0f %% right poses; set mean reliability %.2f, "
                "kappa %s", n_calibration, 100 * right.mean(), reliability.mean(), np.round(kappa, 2).tolist())
    return out


def _rows_ctf(ctf: Optional[CTFParams], rows: np.ndarray) -> Optional[CTFParams]:
    """The CTF of ``rows`` of a set whose CTF is ``ctf`` (one for all, M, or None)."""
    return ctf if ctf is None or ctf.batch_size == 1 else ctf.select(rows)


def reliability_from_scores(scores: np.ndarray, coef) -> np.ndarray:
    """(M,) probability of a right pose for scores (M,): ``1 / (1 + exp(-(a + b score)))``
    with ``coef = (a, b)`` (:func:`calibrate`'s logistic fit)."""
    a, b = coef
    return 1.0 / (1.0 + np.exp(-(a + b * np.asarray(scores, dtype=np.float64))))


def _logistic(scores: np.ndarray, right: np.ndarray, prior: float = 1.0) -> tuple:
    """(a, b) of the logistic regression of ``right`` (B,) on ``scores`` (B,), by Newton's
    method on the score standardised, with a weak Gaussian prior (``prior`` pseudo-counts' worth
    on the slope) so that a calibration set of right poses only gives a finite slope."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(right, dtype=np.float64)
    mu, sd = s.mean(), s.std() + 1e-12
    x = np.stack([np.ones_like(s), (s - mu) / sd], 1)
    w = np.zeros(2)
    # Half a pseudo-count's curvature on the intercept keeps it finite when every pose is right.
    ridge = 0.5 * np.diag([1.0, prior])
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-x @ w))
        grad = x.T @ (y - p) - ridge @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x + ridge
        step = np.linalg.solve(hess, grad)
        w = w + step
        if np.abs(step).max() < 1e-8:
            break
    return float(w[0] - w[1] * mu / sd), float(w[1] / sd)


def _auc(a: np.ndarray, b: np.ndarray) -> float:
    """Probability that a value of ``a`` exceeds one of ``b`` (ties count half)."""
    if not len(a) or not len(b):
        return float("nan")
    diff = np.asarray(a)[:, None] - np.asarray(b)[None, :]
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


def calibrate_job(job, result: AlignmentResult, device: str = "cpu", n_calibration: int = CALIBRATION_PARTICLES,
                  seed: int = 0) -> Reliability:
    """:func:`calibrate` for the answers ``result`` (rows of ``job.ids``) of an
    :class:`~alignment_job.AlignmentJob`: its images read for :data:`SPECTRUM_PARTICLES` rows
    spread over the set, the calibration particles aligned by :meth:`AlignmentJob.align_images`
    without the contrast check (the set passed it; simulated images have the right contrast by
    construction, and are noise alone where the reference does not match the set)."""
    m = len(job.ids)
    rows = np.unique(np.linspace(0, m - 1, min(SPECTRUM_PARTICLES, m)).round().astype(int))
    sigma, weights = job._atom_model()
    return calibrate(job.read_rows(rows), result, job.reference.coords, job.reference.modes, job.pixel_size,
                     lambda images, ctf: job.align_images(images, ctf, device=device, refuse_inverted=False),
                     ctf=job.ctf, sigma=sigma,
                     weights=weights, rows=rows, n_calibration=n_calibration, seed=seed,
                     deformation=job.deformation(), blocks=job.reference.blocks)
