"""Our poses as cryoDRGN reads them: a backprojection from our RELION star must be sharp.

Synthesizes rigid adenylate kinase particles (core.modes.synthesis, CTF, optional noise), writes
their ground truth as a RELION star (SynthesisResult.write_star), then runs cryoDRGN's own
``parse_pose_star``, ``parse_ctf_star`` and ``backproject_voxel`` and correlates its map with
the density of the atoms. cryoDRGN's CTF is negative at zero frequency (``-w cos(gamma)``),
the opposite of RELION's, and it inverts the data by default: for white-on-black particles
with RELION's CTF sign the two cancel, so its default settings are right. Two
controls write the same particles with the shifts negated and with the rotations transposed;
both must give a clearly worse map. cryoDRGN is not a dependency of this project: install
it in a separate venv (``python3 -m venv cryodrgn-venv && cryodrgn-venv/bin/pip install
torch==2.14.1 cryodrgn==4.3.1``) and pass its command with ``--cryodrgn``.

Example: python bench/bench_cryodrgn_poses.py --cryodrgn cryodrgn-venv/bin/cryodrgn --n 2000
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import mrcfile
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from figures import report  # noqa: E402
from continuousflex_dl.core.imaging.geometry import euler_to_matrix, matrix_to_euler  # noqa: E402
from continuousflex_dl.core.imaging.projection import density_map  # noqa: E402
from continuousflex_dl.core.imaging.star import write_particles_star  # noqa: E402
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms  # noqa: E402
from continuousflex_dl.core.modes.synthesis import CTFSampler, synthesize  # noqa: E402


def backproject(cryodrgn: str, folder: Path, name: str, stack: Path, box: int, pixel: float) -> np.ndarray:
    """cryoDRGN's map (box^3) from the star ``folder/name.star``."""
    star = folder / f"{name}.star"
    run = lambda *a: subprocess.run([cryodrgn, *map(str, a)], check=True, capture_output=True)  # noqa: E731
    run("parse_pose_star", star, "-D", box, "--Apix", pixel, "-o", folder / f"{name}_pose.pkl")
    run("parse_ctf_star", star, "-D", box, "--Apix", pixel, "-o", folder / f"{name}_ctf.pkl")
    run("backproject_voxel", stack, "--poses", folder / f"{name}_pose.pkl", "--ctf", folder / f"{name}_ctf.pkl",
        "-o", folder / name, "--no-half-maps")
    with mrcfile.open(next((folder / name).glob("*.mrc")), permissive=True) as mrc:
        return np.asarray(mrc.data, dtype=float)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation inside the sphere inscribed in the box."""
    n = a.shape[0]
    z, y, x = np.indices(a.shape) - n // 2
    inside = x * x + y * y + z * z < (n // 2) ** 2
    return float(np.corrcoef(a[inside], b[inside])[0, 1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cryodrgn", default="cryodrgn", help="cryoDRGN's command (in its own venv)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--pixel-size", type=float, default=2.0)
    ap.add_argument("--max-shift", type=float, default=5.0)
    ap.add_argument("--snr", type=float, default=None, help="default: clean images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)

    atoms = load_atoms(example_structure_path("4ake"), "heavy")
    coords = centre(atoms.coords)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        stack = folder / "particles.mrcs"
        res = synthesize(stack, coords, None, args.n, args.box, args.pixel_size, max_shift_px=args.max_shift,
                         ctf=CTFSampler(defocus_min=10000.0, defocus_max=20000.0), snr=args.snr,
                         sigma=atoms.sigma, weights=atoms.weights, seed=args.seed)
        transposed = matrix_to_euler(np.swapaxes(euler_to_matrix(res.angles), -1, -2))
        for name, angles, shifts in [("ours", res.angles, res.shifts), ("negated_shift", res.angles, -res.shifts),
                                     ("transposed_rotation", transposed, res.shifts)]:
            write_particles_star(folder / f"{name}.star", stack.name, angles, shifts, args.pixel_size, ctf=res.ctf)
        truth = density_map(coords, args.box, args.pixel_size, sigma=atoms.sigma, weights=atoms.weights).numpy()
        figures = {"n": args.n, "box": args.box, "pixel_size": args.pixel_size, "snr": args.snr}
        for name in ("ours", "negated_shift", "transposed_rotation"):
            vol = backproject(args.cryodrgn, folder, name, stack, args.box, args.pixel_size)
            figures[f"correlation_{name}"] = round(correlation(vol, truth), 4)
    return report(figures, args.out)


if __name__ == "__main__":
    main()
