"""HEMNMA: combined elastic (normal-mode amplitudes) and rigid (pose) alignment of particle images.

For every particle image the method finds the normal-mode amplitudes ``q``
(Å), the Euler angles and the in-plane shifts whose Gaussian-atom projection
(:mod:`projection`, CTF applied when given) best matches the image in the
least-squares sense with a free scale and offset, i.e. the largest normalised
cross-correlation (NCC). Four stages, all batched over images:

1. **Global search** at ``search_size`` px on a coarse-grained copy of the
   structure (atoms grouped into beads of ``bead_cell`` search pixels): a
   quasi-uniform set of rotations (Fibonacci directions x in-plane angles,
   ``angular_step_deg`` apart; the in-plane angles by rotating the images of
   each direction) times a star of amplitude seeds (the centre of the
   amplitude box and bin centres along each mode), scored against every image
   by FFT cross-correlation over all shifts within ``max_shift_px``. The
   projections are shared by all images; a CTF is applied to the image side
   (a real CTF commutes with correlation) and to the reference norms.
2. For the ``n_candidates`` best distinct rotations of each image (more where
   its ranking is flat, :data:`CANDIDATE_SPREAD_FRACTION`), a grid of
   amplitudes (``amplitude_grid`` values per mode) with shift search, then
   **local refinement** at the search size: Levenberg-Marquardt on
   amplitudes, a small axis-angle rotation update and shifts together, with
   analytic Jacobians of the projector, on low-passed images
   (``search_lowpass``) to widen the basin of convergence.
3. Of the best of those (:data:`FINAL_RANKED` x ``n_final``), the ``n_final`` whose
   projections at ``working_size`` px match the image best are refined again with
   all atoms at that size (atoms widened against aliasing, :data:`ANTI_ALIAS_PX`);
   the one with the highest NCC is returned,
4. with its **uncertainty**: the Laplace standard deviation of every parameter at
   the optimum, from the Gauss-Newton matrix of the refinement's last state (the
   pose, scale and offset free).

An :class:`Aligner` is built once per set from an :class:`AlignConfig` (presets
``fast``/``normal``/``thorough``); its methods are these stages
(:meth:`~Aligner.global_search`, :meth:`~Aligner.refine_candidates`,
:meth:`~Aligner.refine_final`, :meth:`~Aligner.uncertainty`; :meth:`~Aligner.polish` runs
stages 3 and 4 alone from a given
answer, e.g. after :mod:`image_model` refined the atoms' weights and widths). Given a first
answer per particle (a network's),
:meth:`~Aligner.seeded_candidates` replaces stage 1 by the answer, two slightly
rotated copies and its in-plane flip; a few reference particles take the global
path, and seeded particles whose score falls clearly below theirs take it too,
so a poor first answer costs time, never accuracy. :func:`align_particles` does
all of it in one call.

Images larger than the working size are reduced by Fourier cropping (the box
in Å is unchanged) without touching their spectrum, so white noise stays white
(the Laplace uncertainty assumes it); the projections at the coarser pixel carry
the difference of pixel-integration blur instead (:func:`_filters`).

The module reads in that order: the settings and results; :func:`align_particles` and the
:class:`Aligner`, its methods stage by stage; then the helpers in sections, the image sizes
(cropping, filters, pixel frames) and one section per stage.

Pose convention: :mod:`geometry` (Euler ZYZ in degrees, shifts in pixels of
the *input* images, ``[x, y] = (A r)[:2] / pixel_size - shift + box // 2``: the shift is
RELION's origin).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, fields, replace
from typing import Callable, NamedTuple, Optional, Union

import numpy as np
import torch

from ..imaging.geometry import euler_to_matrix, matrix_to_euler, particle_offset_px
from ..modes.nma import default_amplitude_range
from ..imaging.projection import fourier_crop, pixel_profiles, profile_reach, project_gaussians

logger = logging.getLogger(__name__)

__all__ = ["AlignConfig", "PRESETS", "preset_changes", "Aligner", "AlignmentResult", "RESULT_ARRAYS",
           "align_particles", "check_contrast",
           "PATH_GLOBAL", "PATH_SEEDED", "PATH_FALLBACK", "rotation_grid", "fourier_crop",
           "coarse_grain", "normalised_cross_correlation"]

ArrayLike = Union[np.ndarray, torch.Tensor]


# ---------------------------------------------------------------------------- settings and results

@dataclass(frozen=True)
class AlignConfig:
    """Settings of a HEMNMA alignment (values that change results; see :class:`Aligner`).

    max_shift_px: largest |shift| searched, pixels of the input images.
    working_size / search_size: image sizes (px) of the final refinement and of the global
        search (reduced by Fourier cropping; never above the input box).
    angular_step_deg: spacing of the global rotation grid; amplitude_seeds: values per mode
        in the star of amplitude seeds of the global search; amplitude_grid: values per mode
        of the grid tried at every candidate pose (at most ~256 combinations); n_candidates:
        distinct poses refined per image at the search size (at least; up to
        :data:`CANDIDATE_MOST` times more for an image whose ranking is flat); n_final: of
        those, refined at the working size.
    search_iters / refine_iters: Levenberg-Marquardt iterations of the two refinements;
        seed_search_iters: those of the search-size refinement of a seed's start, which is
        near its optimum already (5: the same MAE as 10 on network-like seeds, 3.01 Å, at 3.4
        instead of 5.7 ms per image).
    bead_cell: bead size of the search model, in search pixels.
    max_final_points: the final refinement uses every atom of structures up to this size;
        larger ones are refined on beads (one working pixel, grown until there are at most
        this many), with their modes carried over, so the cost per image stays bounded.
    search_lowpass: width (cycles/px at the search size) of the Gaussian low-pass applied in
        the search-size refinement (widens its basin of convergence); None: off.
    batch_size: images aligned at once (bounds memory).
    seed_perturbation_deg: the seeded path starts from each seed, two copies of it rotated by
        this angle about the image axes and its in-plane flip (psi + 180 deg, the pose a
        network most often confuses); seed_starts: how many of those four, the best matches of
        the image as they stand, it refines (1: 96 network-like seeds at 128 px, SNR 0.1, gave
        the same MAE as 2, 3.01 Å, at 0.024 instead of 0.030 CPU s per image);
        seed_fallback_mads: a seeded particle whose score falls this many robust standard
        deviations below the median score of the particles aligned by the global path, and
        below the lowest of them, takes the global path too (the spread: 1.4826 MAD of those
        scores, or, if larger, 1.4826 times the median excess of the seeded scores above that
        median, which poor seeds, scoring low, leave alone);
        seed_reference: how many particles of the set at most take the global path to give that
        score distribution (a twentieth of the set, at least 8; :func:`reference_count`; 8 at
        500 particles: the same fallbacks as 16, none of 492 against 2 of 484, and the same
        MAE, at 1.5 ms per image less); seed_finish_chi2: the seeded path's final refinement
        takes its last Gauss-Newton step unevaluated once that step would lower the cost by
        less than this many noise variances (:data:`FINISH_CHI2`, 0.5, on the global path): 2
        took 2.65 instead of 3.32 working-size evaluations per particle for 1 % more amplitude
        MAE (3.238 against 3.207 Å, 256 network-like seeds at 128 px, SNR 0.1, CTF), within
        the seeded path's allowance of 1.1x the global path's MAE.
    """
    max_shift_px: float = 5.0
    working_size: int = 64
    search_size: int = 32
    angular_step_deg: float = 15.0
    amplitude_seeds: int = 3
    amplitude_grid: int = 3
    n_candidates: int = 8
    n_final: int = 1
    search_iters: int = 10
    seed_search_iters: int = 5
    refine_iters: int = 15
    bead_cell: float = 1.5
    max_final_points: int = 5000
    search_lowpass: Optional[float] = 0.25
    batch_size: int = 128
    seed_perturbation_deg: float = 10.0
    seed_starts: int = 1
    seed_fallback_mads: float = 3.0
    seed_reference: int = 8
    seed_finish_chi2: float = 2.0

    @classmethod
    def preset(cls, name: str, **changes) -> "AlignConfig":
        """A named effort, ``'fast'``, ``'normal'`` (the defaults, the settings of the README's
        benchmark) or ``'thorough'``, with optional ``changes`` of single fields."""
        if name not in PRESETS:
            raise ValueError(f"Unknown alignment effort {name!r}; choose one of {sorted(PRESETS)}.")
        return replace(PRESETS[name], **changes)

    def check(self) -> None:
        """Raise ValueError with the fix for settings no alignment can use."""
        if self.max_shift_px < 0:
            raise ValueError(f"The maximum shift must be >= 0 px, got {self.max_shift_px}.")
        if not 0 < self.angular_step_deg <= 90:
            raise ValueError(f"The angular step must be in (0, 90] degrees, got {self.angular_step_deg}.")
        if min(self.n_candidates, self.n_final, self.batch_size) < 1 or self.n_final > self.n_candidates:
            raise ValueError("Need 1 <= n_final <= n_candidates and a positive batch size.")
        if self.seed_finish_chi2 < 0:
            raise ValueError(f"seed_finish_chi2 must be >= 0 noise variances, got {self.seed_finish_chi2}.")


PRESETS = {
    "fast": AlignConfig(n_candidates=4, search_iters=8, refine_iters=10),
    "normal": AlignConfig(),
    "thorough": AlignConfig(n_candidates=12, n_final=2, search_iters=15, refine_iters=25),
}


def preset_changes(name: str) -> dict:
    """The fields of preset ``name`` that differ from the defaults (AlignConfig keywords)."""
    preset, default = AlignConfig.preset(name), AlignConfig()
    return {f.name: getattr(preset, f.name) for f in fields(AlignConfig)
            if getattr(preset, f.name) != getattr(default, f.name)}


_CONFIG_FIELDS = {f.name for f in fields(AlignConfig)}


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
    path: (M,) how each particle was aligned (:data:`PATH_GLOBAL`, :data:`PATH_SEEDED`, or
    :data:`PATH_FALLBACK` for a seeded particle that then took the global path), or None.
    """
    amplitudes: np.ndarray
    angles: np.ndarray
    shifts: np.ndarray
    score: np.ndarray
    amplitude_std: Optional[np.ndarray] = None
    angle_std: Optional[np.ndarray] = None
    shift_std: Optional[np.ndarray] = None
    path: Optional[np.ndarray] = None

    @property
    def rotations(self) -> np.ndarray:
        """(M, 3, 3) rotation matrices A of the angles."""
        return euler_to_matrix(self.angles)

    def to_dict(self) -> dict:
        """Plain numpy arrays by name (for ``np.savez`` or conversion to Scipion objects)."""
        return {name: getattr(self, name) for name in RESULT_ARRAYS + ("path",)
                if getattr(self, name) is not None}


