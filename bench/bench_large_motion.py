"""HEMNMA on large, nonlinear motions outside the span of its modes (issue 26).

Three motions of adenylate kinase (4AKE chain A, heavy atoms): rigid hinge rotations of the LID
domain (residues 122-159) and of the NMP domain (residues 30-59) about the axis through their
hinge residues' CA atoms, closing by up to ``--max-angle`` degrees, and the experimental
open -> closed change 4AKE -> 1AKE (7.2 Å RMSD; LID and NMP follow their screw motions between
the crystal structures, 52 and 45 degrees, the local rest linearly: ``experimental_motion``),
all in ``continuousflex_dl/tests/large_motion.py``. Each particle sits at a uniformly random
progress t in [0, 1] of one motion (angle t * max-angle), in a uniformly random pose with a
shift up to 5 px at 128 px, rendered by the physical-style simulator
(``continuousflex_dl/tests/physical_particles.py``: hydrogens, Peng scattering factors,
Fourier-slice projection, detector MTF), CTF with defocus uniform in 0.5-2 µm, white noise at
``--snr`` over the box. The reference is the open structure's heavy atoms, its ANM modes
7..6+``--modes`` (cutoff 8 Å), the default amplitude range; settings of
:class:`AlignConfig` by ``--set name=value``.

Prints, per motion: the fraction of poses within 10 degrees by fifth of the motion; |Spearman
rho| between the first principal component of the amplitudes and the true progress; the median
heavy-atom RMSD (Å, after rigid superposition: the pose absorbs rigid motion) of the fitted
structure to the true one by fifth, beside the best in the linear span of the modes used (with
the rigid modes 1-6: the least-squares projection of the true displacement), the best answer the
rigid-block deformation of the same modes can give (:func:`rigid_block_floor`: its amplitudes fitted
to the true structure by least squares, the rigid motion free) and no flexibility (the reference); the failures (poses off by 10 degrees or more) and how many of them score
higher when refined from the truth (the pose and the linear floor's amplitudes: the search
missed them; the others the modes cannot draw); the fraction of particles with an amplitude at
a limit of the range (the default, grown where answers reach it: Aligner.grow_range); the CPU
seconds per particle of the alignment (one thread unless ``--threads``). ``--second-reference``
adds the experiment of :func:`second_reference`. ``--out`` writes them as JSON. The fitted
structures are the answers' amplitudes through the deformation the alignment used
(``--set deformation=rigid-blocks``: NOLB rigid blocks, one per residue,
:mod:`continuousflex_dl.core.modes.deformation`).

Example (fast, while developing): python bench/bench_large_motion.py --n 100 --size 64 --pixel-size 2
With rigid blocks: ... --set deformation=rigid-blocks
The issue's figures: --n 400 --size 128 (1 Å/px).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_alignment import timed  # noqa: E402
from figures import report  # noqa: E402
from continuousflex_dl.core.hemnma.alignment import Aligner, AlignConfig, AlignmentResult  # noqa: E402
from continuousflex_dl.core.imaging.ctf import CTFParams  # noqa: E402
from continuousflex_dl.core.imaging.geometry import angular_distance_deg, matrix_to_euler, random_rotations  # noqa: E402
from continuousflex_dl.core.modes.deformation import Deformation, deformation  # noqa: E402
from continuousflex_dl.core.modes.reference import Reference  # noqa: E402
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms  # noqa: E402
from continuousflex_dl.core.modes.nma import compute_modes  # noqa: E402
from continuousflex_dl.tests import physical_particles as pp  # noqa: E402
from continuousflex_dl.tests.large_motion import (MOTIONS, experimental_motion, hinge_motion, kabsch_rmsd,  # noqa: E402
                                                  span_projection)

FIFTHS = 5
EXPERIMENTAL = "4AKE-1AKE"
MOTION_NAMES = [name for name, _, _ in MOTIONS] + [EXPERIMENTAL]


def by_fifth(values: np.ndarray, progress: np.ndarray, reduce) -> list:
    """``reduce`` of ``values`` (M,) over each fifth of the progress (M,) in [0, 1]."""
    fifth = np.minimum((progress * FIFTHS).astype(int), FIFTHS - 1)
    return [round(float(reduce(values[fifth == f])), 3) if np.any(fifth == f) else None for f in range(FIFTHS)]


def first_pc_spearman(amplitudes: np.ndarray, progress: np.ndarray) -> float:
    """|Spearman rho| between the first principal component of amplitudes (M, K) and progress (M,)."""
    from scipy.stats import spearmanr
    centred = amplitudes - amplitudes.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return abs(float(spearmanr(centred @ vt[0], progress)[0]))


def render_particles(structure, displacement, rotations, shifts, defocus, box, pixel_size, snr, rng):
    """Physical-style images (M, box, box) of the heavy-atom displacements (M, H, 3) Å."""
    out = []
    for i in range(len(displacement)):
        ctf = CTFParams(defocus_u=defocus[i], defocus_v=defocus[i])
        out.append(pp.render(structure, displacement[i][None], np.ones((1, 1)), rotations[i:i + 1],
                             shifts[i:i + 1], box, pixel_size, ctf=ctf, snr=snr, rng=rng))
    return np.concatenate(out)


def parse_settings(pairs) -> dict:
    """``name=value`` strings -> AlignConfig keywords (values as Python literals)."""
    import ast
    out = {}
    for pair in pairs or ():
        name, _, value = pair.partition("=")
        try:
            out[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name] = value
    return out


def superpose(moving: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Structures moving (M, N, 3) rigidly superposed onto target (M, N, 3) (Kabsch), Å."""
    mc, tc = moving.mean(1, keepdims=True), target.mean(1, keepdims=True)
    u, _, vt = np.linalg.svd(np.einsum("mni,mnj->mij", moving - mc, target - tc))
    d = np.sign(np.linalg.det(u @ vt))
    u[:, :, -1] *= d[:, None]
    return np.einsum("mni,mij->mnj", moving - mc, u @ vt) + tc


