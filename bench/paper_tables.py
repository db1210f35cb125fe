"""The DeepHEMNMA paper's Tables I and II on synthetic adenylate kinase, beside the paper's numbers.

Table I: the network trained on ground-truth amplitudes, eight cases in the
paper's row order: (no in-plane rotation, no shift), (no rotation, random
shift), (random in-plane rotation, no shift), (random rotation and shift),
each clean and then with noise (SNR 0.1) and CTF; projection directions are
random in every row. Global mean absolute error (Å) and per-mode mean ± std
on a test set, beside a second network trained for the same wall time
(epochs of --train images each, as many as a timed one-epoch run says fit)
on particles simulated on the fly and matched to the training set
(core/network/simulator.py: its CTFs, noise, amplitude and shift ranges; no image
seen twice).
Table II: HEMNMA on the hardest case (all random, CTF, SNR 0.1) before and
after 10 % outlier removal, then the network trained on the HEMNMA amplitudes
of the kept particles, and the network trained on the simulated stream then
fine-tuned on those amplitudes.

Geometry (the paper's by default): 256 px images; the pixel size is not in the
paper, 1 Å/px is assumed (a parameter; by default 256 / box Å/px, so a smaller
box keeps the 256 Å field of view); SNR = var(clean CTF-modulated projection) /
var(noise) over the whole box; shifts within ±5 px at 256 px (±5 Å); CTF
defocus 0.5 µm. What the network sees: a 128 Å window around the box centre,
Fourier-cropped to the working size (64 px), as saved in the model's config.
Particles: 4AKE chain A heavy atoms, ANM modes 7-9 (cutoff 8 Å), amplitudes
q7 = -200 r, q8 = 200 sin(pi r), q9 = 200 cos(pi r). The paper used 6000
training and 2000 test images.

Writes a Markdown table to --out (default bench/results/paper_table<N>.md).

    python bench/paper_tables.py --table 1                    # the paper's geometry (a GPU: hours)
    python bench/paper_tables.py --table 1 --box 64 --working-size 32 --train 300 --test 100 --epochs 2
    python bench/paper_tables.py --table 2 --box 64 --train 400 --test 200 --epochs 15
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from continuousflex_dl.core.hemnma.alignment import align_particles  # noqa: E402
from continuousflex_dl.core.landscape.analysis import amplitude_errors, mahalanobis_distances, outlier_mask  # noqa: E402
from continuousflex_dl.core.imaging.ctf import CTFParams  # noqa: E402
from continuousflex_dl.core.imaging.dataset import MrcsImageSource  # noqa: E402
from continuousflex_dl.core.modes.nma import compute_modes  # noqa: E402
from continuousflex_dl.core.network.simulator import Reference  # noqa: E402
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms  # noqa: E402
from continuousflex_dl.core.modes.synthesis import synthesize  # noqa: E402
from continuousflex_dl.core.imaging.dataset import Preprocessing  # noqa: E402
from continuousflex_dl.core.network.training import TrainConfig, load_model, predict, train  # noqa: E402

MODES = [7, 8, 9]
#: Table I cases (in-plane rotation, shift, noise + CTF) in the paper's row order.
CASES = [(rot, shift, noisy) for rot in (False, True) for shift in (False, True) for noisy in (False, True)]
#: Table I of the paper (network, global MAE in Å), one per case of CASES.
PAPER_TABLE1 = [2.32, 5.79, 4.83, 7.95, 16.86, 19.62, 23.51, 27.60]
#: Table II of the paper: HEMNMA after 10 % outlier removal, and the network trained on it (MAE, Å).
PAPER_HEMNMA, PAPER_TABLE2_NETWORK = 6.58, 20.22


def reference():
    atoms = load_atoms(example_structure_path("4ake"))
    coords = centre(atoms.coords)
    modes = compute_modes(coords, 10, 8.0).vectors[[m - 1 for m in MODES]]
    return atoms, coords, modes


def make_set(folder, name, coords, modes, atoms, n, args, in_plane, shift, noisy, seed):
    return synthesize(Path(folder) / f"{name}.mrcs", coords, modes, n, args.box, args.pixel_size,
                      relation="paper", mode_numbers=MODES, in_plane=in_plane,
                      max_shift_px=args.max_shift if shift else 0.0,
                      ctf=CTFParams(5000.0, 5000.0) if noisy else None, snr=args.snr if noisy else None,
                      sigma=atoms.sigma, weights=atoms.weights, seed=seed, device=args.device)


def entries(result):
    return [(result.stack_path, i) for i in range(result.n_images)]


def train_network(folder, train_entries, amplitudes, ids, args, augment, data="particles",
                  simulation=None, epochs=None):
    """Train on (stack, index) entries with their amplitudes.

    augment: random in-plane rotations of the training images (sets with random in-plane
    angles). data: the training-data source (DataConfig.source); simulation: (Reference, the training set's CTFs or None,
    its poses (angles, shifts), in_plane) for the simulated stream. epochs: None for --epochs.
    Returns (model folder, training seconds).
    """
    epochs = epochs or args.epochs
    in_plane = simulation[3] if simulation else True
    config = TrainConfig.build(modes=MODES, working_size=args.working_size, window=args.window,
                               pixel_size=args.pixel_size, epochs=epochs, batch_size=args.batch_size,
                               learning_rate=args.lr, lr_schedule=args.lr_schedule,
                               augment_rotation=augment and data == "particles",
                               patience=max(5, epochs // 3), seed=args.seed, source=data,
                               sim_images=args.sim_images or len(train_entries), sim_in_plane=in_plane,
                               finetune_epochs=args.finetune_epochs)
    out = Path(folder) / f"model_{time.time_ns()}"
    extra = {}
    if simulation:
        extra = dict(reference=simulation[0], particle_ctf=simulation[1], poses=simulation[2])
    t0 = time.time()
    train(train_entries, amplitudes, ids, out, config, device=args.device, seed=args.seed, **extra)
    return out, time.time() - t0


def train_and_test(folder, train_entries, amplitudes, ids, test_set, args, augment, data="particles",
                   simulation=None, epochs=None):
    """:func:`train_network`, then predict the test set.
    Returns (rotation-averaged prediction, plain prediction, training seconds).
    """
    out, seconds = train_network(folder, train_entries, amplitudes, ids, args, augment, data, simulation,
                                 epochs)
    model = load_model(out, args.device)
    plain = predict(model, entries(test_set))
    if not augment or args.rotations < 2:
        return plain, plain, seconds
    return predict(model, entries(test_set), rotations=args.rotations), plain, seconds


def fmt(report):
    return " | ".join(f"{m:.2f} ± {s:.2f}" for m, s in zip(report.per_mode_mean, report.per_mode_std))


def table1(args, folder):
    atoms, coords, modes = reference()
    ref = Reference(coords, modes, atoms.sigma, atoms.weights)
    rows = ["| In-plane rotation | Shift | Noise + CTF | Mode 7 | Mode 8 | Mode 9 | MAE (Å) | "
            "MAE without rotation averaging (Å) | Paper MAE (Å) | Simulated stream: MAE (Å) | "
            "Training s (truth / simulated, its epochs) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, (rot, shift, noisy) in enumerate(CASES):
        if args.cases and k not in args.cases:
            continue
        t0 = time.time()
        tr = make_set(folder, f"train{k}", coords, modes, atoms, args.train, args, rot, shift, noisy, args.seed)
        te = make_set(folder, f"test{k}", coords, modes, atoms, args.test, args, rot, shift, noisy, args.seed + 1)
        pred, plain, seconds = train_and_test(folder, entries(tr), tr.amplitudes, np.arange(args.train), te,
                                              args, augment=rot and not args.no_augment)
        rep = amplitude_errors(pred, te.amplitudes, MODES)
        plain_mae = amplitude_errors(plain, te.amplitudes, MODES).mean_abs_error
        sim_mae, sim_seconds, sim_epochs = float("nan"), float("nan"), 0
        if not args.no_simulated:
            sim = dict(augment=rot, data="simulated", simulation=(ref, tr.ctf, (tr.angles, tr.shifts), rot))
            # The same wall time as the network trained on the truth: a one-epoch run of the
            # stream (rendering the full box costs more than training on the window's crop)
            # gives the number of epochs that fit in it.
            _, probe = train_network(folder, entries(tr), tr.amplitudes, np.arange(args.train), args,
                                     epochs=1, **sim)
            sim_epochs = max(1, int(seconds // probe))
            sim_pred, _, sim_seconds = train_and_test(folder, entries(tr), tr.amplitudes, np.arange(args.train),
                                                      te, args, epochs=sim_epochs, **sim)
            sim_mae = amplitude_errors(sim_pred, te.amplitudes, MODES).mean_abs_error
        yn = lambda b: "random" if b else "no"  # noqa: E731
        rows.append(f"| {yn(rot)} | {yn(shift)} | {'yes' if noisy else 'no'} | {fmt(rep)} | "
                    f"{rep.mean_abs_error:.2f} | {plain_mae:.2f} | {PAPER_TABLE1[k]:.2f} | {sim_mae:.2f} | "
                    f"{seconds:.0f} / {sim_seconds:.0f}, {sim_epochs} |")
        print(rows[-1], f"({time.time() - t0:.0f} s)", flush=True)
    return rows


def table2(args, folder):
    atoms, coords, modes = reference()
    tr = make_set(folder, "train", coords, modes, atoms, args.train, args, True, True, True, args.seed)
    te = make_set(folder, "test", coords, modes, atoms, args.test, args, True, True, True, args.seed + 1)
    images = MrcsImageSource(entries(tr)).read(np.arange(tr.n_images))
    t0 = time.time()
    res = align_particles(images, coords, modes, args.pixel_size, ctf=tr.ctf, sigma=atoms.sigma,
                          weights=atoms.weights, max_shift_px=args.max_shift + 1,
                          working_size=min(args.working_size, args.box), device=args.device, seed=args.seed)
    seconds = time.time() - t0
    keep = outlier_mask(mahalanobis_distances(res.amplitudes), fraction=0.1)
    hem_all = amplitude_errors(res.amplitudes, tr.amplitudes, MODES)
    hem_kept = amplitude_errors(res.amplitudes[keep], tr.amplitudes[keep], MODES)
    # The networks learn the HEMNMA amplitudes of the kept particles only.
    kept_entries = [e for e, k in zip(entries(tr), keep) if k]
    pred, _, _ = train_and_test(folder, kept_entries, res.amplitudes[keep], np.flatnonzero(keep), te, args,
                                augment=not args.no_augment)
    net = amplitude_errors(pred, te.amplitudes, MODES)
    rows = ["| Method | Mode 7 | Mode 8 | Mode 9 | MAE (Å) | Paper MAE (Å) |",
            "|---|---|---|---|---|---|",
            f"| HEMNMA, all ({tr.n_images} images, {seconds / tr.n_images:.2f} s/image) | {fmt(hem_all)} | "
            f"{hem_all.mean_abs_error:.2f} | |",
            f"| HEMNMA, 10 % outliers removed | {fmt(hem_kept)} | {hem_kept.mean_abs_error:.2f} | "
            f"{PAPER_HEMNMA:.2f} |",
            f"| DeepHEMNMA trained on HEMNMA ({args.test} test images) | {fmt(net)} | "
            f"{net.mean_abs_error:.2f} | {PAPER_TABLE2_NETWORK:.2f} |"]
    if not args.no_simulated:
        ref = Reference(coords, modes, atoms.sigma, atoms.weights)
        poses = (res.angles[keep], res.shifts[keep])
        sim_pred, _, _ = train_and_test(folder, kept_entries, res.amplitudes[keep], np.flatnonzero(keep), te,
                                        args, augment=True, data="simulated+finetune",
                                        simulation=(ref, tr.ctf.select(keep), poses, True))
        sim = amplitude_errors(sim_pred, te.amplitudes, MODES)
        rows.append(f"| DeepHEMNMA, simulated stream then fine-tuned on HEMNMA | {fmt(sim)} | "
                    f"{sim.mean_abs_error:.2f} | |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", type=int, choices=[1, 2], default=1)
    ap.add_argument("--box", type=int, default=256, help="image size (px); the paper: 256")
    ap.add_argument("--pixel-size", type=float, default=None,
                    help="Å/px (default 256 / --box: a 256 Å box, the paper's 256 px at an assumed 1 Å/px)")
    ap.add_argument("--max-shift", type=float, default=None,
                    help="largest shift (px) of the shifted cases (default: 5 px at 256 px, scaled with --box)")
    ap.add_argument("--snr", type=float, default=0.1, help="SNR of the noisy cases, over the whole box")
    ap.add_argument("--window", type=float, default=128.0,
                    help="side (Å) of the real-space window the network sees (0: the whole box)")
    ap.add_argument("--working-size", type=int, default=64, help="network input (px) after the window; HEMNMA's")
    ap.add_argument("--train", type=int, default=6000, help="training images (the paper: 6000)")
    ap.add_argument("--test", type=int, default=2000, help="test images (the paper: 2000)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--sim-images", type=int, default=0,
                    help="simulated images per epoch (default: --train, the same number of steps)")
    ap.add_argument("--finetune-epochs", type=int, default=5, help="fine-tuning epochs of Table II's last row")
    ap.add_argument("--no-simulated", action="store_true", help="skip the networks trained on the simulated stream")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak (one-cycle) or initial learning rate")
    ap.add_argument("--lr-schedule", default="onecycle", choices=["onecycle", "plateau", "cosine", "none"])
    ap.add_argument("--rotations", type=int, default=8,
                    help="in-plane rotations averaged at prediction for cases with random in-plane angles (1: none)")
    ap.add_argument("--cases", type=lambda t: [int(c) for c in t.split(",")], default=None,
                    help="Table I rows to run, 0-based in the paper's order, comma-separated (default: all eight)")
    ap.add_argument("--no-augment", action="store_true",
                    help="no in-plane rotation augmentation (by default on for sets with random in-plane angles)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.pixel_size = args.pixel_size or 256.0 / args.box
    args.max_shift = 5.0 * args.box / 256 if args.max_shift is None else args.max_shift
    args.window = args.window or None
    pre = Preprocessing(pixel_size=args.pixel_size, window=args.window)
    window_px = pre.input_size(args.box)
    try:
        pre.check(args.box)
    except ValueError as err:
        ap.error(f"--window: {err}")
    args.working_size = min(args.working_size, window_px)
    out = args.out or Path(__file__).parent / "results" / f"paper_table{args.table}.md"
    t0 = time.time()
    with tempfile.TemporaryDirectory() as folder:
        rows = (table1 if args.table == 1 else table2)(args, folder)
    window = f"a {args.window:g} Å window ({window_px} px)" if args.window else "the whole box"
    header = (f"Table {args.table}: {args.box} px at {args.pixel_size:g} Å/px, SNR {args.snr:g} over the box, "
              f"shifts within ±{args.max_shift:g} px, {args.train} training / {args.test} test images, "
              f"{args.epochs} epochs ({args.lr_schedule}, learning rate {args.lr:g}, batch {args.batch_size}); "
              f"the network sees {window} Fourier-cropped to {args.working_size} px; in-plane rotation "
              f"averaging {args.rotations} where rotated; simulated stream: "
              f"{args.sim_images or args.train} new images per epoch; device {args.device}, "
              f"{time.time() - t0:.0f} s.\n\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + "\n".join(rows) + "\n")
    print(header + "\n".join(rows))
    print(f"Written to {out}")


if __name__ == "__main__":
    main()
