"""HEMNMA: combined elastic (normal-mode amplitudes) and rigid (pose) alignment of particle images.

For every particle image the method finds the normal-mode amplitudes ``q``
(Å), the Euler angles and the in-plane shifts whose Gaussian-atom projection
(:mod:`~continuousflex_dl.core.imaging.projection`, CTF applied when given) best matches
the image in the least-squares sense with a free scale and offset, i.e. the largest normalised
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
   its ranking is flat, :data:`~.search.CANDIDATE_SPREAD_FRACTION`), a grid of
   amplitudes (``amplitude_grid`` values per mode) with shift search, then
   **local refinement** at the search size: Levenberg-Marquardt on
   amplitudes, a small axis-angle rotation update and shifts together, with
   analytic Jacobians of the projector, on low-passed images
   (``search_lowpass``) to widen the basin of convergence.
3. Of the best of those (:data:`~.aligner.FINAL_RANKED` x ``n_final``), the ``n_final`` whose
   projections at ``working_size`` px match the image best are refined again with
   all atoms at that size (atoms widened against aliasing, :data:`~.sizes.ANTI_ALIAS_PX`);
   the one with the highest NCC is returned,
4. with its **uncertainty**: the Laplace standard deviation of every parameter at
   the optimum, from the Gauss-Newton matrix of the refinement's last state (the
   pose, scale and offset free).

An :class:`Aligner` is built once per set from an :class:`AlignConfig` (presets
``fast``/``normal``/``thorough``); its methods are these stages
(:meth:`~Aligner.global_search`, :meth:`~Aligner.refine_candidates`,
:meth:`~Aligner.refine_final`, :meth:`~Aligner.uncertainty`; :meth:`~Aligner.polish` runs
stages 3 and 4 alone from a given answer, e.g. after :mod:`..image_model` refined the atoms'
weights and widths). Given a first answer per particle (a network's),
:meth:`~Aligner.seeded_candidates` replaces stage 1 by the answer, two slightly
rotated copies and its in-plane flip; a few reference particles take the global
path, and seeded particles whose score falls clearly below theirs take it too,
so a poor first answer costs time, never accuracy. :func:`align_particles` does
all of it in one call.

Images larger than the working size are reduced by Fourier cropping (the box
in Å is unchanged) without touching their spectrum, so white noise stays white
(the Laplace uncertainty assumes it); the projections at the coarser pixel carry
the difference of pixel-integration blur instead (:func:`~.sizes.projection_filters`).

The package, one module per concern (a new stage is a method of the :class:`Aligner` that
takes and gives :class:`~.aligner.Candidates`, with its numerics in a module of its own):

- :mod:`.config`: :class:`AlignConfig` (what a user or a preset may change; its docstring
  states the rule against module constants), the presets, :class:`AlignmentResult`;
- :mod:`.aligner`: :func:`align_particles` and the :class:`Aligner`, the stages and the
  :class:`~.aligner.Candidates` they pass on (shifts in pixels of the input images);
- :mod:`.search`: stage 1, the rotation grid, the scores over shifts, the candidates;
- :mod:`.model`: the deformable model, projections and their Jacobians, the coarse-grained copy;
- :mod:`.sizes`: the search and working sizes: cropping, filters, pixel frames of shifts;
- :mod:`.least_squares`: stages 2 and 3, Levenberg-Marquardt and its least-squares state;
- :mod:`.uncertainty`: stage 4, the Laplace standard deviations.

Public names are re-exported here; import the others from their module.

Pose convention: :mod:`geometry` (Euler ZYZ in degrees, shifts in pixels of
the *input* images, ``[x, y] = (A r)[:2] / pixel_size - shift + box // 2``: the shift is
RELION's origin).
"""

from .aligner import Aligner, Candidates, align_particles, alignment_deformation, reference_count
from .config import (PATH_FALLBACK, PATH_GLOBAL, PATH_SEEDED, PRESETS, RESULT_ARRAYS, AlignConfig, AlignmentResult,
                     preset_changes)
from .model import coarse_grain, normalised_cross_correlation
from .search import check_contrast, rotation_grid

__all__ = ["AlignConfig", "PRESETS", "preset_changes", "Aligner", "Candidates", "AlignmentResult", "RESULT_ARRAYS",
           "align_particles", "alignment_deformation", "reference_count",
           "check_contrast", "PATH_GLOBAL", "PATH_SEEDED", "PATH_FALLBACK",
           "rotation_grid", "coarse_grain", "normalised_cross_correlation"]
