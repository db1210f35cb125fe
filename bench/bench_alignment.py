"""Accuracy and speed of HEMNMA alignment (core.hemnma.alignment) on synthetic 4AKE particles.

Particles: adenylate kinase (4AKE chain A, heavy atoms) deformed along ANM modes with the
DeepHEMNMA paper's amplitudes (q7 = -200 r, q8 = 200 sin(pi r), q9 = 200 cos(pi r), r uniform
in [0, 1]; further modes get 0), uniformly random orientations, shifts uniform in +-max_shift px,
optional CTF and Gaussian noise of variance var(clean) / SNR per image. Prints the mean
absolute amplitude error per mode (Å), the angular error (deg), the shift error (px),
images/s, CPU seconds per image (process CPU time: meaningful on a busy machine) and the
peak memory; the calibration of the per-particle uncertainty (fraction of amplitude errors
within +-1.96 sigma, median sigma) beside the Cramér-Rao bound at known pose (the amplitude
standard deviation an unbiased estimator cannot beat when the pose, scale and noise level are
known); ``--out`` also writes them as JSON.

With ``--seeded`` the same images are aligned a second time from first answers that stand
for a network's (the truth plus Gaussian errors of ``--seed-amp-error`` Å per mode, rotations
off by ``--seed-angle-error`` degrees about random axes, shifts off by ``--seed-shift-error``
px), and the figures of that seeded path are printed beside the global path's.

Example: python bench/bench_alignment.py --n 50 --size 128 --snr 0.1 --defocus-um 0.5
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from figures import report  # noqa: E402
from continuousflex_dl.core.hemnma.alignment import AlignConfig, align_particles  # noqa: E402
from continuousflex_dl.core.imaging.geometry import angular_distance_deg, random_rotations  # noqa: E402
from continuousflex_dl.core.modes.deformation import DEFORMATIONS, deformation  # noqa: E402
from continuousflex_dl.core.modes.nma import compute_modes  # noqa: E402
from continuousflex_dl.core.imaging.projection import project_gaussians  # noqa: E402
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms  # noqa: E402


def paper_amplitudes(n: int, n_modes: int, rng: np.random.Generator) -> np.ndarray:
    """(n, n_modes) amplitudes Å: the paper's curve on the first three modes, 0 beyond."""
    r = rng.random(n)
    curve = np.stack([-200 * r, 200 * np.sin(np.pi * r), 200 * np.cos(np.pi * r)], -1)
    out = np.zeros((n, n_modes))
    out[:, :min(3, n_modes)] = curve[:, :min(3, n_modes)]
    return out


def synthesize(coords, modes, amplitudes, rotations, shifts, box, pixel_size, ctf=None, snr=None,
               rng=None, chunk=32, kind="linear", blocks=None):
    """Particle images (n, box, box) float32: projections of structures displaced by the
    deformation ``kind`` (blocks: the atoms' residues, for 'rigid-blocks'), CTF, noise."""
    from continuousflex_dl.core.imaging.ctf import apply_ctf, ctf_image
    deform = deformation(coords, modes, kind, blocks).to(dtype=torch.float32)
    out = []
    for s in range(0, len(amplitudes), chunk):
        sl = slice(s, s + chunk)
        x = deform(torch.as_tensor(amplitudes[sl], dtype=torch.float32))
        img = project_gaussians(x, rotations[sl], shifts[sl], box, pixel_size)
        if ctf is not None:
            img = apply_ctf(img, ctf_image(ctf, box, pixel_size))
        out.append(img)
    img = torch.cat(out).numpy()
    if snr is not None:
        sd = np.sqrt(img.var(axis=(1, 2)) / snr)
        img = img + rng.normal(size=img.shape).astype(np.float32) * sd[:, None, None].astype(np.float32)
    return img


def cramer_rao_std(coords, modes, amplitudes, rotations, shifts, box, pixel_size, ctf, noise_var,
                   chunk=8):
    """(n, K) Å: sqrt of the diagonal of the inverse Fisher information of the amplitudes at the
    true pose, scale known, white noise of variance ``noise_var`` (n,) per pixel."""
    from continuousflex_dl.core.hemnma.alignment.model import DeformableModel, apply_filter
    from continuousflex_dl.core.hemnma.alignment.sizes import projection_filters
    k, n = len(modes), len(amplitudes)
    model = DeformableModel(coords, modes, np.ones(len(coords)), np.ones(len(coords)), box, pixel_size, "cpu")
    out = np.zeros((n, k))
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    for s in range(0, n, chunk):
        sl = slice(s, s + chunk)
        _, jac = model.project_with_jacobian(t(rotations[sl]), t(amplitudes[sl]), t(shifts[sl]))
        m = jac.shape[0]
        filt = projection_filters(ctf, m, box, pixel_size, "cpu", torch.float32)
        jq = apply_filter(jac[:, :k], filt).reshape(m, k, -1).double()
        fisher = torch.matmul(jq, jq.transpose(1, 2)) / torch.as_tensor(noise_var[sl])[:, None, None]
        out[sl] = np.sqrt(np.diagonal(np.linalg.inv(fisher.numpy()), axis1=1, axis2=2))
    return out


