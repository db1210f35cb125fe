"""The settings of a HEMNMA alignment (:class:`AlignConfig`, its presets) and its result
(:class:`AlignmentResult`)."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import numpy as np

from ...imaging.geometry import euler_to_matrix
from ...modes.deformation import DEFORMATIONS

__all__ = ["AlignConfig", "PRESETS", "preset_changes", "CONFIG_FIELDS", "AlignmentResult", "RESULT_ARRAYS",
           "PATH_GLOBAL", "PATH_SEEDED", "PATH_FALLBACK"]


@dataclass(frozen=True)
class AlignConfig:
    """Settings of a HEMNMA alignment (see :class:`~.aligner.Aligner`).

    The rule for what is a field here and what is a module constant: a field is a value that a
    user (the protocol form, a script, a benchmark) or a preset (:data:`PRESETS`) may change,
    the extent of the search, the image sizes and every choice of effort, time against
    accuracy, of either path (iterations, candidates, when a refinement may stop early); the
    same kind of choice for the global and the seeded path is a field for both
    (``finish_chi2``, ``seed_finish_chi2``). A module constant (upper case, in the module that
    uses it, documented with the measurement that fixed it) is a property of the numerical
    method that no data set, preset or user has a reason to change: a solver's convergence
    test (:data:`~.least_squares.CONVERGED_CHI2`), a block size that bounds memory, a ranking
    margin measured once (:data:`~.aligner.FINAL_RANKED`). Changing a constant is a change of
    the method, with the benchmark that justifies it.

    max_shift_px: largest |shift| searched, pixels of the input images.
    working_size / search_size: image sizes (px) of the final refinement and of the global
        search (reduced by Fourier cropping; never above the input box).
    angular_step_deg: spacing of the global rotation grid; amplitude_seeds: values per mode
        in the star of amplitude seeds of the global search; amplitude_grid: values per mode
        of the grid tried at every candidate pose (at most ~256 combinations); n_candidates:
        distinct poses refined per image at the search size (at least; up to
        :data:`~.search.CANDIDATE_MOST` times more for an image whose ranking is flat); n_final: of
        those, refined at the working size.
    search_iters / refine_iters: Levenberg-Marquardt iterations of the two refinements;
        seed_search_iters: those of the search-size refinement of a seed's start, which is
        near its optimum already (5: the same MAE as 10 on network-like seeds, 3.01 Å, at 3.4
        instead of 5.7 ms per image).
    bead_cell: bead size of the search model, in search pixels.
    conformation_seeds: the conformations of the global search's references: ``'star'`` (the
        centre of the amplitude range and ``amplitude_seeds`` values along each mode alone) or
        ``'grid'`` (every combination of ``amplitude_seeds`` values per mode, fewer values per
        mode where there would be more than :data:`~.aligner.CONFORMATION_GRID_MOST`), so that
        a particle far along several modes at once meets projections of a conformation near
        its own before the pose refinement. Off by default, by measurement: on particles at
        0.8 of the range on all of modes 7-9 at once (noise-free, 30 degree search) the grid
        found every pose where the star missed 2 of 8; on the LID hinge of
        bench/bench_large_motion.py (100 particles, 64 px at 2 Å/px, SNR 0.1) it left the
        poses within 10 degrees by fifth as they were (1.00 0.94 1.00 0.90 0.78 against 1.00
        1.00 1.00 0.90 0.78) at 1.6x the CPU (0.161 against 0.101 s per particle).
    deformation: how amplitudes displace the reference in the refinements
        (:mod:`~continuousflex_dl.core.modes.deformation`): ``'linear'`` (``x + sum q_k v_k``) or
        ``'rigid-blocks'`` (NOLB: every residue moves as a rigid block along the screw motion of
        its modes' rigid velocities, so a domain turned about a hinge keeps its shape); a
        reference without residues, and a final model of beads (above ``max_final_points``),
        stay linear. The global search's bead model is linear either way.
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
        score distribution (a twentieth of the set, at least 8; :func:`~.aligner.reference_count`;
        8 at 500 particles: the same fallbacks as 16, none of 492 against 2 of 484, and the same
        MAE, at 1.5 ms per image less).
    finish_chi2 / seed_finish_chi2: the final refinement of the global / the seeded path takes
        its last Gauss-Newton step unevaluated, and stops, once that step would lower the cost
        by less than this many noise variances and than a fraction of its last step's gain
        (:func:`~.least_squares.refine`, :data:`~.least_squares.FINISH_CONTRACTION`); 0: never.
        0.5 on the global path puts the parameters within 0.7 standard deviations, in the
        Mahalanobis sense, of the optimum; 2 on the seeded path took 2.65 instead of 3.32
        working-size evaluations per particle for 1 % more amplitude MAE (3.238 against 3.207
        Å, 256 network-like seeds at 128 px, SNR 0.1, CTF), within the seeded path's allowance
        of 1.1x the global path's MAE.
    refuse_inverted: the global search refuses a batch whose images match the reference better
        with the opposite sign (:func:`~.search.check_contrast`); False only for images whose
        contrast is right by construction, such as the particles simulated to calibrate a set
        that already passed the check (:mod:`~continuousflex_dl.core.hemnma.reliability`), where a
        reference that does not match the set leaves images of noise alone.
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
    conformation_seeds: str = "star"
    deformation: str = "linear"
    max_final_points: int = 5000
    search_lowpass: Optional[float] = 0.25
    batch_size: int = 128
    seed_perturbation_deg: float = 10.0
    seed_starts: int = 1
    seed_fallback_mads: float = 3.0
    seed_reference: int = 8
    finish_chi2: float = 0.5
    seed_finish_chi2: float = 2.0
    refuse_inverted: bool = True

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
        if self.conformation_seeds not in ("star", "grid"):
            raise ValueError(f"conformation_seeds must be 'star' or 'grid', got {self.conformation_seeds!r}.")
        if self.deformation not in DEFORMATIONS:
            raise ValueError(f"deformation must be one of {', '.join(DEFORMATIONS)}, got {self.deformation!r}.")
        for name in ("finish_chi2", "seed_finish_chi2"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 noise variances (0: no early finish), "
                                 f"got {getattr(self, name)}.")


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


CONFIG_FIELDS = {f.name for f in fields(AlignConfig)}


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
    at_limit: (M,) bool, the particles with an amplitude at a limit of the amplitude range as
    it ended (grown where answers reached it, :meth:`~.aligner.Aligner.grow_range`), or None;
    amplitude_range: (K, 2) Å, that range, or None.
    """
    amplitudes: np.ndarray
    angles: np.ndarray
    shifts: np.ndarray
    score: np.ndarray
    amplitude_std: Optional[np.ndarray] = None
    angle_std: Optional[np.ndarray] = None
    shift_std: Optional[np.ndarray] = None
    path: Optional[np.ndarray] = None
    at_limit: Optional[np.ndarray] = None
    amplitude_range: Optional[np.ndarray] = None

    @property
    def rotations(self) -> np.ndarray:
        """(M, 3, 3) rotation matrices A of the angles."""
        return euler_to_matrix(self.angles)

    def to_dict(self) -> dict:
        """Plain numpy arrays by name (for ``np.savez`` or conversion to Scipion objects)."""
        return {name: getattr(self, name) for name in RESULT_ARRAYS + ("path", "at_limit")
                if getattr(self, name) is not None}

    @property
    def fraction_at_limit(self) -> float:
        """The fraction of the particles with an amplitude at a limit of the range (NaN: unknown)."""
        return float(np.mean(self.at_limit)) if self.at_limit is not None and len(self.at_limit) else float("nan")


#: The per-particle arrays of an AlignmentResult that every stage fills (``path`` aside).
RESULT_ARRAYS = ("amplitudes", "angles", "shifts", "score", "amplitude_std", "angle_std", "shift_std")


#: :attr:`AlignmentResult.path` codes: how each particle was aligned.
PATH_GLOBAL, PATH_SEEDED, PATH_FALLBACK = 0, 1, 2
