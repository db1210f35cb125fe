"""The HEMNMA alignment, stage by stage: :func:`align_particles` (one call) and the
:class:`Aligner`, whose methods are the stages and pass :class:`Candidates` between them."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import NamedTuple, Optional, Union

import numpy as np
import torch

from ...imaging.geometry import euler_to_matrix, matrix_to_euler
from ...modes.deformation import LINEAR
from ...modes.nma import default_amplitude_range
from ...modes.reference import Reference
from ...progress import Progress, report
from .config import CONFIG_FIELDS, PATH_FALLBACK, PATH_GLOBAL, PATH_SEEDED, RESULT_ARRAYS, AlignConfig, AlignmentResult
from .least_squares import REFINED_AT_ONCE, Fit, refine
from .model import apply_filter, coarse_grain, normalised_cross_correlation, rodrigues
from .search import (amplitude_grid_search, check_contrast, distinct_candidates, in_plane_rotations, rotation_grid,
                     score_references)
from .sizes import ImageScale, as_images
from .uncertainty import laplace_std

logger = logging.getLogger(__name__)

__all__ = ["align_particles", "alignment_deformation",
           "Aligner", "Candidates", "ScaledBatch", "reference_count", "FINAL_RANKED",
           "AT_LIMIT_FRACTION", "RANGE_GROWTH_STEPS", "CONFORMATION_GRID_MOST"]

ArrayLike = Union[np.ndarray, torch.Tensor]


class Candidates(NamedTuple):
    """C candidate answers for the mb images of a batch (several per image, or one), what the
    stages hand on to each other.

    owner: (C,) int64, the index in the batch of the image each candidate belongs to;
    rotations: (C, 3, 3) the pose's matrices A (:mod:`geometry`); amplitudes: (C, K) Å;
    shifts: (C, 2) (x, y) in pixels of the *input* images (``box`` px), whatever size the stage
    that made them worked at, with the pose's sign: RELION's origin, the particle's centre sits
    at the box centre *minus* the shift (:func:`geometry.particle_offset_px`), as in
    :class:`AlignmentResult`. A stage working at another size converts them on the way in and
    out (:meth:`~.sizes.ImageScale.shifts_here`, :meth:`~.sizes.ImageScale.shifts_input`).
    """
    owner: torch.Tensor
    rotations: torch.Tensor
    amplitudes: torch.Tensor
    shifts: torch.Tensor

    def select(self, index) -> "Candidates":
        """The candidates at ``index`` (a LongTensor or a boolean mask over C)."""
        return Candidates(*(x[index] for x in self))


class ScaledBatch(NamedTuple):
    """The images of a batch at one size of the alignment (:class:`~.sizes.ImageScale`) and the
    filters of the projections there: images (mb, n, n), filters (mb, n, n//2+1)."""
    images: torch.Tensor
    filters: torch.Tensor

    @property
    def count(self) -> int:
        """mb, the number of images."""
        return int(self.images.shape[0])


def align_particles(images: ArrayLike, coords: np.ndarray, modes: np.ndarray, pixel_size: float, *,
                    ctf=None, sigma: Union[float, np.ndarray] = 1.0, weights: Optional[np.ndarray] = None,
                    blocks: Optional[np.ndarray] = None,
                    amplitude_range: Optional[np.ndarray] = None, seeds: Optional[AlignmentResult] = None,
                    config: Optional[AlignConfig] = None, device: Union[str, torch.device] = "cpu",
                    seed: int = 0, progress: Optional[Progress] = None, **settings) -> AlignmentResult:
    """HEMNMA alignment of particle images in one call: ``Aligner(...).align(...)``.

    images: (M, box, box); coords (N, 3) Å centred; modes (K, N, 3); sigma, weights, blocks: the
    atoms' widths (Å), weights and residues (:class:`~continuousflex_dl.core.modes.reference.Reference`);
    pixel_size Å/px; ctf, amplitude_range, seeds, progress: see :class:`Aligner` and
    :meth:`Aligner.align`. config: an :class:`AlignConfig` (default: the 'normal' preset), and
    ``settings``: single fields of it (``max_shift_px=3``, ``n_candidates=4``, ...). seed: the
    method is deterministic; kept for the project's seeding rule. Returns an
    :class:`AlignmentResult`.
    """
    del seed  # no random choices
    unknown = set(settings) - CONFIG_FIELDS
    if unknown:
        raise ValueError(f"Unknown alignment settings {sorted(unknown)}; AlignConfig has {sorted(CONFIG_FIELDS)}.")
    config = replace(config or AlignConfig(), **settings)
    imgs = as_images(images, device)
    aligner = Aligner(Reference(coords, modes, sigma, weights, blocks), pixel_size, imgs.shape[-1], config,
                      amplitude_range=amplitude_range, device=device)
    return aligner.align(imgs, ctf=ctf, seeds=seeds, progress=progress)


def alignment_deformation(reference: Reference, deformation: str, max_final_points: int) -> str:
    """The deformation an alignment asked for ``deformation`` (AlignConfig's) refines with:
    ``'rigid-blocks'`` where asked and the reference has residues (``reference.blocks``) and is
    refined atom by atom (at most ``max_final_points`` atoms), else ``'linear'`` (logged when it
    was not what was asked). Whatever turns the alignment's amplitudes into structures uses this."""
    if deformation == LINEAR:
        return LINEAR
    if reference.blocks is None or reference.n_atoms > max_final_points:
        logger.warning("HEMNMA: the %s are displaced linearly along the modes, not by rigid blocks (%s).",
                       "pseudoatoms" if reference.blocks is None else "beads",
                       "the reference has no residues" if reference.blocks is None else
                       f"the final refinement uses beads above {max_final_points} atoms")
        return LINEAR
    return deformation


class Aligner:
    """HEMNMA alignment of particle images against one flexible reference (the package's
    docstring).

    reference: the structure, its modes (K may be 0) and its atoms' widths and weights
    (:class:`~continuousflex_dl.core.modes.reference.Reference`, which validates them);
    pixel_size: Å/px and box: px of the images; config: :class:`AlignConfig`;
    amplitude_range: (K, 2) lowest and highest amplitude (Å) of each mode, default
    ``+-5 sqrt(N)`` Å (atoms moved by 5 Å RMS).

    Built once per set: the models at both sizes and, on first use, the reference projections
    of the global search (shared by every image). Stages, in the order :meth:`align` runs them,
    each taking and giving :class:`Candidates`: :meth:`global_search` (or
    :meth:`seeded_candidates`), :meth:`refine_candidates`, :meth:`refine_final`,
    :meth:`uncertainty` (:func:`~.uncertainty.laplace_std`).
    """

    def __init__(self, reference: Reference, pixel_size: float, box: int, config: AlignConfig = AlignConfig(), *,
                 amplitude_range: Optional[np.ndarray] = None, device: Union[str, torch.device] = "cpu"):
        config.check()
        if not isinstance(reference, Reference):
            raise ValueError("The aligner needs a modes.reference.Reference (structure, modes, atom widths "
                             f"and weights), got {type(reference).__name__}.")
        if not pixel_size > 0:
            raise ValueError(f"The pixel size must be positive (Å/px), got {pixel_size}.")
        coords, modes, n_atoms = reference.coords, reference.modes, reference.n_atoms
        sig, wts = reference.atom_sigma, reference.atom_weights
        self.k = k = reference.n_modes
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
        self.search = ImageScale(search, self.box, pixel_size, bead, self.device)
        final = (coords, modes, sig, wts)
        cell = pixel_size * self.box / work
        while len(final[0]) > config.max_final_points:
            final = coarse_grain(coords, modes, sig, wts, cell=cell)
            cell *= 1.25
        self.deformation = deformation = alignment_deformation(reference, config.deformation, config.max_final_points)
        blocks = reference.blocks if deformation != LINEAR else None
        self.work = ImageScale(work, self.box, pixel_size, final, self.device, anti_alias=True,
                               deformation=deformation, blocks=blocks)
        self.amplitude_range = amplitude_range
        self.q_lo = torch.as_tensor(amplitude_range[:, 0], dtype=torch.float32, device=self.device)
        self.q_hi = torch.as_tensor(amplitude_range[:, 1], dtype=torch.float32, device=self.device)
        self._references = None
        logger.info("HEMNMA: %d px images, %d atoms (%d beads in the search, %d points in the final "
                    "refinement), %d modes, %s deformation; search %d px, work %d px",
                    self.box, n_atoms, len(bead[0]), len(final[0]), k, deformation, search, work)

    # ------------------------------------------------------------------------------------- the set
    def align(self, images: ArrayLike, ctf=None, seeds: Optional[AlignmentResult] = None,
              progress: Optional[Progress] = None) -> AlignmentResult:
        """Align images (M, box, box) (numpy or torch, indexed ``[y, x]``); ctf: CTFParams of
        the images (one or M values) or None; seeds: a first answer per image (amplitudes,
        angles, shifts, e.g. a network's), which replaces the global search for all particles
        but ``seed_reference`` of them and those whose refined score stays clearly below the
        scores of the global path. progress: :data:`~continuousflex_dl.core.progress.Progress`,
        called with (images aligned, M, message) after each batch."""
        imgs = as_images(images, self.device)
        m = imgs.shape[0]
        if imgs.shape[-1] != self.box:
            raise ValueError(f"The images are {imgs.shape[-1]} px but the aligner was built for {self.box} px.")
        if ctf is not None and ctf.batch_size not in (1, m):
            raise ValueError(f"The CTF describes {ctf.batch_size} images but {m} images were given.")
        if seeds is not None and seeds.amplitudes.shape != (m, self.k):
            raise ValueError(f"The seeds must give ({m}, {self.k}) amplitudes, got {seeds.amplitudes.shape}.")
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
                report(progress, done, m, f"aligned {done}/{m} images")
                logger.info("HEMNMA: aligned %d/%d images (%.1f s)", done, m, time.time() - t0)
        result = _gather(parts, m)
        if seeds is not None:
            result = self._fall_back(imgs, ctf, result, path)
        result = self.grow_range(imgs, ctf, result)
        result.path = path
        return result

    def at_limit(self, amplitudes: np.ndarray) -> np.ndarray:
        """(M, K) bool: the amplitudes (M, K) Å at (within :data:`AT_LIMIT_FRACTION` of its
        width) the lowest or highest value of the amplitude range as it stands."""
        lo, hi = self.amplitude_range[:, 0], self.amplitude_range[:, 1]
        tol = AT_LIMIT_FRACTION * np.maximum(hi - lo, 1e-12)
        return (amplitudes <= lo + tol) | (amplitudes >= hi - tol)

    def grow_range(self, imgs, ctf, result: AlignmentResult) -> AlignmentResult:
        """The amplitude range grown where answers reach it: while particles have an amplitude
        at a limit (:meth:`at_limit`), that side of the mode's range moves out by half the
        range's width (:data:`RANGE_GROWTH_STEPS` times at most) and those particles are refined
        again from their answer (:meth:`polish`), keeping the better score. The global search
        keeps the range it was given (a wider grid of seeds lowers its resolution where the
        particles are). Sets ``result.at_limit`` and ``result.amplitude_range`` (the range as
        it ended; the aligner keeps it for its next images)."""
        for _ in range(RANGE_GROWTH_STEPS if self.k else 0):
            at = self.at_limit(result.amplitudes)
            rows = np.flatnonzero(at.any(1))
            if len(rows) == 0:
                break
            lo, hi = self.amplitude_range[:, 0], self.amplitude_range[:, 1]
            centre = 0.5 * (lo + hi)
            reached_lo = (at & (result.amplitudes < centre)).any(0)
            reached_hi = (at & (result.amplitudes >= centre)).any(0)
            half = 0.5 * (hi - lo)
            self.amplitude_range = np.stack([lo - reached_lo * half, hi + reached_hi * half], 1)
            self.q_lo = torch.as_tensor(self.amplitude_range[:, 0], dtype=torch.float32, device=self.device)
            self.q_hi = torch.as_tensor(self.amplitude_range[:, 1], dtype=torch.float32, device=self.device)
            logger.info("HEMNMA: %d particles at a limit of the amplitude range; range grown to %s Å and "
                        "those particles refined again", len(rows),
                        ", ".join(f"[{a:.0f}, {b:.0f}]" for a, b in self.amplitude_range))
            start = AlignmentResult(**{n: getattr(result, n)[rows] for n in RESULT_ARRAYS})
            ctf_rows = None if ctf is None else (ctf if ctf.batch_size == 1 else ctf.select(rows))
            redo = self.polish(imgs[torch.as_tensor(rows, device=self.device)], start, ctf=ctf_rows)
            better = redo.score >= result.score[rows]
            for name in RESULT_ARRAYS:
                getattr(result, name)[rows[better]] = getattr(redo, name)[better]
        result.at_limit = self.at_limit(result.amplitudes).any(1)
        result.amplitude_range = self.amplitude_range.copy()
        return result

    def _align_batch(self, imgs, ctf, rows: np.ndarray, seeds: Optional[AlignmentResult]) -> AlignmentResult:
        batch = imgs[torch.as_tensor(rows, device=self.device)]
        ctf_b = None if ctf is None else (ctf if ctf.batch_size == 1 else ctf.select(rows))
        at_search = ScaledBatch(self.search.images(batch), self.search.filters(ctf_b, len(rows)))
        cfg = self.config
        if seeds is None:
            start = self.global_search(at_search)
        else:
            start = self.seeded_candidates(seeds, rows, at_search)
        # A seed's candidates are one basin: the best of them alone goes to the working size.
        # The global path's best refined candidates are ranked again at the working size
        # (refine_final's keep).
        refined = self.refine_candidates(at_search, start, keep=cfg.n_final * FINAL_RANKED if seeds is None else 1,
                                         iters=cfg.search_iters if seeds is None else cfg.seed_search_iters)
        return self._final_stages(batch, ctf_b, refined,
                                  finish=cfg.finish_chi2 if seeds is None else cfg.seed_finish_chi2,
                                  keep=cfg.n_final if seeds is None else None)

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
    def global_search(self, at_search: ScaledBatch) -> Candidates:
        """The ``n_candidates`` best distinct rotations of each image (at the search size)
        against every reference projection, with the best grid amplitudes and shift of each
        (more candidates where an image's ranking is flat, :func:`~.search.distinct_candidates`).
        Refuses contrast-inverted images (:func:`~.search.check_contrast`) unless
        ``refuse_inverted`` is off."""
        cfg, refs = self.config, self._reference_projections()
        img_s, filt_s = at_search
        max_shift = self.search.max_shift(cfg.max_shift_px)
        scores, best_shift, anti = score_references(refs["spectra"], img_s, filt_s, max_shift)
        scores_np = scores.cpu().numpy()
        if cfg.refuse_inverted:
            check_contrast(scores_np.max(1), anti.cpu().numpy())
        mb = at_search.count
        picks = [distinct_candidates(scores_np[i], refs["rotation_index"], refs["rotations"],
                                     cfg.n_candidates, cfg.angular_step_deg, adaptive=True)
                 for i in range(mb)]
        pick = np.concatenate(picks)                                                   # (C,)
        owner = torch.as_tensor(np.repeat(np.arange(mb), [len(p) for p in picks]), device=self.device)
        rot = refs["rotation_tensor"][torch.as_tensor(refs["rotation_index"][pick], device=self.device)]
        if self.k:
            q, shift_search, _ = amplitude_grid_search(self.search.model, img_s[owner], filt_s[owner], rot,
                                                       refs["grid"], max_shift)
        else:
            q = torch.zeros(len(pick), 0, device=self.device)
            shift_search = best_shift[owner, torch.as_tensor(pick, device=self.device)]
        return Candidates(owner, rot, q, self.search.shifts_input(shift_search))

    def _reference_projections(self) -> dict:
        """Spectra of the global search's references (rotations x amplitude seeds), the
        rotation of each and the amplitude grid of the candidates; built on first use."""
        if self._references is not None:
            return self._references
        cfg, k, device, t0 = self.config, self.k, self.device, time.time()
        lo, hi = self.amplitude_range[:, 0], self.amplitude_range[:, 1]
        mid = 0.5 * (lo + hi)
        seeds = [mid]
        if cfg.conformation_seeds == "grid" and k and cfg.amplitude_seeds > 1:
            n_val = max(2, min(int(cfg.amplitude_seeds), int(CONFORMATION_GRID_MOST ** (1.0 / k) + 1e-9)))
            frac = (np.arange(n_val) + 0.5) / n_val
            axes = [lo[i] + frac * (hi[i] - lo[i]) for i in range(k)]
            grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, k)
            seeds += [s for s in grid if not np.allclose(s, mid)]
        elif cfg.amplitude_seeds > 1:
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
        psi = torch.arange(n_psi, device=device, dtype=torch.float32) * (360.0 / n_psi)       # degrees
        spectra = []
        for sd in seeds:
            q = torch.as_tensor(sd, dtype=torch.float32, device=device).expand(len(directions), k)
            for start in range(0, len(directions), 256):
                sl = slice(start, start + 256)
                p = self.search.model.project(directions[sl], q[sl],
                                              torch.zeros(directions[sl].shape[0], 2, device=device))
                p = in_plane_rotations(p, psi)                                    # (Pc * n_psi, n, n)
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

    def seeded_candidates(self, seeds: AlignmentResult, rows: np.ndarray, at_search: ScaledBatch) -> Candidates:
        """Candidates from a first answer per image (``seeds`` of the set, ``rows`` those of this
        batch): of the seed, two copies rotated by ``seed_perturbation_deg`` about the image x
        and y axes and the in-plane flip, the ``seed_starts`` that match the (low-passed,
        search-size) image best as they stand; amplitudes clamped to the amplitude range,
        shifts to the shift limit."""
        a = np.radians(self.config.seed_perturbation_deg)
        turns = torch.as_tensor(np.stack([[0.0, 0.0, 0.0], [a, 0.0, 0.0], [0.0, a, 0.0], [0.0, 0.0, math.pi]]),
                                dtype=torch.float32, device=self.device)
        n_turn, mb = len(turns), len(rows)
        rot = torch.as_tensor(euler_to_matrix(seeds.angles[rows]), dtype=torch.float32, device=self.device)
        rot0 = torch.matmul(rodrigues(turns.repeat(mb, 1)), rot.repeat_interleave(n_turn, 0))
        q = torch.as_tensor(seeds.amplitudes[rows], dtype=torch.float32, device=self.device)
        q0 = torch.minimum(torch.maximum(q, self.q_lo), self.q_hi).repeat_interleave(n_turn, 0)
        limit = self.search.max_shift(self.config.max_shift_px)
        shift = self.search.shifts_here(torch.as_tensor(seeds.shifts[rows], dtype=torch.float32, device=self.device))
        shift_search = shift.clamp(-limit, limit).repeat_interleave(n_turn, 0)
        owner = torch.as_tensor(np.repeat(np.arange(mb), n_turn), device=self.device)
        smooth = self._search_lowpass()
        match = normalised_cross_correlation(
            apply_filter(self.search.model.project(rot0, q0, shift_search), (at_search.filters * smooth)[owner]),
            apply_filter(at_search.images, smooth.expand(mb, -1, -1))[owner])
        keep = min(max(1, int(self.config.seed_starts)), n_turn)
        order = torch.argsort(match.reshape(mb, n_turn), dim=1, descending=True)[:, :keep]
        sel = (order + torch.arange(mb, device=self.device)[:, None] * n_turn).reshape(-1)
        return Candidates(owner, rot0, q0, self.search.shifts_input(shift_search)).select(sel)

    # --------------------------------------------------------------- stage 2: candidate refinement
    def refine_candidates(self, at_search: ScaledBatch, start: Candidates, keep: int, iters: int) -> Candidates:
        """Joint local refinement of the candidates at the search size (low-passed images),
        ``iters`` Levenberg-Marquardt iterations at most; keeps the ``keep`` best of each image
        (fewer if an image has fewer), image by image, best first."""
        mb, owner = at_search.count, start.owner
        rot, q, shift_search, fit = refine(self.search.model, at_search.images[owner],
                                           (at_search.filters * self._search_lowpass())[owner],
                                           start.rotations, start.amplitudes, self.search.shifts_here(start.shifts),
                                           self.q_lo, self.q_hi, self.search.max_shift(self.config.max_shift_px, 1.1),
                                           iters, chunk=REFINED_AT_ONCE[0])
        keep = min(keep, int(torch.bincount(owner, minlength=mb).min()))
        sel = _best_of_each(fit.ncc, owner, mb, keep)
        return Candidates(owner, rot, q, self.search.shifts_input(shift_search)).select(sel)

    def _search_lowpass(self):
        """The Gaussian low-pass (n, n//2+1) of the search-size refinement (ones when off)."""
        width = self.config.search_lowpass
        ky = torch.fft.fftfreq(self.search.size, device=self.device)[:, None]
        kx = torch.fft.rfftfreq(self.search.size, device=self.device)[None, :]
        return torch.exp(-(kx * kx + ky * ky) / (2 * width ** 2)) if width else torch.ones_like(ky * kx)

    # -------------------------------------------- stages 3 and 4: final refinement and uncertainty
    def refine_final(self, at_work: ScaledBatch, start: Candidates, finish: float,
                     keep: Optional[int] = None) -> tuple:
        """All-atom refinement of the candidates at the working size; the best of each image.
        With ``keep``, of the candidates of each image (the same number for all) only the
        ``keep`` whose projections at the working size match it best, as they stand, are
        refined: at 12 copies of 4AKE (11.5 Å per search pixel) the low-passed search-size
        score put a refined candidate within 5 degrees of the truth first for 85 % of 48
        particles, the working-size score for 94 % (of 96 % that had one; 94 % among the
        :data:`FINAL_RANKED` best at the search size, the candidates it is given). Refining the
        search size's first too (as before) changed no 4AKE figure and refined 1.6 candidates
        per image instead of 1. finish: the threshold of the unevaluated last step, noise
        variances (the config's ``finish_chi2`` or ``seed_finish_chi2``;
        :func:`~.least_squares.refine`). Returns (one :class:`Candidates` per image, in image
        order, the least-squares state there (:class:`~.least_squares.Fit`, ``.ncc`` the score))."""
        mb = at_work.count
        if keep is not None:
            match = normalised_cross_correlation(
                apply_filter(self.work.model.project(start.rotations, start.amplitudes,
                                                     self.work.shifts_here(start.shifts)),
                             at_work.filters[start.owner]), at_work.images[start.owner])
            start = start.select(_best_of_each(match, start.owner, mb, min(keep, len(start.owner) // mb)))
        owner = start.owner
        rot, q, shift_work, fit = refine(self.work.model, at_work.images[owner], at_work.filters[owner],
                                         start.rotations, start.amplitudes, self.work.shifts_here(start.shifts),
                                         self.q_lo, self.q_hi, self.work.max_shift(self.config.max_shift_px, 1.1),
                                         self.config.refine_iters, chunk=REFINED_AT_ONCE[1], finish=finish)
        best = _best_of_each(fit.ncc, owner, mb, 1)
        return Candidates(owner, rot, q, self.work.shifts_input(shift_work)).select(best), fit.select(best)

    def uncertainty(self, fit: Fit) -> dict:
        """The Laplace uncertainty (:func:`~.uncertainty.laplace_std`) of each image's answer at
        the working size, from :meth:`refine_final`'s least-squares state there: amplitude_std
        (M, K) Å, angle_std (M,) degrees (the RMS length of the three axis-angle components),
        shift_std (M,) px of the input images."""
        k = self.k
        std = laplace_std(fit, self.work.model.n_params, self.work.size).cpu().numpy()
        angle = np.degrees(np.sqrt((std[:, k:k + 3] ** 2).sum(1)))
        shift = np.sqrt((std[:, k + 3:k + 5] ** 2).sum(1)) * (self.box / self.work.size)
        return {"amplitude_std": std[:, :k], "angle_std": angle, "shift_std": shift}

    def _final_stages(self, batch, ctf_b, start: Candidates, finish: float,
                      keep: Optional[int] = None) -> AlignmentResult:
        """:meth:`refine_final` (``finish``, ``keep``: see there) and :meth:`uncertainty` of the
        input images ``batch`` (mb, box, box)."""
        at_work = ScaledBatch(self.work.images(batch), self.work.filters(ctf_b, batch.shape[0]))
        best, fit = self.refine_final(at_work, start, finish, keep)
        return AlignmentResult(amplitudes=best.amplitudes.double().cpu().numpy(),
                               angles=matrix_to_euler(best.rotations.double().cpu().numpy()),
                               shifts=best.shifts.double().cpu().numpy(),
                               score=fit.ncc.double().cpu().numpy(),
                               **self.uncertainty(fit))

    def polish(self, images: ArrayLike, start: AlignmentResult, ctf=None) -> AlignmentResult:
        """The final refinement and the uncertainty alone (:meth:`refine_final` with the global
        path's ``finish_chi2``, :meth:`uncertainty`), from a given answer per image (images (M,
        box, box), ``start`` its amplitudes, angles and shifts): re-fits particles whose answer
        is already close, e.g. after the image model changed. Keeps ``start.path``; sets
        ``at_limit`` and ``amplitude_range`` (the range as it stands, not grown)."""
        imgs = as_images(images, self.device)
        m = imgs.shape[0]
        if start.amplitudes.shape != (m, self.k):
            raise ValueError(f"The answer to polish must give ({m}, {self.k}) amplitudes, "
                             f"got {start.amplitudes.shape}.")
        parts = {}
        t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=self.device)  # noqa: E731
        for b0 in range(0, m, self.config.batch_size):
            rows = np.arange(b0, min(m, b0 + self.config.batch_size))
            batch = imgs[b0:b0 + len(rows)]
            ctf_b = None if ctf is None else (ctf if ctf.batch_size == 1 else ctf.select(rows))
            q = torch.minimum(torch.maximum(t(start.amplitudes[rows]), self.q_lo), self.q_hi)
            given = Candidates(torch.arange(len(rows), device=self.device),
                               t(euler_to_matrix(np.asarray(start.angles[rows], dtype=np.float64))), q,
                               t(start.shifts[rows]))
            parts[tuple(rows)] = self._final_stages(batch, ctf_b, given, finish=self.config.finish_chi2)
        result = _gather(parts, m)
        result.path = None if start.path is None else np.array(start.path)
        result.at_limit = self.at_limit(result.amplitudes).any(1)
        result.amplitude_range = self.amplitude_range.copy()
        return result


#: Most conformations of the global search's references with ``conformation_seeds='grid'``
#: (the amplitude grid's values per mode are cut to stay within it: 27 for 3 modes, 64 for 6).
CONFORMATION_GRID_MOST = 64

#: An amplitude within this fraction of its range's width of a limit is at the limit (the
#: refinement clamps amplitudes to the range, so a particle that wanted more sits exactly there).
AT_LIMIT_FRACTION = 1e-3

#: :meth:`Aligner.grow_range` moves a reached side of a mode's range out by half its width at
#: most this many times: a symmetric range of half-width h reaches 3.5 h on that side (the
#: default 5 sqrt(N) Å to 17.5 sqrt(N) Å, atoms moved by 17.5 Å RMS along one mode, far beyond
#: what a linear mode draws as a protein).
RANGE_GROWTH_STEPS = 2


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
