"""Reliability of HEMNMA answers on physical-style particles (issues 26 and 31).

Particles: adenylate kinase (4AKE chain A, hydrogens) deformed along ANM modes 7-9 of its heavy
atoms with the DeepHEMNMA paper's amplitudes, rendered by the independent renderer of
``continuousflex_dl/tests/physical_particles.py`` (``adenylate_kinase_set``: 5-Gaussian
scattering factors, B-factors, an 80 Å² envelope, Fourier-slice projection, CTF 0.5-2 um,
detector MTF), ``--size`` px at ``--pixel-size`` Å/px, white noise at each ``--snr``.

For each SNR prints: the fraction of poses within 10°, the coverage of +-1.96 sigma of the
amplitude errors with the alignment's Laplace sigma (before) and with the honest sigma of
core.hemnma.reliability (after), the mean reliability against the fraction of right poses,
per reliability bin, how many particles are reliable, the summary's warning, and the CPU
seconds of the alignment and of the calibration. Then the pixel-size check
(core.hemnma.pixel_size) of the first set labelled at half, its own and twice its pixel size.
``--out`` writes the figures as JSON.

Example: python bench/bench_reliability.py --n 150 --snr 0.1 0.01
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_alignment import timed  # noqa: E402
from figures import report  # noqa: E402
from continuousflex_dl.core.hemnma.alignment import align_particles  # noqa: E402
from continuousflex_dl.core.hemnma.pixel_size import check_pixel_size  # noqa: E402
from continuousflex_dl.core.hemnma.reliability import RELIABLE, RIGHT_POSE_DEG, calibrate  # noqa: E402
from continuousflex_dl.core.imaging.ctf import CTFParams  # noqa: E402
from continuousflex_dl.core.imaging.geometry import angular_distance_deg  # noqa: E402
from continuousflex_dl.tests import physical_particles as pp  # noqa: E402

BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0001)


def one_snr(data, snr: float, seed: int) -> dict:
    images = data.noisy(snr, seed)
    options = dict(max_shift_px=3.0 * data.clean.shape[-1] / 64, amplitude_range=np.tile([-250.0, 250.0], (3, 1)),
                   sigma=data.sigma, weights=data.weights)

    def align(imgs, ctf):
        return align_particles(imgs, data.coords, data.modes, data.pixel_size, ctf=ctf, **options)
    result, _, align_cpu = timed(lambda: align(images, data.ctf))
    rel, _, cal_cpu = timed(lambda: calibrate(images, result, data.coords, data.modes, data.pixel_size, align,
                                              ctf=data.ctf, sigma=data.sigma, weights=data.weights, seed=seed))
    right = angular_distance_deg(result.rotations, data.rotations) < RIGHT_POSE_DEG
    err = result.amplitudes - data.amplitudes
    reliable = rel.reliability >= RELIABLE
    bins = []
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        b = (rel.reliability >= lo) & (rel.reliability < hi)
        if b.any():
            bins.append({"bin": f"{lo:.1f}-{min(hi, 1):.1f}", "n": int(b.sum()),
                         "mean_reliability": round(float(rel.reliability[b].mean()), 3),
                         "fraction_right": round(float(right[b].mean()), 3)})
    return {"snr": snr, "fraction_right": round(float(right.mean()), 3),
            "mean_reliability": round(float(rel.reliability.mean()), 3),
            "reliable": f"{int(reliable.sum())} of {len(right)} (right among them: "
                        f"{float(right[reliable].mean()) if reliable.any() else float('nan'):.3f})",
            "coverage_laplace": round(float(np.mean(np.abs(err) < 1.96 * result.amplitude_std)), 3),
            "coverage_honest": round(float(np.mean(np.abs(err) < 1.96 * rel.amplitude_std)), 3),
            "coverage_honest_right_poses": round(float(np.mean(np.abs(err[right]) < 1.96 * rel.amplitude_std[right])), 3),
            "median_sigma_laplace": np.round(np.median(result.amplitude_std, 0), 1).tolist(),
            "median_sigma_honest": np.round(np.median(rel.amplitude_std, 0), 1).tolist(),
            "amplitude_mae": np.round(np.abs(err).mean(0), 1).tolist(),
            "kappa": np.round(rel.kappa, 2).tolist(), "calibration": rel.calibration,
            "warning": bool(rel.warnings(result.score)), "bins": bins,
            "cpu_s": {"alignment": round(align_cpu, 1), "calibration": round(cal_cpu, 1)}}


def pixel_checks(data, snr: float, seed: int) -> dict:
    """The check of the set labelled at half, its own and twice its pixel size (a CTF estimated
    at the label: the defocus scales with the label squared)."""
    images = data.noisy(snr, seed)
    out = {}
    for factor in (0.5, 0.8, 1.0, 1.25, 2.0):
        label = data.pixel_size * factor
        dz = np.asarray(data.ctf.defocus_u) * factor ** 2
        check, wall, _ = timed(lambda: check_pixel_size(images, data.coords, label,
                                                        ctf=CTFParams(defocus_u=dz, defocus_v=dz),
                                                        sigma=data.sigma, weights=data.weights))
        out[f"labelled {label:g} (snr {snr:g})"] = {"fitted": None if check.fitted is None else round(check.fitted, 3),
                                                     "verdict": check.verdict()[0], "wall_s": round(wall, 2)}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=150, help="particles per set")
    ap.add_argument("--size", type=int, default=64, help="box (px)")
    ap.add_argument("--pixel-size", type=float, default=2.0, help="Å/px")
    ap.add_argument("--snr", type=float, nargs="+", default=[0.1, 0.01])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = pp.adenylate_kinase_set(args.n, box=args.size, pixel_size=args.pixel_size, seed=args.seed)
    figures = {"n": args.n, "size": args.size, "pixel_size": args.pixel_size, "threads": args.threads}
    for snr in args.snr:
        figures[f"snr {snr:g}"] = one_snr(data, snr, args.seed + 6)
    for snr in args.snr:
        figures.update(pixel_checks(data, snr, args.seed + 6))
    return report(figures, args.out)


if __name__ == "__main__":
    main()
