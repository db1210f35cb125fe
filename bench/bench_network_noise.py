"""DeepHEMNMA at realistic noise (issue 29): the network trained on HEMNMA labels of physical-style
particles, against the truth and the mean predictor.

Particles: adenylate kinase (4AKE chain A, hydrogens) deformed along ANM modes 7-9 of its heavy
atoms with the DeepHEMNMA paper's amplitudes (q7 = -200 r, q8 = 200 sin(pi r), q9 = 200 cos(pi r)
Å), rendered by the independent renderer of ``continuousflex_dl/tests/physical_particles.py``
(``adenylate_kinase_set``: 5-Gaussian scattering factors, B-factors, an 80 Å² envelope,
Fourier-slice projection, CTF with defocus 0.5-2 um, detector MTF), ``--size`` px at
``--pixel-size`` Å/px (default 64 px at 2 Å/px, a 128 Å box), white noise at ``--snr`` over the box.

1. **Labels** (cached in ``--cache``, keyed by the particle settings and the SNR): HEMNMA
   (core.hemnma.alignment.align_particles, the 'normal' preset, the heavy-atom reference)
   aligns all ``--train + --test`` particles; the first ``--train`` are the training set, the
   last ``--test`` the new particles, which keep their own HEMNMA poses (as particles from a
   consensus refinement would). The honest sigma of core.hemnma.reliability gives the coverage.
2. **Network**: core.network.training.train on the training particles' images and HEMNMA
   amplitudes (and poses), with the simulated stream from the same reference (``--source``), then
   prediction of the new particles.

Prints: HEMNMA's amplitude MAE (Å, against the truth), its median angular error and fraction of
poses within 10°, its shift error (px), the coverage of ±1.96σ; the network's prediction MAE on the
new particles, the mean predictor's (always the mean of the training labels), their ratio, the MAE
of the training particles' true mean (for reference), and the training's CPU seconds (process CPU
time, ``--threads`` threads). ``--out`` writes the figures as JSON.

Example (issue 29's setting; --no-pose-normalise for the network without pose normalisation):

    python bench/bench_network_noise.py --snr 0.1 --cache /tmp/noise_cache --threads 1
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_alignment import timed  # noqa: E402
from figures import report  # noqa: E402
from continuousflex_dl.core.hemnma.alignment import align_particles  # noqa: E402
from continuousflex_dl.core.hemnma.reliability import RIGHT_POSE_DEG, calibrate  # noqa: E402
from continuousflex_dl.core.imaging.geometry import angular_distance_deg, euler_to_matrix  # noqa: E402
from continuousflex_dl.core.modes.reference import Reference  # noqa: E402
from continuousflex_dl.core.network import training as tr  # noqa: E402
from continuousflex_dl.tests import physical_particles as pp  # noqa: E402


def labels(args, data, images) -> dict:
    """HEMNMA's answers for every particle, and its honest sigma (core.hemnma.reliability)."""
    options = dict(max_shift_px=args.max_shift, amplitude_range=np.tile([-250.0, 250.0], (3, 1)),
                   sigma=data.sigma, weights=data.weights)

    def align(imgs, ctf):
        return align_particles(imgs, data.coords, data.modes, data.pixel_size, ctf=ctf, **options)
    result, wall, cpu = timed(lambda: align(images, data.ctf))
    rel, _, cal_cpu = timed(lambda: calibrate(images, result, data.coords, data.modes, data.pixel_size, align,
                                              ctf=data.ctf, sigma=data.sigma, weights=data.weights,
                                              seed=args.seed))
    return dict(amplitudes=result.amplitudes, angles=result.angles, shifts=result.shifts, score=result.score,
                honest_std=rel.amplitude_std, align_cpu_s=cpu, calibration_cpu_s=cal_cpu)


def cached_labels(args, data, images) -> dict:
    key = f"ak_n{args.train + args.test}_s{args.size}_p{args.pixel_size:g}_snr{args.snr:g}_seed{args.seed}.npz"
    path = Path(args.cache) / key if args.cache else None
    if path is not None and path.exists():
        return dict(np.load(path))
    out = labels(args, data, images)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **out)
        tmp.replace(path)
    return out


def hemnma_figures(data, lab, rows) -> dict:
    err = lab["amplitudes"][rows] - data.amplitudes[rows]
    ang = angular_distance_deg(data.rotations[rows], euler_to_matrix(lab["angles"][rows]))
    shift = np.linalg.norm(lab["shifts"][rows] - data.shifts[rows], axis=1)
    return {"amplitude_mae": round(float(np.abs(err).mean()), 2),
            "amplitude_mae_per_mode": np.round(np.abs(err).mean(0), 1).tolist(),
            "angular_error_median_deg": round(float(np.median(ang)), 2),
            "fraction_within_10deg": round(float(np.mean(ang < RIGHT_POSE_DEG)), 3),
            "shift_error_median_px": round(float(np.median(shift)), 2),
            "coverage_1.96_honest_sigma": round(float(np.mean(np.abs(err) < 1.96 * lab["honest_std"][rows])), 3)}