def rigid_block_floor(deform: Deformation, true: np.ndarray, q0: np.ndarray, iters: int = 30) -> np.ndarray:
    """The best structures (M, N, 3) the deformation ``deform`` can draw of ``true`` (M, N, 3),
    its rigid motion free (the pose absorbs it): amplitudes from ``q0`` (M, K) by Gauss-Newton on
    the squared distance to the truth superposed onto the current structure (Levenberg-Marquardt
    damped, a step kept only where it lowers the cost)."""
    q, lam = q0.astype(np.float64).copy(), np.full(len(q0), 1e-3)

    def cost(x):
        return ((superpose(true, x) - x) ** 2).sum((1, 2))

    x = deform(q)
    c = cost(x)
    for _ in range(iters):
        jac = deform.jacobian(q).reshape(len(q), q.shape[1], -1)                  # (M, K, 3N)
        r = (superpose(true, x) - x).reshape(len(q), -1)
        jtj = np.einsum("mki,mli->mkl", jac, jac)
        damping = lam[:, None, None] * np.eye(q.shape[1]) * np.trace(jtj, axis1=1, axis2=2)[:, None, None]
        step = np.linalg.solve(jtj + damping, np.einsum("mki,mi->mk", jac, r))
        x_new = deform(q + step)
        c_new = cost(x_new)
        better = c_new < c
        q[better], x[better], c[better] = (q + step)[better], x_new[better], c_new[better]
        lam = np.where(better, lam / 3, lam * 4)
    return x