def timed(run):
    """(result, wall seconds, process CPU seconds) of ``run()``."""
    t0, ru0 = time.time(), resource.getrusage(resource.RUSAGE_SELF)
    out = run()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    return out, time.time() - t0, (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)


def network_like_seeds(q_true, rot_true, s_true, args, rng):
    """First answers standing for a network's: the truth with Gaussian errors."""
    from continuousflex_dl.core.hemnma.alignment import AlignmentResult
    from continuousflex_dl.core.hemnma.alignment.model import rodrigues
    from continuousflex_dl.core.imaging.geometry import matrix_to_euler
    n = len(q_true)
    axes = rng.normal(size=(n, 3))
    w = axes / np.linalg.norm(axes, axis=1, keepdims=True) * np.radians(args.seed_angle_error)
    turn = rodrigues(torch.as_tensor(w)).numpy()
    return AlignmentResult(amplitudes=q_true + rng.normal(0, args.seed_amp_error, q_true.shape),
                           angles=matrix_to_euler(np.einsum("bij,bjk->bik", turn, rot_true)),
                           shifts=s_true + rng.normal(0, args.seed_shift_error / np.sqrt(2), s_true.shape),
                           score=np.zeros(n))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20, help="number of images")
    ap.add_argument("--size", type=int, default=128, help="box size (px)")
    ap.add_argument("--pixel-size", type=float, default=1.0, help="Å/px at --size")
    ap.add_argument("--snr", type=float, default=None, help="signal-to-noise ratio (default: no noise)")
    ap.add_argument("--defocus-um", type=float, default=0.0, help="CTF defocus in µm (0: no CTF)")
    ap.add_argument("--modes", type=int, nargs="+", default=[7, 8, 9], help="mode numbers (1-based)")
    ap.add_argument("--amp-range", type=float, default=250.0, help="amplitudes searched in +-this Å")
    ap.add_argument("--max-shift", type=float, default=5.0, help="true shifts uniform in +-this px")
    normal = AlignConfig()  # the protocol's default effort
    ap.add_argument("--working-size", type=int, default=normal.working_size, help="px of the final refinement")
    ap.add_argument("--search-size", type=int, default=normal.search_size, help="px of the global search")
    ap.add_argument("--angular-step", type=float, default=normal.angular_step_deg, help="degrees")
    ap.add_argument("--candidates", type=int, default=normal.n_candidates, help="poses refined per image")
    ap.add_argument("--final", type=int, default=normal.n_final, help="of those, refined at the working size")
    ap.add_argument("--refine-iters", type=int, default=normal.refine_iters)
    ap.add_argument("--deformation", default=normal.deformation, choices=DEFORMATIONS,
                    help="how amplitudes displace the reference in the alignment's refinements")
    ap.add_argument("--particle-deformation", default="linear", choices=DEFORMATIONS,
                    help="how the amplitudes displace the particles' structures (the paper: linear)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeded", action="store_true", help="also align from network-like first answers")
    ap.add_argument("--seed-amp-error", type=float, default=20.0)
    ap.add_argument("--seed-angle-error", type=float, default=10.0)
    ap.add_argument("--seed-shift-error", type=float, default=1.0)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    atoms = load_atoms(example_structure_path("4ake"), "heavy")
    coords = centre(atoms.coords)
    nm = compute_modes(coords, n_modes=max(args.modes), cutoff=8.0)
    modes = nm.vectors[np.array(args.modes) - 1]
    q_true = paper_amplitudes(args.n, len(args.modes), rng)
    rot_true = random_rotations(args.n, rng)
    s_true = rng.uniform(-args.max_shift, args.max_shift, size=(args.n, 2))
    ctf = None
    if args.defocus_um > 0:
        from continuousflex_dl.core.imaging.ctf import CTFParams
        ctf = CTFParams(defocus_u=args.defocus_um * 1e4, defocus_v=args.defocus_um * 1e4)
    blocks = atoms.blocks                                                        # one per residue
    images = synthesize(coords, modes, q_true, rot_true, s_true, args.size, args.pixel_size, ctf,
                        args.snr, rng, kind=args.particle_deformation, blocks=blocks)
    if args.snr is not None:
        clean = synthesize(coords, modes, q_true, rot_true, s_true, args.size, args.pixel_size, ctf,
                           kind=args.particle_deformation, blocks=blocks)
        crb = cramer_rao_std(coords, modes, q_true, rot_true, s_true, args.size, args.pixel_size, ctf,
                             clean.var(axis=(1, 2)) / args.snr)

    common = dict(ctf=ctf, max_shift_px=args.max_shift,
                  amplitude_range=np.tile([-args.amp_range, args.amp_range], (len(args.modes), 1)),
                  working_size=args.working_size, search_size=args.search_size,
                  angular_step_deg=args.angular_step, n_candidates=args.candidates,
                  n_final=args.final, refine_iters=args.refine_iters, device=args.device,
                  deformation=args.deformation, blocks=blocks)
    res, elapsed, cpu = timed(lambda: align_particles(images, coords, modes, args.pixel_size, **common))
    amp_err = np.abs(res.amplitudes - q_true)
    ang_err = angular_distance_deg(res.rotations, rot_true)
    sh_err = np.linalg.norm(res.shifts - s_true, axis=1)
    from continuousflex_dl.core.landscape.analysis import mahalanobis_distances, outlier_mask
    keep = outlier_mask(mahalanobis_distances(res.amplitudes), fraction=0.1)  # as the paper: 10 %
    figures = {
        "n": args.n, "size": args.size, "pixel_size": args.pixel_size, "snr": args.snr,
        "defocus_um": args.defocus_um, "modes": args.modes, "deformation": args.deformation,
        "particle_deformation": args.particle_deformation,
        "threads": args.threads,
        "mae_per_mode": dict(zip(map(str, args.modes), np.round(amp_err.mean(0), 3).tolist())),
        "mae_all": round(float(amp_err.mean()), 3),
        "median_amp_error": round(float(np.median(amp_err)), 3),
        "mae_all_after_10pct_outlier_removal": round(float(amp_err[keep].mean()), 3),
        "mae_per_mode_after_outlier_removal": dict(zip(map(str, args.modes),
                                                       np.round(amp_err[keep].mean(0), 3).tolist())),
        "angular_error_mean_deg": round(float(ang_err.mean()), 3),
        "angular_error_median_deg": round(float(np.median(ang_err)), 3),
        "fraction_angle_over_10deg": round(float(np.mean(ang_err > 10)), 3),
        "shift_error_mean_px": round(float(sh_err.mean()), 3),
        "score_mean": round(float(res.score.mean()), 4),
        "uncertainty_coverage_1.96sigma": round(float(np.mean(amp_err < 1.96 * res.amplitude_std)), 3),
        "uncertainty_coverage_good_poses": round(float(np.mean((amp_err < 1.96 * res.amplitude_std)[ang_err < 5])), 3),
        "median_amplitude_std": round(float(np.median(res.amplitude_std)), 3),
        "median_cramer_rao_std_known_pose": (round(float(np.median(crb)), 3) if args.snr is not None
                                             else None),
        "median_angle_std_deg": round(float(np.median(res.angle_std)), 3),
        "seconds": round(elapsed, 2), "images_per_s": round(args.n / elapsed, 3),
        "s_per_image_per_thread": round(elapsed * args.threads / args.n, 3),
        "cpu_s_per_image": round(cpu / args.n, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.seeded:
        seeds = network_like_seeds(q_true, rot_true, s_true, args, rng)
        sres, s_elapsed, s_cpu = timed(lambda: align_particles(images, coords, modes, args.pixel_size,
                                                               seeds=seeds, **common))
        s_err = np.abs(sres.amplitudes - q_true)
        from continuousflex_dl.core.hemnma.alignment import PATH_FALLBACK, PATH_GLOBAL, PATH_SEEDED
        figures.update({
            "seeded_mae_all": round(float(s_err.mean()), 3),
            "seeded_mae_ratio_to_global": round(float(s_err.mean() / amp_err.mean()), 3),
            "seeded_angular_error_median_deg": round(float(np.median(angular_distance_deg(sres.rotations,
                                                                                          rot_true))), 3),
            "seeded_paths": {"global (reference)": int(np.sum(sres.path == PATH_GLOBAL)),
                             "seeded": int(np.sum(sres.path == PATH_SEEDED)),
                             "seeded then global": int(np.sum(sres.path == PATH_FALLBACK))},
            "seeded_uncertainty_coverage_1.96sigma": round(float(np.mean(s_err < 1.96 * sres.amplitude_std)), 3),
            "seeded_median_amplitude_std": round(float(np.median(sres.amplitude_std)), 3),
            "seeded_cpu_s_per_image": round(s_cpu / args.n, 3),
            "seeded_speedup_cpu": round(cpu / s_cpu, 2),
            "seed_mae": round(float(np.abs(seeds.amplitudes - q_true).mean()), 3),
        })
    return report(figures, args.out)


if __name__ == "__main__":
    main()
