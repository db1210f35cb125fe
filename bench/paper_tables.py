"""The DeepHEMNMA paper's Tables I and II on synthetic adenylate kinase, beside the paper's numbers.

Table I: the network trained on ground-truth amplitudes, eight cases (in-plane
rotation no/random x shift no/random x clean/noise+CTF), global mean absolute
error (Å) and per-mode mean ± std on a test set.
Table II: HEMNMA on the hardest case (all random, CTF, SNR 0.1) before and
after 10 % outlier removal, then the network trained on the HEMNMA amplitudes.

Particles: 4AKE chain A heavy atoms, ANM modes 7-9 (cutoff 8 Å), amplitudes
q7 = -200 r, q8 = 200 sin(pi r), q9 = 200 cos(pi r); CTF defocus 0.5 µm; shifts
within ±5 px scaled to the box (±5 px at 256 px). Sizes are parameters: the
paper used 256 px, 6000 training and 2000 test images.

Writes a Markdown table to --out (default bench/results/paper_table<N>.md).

    python bench/paper_tables.py --table 1 --box 64 --working-size 32 --train 6000 --test 2000 --epochs 20
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
from continuousflex_dl.core.alignment import align_particles  # noqa: E402
from continuousflex_dl.core.analysis import amplitude_errors, mahalanobis_distances, outlier_mask  # noqa: E402
from continuousflex_dl.core.ctf import CTFParams  # noqa: E402
from continuousflex_dl.core.dataset import MrcsImageSource  # noqa: E402
from continuousflex_dl.core.nma import compute_modes  # noqa: E402
from continuousflex_dl.core.structure import centre, example_structure_path, load_atoms  # noqa: E402
from continuousflex_dl.core.synthesis import synthesize  # noqa: E402
from continuousflex_dl.core.training import TrainConfig, load_model, predict, train  # noqa: E402

MODES = [7, 8, 9]
#: Table I of the paper (network, global MAE in Å), in the order of CASES.
PAPER_TABLE1 = [2.32, 5.79, 4.83, 7.95, 16.86, 19.62, 23.51, 27.60]
CASES = [(rot, shift, noisy) for noisy in (False, True) for rot in (False, True) for shift in (False, True)]
PAPER_HEMNMA = 6.58


def reference():
    atoms = load_atoms(example_structure_path("4ake"))
    coords = centre(atoms.coords)
    modes = compute_modes(coords, 10, 8.0).vectors[[m - 1 for m in MODES]]
    return atoms, coords, modes


def make_set(folder, name, coords, modes, atoms, n, args, in_plane, shift, noisy, seed):
    return synthesize(Path(folder) / f"{name}.mrcs", coords, modes, n, args.box, args.pixel_size,
                      relation="paper", mode_numbers=MODES, in_plane=in_plane,
                      max_shift_px=5.0 * args.box / 256 if shift else 0.0,
                      ctf=CTFParams(5000.0, 5000.0) if noisy else None, snr=0.1 if noisy else None,
                      sigma=atoms.sigma, weights=atoms.weights, seed=seed, device=args.device)


def entries(result):
    return [(result.stack_path, i) for i in range(result.n_images)]


def train_and_test(folder, train_entries, amplitudes, ids, test_set, args, augment):
    """Train on (stack, index) entries with their amplitudes; predict the test set.
    augment: random in-plane rotations of the training images (for sets with random in-plane angles)."""
    config = TrainConfig(modes=MODES, working_size=min(args.working_size, args.box) or None,
                         pixel_size=args.pixel_size, epochs=args.epochs, batch_size=args.batch_size,
                         learning_rate=args.lr, lr_schedule=args.lr_schedule, augment_rotation=augment,
                         patience=max(5, args.epochs // 3), seed=args.seed)
    out = Path(folder) / f"model_{time.time_ns()}"
    train(train_entries, amplitudes, ids, out, config, device=args.device, seed=args.seed)
    model = load_model(out, args.device)
    plain = predict(model, entries(test_set))
    if not augment or args.rotations < 2:
        return plain, plain
    return predict(model, entries(test_set), rotations=args.rotations), plain


def fmt(report):
    return " | ".join(f"{m:.2f} ± {s:.2f}" for m, s in zip(report.per_mode_mean, report.per_mode_std))


def table1(args, folder):
    atoms, coords, modes = reference()
    rows = ["| In-plane rotation | Shift | Noise + CTF | Mode 7 | Mode 8 | Mode 9 | MAE (Å) | "
            "MAE without rotation averaging (Å) | Paper MAE (Å) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for k, (rot, shift, noisy) in enumerate(CASES):
        if args.cases and k not in args.cases:
            continue
        t0 = time.time()
        tr = make_set(folder, f"train{k}", coords, modes, atoms, args.train, args, rot, shift, noisy, args.seed)
        te = make_set(folder, f"test{k}", coords, modes, atoms, args.test, args, rot, shift, noisy, args.seed + 1)
        pred, plain = train_and_test(folder, entries(tr), tr.amplitudes, np.arange(args.train), te, args,
                                     augment=rot and not args.no_augment)
        rep = amplitude_errors(pred, te.amplitudes, MODES)
        plain_mae = amplitude_errors(plain, te.amplitudes, MODES).mean_abs_error
        yn = lambda b: "random" if b else "no"  # noqa: E731
        rows.append(f"| {yn(rot)} | {yn(shift)} | {'yes' if noisy else 'no'} | {fmt(rep)} | "
                    f"{rep.mean_abs_error:.2f} | {plain_mae:.2f} | {PAPER_TABLE1[k]:.2f} |")
        print(rows[-1], f"({time.time() - t0:.0f} s)", flush=True)
    return rows


def table2(args, folder):
    atoms, coords, modes = reference()
    tr = make_set(folder, "train", coords, modes, atoms, args.train, args, True, True, True, args.seed)
    te = make_set(folder, "test", coords, modes, atoms, args.test, args, True, True, True, args.seed + 1)
    images = MrcsImageSource(entries(tr)).read(np.arange(tr.n_images))
    t0 = time.time()
    res = align_particles(images, coords, modes, args.pixel_size, ctf=tr.ctf, sigma=atoms.sigma,
                          weights=atoms.weights, max_shift_px=5.0 * args.box / 256 + 1,
                          working_size=min(args.working_size, args.box), device=args.device, seed=args.seed)
    seconds = time.time() - t0
    keep = outlier_mask(mahalanobis_distances(res.amplitudes), fraction=0.1)
    hem_all = amplitude_errors(res.amplitudes, tr.amplitudes, MODES)
    hem_kept = amplitude_errors(res.amplitudes[keep], tr.amplitudes[keep], MODES)
    # The network learns the HEMNMA amplitudes of the kept particles only.
    kept_entries = [e for e, k in zip(entries(tr), keep) if k]
    pred, _ = train_and_test(folder, kept_entries, res.amplitudes[keep], np.flatnonzero(keep), te, args,
                             augment=not args.no_augment)
    net = amplitude_errors(pred, te.amplitudes, MODES)
    return ["| Method | Mode 7 | Mode 8 | Mode 9 | MAE (Å) | Paper MAE (Å) |",
            "|---|---|---|---|---|---|",
            f"| HEMNMA, all ({tr.n_images} images, {seconds / tr.n_images:.2f} s/image) | {fmt(hem_all)} | "
            f"{hem_all.mean_abs_error:.2f} | |",
            f"| HEMNMA, 10 % outliers removed | {fmt(hem_kept)} | {hem_kept.mean_abs_error:.2f} | "
            f"{PAPER_HEMNMA:.2f} |",
            f"| DeepHEMNMA trained on HEMNMA ({args.test} test images) | {fmt(net)} | "
            f"{net.mean_abs_error:.2f} | |"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", type=int, choices=[1, 2], default=1)
    ap.add_argument("--box", type=int, default=64, help="image size (px); the paper: 256")
    ap.add_argument("--pixel-size", type=float, default=None, help="Å/px (default: a 128 Å box, 128 / --box)")
    ap.add_argument("--train", type=int, default=2000, help="training images (the paper: 6000)")
    ap.add_argument("--test", type=int, default=500, help="test images (the paper: 2000)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak (one-cycle) or initial learning rate")
    ap.add_argument("--lr-schedule", default="onecycle", choices=["onecycle", "plateau", "cosine", "none"])
    ap.add_argument("--rotations", type=int, default=8,
                    help="in-plane rotations averaged at prediction when training was augmented (1: none)")
    ap.add_argument("--cases", type=lambda t: [int(c) for c in t.split(",")], default=None,
                    help="Table I rows to run, 0-based and comma-separated (default: all eight)")
    ap.add_argument("--no-augment", action="store_true",
                    help="no in-plane rotation augmentation (by default on for sets with random in-plane angles)")
    ap.add_argument("--working-size", type=int, default=64, help="network/HEMNMA input size (px)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.pixel_size = args.pixel_size or 128.0 / args.box
    out = args.out or Path(__file__).parent / "results" / f"paper_table{args.table}.md"
    t0 = time.time()
    with tempfile.TemporaryDirectory() as folder:
        rows = (table1 if args.table == 1 else table2)(args, folder)
    header = (f"Table {args.table}: {args.box} px at {args.pixel_size:.2f} Å/px, {args.train} training / "
              f"{args.test} test images, {args.epochs} epochs ({args.lr_schedule}, learning rate {args.lr:g}), "
              f"in-plane rotation averaging {args.rotations} where augmented, "
              f"working size {args.working_size} px, device {args.device}, {time.time() - t0:.0f} s.\n\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + "\n".join(rows) + "\n")
    print(header + "\n".join(rows))
    print(f"Written to {out}")


if __name__ == "__main__":
    main()