def bench_motion(motion, args, coords, modes, blocks, rigid, structure, rng) -> dict:
    progress = rng.uniform(0, 1, args.n)
    disp = motion.displacement(coords, progress)                                  # (M, N, 3)
    rot = random_rotations(args.n, rng)
    max_shift = 5.0 * args.size / 128
    shifts = rng.uniform(-max_shift, max_shift, (args.n, 2))
    defocus = rng.uniform(0.5e4, 2.0e4, args.n)
    images, _, render_cpu = timed(lambda: render_particles(structure, disp, rot, shifts, defocus, args.size,
                                                           args.pixel_size, args.snr, rng))
    ctf = CTFParams(defocus_u=defocus, defocus_v=defocus)
    config = replace(AlignConfig(), max_shift_px=max_shift, **parse_settings(args.set))
    aligner = Aligner(Reference(coords, modes, blocks=blocks), args.pixel_size, args.size, config)
    res, _, align_cpu = timed(lambda: aligner.align(images, ctf=ctf))
    true = coords + disp
    fitted = deformation(coords, modes, aligner.deformation, blocks)(res.amplitudes)
    best = coords + span_projection(disp, np.concatenate([rigid, modes]))
    q_best = np.einsum("mnd,knd->mk", best - coords, modes)
    best_blocks = rigid_block_floor(Deformation(coords, modes, "rigid-blocks", blocks), true, q_best)
    within = (angular_distance_deg(res.rotations, rot) < 10.0).astype(float)
    # Each failure refined from the truth (the pose, the amplitudes of the linear floor): if
    # that scores higher the search missed it, else the modes cannot draw the particle.
    fail = np.flatnonzero(within == 0)
    search_missed = 0
    if len(fail):
        q_floor = np.einsum("mnd,knd->mk", disp[fail], modes)
        start = AlignmentResult(amplitudes=q_floor, angles=matrix_to_euler(rot[fail]), shifts=shifts[fail],
                                score=np.zeros(len(fail)))
        truth_started = aligner.polish(images[fail], start, ctf=ctf.select(fail))
        search_missed = int(np.sum(truth_started.score > res.score[fail]))
    figures = {}
    if args.second_reference:
        figures["second_reference"] = second_reference(args, images, ctf, config, coords, modes, res, rot,
                                                       true, progress)
    return {"within_10deg_by_fifth": by_fifth(within, progress, np.mean),
            "spearman_pc1_progress": round(first_pc_spearman(res.amplitudes, progress), 3),
            "rmsd_fitted_by_fifth": by_fifth(kabsch_rmsd(fitted, true), progress, np.median),
            "rmsd_best_linear_by_fifth": by_fifth(kabsch_rmsd(best, true), progress, np.median),
            "rmsd_best_rigid_blocks_by_fifth": by_fifth(kabsch_rmsd(best_blocks, true), progress, np.median),
            "rmsd_no_flex_by_fifth": by_fifth(kabsch_rmsd(np.broadcast_to(coords, true.shape), true), progress,
                                              np.median),
            "failures": int(len(fail)), "failures_truth_started_scores_higher": search_missed,
            "fraction_at_limit": round(res.fraction_at_limit, 3),
            "cpu_s_per_particle": round(align_cpu / args.n, 3),
            "render_cpu_s_per_particle": round(render_cpu / args.n, 3), **figures}


