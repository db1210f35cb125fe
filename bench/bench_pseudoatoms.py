"""Speed and accuracy of map -> Gaussian pseudoatoms (core.modes.pseudoatoms) on a 128^3 map.

The map: copies of adenylate kinase (4AKE chain A, heavy atoms, each in a random
orientation) on a cubic lattice ``--spacing`` Å apart, rendered as Gaussians of
``--map-sigma`` Å at ``--pixel-size`` Å/px in a ``--box``^3 box (the default,
27 copies at 2 Å/px, fills about 200 Å of the 256 Å box). Prints the number of
pseudoatoms, the relative error reached, the wall time, an independent check of
the error with ``projection.density_map``, and the peak memory; ``--out``
writes them as JSON.

Target (issue 8): a 128^3 map converted in under 2 minutes on 2 cores.

Example: python bench/bench_pseudoatoms.py --threads 2 --out pseudo.json
(OMP_WAIT_POLICY defaults to PASSIVE here; set it to ACTIVE to see spinning threads.)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads
# made 2 threads ~7x slower than 1. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continuousflex_dl.core.modes import pseudoatoms as pa  # noqa: E402
from continuousflex_dl.core.imaging.geometry import random_rotations  # noqa: E402
from continuousflex_dl.core.imaging.projection import density_map  # noqa: E402
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms  # noqa: E402


def lattice_of_copies(coords: np.ndarray, per_side: int, spacing: float,
                      rng: np.random.Generator) -> np.ndarray:
    """``per_side**3`` randomly rotated copies of ``coords`` (N, 3) Å on a centred lattice."""
    rots = random_rotations(per_side ** 3, rng)
    grid = (np.arange(per_side) - (per_side - 1) / 2.0) * spacing
    centres = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)
    return np.concatenate([coords @ r.T + c for r, c in zip(rots, centres)])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--box", type=int, default=128, help="map size (voxels per side)")
    ap.add_argument("--pixel-size", type=float, default=2.0, help="Å/voxel")
    ap.add_argument("--copies-per-side", type=int, default=3, help="lattice of copies^3 molecules")
    ap.add_argument("--spacing", type=float, default=66.0, help="lattice spacing (Å)")
    ap.add_argument("--map-sigma", type=float, default=2.0, help="atom width of the map (Å)")
    ap.add_argument("--sigma-voxels", type=float, default=1.0, help="pseudoatom width (voxels)")
    ap.add_argument("--target", type=float, default=0.05, help="target relative L2 error")
    ap.add_argument("--max-atoms", type=int, default=60000)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    atoms = centre(load_atoms(example_structure_path("4ake"), "heavy").coords)
    coords = lattice_of_copies(atoms, args.copies_per_side, args.spacing, rng)
    vol = density_map(torch.as_tensor(coords, dtype=torch.float32, device=args.device), args.box,
                      args.pixel_size, sigma=args.map_sigma).cpu().numpy()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.time()
    res = pa.volume_to_pseudoatoms(vol, args.pixel_size, args.sigma_voxels * args.pixel_size,
                                   target_error=args.target, max_atoms=args.max_atoms, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.time() - t0
    check = density_map(torch.as_tensor(res.coords), args.box, args.pixel_size, sigma=res.sigma,
                        weights=torch.as_tensor(res.weights)).numpy()
    independent = float(np.linalg.norm(check - vol) / np.linalg.norm(vol))
    figures = {
        "box": args.box, "pixel_size": args.pixel_size, "molecules": args.copies_per_side ** 3,
        "atoms": int(len(coords)), "map_sigma_A": args.map_sigma, "sigma_A": res.sigma,
        "threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "device": args.device, "target_error": args.target,
        "pseudoatoms": res.n_atoms, "relative_error": round(res.error, 5),
        "relative_error_independent": round(independent, 5), "reached": res.reached,
        "rounds": len(res.history) - 1, "seconds": round(elapsed, 2),
        "under_2_min": elapsed < 120.0,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    for key, val in figures.items():
        print(f"{key}: {val}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
