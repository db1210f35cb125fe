"""Script-level commands over the core (no Scipion needed): for clusters and pipelines."""
import argparse
import logging
import sys
from pathlib import Path

import numpy as np


def _parse(parser: argparse.ArgumentParser, argv):
    """The parsed arguments, with the core's progress lines (logging) on stderr."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return args


def nma_main(argv=None) -> int:
    from .core.modes import nma
    from .core.imaging.structure import load_atoms, write_multimodel_pdb
    parser = argparse.ArgumentParser(prog="continuousflex_dl nma",
                                     description="ANM normal modes of a structure -> vec.N mode files.")
    parser.add_argument("structure", type=Path, help="PDB or mmCIF file")
    parser.add_argument("output", type=Path, help="output folder")
    parser.add_argument("--selection", default="heavy", help="heavy, ca, all or a ProDy selection")
    parser.add_argument("--modes", type=int, default=20)
    parser.add_argument("--cutoff", type=float, default=8.0, help="Å")
    parser.add_argument("--method", default="auto", choices=["auto", "exact", "coarse"])
    args = _parse(parser, argv)
    atoms = load_atoms(args.structure, args.selection)
    modes = nma.compute_modes(atoms.coords, args.modes, args.cutoff, method=args.method)
    args.output.mkdir(parents=True, exist_ok=True)
    write_multimodel_pdb(args.output / "atoms.pdb", atoms, atoms.coords)
    nma.write_mode_files(args.output / "modes", modes.vectors)
    np.savetxt(args.output / "modes.txt",
               np.column_stack([modes.numbers, modes.eigenvalues, modes.collectivity]),
               fmt=["%d", "%.6e", "%.4f"], header="mode eigenvalue collectivity")
    print(f"{modes.n_modes} modes of {atoms.n_atoms} atoms written to {args.output}")
    return 0


def _chunk_main(argv, command: str, what: str, run_chunk) -> int:
    """A chunk command over a job folder: parse rows, fingerprint, device, slot and threads,
    then ``run_chunk(folder, start, stop, fingerprint, device=..., progress=...)``. A failure
    exits with 1 and leaves its reason, one message without traceback, on stderr and in
    ``core.chunks.chunk_error_path`` (where the protocol's step reads it)."""
    parser = argparse.ArgumentParser(
        prog=f"continuousflex_dl {command}",
        description=f"{what} of rows [START, STOP) of a job folder -> chunks/rows_START_STOP.npz. "
                    "An up-to-date chunk file (same job fingerprint, rows and images) is kept.")
    parser.add_argument("folder", type=Path, help="job folder (job.npz, job.json)")
    parser.add_argument("--rows", type=int, nargs=2, required=True, metavar=("START", "STOP"),
                        help="0-based rows of the job's particles, STOP excluded")
    parser.add_argument("--fingerprint", default=None,
                        help="the job fingerprint the caller planned with: a job folder prepared for other "
                             "inputs or settings is refused")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--slot", type=int, default=0,
                        help="spreads concurrent chunks over the visible GPUs (GPU slot mod count)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads of torch; 0: the queue's allocation or the process's cores")
    args = _parse(parser, argv)
    start, stop = args.rows
    from .core.chunks import DiskFullError, chunk_error_path, write_chunk_error
    try:
        chunk_error_path(args.folder, start, stop).unlink(missing_ok=True)  # a reason left by an earlier try
        import torch
        from .core.device import cpu_threads_available, resolve_device
        torch.set_num_threads(args.threads if args.threads > 0 else cpu_threads_available())
        device = resolve_device(args.device, args.slot)
        path, computed = run_chunk(args.folder, start, stop, args.fingerprint, device=device,
                                   progress=lambda done, total, m: logging.info("rows %d-%d: %d/%d %s", start,
                                                                                stop, done, total, m))
    except (ValueError, DiskFullError) as exc:  # a refusal or a full disk: the message says what to do
        message = f"{command} rows {start}-{stop}: {exc}"
    except Exception as exc:  # anything else: the reason for the user, the traceback for the log
        import traceback
        traceback.print_exc()
        message = (f"{command} rows {start}-{stop} failed: {type(exc).__name__}: {exc} (the traceback is in "
                   f"the log of the step or of its cluster job)")
    else:
        print(f"{'computed' if computed else 'up to date'}: {path} ({device}, {torch.get_num_threads()} threads)")
        return 0
    print(message, file=sys.stderr)
    try:  # beside the chunk file, where the protocol (or a cluster job's step) reads it
        write_chunk_error(args.folder, start, stop, message)
    except OSError:
        pass
    return 1


def align_chunk_main(argv=None) -> int:
    """Align one chunk of a HEMNMA alignment job folder (written by the alignment protocol or
    :meth:`core.hemnma.alignment_job.AlignmentJob.save`); the chunk file is written atomically."""
    from .core.hemnma.alignment_job import run_chunk
    return _chunk_main(argv, "align-chunk", "HEMNMA alignment", run_chunk)


def predict_chunk_main(argv=None) -> int:
    """Predict one chunk of a DeepHEMNMA prediction job folder (written by the prediction
    protocol or :meth:`core.network.prediction_job.PredictionJob.save`); the chunk file is written atomically."""
    from .core.network.prediction_job import run_chunk
    return _chunk_main(argv, "predict-chunk", "DeepHEMNMA prediction", run_chunk)


def train_worker_main(argv=None) -> int:
    """Train a DeepHEMNMA training job folder (``core.network.distributed.TrainingJob.save``) on one or
    several processes (DDP) into a model directory."""
    parser = argparse.ArgumentParser(
        prog="continuousflex_dl train-worker",
        description="DeepHEMNMA training of a job folder (job.npz, job.json) into a model directory, "
                    "on N data-parallel processes of this machine (DDP: gloo on the CPU, NCCL with one "
                    "GPU per process). A stopped training in the model directory is continued.")
    parser.add_argument("folder", type=Path, help="training job folder")
    parser.add_argument("model", type=Path, help="model directory (config.json, best.pt, last.pt, metrics.csv)")
    parser.add_argument("--processes", type=int, default=1,
                        help="data-parallel processes; the job's batch size is global (a multiple of it)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="cuda: one visible GPU per process (CUDA_VISIBLE_DEVICES chooses them)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads of torch per process; 0: the cores shared among the processes")
    args = _parse(parser, argv)
    from .core.network.distributed import TrainingJob, train_distributed
    try:
        train_distributed(TrainingJob.load(args.folder), args.model, args.processes, args.device, args.threads)
    except ValueError as exc:
        print(f"train-worker: {exc}", file=sys.stderr)
        return 1
    print(f"trained: {args.model} ({args.processes} processes)")
    return 0
