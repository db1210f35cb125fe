"""Cost of running HEMNMA alignment chunks as processes (``python -m continuousflex_dl align-chunk``).

Synthetic 4AKE particles (heavy atoms, modes 7-9 with the paper's amplitudes, random poses,
shifts within 3 px, white noise at SNR 0.1, no CTF) are written as an alignment job folder
(core.hemnma.alignment_job), as the alignment protocol does. Prints and (``--out``) writes as JSON:

1. the wall time of one chunk of ``--chunk`` particles at ``--box`` px aligned in-process
   with 1 torch thread, and its CPU seconds per image;
2. the overhead of a chunk process: the command on an up-to-date chunk (process start,
   imports, job loading, reading and hashing the chunk's images, no alignment), against
   bare Python start-up, as a percentage of the chunk's alignment time (target <= 5 %),
   in wall time and in CPU time (the CPU ratio holds on a busy machine too);
3. ``--parallel-n`` particles at ``--parallel-box`` px aligned in one process with 2 torch
   threads against 2 chunk processes of 1 thread each running at once (target: the
   processes at least as fast);
4. on paper, for 500,000 particles at the chunk's box on a 10-node, 32-core cluster (one core
   per chunk job): chunk size (core.hemnma.alignment_job.alignment_chunk_size), chunks, waves and hours, from
   the measured CPU seconds per image.

Times are wall-clock on the machine as it is; run it on a quiet machine.

Example: python bench/bench_align_chunk.py --chunk 100 --box 128 --parallel-n 200 --parallel-box 64
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continuousflex_dl.core.hemnma.alignment_job import AlignmentJob, alignment_chunk_size, chunk_path, run_chunk  # noqa: E402
from continuousflex_dl.core.modes.reference import Reference  # noqa: E402
from continuousflex_dl.core.modes.nma import compute_modes  # noqa: E402
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms  # noqa: E402
from continuousflex_dl.core.modes.synthesis import synthesize  # noqa: E402

CLUSTER_NODES, CORES_PER_NODE, PAPER_SET = 10, 32, 500_000


def make_job(folder: Path, n: int, box: int, pixel_size: float, working_size: int) -> str:
    """Synthesize n particles into ``folder`` and save an AlignmentJob there; returns its fingerprint."""
    atoms = load_atoms(example_structure_path("4ake"), "heavy")
    coords = centre(atoms.coords)
    modes = compute_modes(coords, 9, 8.0).vectors[6:9]
    folder.mkdir(parents=True, exist_ok=True)
    stack = folder / "particles.mrcs"
    synthesize(stack, coords, modes, n, box, pixel_size, max_shift_px=3.0, ctf=None, snr=0.1, seed=1)
    job = AlignmentJob(reference=Reference(coords, modes, atoms.sigma, atoms.weights), mode_numbers=[7, 8, 9],
                       ids=np.arange(1, n + 1), stacks=[str(stack)] * n, indices=np.arange(n),
                       pixel_size=pixel_size,
                       options=dict(max_shift_px=5.0, working_size=working_size, angular_step_deg=15.0,
                                    amplitude_range=None))
    job.save(folder)
    return job.fingerprint()


def cli(folder: Path, start: int, stop: int, fp: str, threads: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "continuousflex_dl", "align-chunk", str(folder), "--rows",
                             str(start), str(stop), "--fingerprint", fp, "--device", "cpu", "--threads",
                             str(threads)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wall(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def checked(p: subprocess.Popen) -> None:
    out, err = p.communicate()
    if p.returncode:
        raise SystemExit(f"align-chunk failed: {err[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk", type=int, default=100, help="particles of the measured chunk")
    ap.add_argument("--box", type=int, default=128, help="px of the chunk's particles (1 Å/px)")
    ap.add_argument("--parallel-n", type=int, default=200, help="particles of the parallel comparison")
    ap.add_argument("--parallel-box", type=int, default=64, help="px of those particles (2 Å/px)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each process-overhead measure")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the figures")
    args = ap.parse_args()
    figures = {"cpu_cores": os.cpu_count(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 1. One chunk in-process, 1 thread.
        folder = tmp / "chunk"
        fp = make_job(folder, args.chunk, args.box, 1.0, 64)
        torch.set_num_threads(1)
        cpu0 = time.process_time()
        t_chunk = wall(lambda: run_chunk(folder, 0, args.chunk, fp))
        cpu_per_image = (time.process_time() - cpu0) / args.chunk
        figures.update(chunk=args.chunk, box=args.box, chunk_wall_s=t_chunk, cpu_s_per_image=cpu_per_image)
        print(f"{args.chunk}-particle chunk at {args.box} px, working size 64, 1 thread, in-process: "
              f"{t_chunk:.1f} s ({cpu_per_image:.3f} CPU s per image)")
        # 2. Process overhead: the command on the up-to-date chunk, and bare Python.
        children0 = children_cpu()
        up_to_date = sorted(wall(lambda: checked(cli(folder, 0, args.chunk, fp, 1))) for _ in range(args.repeats))
        overhead_cpu = (children_cpu() - children0) / args.repeats
        bare = sorted(wall(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True))
                      for _ in range(args.repeats))
        children0 = children_cpu()
        torch_only = sorted(wall(lambda: subprocess.run([sys.executable, "-c", "import torch"], check=True))
                            for _ in range(args.repeats))
        torch_cpu = (children_cpu() - children0) / args.repeats
        overhead = up_to_date[len(up_to_date) // 2]
        chunk_cpu = cpu_per_image * args.chunk
        # the smallest chunk whose process overhead is at most 5 % of its CPU time
        break_even = math.ceil(overhead_cpu / (0.05 * cpu_per_image))
        figures.update(process_overhead_s=overhead, process_overhead_cpu_s=overhead_cpu,
                       python_start_s=bare[len(bare) // 2], overhead_percent=100 * overhead / t_chunk,
                       overhead_cpu_percent=100 * overhead_cpu / chunk_cpu, import_torch_s=torch_only[len(torch_only) // 2],
                       import_torch_cpu_s=torch_cpu, chunk_for_5_percent=break_even)
        print(f"chunk process overhead (start, imports, job and image loading; median of {args.repeats}): "
              f"{overhead:.2f} s wall = {100 * overhead / t_chunk:.1f} % of the chunk's wall time; "
              f"{overhead_cpu:.2f} CPU s = {100 * overhead_cpu / chunk_cpu:.1f} % of its CPU time "
              f"(bare Python start {bare[len(bare) // 2]:.2f} s; 'import torch' alone "
              f"{torch_only[len(torch_only) // 2]:.2f} s, {torch_cpu:.2f} CPU s); at most 5 % from chunks of "
              f"{break_even} particles")
        # 3. One process with 2 threads against 2 processes of 1 thread.
        folder = tmp / "parallel"
        n = args.parallel_n
        fp = make_job(folder, n, args.parallel_box, 2.0, 64)
        torch.set_num_threads(2)
        t_inproc = wall(lambda: run_chunk(folder, 0, n, fp))
        half = n // 2

        def two_processes():
            procs = [cli(folder, 0, half, fp, 1), cli(folder, half, n, fp, 1)]
            for p in procs:
                checked(p)

        for start, stop in ((0, half), (half, n)):
            chunk_path(folder, start, stop).unlink(missing_ok=True)
        t_procs = wall(two_processes)
        figures.update(parallel_n=n, parallel_box=args.parallel_box, in_process_2_threads_s=t_inproc,
                       two_processes_1_thread_s=t_procs)
        print(f"{n} particles at {args.parallel_box} px: one process, 2 threads {t_inproc:.1f} s; "
              f"2 chunk processes of 1 thread at once {t_procs:.1f} s ({t_inproc / t_procs:.2f}x)")
    # 4. On paper: 500,000 particles on 10 nodes x 32 cores, one core per chunk job.
    workers = CLUSTER_NODES * CORES_PER_NODE
    size = alignment_chunk_size(PAPER_SET, workers)
    n_chunks = math.ceil(PAPER_SET / size)
    waves = math.ceil(n_chunks / workers)
    hours = waves * (size * cpu_per_image + overhead) / 3600
    figures.update(paper_set=PAPER_SET, cluster_cores=workers, paper_chunk_size=size, paper_chunks=n_chunks,
                   paper_waves=waves, paper_hours=hours, paper_cpu_hours=PAPER_SET * cpu_per_image / 3600)
    print(f"On paper: {PAPER_SET:,} particles at {args.box} px on {CLUSTER_NODES} nodes x {CORES_PER_NODE} "
          f"cores (1 core per job): chunks of {size} -> {n_chunks} jobs, {waves} waves of {workers}, "
          f"about {hours:.1f} h ({PAPER_SET * cpu_per_image / 3600:,.0f} CPU hours)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2))
        print(f"Figures written to {args.out}")


if __name__ == "__main__":
    main()