#: The per-particle arrays of an AlignmentResult that every stage fills (``path`` aside).
RESULT_ARRAYS = ("amplitudes", "angles", "shifts", "score", "amplitude_std", "angle_std", "shift_std")


#: :attr:`AlignmentResult.path` codes: how each particle was aligned.
PATH_GLOBAL, PATH_SEEDED, PATH_FALLBACK = 0, 1, 2


# ------------------------------------------------------------------- the alignment, stage by stage

def align_particles(images: ArrayLike, coords: np.ndarray, modes: np.ndarray, pixel_size: float, *,
                    ctf=None, sigma: Union[float, np.ndarray] = 1.0, weights: Optional[np.ndarray] = None,
                    amplitude_range: Optional[np.ndarray] = None, seeds: Optional[AlignmentResult] = None,
                    config: Optional[AlignConfig] = None, device: Union[str, torch.device] = "cpu",
                    seed: int = 0, progress: Optional[Callable[[float, str], None]] = None,
                    **settings) -> AlignmentResult:
    """HEMNMA alignment of particle images in one call: ``Aligner(...).align(...)``.

    images: (M, box, box); coords (N, 3) Å centred; modes (K, N, 3); pixel_size Å/px; ctf,
    sigma, weights, amplitude_range, seeds: see :class:`Aligner` and :meth:`Aligner.align`.
    config: an :class:`AlignConfig` (default: the 'normal' preset), and ``settings``: single
    fields of it (``max_shift_px=3``, ``n_candidates=4``, ...). seed: the method is
    deterministic; kept for the project's seeding rule. Returns an :class:`AlignmentResult`.
    """
    del seed  # no random choices
    unknown = set(settings) - _CONFIG_FIELDS
    if unknown:
        raise ValueError(f"Unknown alignment settings {sorted(unknown)}; AlignConfig has {sorted(_CONFIG_FIELDS)}.")
    config = replace(config or AlignConfig(), **settings)
    imgs = _as_images(images, device)
    aligner = Aligner(coords, modes, pixel_size, imgs.shape[-1], config, sigma=sigma, weights=weights,
                      amplitude_range=amplitude_range, device=device)
    return aligner.align(imgs, ctf=ctf, seeds=seeds, progress=progress)


