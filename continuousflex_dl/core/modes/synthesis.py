"""Synthetic particle images with known ground truth: poses, normal-mode amplitudes, CTF, noise.

The pipeline of :func:`synthesize`, per chunk of images:

1. displace the reference ``x + sum_k q_k v_k`` (:func:`continuousflex_dl.core.modes.nma.displace`),
2. project the Gaussian atoms with the pose ``(rot, tilt, psi)`` and shift
   (:func:`continuousflex_dl.core.imaging.projection.project_gaussians`, convention of
   :mod:`continuousflex_dl.core.imaging.geometry`),
3. modulate by the CTF (:mod:`continuousflex_dl.core.imaging.ctf`),
4. add white Gaussian noise at the requested SNR (:func:`add_noise`),
5. write the chunk into ONE .mrcs stack on disk,

so a long run (e.g. 20,000 images of 256 px, 5 GB) never sits in memory: the
process holds one chunk at a time.

SNR convention (DESIGN.md): ``SNR = var(clean CTF-modulated projection) / var(noise)``,
variances over the whole box, per image; the noise is white Gaussian.

Reproducibility: one integer ``seed`` drives independent streams (numpy
``SeedSequence.spawn``) for orientations, shifts, amplitudes, defocus and noise,
so the same inputs and seed give a byte-identical stack on the same device,
whatever ``chunk_size``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..imaging.ctf import CTFParams, apply_ctf, ctf_image
from ..progress import Progress, report
from ..imaging.geometry import euler_to_matrix, matrix_to_euler, pose_to_scipion_matrix, random_rotations
from .nma import first_flexible_modes

logger = logging.getLogger(__name__)

__all__ = [
    "AMPLITUDE_RELATIONS", "sample_orientations", "sample_shifts", "sample_amplitudes",
    "sample_defocus", "CTFSampler", "add_noise", "measured_snr", "SynthesisResult", "synthesize",
]

#: Bound on atoms x images x (box + 1) per projector call (its profile tensors), ~16 MiB each.
_PROJECTION_ELEMENTS = 2 ** 22

#: Names accepted by :func:`sample_amplitudes`.
AMPLITUDE_RELATIONS = ("paper", "uniform", "gaussian", "linear", "clusters", "grid", "table")


# --------------------------------------------------------------------------- poses

def sample_orientations(n: int, rng: np.random.Generator, in_plane: bool = True) -> np.ndarray:
    """Random orientations as Euler ZYZ angles (n, 3) ``(rot, tilt, psi)`` in degrees.

    in_plane=True: rotations uniform on SO(3) (Haar measure; rot, psi in (-180, 180],
    tilt in [0, 180]). in_plane=False: projection directions uniform on the sphere
    (rot uniform in [-180, 180), cos(tilt) uniform in [-1, 1]) and psi = 0.
    The projection direction of ``(rot, tilt, psi)`` is
    ``(sin tilt cos rot, sin tilt sin rot, cos tilt)`` (third row of the matrix).
    """
    n = _check_count(n, "number of orientations")
    if in_plane:
        return matrix_to_euler(random_rotations(n, rng))
    rot = rng.uniform(-180.0, 180.0, n)
    tilt = np.degrees(np.arccos(rng.uniform(-1.0, 1.0, n)))
    return np.stack([rot, tilt, np.zeros(n)], -1)


def sample_shifts(n: int, max_shift_px: float, rng: np.random.Generator) -> np.ndarray:
    """In-plane shifts (n, 2) ``(shiftX, shiftY)`` in px, uniform in [-S, S]^2 (zeros if S = 0)."""
    n = _check_count(n, "number of shifts")
    if not max_shift_px >= 0:
        raise ValueError(f"The maximum shift must be >= 0 px, got {max_shift_px}.")
    if max_shift_px == 0:
        return np.zeros((n, 2))
    return rng.uniform(-max_shift_px, max_shift_px, (n, 2))


def sample_defocus(n: int, rng: np.random.Generator, defocus_min: float, defocus_max: float,
                   astigmatism: float = 0.0) -> tuple:
    """Per-image defocus: mean defocus uniform in [defocus_min, defocus_max] Å (underfocus > 0),
    ``U = d + astigmatism/2``, ``V = d - astigmatism/2`` Å, angle uniform in [0, 180) deg when
    astigmatism > 0, else 0. Returns (defocus_u (n,), defocus_v (n,), defocus_angle (n,))."""
    n = _check_count(n, "number of images")
    if not (0 < defocus_min <= defocus_max):
        raise ValueError(f"Need 0 < defocus_min <= defocus_max (Å, underfocus positive), "
                         f"got {defocus_min} and {defocus_max}.")
    if not 0 <= astigmatism < 2 * defocus_min:
        raise ValueError(f"The astigmatism must be in [0, 2 * defocus_min) Å, got {astigmatism}.")
    d = rng.uniform(defocus_min, defocus_max, n) if defocus_max > defocus_min else np.full(n, float(defocus_min))
    angle = rng.uniform(0.0, 180.0, n) if astigmatism > 0 else np.zeros(n)
    return d + astigmatism / 2, d - astigmatism / 2, angle


@dataclass(frozen=True)
class CTFSampler:
    """Random per-image CTFs for :func:`synthesize`: defocus by :func:`sample_defocus`
    (``defocus_min``/``defocus_max`` Å, ``astigmatism`` Å), one acquisition for all images
    (voltage kV, cs mm, amplitude_contrast). A fixed defocus: ``defocus_min == defocus_max``."""
    defocus_min: float = 5000.0
    defocus_max: float = 20000.0
    astigmatism: float = 0.0
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1

    def sample(self, n: int, rng: np.random.Generator) -> CTFParams:
        """CTF parameters of ``n`` images (B = n)."""
        u, v, angle = sample_defocus(n, rng, self.defocus_min, self.defocus_max, self.astigmatism)
        return CTFParams(u, v, angle, self.voltage, self.cs, self.amplitude_contrast)


# --------------------------------------------------------------------------- amplitudes

_RELATION_PARAMS = {
    "paper": {"scale": 200.0},
    "uniform": {"range": 100.0},
    "gaussian": {"mean": 0.0, "std": 50.0},
    "linear": {"start": None, "end": None, "range": 100.0, "noise": 0.0},
    "clusters": {"centers": None, "n_clusters": 3, "range": 100.0, "spread": 10.0},
    "grid": {"range": 100.0, "points": 5},
    "table": {"path": None},
}


def sample_amplitudes(relation: str, n: int, n_modes: int, rng: np.random.Generator,
                      **params) -> np.ndarray:
    """Normal-mode amplitudes (n, n_modes) in Å, columns in the order of the chosen modes.

    relation and its ``params`` (defaults in brackets; a "per-mode" value is a number or
    an (n_modes,) sequence):

    * ``'paper'`` (DeepHEMNMA, Hamitouche & Jonic 2022): ``r ~ U[0, 1]``,
      ``q1 = -scale r``, ``q2 = scale sin(pi r)``, ``q3 = scale cos(pi r)`` on the first
      three modes (the paper's q7, q8, q9), other modes 0; ``scale`` [200] Å. Needs n_modes >= 3.
    * ``'uniform'``: ``q ~ U[-range, range]`` per mode; ``range`` [100] Å, per-mode.
    * ``'gaussian'``: ``q ~ N(mean, std^2)``; ``mean`` [0], ``std`` [50] Å, per-mode.
    * ``'linear'``: points on the segment ``start -> end``: ``q = start + t (end - start)
      + noise * N(0, 1)``, ``t ~ U[0, 1]``; ``start`` [-range], ``end`` [+range] (per-mode),
      ``range`` [100] Å, ``noise`` [0] Å.
    * ``'clusters'``: images drawn with equal probability around ``centers`` (C, n_modes)
      [``n_clusters`` (3) centres uniform in [-range, range]], Gaussian ``spread`` [10] Å.
    * ``'grid'``: nodes of a regular grid of ``points`` [5] per mode over
      [-range, range] [100 Å], image ``i`` at node ``i mod points^n_modes`` (row-major).
    * ``'table'``: rows of a text/CSV file ``path`` (one row per image, one column per
      mode, separated by commas, semicolons or white space; ``#`` comments and a
      non-numeric header line are skipped); rows are used in order and repeated
      cyclically when the file has fewer than n.

    Raises ValueError for an unknown relation or parameter, or a wrong column count.
    """
    if relation not in _RELATION_PARAMS:
        raise ValueError(f"Unknown amplitude relation {relation!r}; choose one of "
                         f"{', '.join(AMPLITUDE_RELATIONS)}.")
    unknown = set(params) - set(_RELATION_PARAMS[relation])
    if unknown:
        raise ValueError(f"Unknown parameter(s) {sorted(unknown)} for amplitude relation "
                         f"{relation!r}; accepted: {sorted(_RELATION_PARAMS[relation])}.")
    p = dict(_RELATION_PARAMS[relation], **params)
    n = _check_count(n, "number of images")
    if int(n_modes) != n_modes or n_modes < 1:
        raise ValueError(f"The number of modes must be a positive integer, got {n_modes}.")
    k = int(n_modes)

    def per_mode(name):
        v = np.asarray(p[name], dtype=float)
        if v.ndim == 0:
            return np.full(k, float(v))
        if v.shape != (k,):
            raise ValueError(f"Parameter {name!r} of relation {relation!r} must be a number or "
                             f"{k} values (one per mode), got shape {v.shape}.")
        return v

    if relation == "paper":
        if k < 3:
            raise ValueError("The 'paper' relation needs at least 3 modes (q7, q8, q9); "
                             f"{k} chosen. Choose more modes or another relation.")
        scale = float(p["scale"])
        r = rng.uniform(0.0, 1.0, n)
        out = np.zeros((n, k))
        out[:, 0] = -scale * r
        out[:, 1] = scale * np.sin(np.pi * r)
        out[:, 2] = scale * np.cos(np.pi * r)
        return out
    if relation == "uniform":
        half = per_mode("range")
        return rng.uniform(-1.0, 1.0, (n, k)) * half
    if relation == "gaussian":
        return per_mode("mean") + rng.standard_normal((n, k)) * per_mode("std")
    if relation == "linear":
        rng_half = per_mode("range")
        start = -rng_half if p["start"] is None else per_mode("start")
        end = rng_half if p["end"] is None else per_mode("end")
        t = rng.uniform(0.0, 1.0, (n, 1))
        return start + t * (end - start) + float(p["noise"]) * rng.standard_normal((n, k))
    if relation == "clusters":
        if p["centers"] is None:
            c = int(p["n_clusters"])
            if c < 1:
                raise ValueError(f"n_clusters must be >= 1, got {p['n_clusters']}.")
            centers = rng.uniform(-1.0, 1.0, (c, k)) * per_mode("range")
        else:
            centers = np.atleast_2d(np.asarray(p["centers"], dtype=float))
            if centers.ndim != 2 or centers.shape[1] != k:
                raise ValueError(f"Cluster centres must be an array (C, {k}), got shape {centers.shape}.")
        label = rng.integers(0, len(centers), n)
        return centers[label] + float(p["spread"]) * rng.standard_normal((n, k))
    if relation == "grid":
        points = int(p["points"])
        if points < 1 or points ** k > 10 ** 6:
            raise ValueError(f"A grid of {points} points per mode over {k} modes is too large "
                             "(or empty); use at most 10^6 nodes.")
        half = per_mode("range")
        axes = [np.linspace(-h, h, points) if points > 1 else np.zeros(1) for h in half]
        nodes = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, k)
        return nodes[np.arange(n) % len(nodes)]
    # table
    if p["path"] is None:
        raise ValueError("The 'table' relation needs path=<text or CSV file of amplitudes>.")
    table = read_amplitude_table(p["path"])
    if table.shape[1] != k:
        raise ValueError(f"The amplitude table {p['path']} has {table.shape[1]} columns but "
                         f"{k} modes are chosen: give one column per mode.")
    return table[np.arange(n) % len(table)]


def read_amplitude_table(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read a text/CSV table of numbers (rows, columns) -> float64 array (see ``'table'``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Amplitude table not found: {path}")
    rows: List[List[float]] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        cells = [c for c in re.split(r"[,;\s]+", line) if c]
        try:
            rows.append([float(c) for c in cells])
        except ValueError:
            if not rows:  # header line
                continue
            raise ValueError(f"{path}, line {number}: not a row of numbers: {line!r}") from None
    if not rows:
        raise ValueError(f"The amplitude table {path} holds no rows of numbers.")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"The rows of {path} have different numbers of columns {sorted(widths)}.")
    return np.asarray(rows, dtype=np.float64)


# --------------------------------------------------------------------------- noise

def add_noise(images: torch.Tensor, snr: float,
              generator: Union[np.random.Generator, torch.Generator]) -> torch.Tensor:
    """Add white Gaussian noise to clean images (B, box, box) at signal-to-noise ratio ``snr``.

    Per image, the noise standard deviation is ``sqrt(var(image) / snr)``, the variance
    taken over the whole box (so SNR = var(clean CTF-modulated projection) / var(noise)).
    ``generator``: a numpy Generator (noise drawn in float32 on the CPU, identical on every
    device) or a torch Generator on the images' device. Returns a new tensor.
    """
    if snr is None or not snr > 0 or not math.isfinite(snr):
        raise ValueError(f"The SNR must be a positive number, got {snr}.")
    if images.ndim != 3:
        raise ValueError(f"Images must have shape (B, box, box), got {tuple(images.shape)}.")
    std = torch.sqrt(images.var(dim=(-2, -1), unbiased=False) / float(snr))[:, None, None]
    if isinstance(generator, np.random.Generator):
        noise = torch.from_numpy(generator.standard_normal(tuple(images.shape), dtype=np.float32))
        noise = noise.to(device=images.device, dtype=images.dtype)
    elif isinstance(generator, torch.Generator):
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    else:
        raise ValueError("generator must be a numpy.random.Generator or a torch.Generator.")
    return images + noise * std.to(images.dtype)


def measured_snr(clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    """Per-image SNR (B,) = var(clean) / var(noisy - clean), variances over the whole box."""
    return clean.var(dim=(-2, -1), unbiased=False) / (noisy - clean).var(dim=(-2, -1), unbiased=False)


# --------------------------------------------------------------------------- synthesis

@dataclass
class SynthesisResult:
    """Ground truth of a synthesized stack of ``n`` images.

    stack_path: the .mrcs file (n, box, box) float32, voxel size = pixel_size;
    angles: (n, 3) Euler ZYZ (rot, tilt, psi) deg; shifts: (n, 2) (shiftX, shiftY) px
    (:mod:`.geometry`: RELION's origin); amplitudes: (n, K) Å in the order of ``mode_numbers``
    (1-based mode numbers); ctf: the CTF of every image (B = n), None when the images carry
    none; snr: None when noise-free; seed.
    """
    stack_path: str
    box: int
    pixel_size: float
    angles: np.ndarray
    shifts: np.ndarray
    amplitudes: np.ndarray
    ctf: Optional[CTFParams]
    snr: Optional[float]
    seed: int
    mode_numbers: List[int] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return int(self.angles.shape[0])

    def scipion_matrices(self) -> np.ndarray:
        """Scipion ALIGN_PROJ 4x4 pose matrices (n, 4, 4), see :mod:`.geometry`."""
        return pose_to_scipion_matrix(self.angles, self.shifts)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the ground truth as .npz: the arrays, the CTF columns
        (:meth:`CTFParams.to_columns`) and the scalars as one JSON field."""
        scalars = {k: getattr(self, k) for k in ("stack_path", "box", "pixel_size", "snr", "seed",
                                                 "mode_numbers")}
        ctf = {} if self.ctf is None else self.ctf.to_columns()
        np.savez(path, _scalars=json.dumps(scalars), angles=self.angles, shifts=self.shifts,
                 amplitudes=self.amplitudes, **ctf)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SynthesisResult":
        """Read what :meth:`save` wrote."""
        data = np.load(path)
        return cls(angles=data["angles"], shifts=data["shifts"], amplitudes=data["amplitudes"],
                   ctf=CTFParams.from_columns(data), **json.loads(str(data["_scalars"])))

    def write_star(self, path: Union[str, os.PathLike], stack_name: Optional[str] = None) -> str:
        """Write the ground truth as a RELION .star file (see :mod:`.star`); returns the path.
        ``stack_name`` is the stack path written in ``_rlnImageName`` (default: relative to
        the star file's folder when possible)."""
        from ..imaging.star import write_particles_star
        if stack_name is None:
            try:
                stack_name = os.path.relpath(self.stack_path, os.path.dirname(os.path.abspath(path)))
            except ValueError:
                stack_name = str(self.stack_path)
        write_particles_star(path, stack_name, self.angles, self.shifts, self.pixel_size, ctf=self.ctf,
                             amplitudes=self.amplitudes, mode_numbers=self.mode_numbers)
        return str(path)


def synthesize(out_stack: Union[str, os.PathLike], coords, modes, n_images: int, box: int,
               pixel_size: float, *,
               amplitudes: Optional[np.ndarray] = None,
               relation: str = "paper", relation_params: Optional[Dict] = None,
               mode_numbers: Optional[Sequence[int]] = None,
               in_plane: bool = True, max_shift_px: float = 0.0,
               ctf: Union[CTFSampler, CTFParams, None] = CTFSampler(),
               snr: Optional[float] = None,
               sigma: Union[float, np.ndarray] = 1.0, weights: Optional[np.ndarray] = None,
               seed: int = 0, chunk_size: int = 256, device: Union[str, torch.device] = "cpu",
               progress: Optional[Progress] = None) -> SynthesisResult:
    """Synthesize ``n_images`` particle images of a flexible structure into one .mrcs stack.

    coords: (N, 3) Å, centred on the box centre; modes: (K, N, 3) unit-norm mode vectors
    (the chosen modes, numbered ``mode_numbers``, default 7..6+K) or None (rigid structure,
    K = 0); box (px, >= 8) and pixel_size (Å/px) of the images.

    amplitudes: (n_images, K) Å, or None to draw them with :func:`sample_amplitudes`
    (``relation``, ``relation_params``). Poses: :func:`sample_orientations` (``in_plane``),
    :func:`sample_shifts` (``max_shift_px``). ctf: a :class:`CTFSampler` (random defocus per
    image, the default), given :class:`CTFParams` (one for all images, B = 1, or one per
    image, B = n_images), or None for images without CTF. ``snr``: None for noise-free images,
    else white noise per :func:`add_noise`. sigma (Å, number or (N,)) and weights ((N,)):
    Gaussian width and weight of each atom in the projection.

    Images are computed ``chunk_size`` at a time on ``device`` and streamed into the stack
    (float32, voxel size = pixel_size, header statistics set), so memory stays at one chunk.
    ``progress(done, total, message)`` (:data:`~continuousflex_dl.core.progress.Progress`) is
    called with the images written after each chunk. Same inputs and seed -> identical
    stack. Returns the ground truth (:class:`SynthesisResult`).
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 3 or len(coords) == 0:
        raise ValueError(f"Coordinates must have shape (N, 3) Å, got {coords.shape}.")
    n_atoms = coords.shape[0]
    if modes is None:
        modes = np.zeros((0, n_atoms, 3))
    modes = np.asarray(modes, dtype=np.float64)
    if modes.ndim != 3 or modes.shape[1:] != (n_atoms, 3):
        raise ValueError(f"Modes must have shape (K, {n_atoms}, 3) to match {n_atoms} atoms, "
                         f"got {modes.shape}.")
    k = modes.shape[0]
    n = _check_count(n_images, "number of images")
    if int(box) != box or box < 8:
        raise ValueError(f"The box must be an integer of at least 8 px, got {box}.")
    box = int(box)
    if not pixel_size > 0:
        raise ValueError(f"The pixel size must be positive (Å/px), got {pixel_size}.")
    if snr is not None and not (snr > 0 and math.isfinite(snr)):
        raise ValueError(f"The SNR must be positive (or None for no noise), got {snr}.")
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"The chunk size must be a positive integer, got {chunk_size}.")
    if not 0 <= max_shift_px < box / 2:
        raise ValueError(f"The maximum shift must be in [0, box/2) px, got {max_shift_px}.")
    if mode_numbers is None:
        mode_numbers = first_flexible_modes(k)
    mode_numbers = [int(m) for m in mode_numbers]
    if len(mode_numbers) != k:
        raise ValueError(f"{len(mode_numbers)} mode numbers given for {k} modes.")
    out_stack = Path(out_stack)
    if not out_stack.parent.is_dir():
        raise ValueError(f"The output folder {out_stack.parent} does not exist.")
    device = torch.device(device)

    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(5)]
    rng_pose, rng_shift, rng_amp, rng_ctf, rng_noise = streams
    angles = sample_orientations(n, rng_pose, in_plane=in_plane)
    shifts = sample_shifts(n, max_shift_px, rng_shift)
    if amplitudes is None:
        amplitudes = (sample_amplitudes(relation, n, k, rng_amp, **(relation_params or {}))
                      if k else np.zeros((n, 0)))
    amplitudes = np.asarray(amplitudes, dtype=np.float64)
    if amplitudes.shape != (n, k):
        raise ValueError(f"Amplitudes must have shape ({n}, {k}) (images, modes), got {amplitudes.shape}.")
    ctf = _ctf_of_images(ctf, n, rng_ctf)

    from .nma import displace
    from ..imaging.projection import project_gaussians

    coords_t = torch.as_tensor(coords, dtype=torch.float32, device=device)
    modes_t = torch.as_tensor(modes, dtype=torch.float32, device=device)
    sigma_t = sigma if np.ndim(sigma) == 0 else torch.as_tensor(np.asarray(sigma), dtype=torch.float32,
                                                                  device=device)
    weights_t = None if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float32,
                                                             device=device)
    rotations = euler_to_matrix(angles)

    header_offset, file_dtype = _create_stack(out_stack, n, box, pixel_size)
    stats = _RunningStats()
    with open(out_stack, "r+b") as handle:
        handle.seek(header_offset)
        for start in range(0, n, int(chunk_size)):
            stop = min(n, start + int(chunk_size))
            amps = torch.as_tensor(amplitudes[start:stop], dtype=torch.float32, device=device)
            xyz = displace(coords_t, modes_t, amps) if k else coords_t
            rot_t = torch.as_tensor(rotations[start:stop], dtype=torch.float32, device=device)
            shift_t = torch.as_tensor(shifts[start:stop], dtype=torch.float32, device=device)
            # The projector holds (B, N, box) profiles: project in sub-batches of bounded size.
            step = max(1, _PROJECTION_ELEMENTS // (n_atoms * (box + 1)))
            images = torch.cat([
                project_gaussians(xyz[i:i + step] if k else xyz, rot_t[i:i + step], shift_t[i:i + step],
                                  box, pixel_size, sigma=sigma_t, weights=weights_t)
                for i in range(0, stop - start, step)]).to(torch.float32)
            if ctf is not None:
                params = ctf.select(slice(start, stop))
                images = apply_ctf(images, ctf_image(params, box, pixel_size, device=device))
            if snr is not None:
                images = add_noise(images, snr, rng_noise)
            block = images.detach().cpu().numpy().astype(file_dtype, copy=False)
            stats.update(block)
            handle.write(block.tobytes())
            report(progress, stop, n, f"synthesized {stop}/{n} images")
            logger.info("Synthesized %d / %d images", stop, n)
    _finish_stack(out_stack, stats)
    return SynthesisResult(
        stack_path=str(out_stack), box=box, pixel_size=float(pixel_size), angles=angles,
        shifts=shifts, amplitudes=amplitudes, ctf=ctf, snr=None if snr is None else float(snr),
        seed=int(seed), mode_numbers=mode_numbers)


# --------------------------------------------------------------------------- helpers

def _ctf_of_images(ctf: Union[CTFSampler, CTFParams, None], n: int,
                   rng: np.random.Generator) -> Optional[CTFParams]:
    """The CTF of each of the ``n`` images (every field an (n,) array), or None."""
    if ctf is None:
        return None
    if isinstance(ctf, CTFSampler):
        ctf = ctf.sample(n, rng)
    if not isinstance(ctf, CTFParams):
        raise ValueError(f"ctf must be a CTFSampler, CTFParams or None, got {type(ctf).__name__}.")
    return ctf.expand(n)


def _check_count(n, what: str) -> int:
    if int(n) != n or n < 1:
        raise ValueError(f"The {what} must be a positive integer, got {n}.")
    return int(n)


def _create_stack(path: Path, n: int, box: int, pixel_size: float) -> tuple:
    """Create an empty (sparse) float32 image stack (n, box, box) with ``mrcfile.new_mmap``;
    returns (byte offset of the data, numpy dtype of the data in the file)."""
    import mrcfile
    with mrcfile.new_mmap(str(path), shape=(n, box, box), mrc_mode=2, overwrite=True) as mrc:
        mrc.set_image_stack()
        mrc.voxel_size = float(pixel_size)
        # A fixed label instead of mrcfile's timestamp, so the same seed gives identical bytes.
        mrc.header.label[0] = b"continuousflex_dl synthetic particles"
        mrc.header.nlabl = 1
        offset = int(mrc.header.nbytes + mrc.extended_header.nbytes)
        dtype = mrc.data.dtype
    return offset, dtype


def _finish_stack(path: Path, stats: "_RunningStats") -> None:
    """Write the header statistics (min, max, mean, rms) without reading the data."""
    import mrcfile
    with mrcfile.mmap(str(path), mode="r+") as mrc:
        mrc.header.dmin, mrc.header.dmax = stats.minimum, stats.maximum
        mrc.header.dmean, mrc.header.rms = stats.mean, stats.rms


class _RunningStats:
    def __init__(self):
        self.count, self.total, self.total_sq = 0, 0.0, 0.0
        self.minimum, self.maximum = math.inf, -math.inf

    def update(self, block: np.ndarray) -> None:
        b = block.astype(np.float64)
        self.count += b.size
        self.total += float(b.sum())
        self.total_sq += float((b * b).sum())
        self.minimum = min(self.minimum, float(b.min()))
        self.maximum = max(self.maximum, float(b.max()))

    @property
    def mean(self) -> float:
        return self.total / self.count

    @property
    def rms(self) -> float:  # MRC "rms" = standard deviation from the mean
        return math.sqrt(max(self.total_sq / self.count - self.mean ** 2, 0.0))
