"""HEMNMA on physical-style particles, with and without the image model refined on the data.

Particles: adenylate kinase (4AKE chain A) with its hydrogens, deformed along ANM modes 7-9 of
its heavy atoms with the DeepHEMNMA paper's amplitudes, rendered by the independent renderer of
``continuousflex_dl/tests/physical_particles.py`` (Peng 5-Gaussian scattering factors,
B-factors 15/30 Å² scaled by ``--b-scale``, an ``--envelope-b`` Å² envelope, Fourier-slice
projection, CTF, detector MTF 0.5 at ``--mtf-half`` cycles/px, optional noise). The reference
is the heavy-atom structure with HEMNMA's Gaussian atoms (1 Å, unit weights).

Prints the amplitude MAE (Å) per mode, its bias, and the angular error of (1) the plain
alignment, (2) the alignment of the whole set after fitting the image model
(core.hemnma.image_model.refine_image_model) on ``--fit-n`` of the particles, the fitted weights and
B-factor, and the CPU seconds of each part; ``--out`` writes them as JSON.

Example: python bench/bench_alignment_physical.py --n 40 --size 128 --defocus-um 0.5
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_alignment import paper_amplitudes, timed  # noqa: E402
from figures import report  # noqa: E402
from continuousflex_dl.core.hemnma.alignment import align_particles  # noqa: E402
from continuousflex_dl.core.imaging.ctf import CTFParams  # noqa: E402
from continuousflex_dl.core.imaging.geometry import angular_distance_deg, random_rotations  # noqa: E402
from continuousflex_dl.core.hemnma.image_model import atom_types, refine_image_model  # noqa: E402
from continuousflex_dl.core.modes.nma import compute_modes  # noqa: E402
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms  # noqa: E402
from continuousflex_dl.tests import physical_particles as pp  # noqa: E402


def errors(res, q, rot) -> dict:
    err = res.amplitudes - q
    return {"mae_all": round(float(np.abs(err).mean()), 3),
            "mae_per_mode": np.round(np.abs(err).mean(0), 3).tolist(),
            "bias_per_mode": np.round(err.mean(0), 3).tolist(),
            "angular_error_median_deg": round(float(np.median(angular_distance_deg(res.rotations, rot))), 3)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=40, help="number of particles")
    ap.add_argument("--fit-n", type=int, default=0, help="particles the image model is fitted on (0: all)")
    ap.add_argument("--size", type=int, default=128, help="box (px)")
    ap.add_argument("--pixel-size", type=float, default=None, help="Å/px (default: 128 Å / box)")
    ap.add_argument("--snr", type=float, default=None, help="SNR over the box (default: clean)")
    ap.add_argument("--defocus-um", type=float, default=0.5)
    ap.add_argument("--b-scale", type=float, default=1.0, help="scales the atoms' B-factors (15/30 Å²)")
    ap.add_argument("--envelope-b", type=float, default=80.0, help="global envelope B-factor, Å²")
    ap.add_argument("--mtf-half", type=float, default=0.4, help="cycles/px where the MTF is 0.5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    ps = args.pixel_size or 128.0 / args.size
    atoms = load_atoms(example_structure_path("4ake"), "heavy")
    coords = centre(atoms.coords)
    labels, names = atom_types(atoms.group.getElements())
    modes = compute_modes(coords, n_modes=9, cutoff=8.0).vectors[6:9]
    q = paper_amplitudes(args.n, 3, rng)
    rot = random_rotations(args.n, rng)
    max_shift = 5.0 * args.size / 128
    shifts = rng.uniform(-max_shift, max_shift, (args.n, 2))
    ctf = CTFParams(defocus_u=args.defocus_um * 1e4, defocus_v=args.defocus_um * 1e4) if args.defocus_um else None
    images, _, render_cpu = timed(lambda: pp.render(pp.load_4ake(), modes, q, rot, shifts, args.size, ps, ctf=ctf,
                                                    mtf_half=args.mtf_half, snr=args.snr, rng=rng,
                                                    b_scale=args.b_scale, envelope_b=args.envelope_b))
    options = dict(max_shift_px=max_shift, amplitude_range=np.tile([-250.0, 250.0], (3, 1)))
    plain, _, plain_cpu = timed(lambda: align_particles(images, coords, modes, ps, ctf=ctf, **options))
    fit_n = args.fit_n or args.n
    rows = np.linspace(0, args.n - 1, fit_n).round().astype(int)
    (model, _), _, fit_cpu = timed(lambda: refine_image_model(images[rows], coords, modes, ps, labels, names,
                                                              ctf=ctf, **options))
    sigma, weights = model.apply(labels, atoms.sigma, atoms.weights)
    refined, _, refined_cpu = timed(lambda: align_particles(images, coords, modes, ps, ctf=ctf, sigma=sigma,
                                                            weights=weights, **options))
    figures = {"n": args.n, "fit_n": fit_n, "size": args.size, "pixel_size": ps, "snr": args.snr,
               "defocus_um": args.defocus_um, "b_scale": args.b_scale, "envelope_b": args.envelope_b,
               "mtf_half": args.mtf_half, "threads": args.threads,
               "plain": errors(plain, q, rot), "refined": errors(refined, q, rot),
               "image_model": model.describe(), "fit": model.fit,
               "cpu_s_per_image": {"render": round(render_cpu / args.n, 3), "plain": round(plain_cpu / args.n, 3),
                                   "fit (subset)": round(fit_cpu / fit_n, 3),
                                   "refined": round(refined_cpu / args.n, 3)}}
    return report(figures, args.out)


if __name__ == "__main__":
    main()