class Aligner:
    """HEMNMA alignment of particle images against one flexible reference (module docstring).

    coords: (N, 3) Å reference structure, centred (:func:`structure.centre`); modes: (K, N, 3)
    the chosen normal modes (unit-norm 3N vectors), K may be 0; pixel_size: Å/px and box: px
    of the images; config: :class:`AlignConfig`; sigma: atom width(s) Å, (N,) or a number;
    weights: (N,) or None; amplitude_range: (K, 2) lowest and highest amplitude (Å) of each
    mode, default ``+-5 sqrt(N)`` Å (atoms moved by 5 Å RMS).

    Built once per set: the models at both sizes and, on first use, the reference projections
    of the global search (shared by every image). Stages, in the order :meth:`align` runs them:
    :meth:`global_search` (or :meth:`seeded_candidates`), :meth:`refine_candidates`,
    :meth:`refine_final`, :meth:`uncertainty` (:func:`_laplace_std`).
    """

    def __init__(self, coords: np.ndarray, modes: np.ndarray, pixel_size: float, box: int,
                 config: AlignConfig = AlignConfig(), *, sigma: Union[float, np.ndarray] = 1.0,
                 weights: Optional[np.ndarray] = None, amplitude_range: Optional[np.ndarray] = None,
                 device: Union[str, torch.device] = "cpu"):
        config.check()
        coords = np.asarray(coords, dtype=np.float64)
        if coords.ndim != 2 or coords.shape[1] != 3:
            raise ValueError(f"coords must have shape (N, 3) Å, got {coords.shape}.")
        n_atoms = len(coords)
        modes = np.asarray(modes, dtype=np.float64)
        if modes.ndim == 2 and modes.size == 0:
            modes = modes.reshape(0, n_atoms, 3)
        if modes.ndim != 3 or modes.shape[1:] != (n_atoms, 3):
            raise ValueError(f"modes must have shape (K, {n_atoms}, 3), got {modes.shape}.")
        if not pixel_size > 0:
            raise ValueError(f"The pixel size must be positive (Å/px), got {pixel_size}.")
        self.k = k = modes.shape[0]
        sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (n_atoms,)).copy()
        wts = np.ones(n_atoms) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
        if wts.shape != (n_atoms,):
            raise ValueError(f"weights must have one value per atom ({n_atoms}).")
        if amplitude_range is None:
            half = default_amplitude_range(n_atoms)
            amplitude_range = np.tile([-half, half], (k, 1))
        amplitude_range = np.asarray(amplitude_range, dtype=np.float64).reshape(k, 2)
        if np.any(amplitude_range[:, 1] < amplitude_range[:, 0]):
            raise ValueError("Each amplitude range must be (lowest, highest) with lowest <= highest.")
        self.config, self.box, self.device = config, int(box), torch.device(device)
        work = min(int(config.working_size), self.box)
        search = min(int(config.search_size), work)
        if search < 8:
            raise ValueError(f"The search size must be at least 8 px, got {search}.")
        # Models: beads of about one search pixel for the search, all atoms for the final fit.
        bead = coarse_grain(coords, modes, sig, wts, cell=config.bead_cell * pixel_size * self.box / search)
        self.search = _Scale(search, self.box, pixel_size, bead, self.device)
        final = (coords, modes, sig, wts)
        cell = pixel_size * self.box / work
        while len(final[0]) > config.max_final_points:
            final = coarse_grain(coords, modes, sig, wts, cell=cell)
            cell *= 1.25
        self.work = _Scale(work, self.box, pixel_size, final, self.device, anti_alias=True)
        self.amplitude_range = amplitude_range
        self.q_lo = torch.as_tensor(amplitude_range[:, 0], dtype=torch.float32, device=self.device)
        self.q_hi = torch.as_tensor(amplitude_range[:, 1], dtype=torch.float32, device=self.device)
        self._references = None
        logger.info("HEMNMA: %d px images, %d atoms (%d beads in the search, %d points in the final "
                    "refinement), %d modes; search %d px, work %d px",
                    self.box, n_atoms, len(bead[0]), len(final[0]), k, search, work)

    # ------------------------------------------------------------------------------------- the set
    def align(self, images: ArrayLike, ctf=None, seeds: Optional[AlignmentResult] = None,
              progress: Optional[Callable[[float, str], None]] = None) -> AlignmentResult:
        """Align images (M, box, box) (numpy or torch, indexed ``[y, x]``); ctf: CTFParams of
        the images (one or M values) or None; seeds: a first answer per image (amplitudes,
        angles, shifts, e.g. a network's), which replaces the global search for all particles
        but ``seed_reference`` of them and those whose refined score stays clearly below the
        scores of the global path. progress: optional ``callback(fraction_done, message)``."""
        imgs = _as_images(images, self.device)
        m = imgs.shape[0]
        if imgs.shape[-1] != self.box:
            raise ValueError(f"The images are {imgs.shape[-1]} px but the aligner was built for {self.box} px.")
        if ctf is not None and ctf.batch_size not in (1, m):
            raise ValueError(f"The CTF describes {ctf.batch_size} images but {m} images were given.")
        if seeds is not None and seeds.amplitudes.shape != (m, self.k):
            raise ValueError(f"The seeds must give ({m}, {self.k}) amplitudes, got {seeds.amplitudes.shape}.")
        report = progress or (lambda f, msg: None)
        t0 = time.time()
        path = np.full(m, PATH_GLOBAL if seeds is None else PATH_SEEDED, dtype=np.int8)
        if seeds is not None:
            path[np.linspace(0, m - 1, reference_count(m, self.config.seed_reference)).round().astype(int)] = \
                PATH_GLOBAL
        parts = {}
        for route in (PATH_GLOBAL, PATH_SEEDED):
            rows = np.flatnonzero(path == route)
            for b0 in range(0, len(rows), self.config.batch_size):
                batch = rows[b0:b0 + self.config.batch_size]
                parts[tuple(batch)] = self._align_batch(imgs, ctf, batch, seeds if route == PATH_SEEDED else None)
                done = sum(len(b) for b in parts)
                report(done / m, f"aligned {done}/{m} images")
                logger.info("HEMNMA: aligned %d/%d images (%.1f s)", done, m, time.time() - t0)
        result = _gather(parts, m)
        if seeds is not None:
            result = self._fall_back(imgs, ctf, result, path)
        result.path = path
        return result

    def _align_batch(self, imgs, ctf, rows: np.ndarray, seeds: Optional[AlignmentResult]) -> AlignmentResult:
        batch = imgs[torch.as_tensor(rows, device=self.device)]
        mb = len(rows)
        ctf_b = None if ctf is None else (ctf if ctf.batch_size == 1 else ctf.select(rows))
        img_s, filt_s = self.search.images(batch), self.search.filters(ctf_b, mb)
        if seeds is None:
            owner, rot0, q0, s0 = self.global_search(img_s, filt_s)
        else:
            owner, rot0, q0, s0 = self.seeded_candidates(seeds, rows, img_s, filt_s)
        # A seed's candidates are one basin: the best of them alone goes to the working size.
        # The global path's best refined candidates are ranked again at the working size
        # (refine_final's keep).
        keep = self.config.n_final * FINAL_RANKED if seeds is None else 1
        iters = self.config.search_iters if seeds is None else self.config.seed_search_iters
        owner, rot1, q1, s1 = self.refine_candidates(img_s, filt_s, owner, rot0, q0, s0, mb, keep=keep, iters=iters)
        return self._final_stages(batch, ctf_b, owner, rot1, q1, s1, mb,
                                  keep=self.config.n_final if seeds is None else None,
                                  finish=None if seeds is None else self.config.seed_finish_chi2)

    def _fall_back(self, imgs, ctf, result: AlignmentResult, path: np.ndarray) -> AlignmentResult:
        """Seeded particles scoring clearly below the global path's scores take the global path.
        The spread of right answers' scores comes from the few reference particles and from the
        upper half of the seeded ones (many more; at 500 particles the 16 references' MAD put
        the spread at 0.006 where the seeded scores above their median gave 0.011, and sent 28
        right answers to the global path)."""
        reference = result.score[path == PATH_GLOBAL]
        median = np.median(reference)
        above = result.score[(path == PATH_SEEDED) & (result.score > median)] - median
        spread = 1.4826 * max(np.median(np.abs(reference - median)), np.median(above) if len(above) else 0.0) + 1e-6
        threshold = min(reference.min(), median - self.config.seed_fallback_mads * spread)
        poor = np.flatnonzero((path == PATH_SEEDED) & (result.score < threshold))
        logger.info("HEMNMA: %d of %d seeded particles fall below the global path's scores; "
                    "they take the global path", len(poor), int(np.sum(path == PATH_SEEDED)))
        for b0 in range(0, len(poor), self.config.batch_size):
            batch = poor[b0:b0 + self.config.batch_size]
            redo = self._align_batch(imgs, ctf, batch, None)
            better = redo.score > result.score[batch]
            for name in RESULT_ARRAYS:
                getattr(result, name)[batch[better]] = getattr(redo, name)[better]
        path[poor] = PATH_FALLBACK
        return result

    # ---------------------------------------------------- stage 1: the global search, or the seeds
    def global_search(self, img_s: torch.Tensor, filt_s: torch.Tensor):
        """The ``n_candidates`` best distinct rotations of each image (search size) against
        every reference projection, with the best grid amplitudes and shift of each.
        Returns (owner (C,) image index of each candidate, rotations (C, 3, 3), amplitudes
        (C, K) Å, shifts (C, 2) search px). Refuses contrast-inverted images."""
        cfg, refs = self.config, self._reference_projections()
        scores, best_shift, anti = _global_search(refs["spectra"], img_s, filt_s,
                                                  self.search.max_shift(cfg.max_shift_px))
        scores_np = scores.cpu().numpy()
        check_contrast(scores_np.max(1), anti.cpu().numpy())
        mb = img_s.shape[0]
        picks = [_distinct_candidates(scores_np[i], refs["rotation_index"], refs["rotations"],
                                      cfg.n_candidates, cfg.angular_step_deg, adaptive=True)
                 for i in range(mb)]
        pick = np.concatenate(picks)                                                   # (C,)
        owner = torch.as_tensor(np.repeat(np.arange(mb), [len(p) for p in picks]), device=self.device)
        rot0 = refs["rotation_tensor"][torch.as_tensor(refs["rotation_index"][pick], device=self.device)]
        if self.k:
            q0, s0, _ = _amplitude_grid_search(self.search.model, img_s[owner], filt_s[owner], rot0,
                                               refs["grid"], self.search.max_shift(cfg.max_shift_px))
        else:
            q0 = torch.zeros(len(pick), 0, device=self.device)
            s0 = best_shift[owner, torch.as_tensor(pick, device=self.device)]
        return owner, rot0, q0, s0

    def _reference_projections(self) -> dict:
        """Spectra of the global search's references (rotations x amplitude seeds), the
        rotation of each and the amplitude grid of the candidates; built on first use."""
        if self._references is not None:
            return self._references
        cfg, k, device, t0 = self.config, self.k, self.device, time.time()
        lo, hi = self.amplitude_range[:, 0], self.amplitude_range[:, 1]
        mid = 0.5 * (lo + hi)
        seeds = [mid]
        if cfg.amplitude_seeds > 1:
            frac = (np.arange(cfg.amplitude_seeds) + 0.5) / cfg.amplitude_seeds
            for i in range(k):
                for f in frac:
                    s = mid.copy()
                    s[i] = lo[i] + f * (hi[i] - lo[i])
                    if not np.allclose(s, mid):
                        seeds.append(s)
        seeds = np.array(seeds).reshape(len(seeds), k)
        rots, n_psi = rotation_grid(cfg.angular_step_deg, return_n_psi=True)
        rot_t = torch.as_tensor(rots, dtype=torch.float32, device=device)
        directions = rot_t[::n_psi]                 # psi = 0 of every projection direction
        psi = torch.arange(n_psi, device=device, dtype=torch.float32) * (2 * math.pi / n_psi)
        spectra = []
        for sd in seeds:
            q = torch.as_tensor(sd, dtype=torch.float32, device=device).expand(len(directions), k)
            for start in range(0, len(directions), 256):
                sl = slice(start, start + 256)
                p = self.search.model.project(directions[sl], q[sl],
                                              torch.zeros(directions[sl].shape[0], 2, device=device))
                p = _rotate_in_plane(p, psi)                                      # (Pc * n_psi, n, n)
                spectra.append(torch.fft.rfft2(p - p.mean(dim=(-2, -1), keepdim=True)))
        # Amplitude grid tried at every candidate pose: bin centres, at most ~256 combinations.
        n_grid = max(2, min(int(cfg.amplitude_grid), int(256 ** (1.0 / max(k, 1)) + 1e-9)))
        axes = [lo[i] + (np.arange(n_grid) + 0.5) / n_grid * (hi[i] - lo[i]) for i in range(k)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, k) if k else np.zeros((1, 0))
        self._references = {
            "spectra": torch.cat(spectra), "rotations": rots, "rotation_tensor": rot_t,
            "rotation_index": np.tile(np.arange(len(rots)), len(seeds)),
            "grid": torch.as_tensor(grid, dtype=torch.float32, device=device)}
        logger.info("HEMNMA: %d reference projections (%d rotations x %d amplitude seeds) in %.1f s",
                    len(self._references["spectra"]), len(rots), len(seeds), time.time() - t0)
        return self._references

    def seeded_candidates(self, seeds: AlignmentResult, rows: np.ndarray, img_s: torch.Tensor,
                          filt_s: torch.Tensor):
        """Candidates from a first answer per image: of the seed, two copies rotated by
        ``seed_perturbation_deg`` about the image x and y axes and the in-plane flip, the
        ``seed_starts`` that match the (low-passed, search-size) image best as they stand.
        Same return values as :meth:`global_search`."""
        a = np.radians(self.config.seed_perturbation_deg)
        turns = torch.as_tensor(np.stack([[0.0, 0.0, 0.0], [a, 0.0, 0.0], [0.0, a, 0.0], [0.0, 0.0, math.pi]]),
                                dtype=torch.float32, device=self.device)
        n_turn, mb = len(turns), len(rows)
        rot = torch.as_tensor(euler_to_matrix(seeds.angles[rows]), dtype=torch.float32, device=self.device)
        rot0 = torch.matmul(_rodrigues(turns.repeat(mb, 1)), rot.repeat_interleave(n_turn, 0))
        q = torch.as_tensor(seeds.amplitudes[rows], dtype=torch.float32, device=self.device)
        q0 = torch.minimum(torch.maximum(q, self.q_lo), self.q_hi).repeat_interleave(n_turn, 0)
        limit = self.search.max_shift(self.config.max_shift_px)
        s = self.search.shifts_here(torch.as_tensor(seeds.shifts[rows], dtype=torch.float32, device=self.device))
        s0 = s.clamp(-limit, limit).repeat_interleave(n_turn, 0)
        owner = torch.as_tensor(np.repeat(np.arange(mb), n_turn), device=self.device)
        smooth = self._search_lowpass()
        match = normalised_cross_correlation(
            _apply_filter(self.search.model.project(rot0, q0, s0), (filt_s * smooth)[owner]),
            _apply_filter(img_s, smooth.expand(mb, -1, -1))[owner])
        keep = min(max(1, int(self.config.seed_starts)), n_turn)
        order = torch.argsort(match.reshape(mb, n_turn), dim=1, descending=True)[:, :keep]
        sel = (order + torch.arange(mb, device=self.device)[:, None] * n_turn).reshape(-1)
        return owner[sel], rot0[sel], q0[sel], s0[sel]

    # --------------------------------------------------------------- stage 2: candidate refinement
    def refine_candidates(self, img_s, filt_s, owner, rot0, q0, s0, mb: int, keep: int, iters: int):
        """Joint local refinement of the candidates at the search size (low-passed images),
        ``iters`` iterations at most; keeps the ``keep`` best of each image. Returns (owner,
        rotations, amplitudes, shifts in search px) of those."""
        cfg = self.config
        r1, q1, s1, fit1 = _refine(self.search.model, img_s[owner], (filt_s * self._search_lowpass())[owner],
                                   rot0, q0, s0, self.q_lo, self.q_hi,
                                   self.search.max_shift(cfg.max_shift_px, 1.1), iters,
                                   chunk=REFINED_AT_ONCE[0])
        keep = min(keep, int(torch.bincount(owner, minlength=mb).min()))
        sel = _best_of_each(fit1.ncc, owner, mb, keep)
        return owner[sel], r1[sel], q1[sel], s1[sel]

    def _search_lowpass(self):
        """The Gaussian low-pass (n, n//2+1) of the search-size refinement (ones when off)."""
        width = self.config.search_lowpass
        ky = torch.fft.fftfreq(self.search.size, device=self.device)[:, None]
        kx = torch.fft.rfftfreq(self.search.size, device=self.device)[None, :]
        return torch.exp(-(kx * kx + ky * ky) / (2 * width ** 2)) if width else torch.ones_like(ky * kx)

    # -------------------------------------------- stages 3 and 4: final refinement and uncertainty
    def refine_final(self, img_w, filt_w, owner, rot1, q1, s1, mb: int, keep: Optional[int] = None,
                     finish: Optional[float] = None):
        """All-atom refinement of the kept candidates (search-size shifts ``s1``) at the working
        size (images ``img_w``, filters ``filt_w``); the best of each image. With ``keep``, of the
        candidates of each image (the same number for all) only the ``keep`` whose projections
        at the working size match it best, as they stand, are refined: at 12 copies of 4AKE
        (11.5 Å per search pixel) the low-passed search-size score put a refined candidate within
        5 degrees of the truth first for 85 % of 48 particles, the working-size score for 94 %
        (of 96 % that had one; 94 % among the :data:`FINAL_RANKED` best at the search size, the
        candidates it is given). Refining the search size's first too (as before) changed no
        4AKE figure and refined 1.6 candidates per image instead of 1. finish: the threshold of
        the unevaluated last step (:func:`_refine_chunk`; :data:`FINISH_CHI2` unless given, the
        seeded path's ``seed_finish_chi2``). Returns
        (rotations (mb, 3, 3), amplitudes (mb, K) Å, shifts (mb, 2) working px, the
        least-squares state there (:class:`_Fit`, ``.ncc`` the score))."""
        cfg = self.config
        s_work = self.work.shifts_here(self.search.shifts_input(s1))
        if keep is not None:
            match = normalised_cross_correlation(
                _apply_filter(self.work.model.project(rot1, q1, s_work), filt_w[owner]), img_w[owner])
            sel = _best_of_each(match, owner, mb, min(keep, len(owner) // mb))
            owner, rot1, q1, s_work = owner[sel], rot1[sel], q1[sel], s_work[sel]
        r2, q2, s2, fit = _refine(self.work.model, img_w[owner], filt_w[owner], rot1, q1, s_work,
                                  self.q_lo, self.q_hi, self.work.max_shift(cfg.max_shift_px, 1.1),
                                  cfg.refine_iters, chunk=REFINED_AT_ONCE[1],
                                  finish=FINISH_CHI2 if finish is None else finish)
        best = _best_of_each(fit.ncc, owner, mb, 1)
        return r2[best], q2[best], s2[best], fit.select(best)

    def uncertainty(self, fit: _Fit) -> dict:
        """The Laplace uncertainty (:func:`_laplace_std`) of each image's answer at the working
        size, from :meth:`refine_final`'s least-squares state there: amplitude_std (M, K) Å,
        angle_std (M,) degrees (the RMS length of the three axis-angle components), shift_std
        (M,) px of the input images."""
        k = self.k
        std = _laplace_std(fit, self.work.model.n_params, self.work.size).cpu().numpy()
        angle = np.degrees(np.sqrt((std[:, k:k + 3] ** 2).sum(1)))
        shift = np.sqrt((std[:, k + 3:k + 5] ** 2).sum(1)) * (self.box / self.work.size)
        return {"amplitude_std": std[:, :k], "angle_std": angle, "shift_std": shift}

    def _final_stages(self, batch, ctf_b, owner, rot1, q1, s1, mb: int,
                      keep: Optional[int] = None, finish: Optional[float] = None) -> AlignmentResult:
        """:meth:`refine_final` (``keep``: see there) and :meth:`uncertainty` of input images
        ``batch`` (mb, box, box)."""
        img_w, filt_w = self.work.images(batch), self.work.filters(ctf_b, mb)
        rot, q, s_work, fit = self.refine_final(img_w, filt_w, owner, rot1, q1, s1, mb, keep, finish)
        return AlignmentResult(amplitudes=q.double().cpu().numpy(),
                               angles=matrix_to_euler(rot.double().cpu().numpy()),
                               shifts=self.work.shifts_input(s_work).double().cpu().numpy(),
                               score=fit.ncc.double().cpu().numpy(),
                               **self.uncertainty(fit))

    def polish(self, images: ArrayLike, start: AlignmentResult, ctf=None) -> AlignmentResult:
        """The final refinement and the uncertainty alone (:meth:`refine_final`,
        :meth:`uncertainty`), from a given answer per image (images (M, box, box), ``start`` its
        amplitudes, angles and shifts): re-fits particles whose answer is already close, e.g.
        after the image model changed. Keeps ``start.path``."""
        imgs = _as_images(images, self.device)
        m = imgs.shape[0]
        if start.amplitudes.shape != (m, self.k):
            raise ValueError(f"The answer to polish must give ({m}, {self.k}) amplitudes, "
                             f"got {start.amplitudes.shape}.")
        parts = {}
        for b0 in range(0, m, self.config.batch_size):
            rows = np.arange(b0, min(m, b0 + self.config.batch_size))
            mb, batch = len(rows), imgs[b0:b0 + len(rows)]
            ctf_b = None if ctf is None else (ctf if ctf.batch_size == 1 else ctf.select(rows))
            t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=self.device)  # noqa: E731
            q = torch.minimum(torch.maximum(t(start.amplitudes[rows]), self.q_lo), self.q_hi)
            parts[tuple(rows)] = self._final_stages(
                batch, ctf_b, torch.arange(mb, device=self.device),
                t(euler_to_matrix(np.asarray(start.angles[rows], dtype=np.float64))), q,
                self.search.shifts_here(t(start.shifts[rows])), mb)
        result = _gather(parts, m)
        result.path = None if start.path is None else np.array(start.path)
        return result


#: The global path ranks this many times ``n_final`` of each image's refined candidates, the
#: best at the search size, again at the working size (:meth:`Aligner.refine_final`): at 12
#: copies of 4AKE, of 24 candidates per image, the one within 5 degrees of the truth was among
#: the 4 best at the search size for 94 % of 48 particles, among all for 96 %; projecting all
#: at the working size cost 0.11 CPU s per image at 60 copies (5,000 points).
FINAL_RANKED = 4


def _best_of_each(score: torch.Tensor, owner: torch.Tensor, mb: int, keep: int) -> torch.Tensor:
    """Indices (mb * keep,) of the ``keep`` highest ``score`` (C,) of each of mb images (owner
    (C,) the image of each; every image has at least ``keep``), image by image, best first."""
    order = torch.argsort(score, descending=True)
    order = order[torch.sort(owner[order], stable=True).indices]       # by image, best first
    start = torch.searchsorted(owner[order], torch.arange(mb, device=owner.device))
    return order[(start[:, None] + torch.arange(keep, device=owner.device)).reshape(-1)]


def reference_count(m: int, most: int) -> int:
    """How many of ``m`` seeded particles take the global path as the reference: a twentieth,
    at least 8 and at most ``most`` (never more than ``m``). They give the median and the spread
    of the scores of right answers (:meth:`Aligner._fall_back`)."""
    return min(m, max(8, min(int(most), math.ceil(m / 20))))


def _gather(parts: dict, m: int) -> AlignmentResult:
    """One AlignmentResult of M images from results of batches keyed by their row indices."""
    first = next(iter(parts.values()))
    out = {n: np.zeros((m,) + getattr(first, n).shape[1:]) for n in RESULT_ARRAYS}
    for rows, res in parts.items():
        for n in RESULT_ARRAYS:
            out[n][list(rows)] = getattr(res, n)
    return AlignmentResult(**out)


def _as_images(images, device) -> torch.Tensor:
    t = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    t = t.to(device=device, dtype=torch.float32)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[-1] != t.shape[-2]:
        raise ValueError(f"Images must be square, shape (M, box, box); got {tuple(t.shape)}.")
    return t


# ---------------------------------------------------- image sizes: cropping, filters, pixel frames

class _Scale:
    """One image size of the alignment: its model, its pixel size and the conversions of
    shifts between its pixels and those of the input images. With ``anti_alias`` (the final
    refinement's size) a size below the box draws its atoms :data:`ANTI_ALIAS_PX` wider and
    its filters undo it; the search size leaves that to its low-pass (``search_lowpass``)."""

    def __init__(self, size: int, box: int, pixel_size: float, model_args, device, anti_alias: bool = False):
        self.size, self.box = int(size), int(box)
        self.pixel_size = pixel_size * box / size            # Å/px at this size
        # Å: the atoms' widening against aliasing (ANTI_ALIAS_PX), undone by the filters.
        self.blur = ANTI_ALIAS_PX * self.pixel_size if anti_alias and self.size < self.box else 0.0
        coords, modes, sigma, weights = model_args
        self.model = _Model(coords, modes, np.sqrt(np.asarray(sigma) ** 2 + self.blur ** 2), weights,
                            self.size, self.pixel_size, device)
        self.device = device

    def shifts_here(self, shifts_px: torch.Tensor) -> torch.Tensor:
        """Input-image pixels -> pixels of this size."""
        return shifts_px * (self.size / self.box)

    def shifts_input(self, shifts: torch.Tensor) -> torch.Tensor:
        """Pixels of this size -> input-image pixels."""
        return shifts * (self.box / self.size)

    def max_shift(self, max_shift_px: float, margin: float = 1.0) -> float:
        """The largest shift in pixels of this size (``margin``: slack of the refinements)."""
        return max_shift_px * self.size / self.box * margin

    def images(self, batch: torch.Tensor) -> torch.Tensor:
        """Input images (B, box, box) at this size (:func:`_crop`: their noise stays white)."""
        return _crop(batch, self.size)

    def filters(self, ctf, m: int) -> torch.Tensor:
        """(M, size, size//2+1) filters of the projections at this size (:func:`_filters`)."""
        return _filters(ctf, m, self.size, self.pixel_size, self.device, torch.float32, source_box=self.box,
                        blur=self.blur)


def _crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images (B, n, n) Fourier-cropped to (B, size, size) *without* the pixel-blur correction:
    white noise stays white (with the correction its high frequencies would be damped, and a
    least-squares fit weighing all pixels alike would misjudge its noise); the model side
    carries the blur instead (:func:`_filters` with ``source_box``)."""
    return fourier_crop(images, size, correct_pixel_blur=False)


#: Projections at a size coarser than the images (reduced by :func:`_crop`) draw every atom
#: wider by this many pixels of that size (in quadrature) and undo the extra Gaussian blur in
#: their filter (:func:`_filters` ``blur``): the same projection on the frequencies the crop
#: keeps, but with far less of the content above the coarse Nyquist frequency aliased into
#: them. The crop has no such aliases; without the blur the model's 1 Å atoms at 2 Å/px put
#: them into its Jacobian and the Laplace uncertainty counted 3.5 % too much information.
ANTI_ALIAS_PX = 0.75


def _filters(ctf, m: int, n: int, pixel_size: float, device, dtype,
             source_box: Optional[int] = None, blur: float = 0.0) -> torch.Tensor:
    """(M, n, n//2+1): what projections at n px (``pixel_size`` Å/px) are multiplied by to match
    the images: the CTF (or 1) times the Nyquist mask and, for images of ``source_box`` px
    reduced to n px by :func:`_crop`, the ratio ``sinc(f n / source_box) / sinc(f)`` per axis
    (``f`` cycles/px) that turns a projection integrated over the n-px pixel into one
    integrated over the input pixel (the inverse of :func:`fourier_crop`'s correction); blur:
    Å, the width the atoms of the projections were widened by (:data:`ANTI_ALIAS_PX`), undone
    by ``exp(2 pi^2 blur^2 |f|^2)`` (``f`` cycles/Å)."""
    mask = _nyquist_mask(n, device, dtype)
    fy = torch.fft.fftfreq(n, device=device, dtype=dtype)[:, None]
    fx = torch.fft.rfftfreq(n, device=device, dtype=dtype)[None, :]
    if source_box is not None and source_box != n:
        r = n / source_box
        mask = mask * (torch.sinc(fy * r) * torch.sinc(fx * r) / (torch.sinc(fy) * torch.sinc(fx)))
    if blur > 0:
        mask = mask * torch.exp(2 * math.pi ** 2 * (blur / pixel_size) ** 2 * (fy * fy + fx * fx))
    if ctf is None:
        return mask.expand(m, -1, -1)
    from ..imaging.ctf import ctf_image
    if ctf.batch_size not in (1, m):
        raise ValueError(f"The CTF describes {ctf.batch_size} images but {m} images were given.")
    c = ctf_image(ctf, n, pixel_size, device=device, dtype=dtype) * mask
    return c.expand(m, -1, -1)


def _nyquist_mask(n: int, device, dtype) -> torch.Tensor:
    mask = torch.ones(n, n // 2 + 1, device=device, dtype=dtype)
    if n % 2 == 0:
        mask[n // 2, :] = 0
        mask[:, n // 2] = 0
    return mask


def _noise_dof(n: int) -> int:
    """Independent real values of an n x n image whose Nyquist row and column are removed
    (:func:`fourier_crop` does so for even n): the residual's degrees of freedom before fitting."""
    return n * n - (2 * n - 1 if n % 2 == 0 else 0)


# -------------------------------------------------------------------------- stage 1: global search

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


def _global_search(ref_ft: torch.Tensor, img: torch.Tensor,
                   filt: torch.Tensor, max_shift: float):
    """NCC of every image (M, n, n) with every reference spectrum (P, n, n//2+1) over integer
    shifts within ``max_shift`` px. Returns scores (M, P), the best shifts (M, P, 2) px and
    each image's best anti-correlation (M,): the largest ``-NCC`` over references and shifts,
    which beats the best score when the image's contrast is inverted.

    The cross-correlations at the S shifts of the window are one real matrix product,
    (M S, 2H) phase-shifted image half-spectra against (2H, P) reference half-spectra (real
    and imaginary parts side by side, Parseval weights on the images), when S is at most
    :data:`SEARCH_GEMM_SHIFTS`; with more shifts, an inverse FFT per image and reference
    gives every shift at once (:func:`_search_fft`). Both are the same sums: at 32 px and 9
    shifts (5 px at 128 px), the product took 91 -> 14 ms per image on one Intel Xeon thread."""
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
    gemm = len(flat) <= SEARCH_GEMM_SHIFTS
    if gemm:
        # cc[s] = (1/n^2) sum_half w_k Re(F_img(k) e^{2 pi i k.d_s / n} conj(F_ref(k))): the
        # inverse rfft2 at displacement d_s = flat[s] (row dy, column dx of the map).
        dy, dx = flat // n, flat % n
        ky = torch.fft.fftfreq(n, 1.0 / n, device=img.device, dtype=img.dtype)[:, None]
        kx = torch.fft.rfftfreq(n, 1.0 / n, device=img.device, dtype=img.dtype)[None, :]
        phase = torch.polar(wgt / (n * n) * torch.ones_like(ky),
                            (2 * math.pi / n) * (ky[None] * dy[:, None, None].to(img.dtype)
                                                 + kx[None] * dx[:, None, None].to(img.dtype)))
        shifted = torch.view_as_real(f_img[:, None] * phase[None])          # (M, S, n, h, 2)
        shifted = shifted.reshape(m * len(flat), -1)
    block = SEARCH_REFERENCES if gemm else 64  # FFT tiles of 16 images x 64 references stay in cache
    for start in range(0, ref_ft.shape[0], block):
        f_ref = ref_ft[start:start + block]
        power = (f_ref.real ** 2 + f_ref.imag ** 2).reshape(f_ref.shape[0], -1)
        ref_norm = torch.sqrt(torch.matmul(filt2, power.T) + 1e-30)      # (M, Pc)
        if gemm:
            cc = torch.matmul(shifted, torch.view_as_real(f_ref).reshape(f_ref.shape[0], -1).T)
            cc = cc.reshape(m, len(flat), -1).transpose(1, 2)                # (M, Pc, S)
        else:
            cc = _search_fft(f_img, f_ref, n, flat)
        val, arg = cc.max(-1)
        norm = img_norm[:, None] * ref_norm
        scores[:, start:start + f_ref.shape[0]] = val / norm
        best[:, start:start + f_ref.shape[0]] = window[arg].to(img.dtype)
        anti = torch.maximum(anti, (-cc.min(-1).values / norm).max(-1).values)
    return scores, best, anti


def _search_fft(f_img: torch.Tensor, f_ref: torch.Tensor, n: int, flat: torch.Tensor) -> torch.Tensor:
    """Cross-correlations (M, Pc, S) of image spectra (M, n, h) with reference spectra
    (Pc, n, h) at the flat map indices ``flat`` (S,), by inverse FFTs, 16 images at a time."""
    out = []
    for i0 in range(0, f_img.shape[0], 16):
        cc = torch.fft.irfft2(f_img[i0:i0 + 16, None] * f_ref.conj()[None], s=(n, n))
        out.append(cc.reshape(cc.shape[0], cc.shape[1], -1)[..., flat])
    return torch.cat(out)


#: With at most SEARCH_GEMM_SHIFTS shifts in its window (9 at the defaults), the global
#: search scores blocks of SEARCH_REFERENCES references by one matrix product each; the
#: inverse FFTs, whose cost does not grow with the window, were as fast at about 150 shifts
#: (32 px, one Intel Xeon thread: 14 / 39 / 122 ms per image at 9 / 49 shifts / by FFT).
SEARCH_REFERENCES, SEARCH_GEMM_SHIFTS = 1024, 128


def _half_plane_weights(n: int, device, dtype) -> torch.Tensor:
    """Parseval weights of an rfft2 half-plane (n, n//2+1): columns counted twice except 0 and Nyquist."""
    w = torch.full((n // 2 + 1,), 2.0, device=device, dtype=dtype)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return w


def _shift_window(max_shift: float, n: int, device):
    """The integer particle displacements within ``max_shift`` px of the box centre, as pose
    shifts (S, 2) px, and their flat indices (S,) in an n x n cross-correlation map."""
    r = int(math.ceil(max_shift))
    d = torch.arange(-r, r + 1, device=device)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    keep = (dx * dx + dy * dy) <= (max_shift + 0.5) ** 2
    dx, dy = dx[keep], dy[keep]
    return particle_offset_px(torch.stack([dx, dy], -1)), (dy % n) * n + (dx % n)


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


#: The global search hands on more than ``n_candidates`` distinct rotations of an image whose
#: ranking is flat: every one scoring within this fraction of the spread between its best score
#: and the worst of its :data:`CANDIDATE_POOL` x ``n_candidates`` best distinct rotations, up to
#: :data:`CANDIDATE_MOST` x ``n_candidates``. A structure whose search-size projections tell
#: few orientations apart (an assembly of 12 copies of 4AKE, 11.5 Å per search pixel, nearly
#: D4-symmetric at that resolution) ranks the rotation nearest the truth up to 20th; of 48
#: particles 88 % had it among the best 8, 98 % among those within half the spread (14 per
#: image on average); 4AKE itself (4 Å per search pixel) had it among the best 8 for all and
#: keeps 8.7 per image (128 px, SNR 0.1, CTF 0.5 µm).
CANDIDATE_SPREAD_FRACTION, CANDIDATE_POOL, CANDIDATE_MOST = 0.5, 8, 4


def _distinct_candidates(scores: np.ndarray, rot_index: np.ndarray, rots: np.ndarray,
                         n_keep: int, min_angle: float, adaptive: bool = False) -> np.ndarray:
    """Indices into ``scores`` (P,) of the ``n_keep`` best references of one image whose
    rotations (``rots[rot_index]``) differ by more than ``min_angle`` degrees (greedy
    non-maximum suppression); fewer distinct ones than asked repeat the best. With ``adaptive``,
    at least ``n_keep`` and more where the ranking is flat (:data:`CANDIDATE_SPREAD_FRACTION`)."""
    want = n_keep * CANDIDATE_POOL if adaptive else n_keep
    order = np.argsort(-scores)[: max(50, 30 * want)]
    # The best reference of each rotation (the others are within 0 degrees of it).
    _, first = np.unique(rot_index[order], return_index=True)
    order = order[np.sort(first)]
    mats = rots[rot_index[order]].reshape(len(order), 9)
    cos_min = 1.0 + 2.0 * math.cos(math.radians(min_angle))   # trace(A^T B) at min_angle apart
    free = np.ones(len(order), dtype=bool)
    chosen = []
    for i in range(len(order)):
        if not free[i]:
            continue
        chosen.append(order[i])
        if len(chosen) == want:
            break
        free[i:] &= mats[i:] @ mats[i] < cos_min               # trace(A^T B) = sum of products
    chosen = np.array(chosen)
    if adaptive and len(chosen) > n_keep:
        s = scores[chosen]
        close = int(np.sum(s[0] - s < CANDIDATE_SPREAD_FRACTION * (s[0] - s[-1])))
        chosen = chosen[:min(max(n_keep, close), n_keep * CANDIDATE_MOST)]
    if len(chosen) < n_keep:             # fewer distinct ones than asked: repeat the best
        chosen = np.concatenate([chosen, np.repeat(chosen[:1], n_keep - len(chosen))])
    return chosen


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


# ----------------------------------- stages 2 and 3: the deformable model and its local refinement

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


#: On a CPU, :meth:`_Model.project_with_jacobian` forms the Jacobians of this many bytes of
#: intermediate products at a time (about a problem of 1,700 atoms at 64 px).
JACOBIAN_BLOCK_BYTES = 4 << 20

#: On a CPU, projections (:meth:`_Model.project`) take as many problems at a time as keep two
#: of their pixel profiles, (B, N, n) float32 each, within this many bytes
#: (:meth:`_Model.problems_at_once`), so they stay in the cache between the steps that make and
#: use them. 4AKE at 64 px (1,656 atoms), blocks of 4 instead of 512 (one Intel Xeon thread):
#: a projection 1.98 -> 0.66 ms.
PROFILE_BLOCK_BYTES = 4 << 20

#: Problems refined together (Levenberg-Marquardt's steps batched over them) at the search and
#: at the working size. The Jacobian draws its profiles in blocks of its own
#: (:data:`JACOBIAN_BLOCK_BYTES`), so these bound only the memory (the derivatives, (D, n, n)
#: float32 per problem) and spread the per-step work of the solver: 16 instead of 4 problems at
#: 64 px took the seeded path of 256 particles from 17.8 to 14.2 ms per image (best of 4, one
#: AMD EPYC thread).
REFINED_AT_ONCE = (64, 16)


class _Model:
    """Projections of a deformable Gaussian-atom model and their Jacobians at one image size."""

    def __init__(self, coords, modes, sigma, weights, box, pixel_size, device, dtype=torch.float32):
        self.coords = torch.as_tensor(coords, dtype=dtype, device=device)
        self.modes = torch.as_tensor(modes, dtype=dtype, device=device)
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
            x = self.coords + torch.einsum("bk,knd->bnd", q[sl], self.modes)
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
        x = self.coords + torch.einsum("bk,knd->bnd", q, self.modes)
        y = torch.matmul(x, rot.transpose(1, 2))                         # (B, N, 3) rotated, Å
        offset = particle_offset_px(shifts) + self.box // 2
        px = y[..., 0] / ps + offset[:, 0:1]
        py = y[..., 1] / ps + offset[:, 1:2]
        vrot = torch.einsum("bij,knj->bkni", rot[:, :2, :], self.modes) / ps   # (B, K, N, 2)
        zero, d_shift = torch.zeros_like(px), particle_offset_px(torch.ones_like(px))
        yx, yy, yz = y[..., 0] / ps, y[..., 1] / ps, y[..., 2] / ps
        dpx = torch.cat([vrot[..., 0], torch.stack([zero, yz, -yy, d_shift, zero], 1)], 1)
        dpy = torch.cat([vrot[..., 1], torch.stack([-yz, zero, yx, zero, d_shift], 1)], 1)
        return px, py, y, dpx, dpy


def _apply_filter(x: torch.Tensor, filt: Optional[torch.Tensor]) -> torch.Tensor:
    """Multiply the spectrum of images (B, ..., n, n) by filt (B, n, n//2+1) (None: unchanged)."""
    if filt is None:
        return x
    n = x.shape[-1]
    f = filt if x.ndim == 3 else filt.reshape(filt.shape[:1] + (1,) * (x.ndim - 3) + filt.shape[1:])
    return torch.fft.irfft2(torch.fft.rfft2(x) * f, s=(n, n))


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


def normalised_cross_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """NCC of image pairs (..., n, n) -> (...): Pearson correlation over all pixels."""
    a = a - a.mean(dim=(-2, -1), keepdim=True)
    b = b - b.mean(dim=(-2, -1), keepdim=True)
    num = (a * b).sum(dim=(-2, -1))
    return num / torch.sqrt((a * a).sum(dim=(-2, -1)) * (b * b).sum(dim=(-2, -1)) + 1e-30)


def _refine(model: _Model, images: torch.Tensor, filt: Optional[torch.Tensor], rot, q, shifts,
            q_lo, q_hi, max_shift, iters: int, chunk: int, finish: float = 0.0):
    """Levenberg-Marquardt on (amplitudes, rotation, shifts) for B problems; returns the
    refined (rot, q, shifts) and the least-squares state there (:class:`_Fit`; ``.ncc`` the NCC
    of each problem). finish: see :func:`_refine_chunk`."""
    parts = []
    for start in range(0, images.shape[0], chunk):
        sl = slice(start, start + chunk)
        parts.append(_refine_chunk(model, images[sl], None if filt is None else filt[sl],
                                   rot[sl], q[sl], shifts[sl], q_lo, q_hi, max_shift, iters, finish))
    fit = _Fit(*(torch.cat([p[3][i] for p in parts]) for i in range(len(_Fit._fields))))
    return tuple(torch.cat([p[i] for p in parts]) for i in range(3)) + (fit,)


#: Levenberg-Marquardt stops for a problem when the Gauss-Newton step from where it stands would
#: lower the cost by less than this fraction of its noise variance (chi^2 by 0.01: the
#: parameters are within about a tenth of their standard deviation of the optimum), or when an
#: accepted step gained less than that.
CONVERGED_CHI2 = 1e-2


#: The final refinement's last step: a problem whose undamped Gauss-Newton step would lower the
#: cost by less than this many noise variances (the parameters within 0.7 standard deviations,
#: in the Mahalanobis sense, of the optimum) ...
FINISH_CHI2 = 0.5

#: ... and less than this fraction of what its last step gained (Gauss-Newton converging fast:
#: where the residual's curvature, which its model leaves out, matters, it converges slowly, and
#: a step from that model would stop short of the optimum).
FINISH_CONTRACTION = 0.1


def _refine_chunk(model: _Model, images, filt, rot, q, shifts, q_lo, q_hi, max_shift, iters,
                  finish: float = 0.0):
    """:func:`_refine` of one chunk. Each problem stops on its own (an active set): when it is
    within :data:`CONVERGED_CHI2` of the optimum, on steps rejected at large damping, or on a
    fit at the float32 precision of the image. With ``finish`` > 0 (noise variances, e.g.
    :data:`FINISH_CHI2`), a problem whose undamped Gauss-Newton step would lower the cost by
    less than that and than a fraction of its last step's gain (:data:`FINISH_CONTRACTION`), takes
    the step unevaluated, its least-squares state moved to first order (:meth:`_Fit.step`), and
    stops: one evaluation fewer on most problems."""
    rot, q, shifts = rot.clone(), q.clone(), shifts.clone()
    fit = _system(model, images, filt, rot, q, shifts)
    lam = torch.full((images.shape[0],), 1e-3, dtype=torch.float64, device=images.device)
    dof = max(_noise_dof(images.shape[-1]) - fit.jtj.shape[1] - 1, 1)
    active = torch.arange(images.shape[0], device=images.device)
    last_gain = torch.zeros(images.shape[0], dtype=torch.float64, device=images.device)
    for _ in range(iters):
        # The decrease of the cost the undamped Gauss-Newton step predicts, in noise variances.
        jtj, jtr, cost = fit.jtj[active], fit.jtr[active], fit.cost[active]
        step = _scaled_solve(jtj, jtr, 0.0)
        pred = (step * jtr).sum(1) / (cost / dof + 1e-30)
        finishing = (pred < finish) & (pred < FINISH_CONTRACTION * last_gain[active])
        if bool(finishing.any()):
            last = active[finishing]
            q[last], rot[last], shifts[last], delta = _take_step(step[finishing].to(images.dtype), q[last],
                                                                 rot[last], shifts[last], q_lo, q_hi, max_shift)
            for kept, new in zip(fit, fit.select(last).step(delta)):
                kept[last] = new
        near = finishing | (pred < CONVERGED_CHI2)
        active, jtj, jtr, cost = active[~near], jtj[~near], jtr[~near], cost[~near]
        if active.numel() == 0:
            break
        a = active
        delta = _scaled_solve(jtj, jtr, lam[a]).to(images.dtype)
        q_t, rot_t, s_t, _ = _take_step(delta, q[a], rot[a], shifts[a], q_lo, q_hi, max_shift)
        trial = _system(model, images[a], None if filt is None else filt[a], rot_t, q_t, s_t)
        better = trial.cost < cost
        gain = (cost - trial.cost) / (cost / dof + 1e-30)
        last_gain[a] = torch.where(better, gain.double(), last_gain[a])
        ok = a[better]
        q[ok], shifts[ok], rot[ok] = q_t[better], s_t[better], rot_t[better]
        for kept, new in zip(fit, trial):
            kept[ok] = new[better]
        lam[a] = torch.where(better, lam[a] * 0.3, lam[a] * 10).clamp(1e-8, 1e8)
        done = (better & (gain < CONVERGED_CHI2)) | (lam[a] > 1e4) | (fit.cost[a] < 1e-7 * fit.energy[a])
        active = a[~done]
    return rot, q, shifts, fit


def _curvature_units(curvature: torch.Tensor) -> torch.Tensor:
    """The units (B, D) ``u = sqrt(diag(curvature))`` of curvature matrices (B, D, D) that give
    every parameter unit curvature: ``curvature / (u_i u_j)`` has ones on its diagonal, and
    tests and floors on it do not depend on the parameters' units."""
    return torch.sqrt(torch.diagonal(curvature, dim1=1, dim2=2)).clamp_min(1e-150)


def _scaled_solve(jtj: torch.Tensor, jtr: torch.Tensor, lam) -> torch.Tensor:
    """Levenberg-Marquardt steps (B, D): ``(JtJ + (lam + 1e-9) diag(JtJ)) step = Jtr``, solved in
    the parameters scaled to unit curvature, so the damping and its floor act alike on every
    parameter whatever its unit. (A floor of 1e-9 times the largest diagonal, as before, held
    back the amplitudes of large assemblies: at 60 copies of 4AKE, 1 Å of a mode moves each
    atom by 1/300 Å, and the final refinement crept to its iteration limit in steps of 25 %.)"""
    d = _curvature_units(jtj)                                                 # (B, D)
    lam = torch.as_tensor(lam, dtype=jtj.dtype, device=jtj.device).reshape(-1, 1, 1)
    eye = torch.eye(jtj.shape[1], dtype=jtj.dtype, device=jtj.device)
    return torch.linalg.solve(jtj / (d[:, :, None] * d[:, None, :]) + (lam + 1e-9) * eye, jtr / d) / d


def _take_step(delta, q, rot, shifts, q_lo, q_hi, max_shift):
    """Parameters moved by steps delta (B, K + 6: amplitudes Å, axis-angle rad, shifts px, the
    scale last) within the amplitude box and the shift limit: (q, rot, shifts, delta with the
    bounds applied)."""
    k = q.shape[1]
    q_t = torch.minimum(torch.maximum(q + delta[:, :k], q_lo), q_hi)
    s_t = (shifts + delta[:, k + 3:k + 5]).clamp(-max_shift, max_shift)
    taken = torch.cat([q_t - q, delta[:, k:k + 3], s_t - shifts, delta[:, k + 5:]], 1)
    return q_t, torch.matmul(_rodrigues(delta[:, k:k + 3]), rot), s_t, taken


class _Fit(NamedTuple):
    """The least-squares state of B problems at their parameters (:func:`_system`): cost (B,)
    with the best scale and offset, NCC (B,), the normal equations jtj (B, D+1, D+1) and jtr
    (B, D+1) of the parameters plus the scale, the images' energy (B,), the residuals (B, n * n),
    the scales (B,) and the derivatives of the scaled projection (B, D+1, n * n) whose products
    the normal equations are."""
    cost: torch.Tensor
    ncc: torch.Tensor
    jtj: torch.Tensor
    jtr: torch.Tensor
    energy: torch.Tensor
    resid: torch.Tensor
    scale: torch.Tensor
    jac: torch.Tensor

    def select(self, index) -> "_Fit":
        return _Fit(*(x[index] for x in self))

    def step(self, delta: torch.Tensor) -> "_Fit":
        """The state after steps delta (B, D+1) of the parameters and the scale, to first order:
        the residual moved along the derivatives, the normal equations kept."""
        resid = self.resid - torch.matmul(delta[:, None], self.jac)[:, 0]
        cost = (resid * resid).sum(1)
        scale = self.scale + delta[:, -1]
        ncc = torch.sign(scale) * torch.sqrt(torch.clamp(1 - cost / (self.energy + 1e-30), min=0.0))
        jtr = self.jtr - torch.matmul(self.jtj, delta.double()[..., None])[..., 0]
        return _Fit(cost=cost, ncc=ncc, jtj=self.jtj, jtr=jtr, energy=self.energy, resid=resid,
                    scale=scale, jac=self.jac)


def _system(model: _Model, images: torch.Tensor, filt: Optional[torch.Tensor], rot, q, shifts) -> _Fit:
    """The least-squares state (:class:`_Fit`) of images (B, n, n) against the filtered
    projections at (rot, q, shifts); the free offset is eliminated exactly (centring)."""
    p, j = model.project_with_jacobian(rot, q, shifts)
    p, j = _apply_filter(p, filt), _apply_filter(j, filt)
    b = p.shape[0]
    pf = p.reshape(b, -1)
    pf = pf - pf.mean(1, keepdim=True)
    im = images.reshape(b, -1)
    im = im - im.mean(1, keepdim=True)
    jf = j.reshape(b, j.shape[1], -1)
    jf = jf - jf.mean(2, keepdim=True)
    pp, pi, ii = (pf * pf).sum(1), (pf * im).sum(1), (im * im).sum(1)
    scale = pi / (pp + 1e-30)
    resid = im - scale[:, None] * pf
    full = torch.cat([scale[:, None, None] * jf, pf[:, None]], 1)
    return _Fit(cost=(resid * resid).sum(1), ncc=pi / torch.sqrt(pp * ii + 1e-30),
                jtj=torch.matmul(full, full.transpose(1, 2)).double(),
                jtr=torch.matmul(full, resid[..., None])[..., 0].double(), energy=ii, resid=resid, scale=scale,
                jac=full)


# ---------------------------------------------------------------------------- stage 4: uncertainty

def _laplace_std(fit: _Fit, n_params: int, n: int) -> torch.Tensor:
    """Standard deviations (B, D) of the D = ``n_params`` parameters (amplitudes Å, rotation
    components rad, shifts px) at least-squares optima of images n x n px under white Gaussian
    noise, from their least-squares state there (:class:`_Fit`): the Laplace approximation of
    the posterior with the Gauss-Newton matrix, ``s^2 (J^T J)^-1``, J the derivatives of the
    filtered projection, scaled, with respect to the parameters, the scale and the offset,
    whose block of the inverse is taken (the pose, the other amplitudes, the scale and the
    offset free: marginal standard deviations). The noise variance is ``s^2 = cost / (n_dof -
    D - 2)`` (n_dof: :func:`_noise_dof`; D parameters, the scale and the offset were fitted).
    The offset is eliminated exactly by centring, the scale by its Schur complement. (The
    observed Hessian, with the residual's curvature, gave the same calibration at 128 px, SNR
    0.1, 200 particles: coverage of +-1.96 sigma 0.950 against 0.945, median sigma 3.66
    against 3.61 Å, at 2.4-2.9 ms per image more.) The noise must be white: :func:`_crop`
    keeps it so."""
    d, jtj = n_params, fit.jtj
    gn = jtj[:, :d, :d] - jtj[:, :d, d:] @ jtj[:, d:, :d] / jtj[:, d:, d:]    # the scale's Schur complement
    # In the parameters scaled to unit curvature (at 60 copies of 4AKE an amplitude's curvature
    # is 1e-9 of a rotation's).
    u = _curvature_units(gn)
    unit = u[:, :, None] * u[:, None, :]
    eye = torch.eye(d, dtype=gn.dtype, device=gn.device)
    cov = torch.linalg.inv(gn / unit + 1e-12 * eye) / unit
    var = fit.cost.double() / max(_noise_dof(n) - d - 2, 1)
    return torch.sqrt(torch.clamp(torch.diagonal(cov, dim1=1, dim2=2), min=0.0) * var[:, None])