def network(args, data, images, lab) -> dict:
    n, m = args.train, args.train + args.test
    train_rows, test_rows = np.arange(n), np.arange(n, m)
    reference = Reference(data.coords, data.modes, data.sigma, data.weights)
    settings = dict(modes=[7, 8, 9], pixel_size=data.pixel_size, source=args.source, epochs=args.epochs,
                    batch_size=args.batch_size, learning_rate=args.lr, sim_images=args.sim_images,
                    finetune_epochs=args.finetune_epochs, architecture=args.architecture,
                    sim_noise_ramp=args.noise_ramp, working_size=args.working_size)
    if args.pose_normalise:
        settings["pose_normalise"] = True
    config = tr.TrainConfig.build(**settings)
    poses = (lab["angles"][train_rows], lab["shifts"][train_rows])
    ctf_train = data.ctf.select(train_rows)
    with tempfile.TemporaryDirectory() as tmp:
        rows, wall, cpu = timed(lambda: tr.train(
            images[train_rows], lab["amplitudes"][train_rows], train_rows, tmp, config, seed=args.train_seed,
            poses=poses, ctf=ctf_train if args.phase_flip else None, reference=reference, particle_ctf=ctf_train))
        model = tr.load_model(tmp)
        pred = tr.predict(model, images[test_rows], ctf=data.ctf.select(test_rows) if args.phase_flip else None,
                          poses=(lab["angles"][test_rows], lab["shifts"][test_rows]))  # their own HEMNMA poses
    truth = data.amplitudes[test_rows]
    mae = float(np.abs(pred - truth).mean())
    mean_mae = float(np.abs(lab["amplitudes"][train_rows].mean(0) - truth).mean())
    return {"settings": {k: v for k, v in vars(args).items() if k not in ("cache", "out")},
            "prediction_mae": round(mae, 2), "prediction_mae_per_mode": np.round(np.abs(pred - truth).mean(0), 1).tolist(),
            "mean_predictor_mae": round(mean_mae, 2), "ratio": round(mae / mean_mae, 3),
            "true_mean_mae": round(float(np.abs(data.amplitudes[train_rows].mean(0) - truth).mean()), 2),
            "best_val_mae": round(min(r["val_mae"] for r in rows), 2), "epochs_run": len(rows),
            "train_cpu_s": round(cpu, 1), "train_cpu_min": round(cpu / 60, 2), "train_wall_s": round(wall, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--snr", type=float, default=0.1, help="SNR over the box")
    ap.add_argument("--train", type=int, default=300, help="training particles (HEMNMA-labelled)")
    ap.add_argument("--test", type=int, default=100, help="new particles predicted")
    ap.add_argument("--size", type=int, default=64, help="box (px)")
    ap.add_argument("--pixel-size", type=float, default=2.0, help="Å/px")
    ap.add_argument("--max-shift", type=float, default=3.0, help="shifts within ±px (truth and search)")
    ap.add_argument("--cache", default=None, help="folder keeping the HEMNMA labels between runs")
    ap.add_argument("--labels-only", action="store_true", help="stop after the HEMNMA labels")
    ap.add_argument("--source", default="simulated+finetune", choices=tr.DATA_CHOICES)
    ap.add_argument("--pose-normalise", action=argparse.BooleanOptionalAction, default=True,
                    help="turn and centre every image by its pose before the network (default; the new "
                         "particles by their own HEMNMA poses)")
    ap.add_argument("--phase-flip", action="store_true")
    ap.add_argument("--epochs", type=int, default=10, help="epochs (simulated epochs with simulation)")
    ap.add_argument("--sim-images", type=int, default=3000)
    ap.add_argument("--finetune-epochs", type=int, default=6)
    ap.add_argument("--noise-ramp", type=int, default=0)
    ap.add_argument("--architecture", default="resnet18")
    ap.add_argument("--working-size", type=int, default=64, help="the network's input (px)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1, help="the particles and their noise")
    ap.add_argument("--train-seed", type=int, default=1, help="the network's split, initialisation and stream")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    m = args.train + args.test
    data, _, render_cpu = timed(lambda: pp.adenylate_kinase_set(m, box=args.size, pixel_size=args.pixel_size,
                                                                 max_shift=args.max_shift, seed=args.seed))
    images = data.noisy(args.snr, args.seed + 6)
    lab = cached_labels(args, data, images)
    figures = {"snr": args.snr, "box": f"{args.size} px at {args.pixel_size:g} Å/px", "threads": args.threads,
               "hemnma_train": hemnma_figures(data, lab, np.arange(args.train)),
               "hemnma_test": hemnma_figures(data, lab, np.arange(args.train, m)),
               "hemnma_cpu_s": {"alignment": round(float(lab["align_cpu_s"]), 1),
                                "calibration": round(float(lab["calibration_cpu_s"]), 1)}}
    if not args.labels_only:
        figures["network"] = network(args, data, images, lab)
    return report(figures, args.out)


if __name__ == "__main__":
    main()
