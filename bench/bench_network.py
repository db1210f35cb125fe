"""DeepHEMNMA network speed: prediction and training images/s (issue 5 target: >= 100 images/s
predicted at 128 px on 2 CPU cores).

Prediction goes through ``training.predict`` end to end (preprocessing, network,
de-standardisation) on random in-memory images with a randomly initialised
ResNet34 (speed does not depend on the weights), in three settings: float32 at
the full 128-px working size, bfloat16 autocast, and Fourier cropping to a
64-px working size. Training throughput is that of ``training.train`` (one
epoch, metrics.csv's images_per_s).

    python bench/bench_network.py [--size 128] [--images 128] [--repeats 3] [--threads 2] [--device cpu]

The machine may be shared: the best of the repeats is the figure to compare.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from continuousflex_dl.core.network import training as tr  # noqa: E402
from continuousflex_dl.core.network.resnet import build_model  # noqa: E402


def prediction_rates(images, working_size, device, batch_size, bfloat16, repeats):
    """images/s of ``repeats`` full predictions (after one warm-up batch)."""
    config = tr.TrainConfig.build(modes=[7, 8, 9], image_size=images.shape[-1], working_size=working_size,
                                  n_outputs=3, target_mean=[0.0] * 3, target_std=[1.0] * 3)
    torch.manual_seed(0)
    model = tr.LoadedModel(build_model(3).to(device).eval(), config, torch.device(device))
    tr.predict(model, images[:batch_size], batch_size=batch_size, bfloat16=bfloat16)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tr.predict(model, images, batch_size=batch_size, bfloat16=bfloat16)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(images) / (time.perf_counter() - t0))
    return np.array(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="image box (px)")
    parser.add_argument("--images", type=int, default=128, help="images to predict")
    parser.add_argument("--repeats", type=int, default=3, help="timed predictions of all images")
    parser.add_argument("--train-images", type=int, default=96, help="images in the training epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(max(args.images, args.train_images), args.size, args.size)).astype(np.float32)
    print(f"device: {args.device}  threads: {args.threads}  torch {torch.__version__}  "
          f"image: {args.size} px  ResNet34 + 4-layer MLP, 3 modes")
    for label, ws, bf in [("float32, working size %d" % args.size, None, False),
                          ("bfloat16 autocast, working size %d" % args.size, None, True),
                          ("float32, Fourier-cropped to %d" % (args.size // 2), args.size // 2, False)]:
        rates = prediction_rates(images[:args.images], ws, args.device, args.batch_size, bf, args.repeats)
        print(f"prediction ({label}): best {rates.max():.1f} images/s, median {np.median(rates):.1f} "
              f"({args.repeats} runs of {len(images)} images)")
    q = rng.normal(size=(args.train_images, 3))
    ids = np.arange(args.train_images)
    cfg = tr.TrainConfig.build(modes=[7, 8, 9], epochs=1, batch_size=32, val_fraction=0.1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        rows = tr.train(images[:args.train_images], q, ids, tmp, cfg, device=args.device)
        wall = time.perf_counter() - t0
    print(f"training (float32, {args.size} px, batch 32, {len(rows)} epoch of "
          f"{round(args.train_images * 0.9)} images): {rows[0]['images_per_s']:.1f} images/s "
          f"({wall:.1f} s with validation and checkpoints)")


if __name__ == "__main__":
    main()
