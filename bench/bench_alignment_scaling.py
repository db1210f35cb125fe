"""HEMNMA cost as the structure grows: seconds per image at 128 px for about 1.6k, 20k and 100k atoms.

The structures are copies of adenylate kinase (4AKE chain A, heavy atoms; 1, 12 and 60
copies). ``--layout cluster`` (the default) packs them as an irregular assembly: each copy
turned at random and placed, in turn, at the free spot nearest the centre among random
tries (no two copies' centres closer than the diameter of one), so the assembly has no
symmetry, like a real one. ``--layout grid``: identically oriented copies on a grid 55 Å
apart, a pseudo-symmetric lattice of blobs at the search pixel (11.5 Å at 12 copies), whose
orientation the images barely fix. Each copy moves along its own ANM modes 7-9 (turned
with it), so a "mode" of the assembly is the same motion of every copy (normalised over all
atoms) and the paper's amplitudes are scaled by sqrt(copies) to move the atoms by the same
RMS distance. The pixel
size is chosen so that the assembly fills the 128 px box as 4AKE does at 1 Å/px. Particles:
random orientations, shifts within 5 px, CTF 0.5 µm (scaled with the pixel size), SNR 0.1.
Prints, per structure, the number of atoms and of points in the final refinement, the
amplitude MAE (Å, divided by sqrt(copies): the error of the equivalent single-copy amplitude),
the angular errors (median, and the fraction of particles more than 10 degrees off: a wrong
orientation, whose amplitudes are wrong too) and the CPU seconds per image of the global and
of the seeded path (first answers = the truth with network-like errors, as
``bench_alignment.py --seeded``). The seeded path's cost is that of the seeded particles
alone (``seeded_cpu_s_per_image``: every image through the seeded stages); the whole seeded
run (``seeded_run_cpu_s_per_image``) adds its reference particles, which take the global
path (8 at least: a third of a 24-image set, a twentieth of a 500-image one), and fallbacks.

Example: python bench/bench_alignment_scaling.py --n 16
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_alignment import network_like_seeds, paper_amplitudes, synthesize, timed  # noqa: E402
from figures import report  # noqa: E402
from continuousflex_dl.core.hemnma.alignment import PATH_FALLBACK, Aligner, AlignConfig  # noqa: E402
from continuousflex_dl.core.modes.reference import Reference  # noqa: E402
from continuousflex_dl.core.imaging.ctf import CTFParams  # noqa: E402
from continuousflex_dl.core.imaging.geometry import angular_distance_deg, random_rotations  # noqa: E402
from continuousflex_dl.core.modes.nma import compute_modes  # noqa: E402
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms  # noqa: E402

GRIDS = {1: (1, 1, 1), 12: (3, 2, 2), 60: (5, 4, 3)}


def cluster_offsets(copies: int, distance: float, rng: np.random.Generator, tries: int = 200) -> np.ndarray:
    """(copies, 3) Å centres of an irregular compact cluster: each in turn the try nearest the
    centre of those at least ``distance`` from every centre placed so far."""
    centres = [np.zeros(3)]
    while len(centres) < copies:
        placed = np.array(centres)
        reach = np.linalg.norm(placed, axis=1).max() + distance
        trial = rng.uniform(-reach, reach, (tries, 3))
        free = np.linalg.norm(trial[:, None] - placed[None], axis=-1).min(1) >= distance
        if free.any():
            trial = trial[free]
            centres.append(trial[np.argmin(np.linalg.norm(trial, axis=1))])
    return np.array(centres)


def assembly(copies: int, coords: np.ndarray, modes: np.ndarray, layout: str, rng: np.random.Generator,
             spacing: float = 55.0):
    """Coordinates (copies * N, 3) Å centred and modes (K, copies * N, 3) of unit norm."""
    if layout == "grid":
        grid = np.stack(np.meshgrid(*[np.arange(g) for g in GRIDS[copies]], indexing="ij"), -1).reshape(-1, 3)
        offsets, turns = (grid - grid.mean(0)) * spacing, np.broadcast_to(np.eye(3), (copies, 3, 3))
    else:
        diameter = np.linalg.norm(coords[:, None] - coords[None], axis=-1).max()
        offsets = cluster_offsets(copies, diameter, rng)
        turns = random_rotations(copies, rng) if copies > 1 else np.eye(3)[None]
    xyz = np.concatenate([coords @ r.T + o for r, o in zip(turns, offsets)])
    vec = np.concatenate([modes @ r.T for r in turns], axis=1)
    return centre(xyz), vec / np.linalg.norm(vec.reshape(len(vec), -1), axis=1)[:, None, None]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=24, help="images per structure")
    ap.add_argument("--copies", type=int, nargs="+", default=[1, 12, 60], choices=sorted(GRIDS))
    ap.add_argument("--layout", choices=["cluster", "grid"], default="cluster",
                    help="copies turned at random in an irregular cluster, or aligned on a grid")
    ap.add_argument("--max-final-points", type=int, default=AlignConfig.max_final_points,
                    help="all atoms in the final refinement up to this many (AlignConfig)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    atoms = load_atoms(example_structure_path("4ake"), "heavy")
    base = centre(atoms.coords)
    base_modes = compute_modes(base, n_modes=9, cutoff=8.0).vectors[6:9]
    extent0 = np.ptp(base, axis=0).max()
    figures = {"n": args.n, "box": 128, "snr": 0.1, "layout": args.layout, "rows": []}
    seed_args = argparse.Namespace(seed_amp_error=20.0, seed_angle_error=10.0, seed_shift_error=1.0)
    for copies in args.copies:
        rng = np.random.default_rng(args.seed)
        coords, modes = assembly(copies, base, base_modes, args.layout, np.random.default_rng(args.seed + copies))
        pixel = float(np.ptp(coords, axis=0).max() / extent0)          # 1 Å/px for one copy
        q = paper_amplitudes(args.n, 3, rng) * np.sqrt(copies)
        rot = random_rotations(args.n, rng)
        shifts = rng.uniform(-5, 5, (args.n, 2))
        ctf = CTFParams(defocus_u=5000.0 * pixel ** 2, defocus_v=5000.0 * pixel ** 2)
        images = synthesize(coords, modes, q, rot, shifts, 128, pixel, ctf, 0.1, rng)
        amp = np.tile([-250.0, 250.0], (3, 1)) * np.sqrt(copies)
        config = AlignConfig(max_final_points=args.max_final_points)
        aligner, _, build_cpu = timed(lambda: Aligner(Reference(coords, modes), pixel, 128, config,
                                                      amplitude_range=amp))
        glob, _, g_cpu = timed(lambda: aligner.align(images, ctf=ctf))
        seeds = network_like_seeds(q, rot, shifts, seed_args, rng)
        seeded, _, s_cpu = timed(lambda: aligner.align(images, ctf=ctf, seeds=seeds))
        # the seeded stages alone, every image (no reference particles, no fallback)
        _, _, path_cpu = timed(lambda: aligner._align_batch(torch.as_tensor(images), ctf, np.arange(args.n), seeds))
        row = {"copies": copies, "atoms": len(coords), "pixel_size": round(pixel, 3),
               "final_points": len(aligner.work.model.coords),
               "global_mae": round(float(np.abs(glob.amplitudes - q).mean() / np.sqrt(copies)), 3),
               "seeded_mae": round(float(np.abs(seeded.amplitudes - q).mean() / np.sqrt(copies)), 3),
               "global_angle_median_deg": round(float(np.median(angular_distance_deg(glob.rotations, rot))), 2),
               "global_wrong_pose": round(float(np.mean(angular_distance_deg(glob.rotations, rot) > 10)), 3),
               "seeded_angle_median_deg": round(float(np.median(angular_distance_deg(seeded.rotations, rot))), 2),
               "seeded_wrong_pose": round(float(np.mean(angular_distance_deg(seeded.rotations, rot) > 10)), 3),
               "global_cpu_s_per_image": round(g_cpu / args.n, 3),
               "seeded_cpu_s_per_image": round(path_cpu / args.n, 3),
               "seeded_run_cpu_s_per_image": round(s_cpu / args.n, 3),
               "seeded_fallbacks": int(np.sum(seeded.path == PATH_FALLBACK)),
               "build_cpu_s": round(build_cpu, 2)}
        figures["rows"].append(row)
        print(row, flush=True)
    first = figures["rows"][0]
    for row in figures["rows"][1:]:
        for path in ("global", "seeded"):
            row[f"{path}_cost_growth"] = round(row[f"{path}_cpu_s_per_image"] / first[f"{path}_cpu_s_per_image"], 2)
        print(f"{row['atoms']} atoms: global path {row['global_cost_growth']}x, seeded path "
              f"{row['seeded_cost_growth']}x the cost per image of {first['atoms']} atoms")
    return report(figures, args.out, echo=False)


if __name__ == "__main__":
    main()