def second_reference(args, images, ctf, config, coords, modes, res, rot, true, progress) -> dict:
    """Modes recomputed at a displaced conformation (an experiment, ``--second-reference``): the
    median fitted conformation of the fifth of the particles at the end of the amplitudes' first
    principal component farther from the reference becomes a second reference with its own ANM modes; every particle is aligned again against
    it and keeps the answer (pose and structure) of the reference it scores higher on."""
    centred = res.amplitudes - res.amplitudes.mean(0)
    pc1 = centred @ np.linalg.svd(centred, full_matrices=False)[2][0]
    ends = [np.median(res.amplitudes[pc1 <= np.quantile(pc1, 0.2)], 0),
            np.median(res.amplitudes[pc1 >= np.quantile(pc1, 0.8)], 0)]
    far_end = max(ends, key=np.linalg.norm)               # the end of PC1 farther from the reference
    x1 = coords + np.einsum("k,knd->nd", far_end, modes)
    modes1 = compute_modes(x1, n_modes=6 + len(modes), cutoff=8.0).vectors[6:]
    aligner = Aligner(Reference(x1 - x1.mean(0), modes1), args.pixel_size, args.size, config)
    res1, _, cpu = timed(lambda: aligner.align(images, ctf=ctf))
    take = res1.score > res.score
    fitted = coords + np.einsum("mk,knd->mnd", res.amplitudes, modes)
    fitted[take] = (x1 - x1.mean(0) + np.einsum("mk,knd->mnd", res1.amplitudes, modes1))[take]
    rotations = np.where(take[:, None, None], res1.rotations, res.rotations)
    within = (angular_distance_deg(rotations, rot) < 10.0).astype(float)
    flat = fitted.reshape(len(fitted), -1)
    return {"taken": int(take.sum()),
            "within_10deg_by_fifth": by_fifth(within, progress, np.mean),
            "spearman_pc1_of_structures": round(first_pc_spearman(flat, progress), 3),
            "rmsd_fitted_by_fifth": by_fifth(kabsch_rmsd(fitted, true), progress, np.median),
            "cpu_s_per_particle_second_pass": round(cpu / args.n, 3)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=400, help="particles per motion")
    ap.add_argument("--size", type=int, default=128, help="box (px)")
    ap.add_argument("--pixel-size", type=float, default=None, help="Å/px (default: 128 Å / box)")
    ap.add_argument("--snr", type=float, default=0.1, help="SNR over the box")
    ap.add_argument("--modes", type=int, default=3, help="modes 7..6+K")
    ap.add_argument("--max-angle", type=float, default=40.0, help="hinge angle at the end of a motion, degrees")
    ap.add_argument("--motions", default=",".join(MOTION_NAMES),
                    help=f"comma-separated names of the motions, among {','.join(MOTION_NAMES)}")
    ap.add_argument("--set", nargs="*", help="AlignConfig fields, name=value")
    ap.add_argument("--second-reference", action="store_true",
                    help="also align against modes recomputed at the far particles' conformation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.pixel_size = args.pixel_size or 128.0 / args.size
    torch.set_num_threads(args.threads)
    atoms = load_atoms(example_structure_path("4ake"), "heavy")
    coords = centre(atoms.coords)
    vectors = compute_modes(coords, n_modes=6 + args.modes, cutoff=8.0).vectors
    rigid, modes = vectors[:6], vectors[6:6 + args.modes]
    blocks = atoms.blocks                                                        # one per residue
    structure = pp.load_4ake()
    figures = {"n_per_motion": args.n, "size": args.size, "pixel_size": args.pixel_size, "snr": args.snr,
               "modes": f"7-{6 + args.modes}", "max_angle_deg": args.max_angle, "settings": args.set or [],
               "threads": args.threads}
    for i, motion in enumerate(motions(args.motions.split(","), atoms, coords, args.max_angle)):
        rng = np.random.default_rng([args.seed, i])
        figures[motion.name] = bench_motion(motion, args, coords, modes, blocks, rigid, structure, rng)
    return report(figures, args.out)


def motions(wanted, atoms, coords, max_angle) -> list:
    """The motions named in ``wanted``, in the order of :data:`MOTION_NAMES`."""
    unknown = sorted(set(wanted) - set(MOTION_NAMES))
    if unknown:
        raise SystemExit(f"Unknown motions {unknown}; choose among {MOTION_NAMES}.")
    resnums, names = atoms.group.getResnums(), atoms.group.getNames()
    out = [hinge_motion(coords, resnums, names, name, residues, hinges, max_angle)
           for name, residues, hinges in MOTIONS if name in wanted]
    if EXPERIMENTAL in wanted:
        closed = load_atoms(example_structure_path("1ake"), "chain A and protein and not hydrogen")
        out.append(experimental_motion(coords, resnums, names, closed.coords, closed.group.getResnums(),
                                       closed.group.getNames(), EXPERIMENTAL))
    return out


if __name__ == "__main__":
    main()
