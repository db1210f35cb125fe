"""DeepHEMNMA training on several processes of one machine: torch.distributed (DDP).

A :class:`TrainingJob` holds everything :func:`training.train` needs; it is
saved in a folder (``job.npz`` + ``job.json``), so that a separate process
(``python -m continuousflex_dl train-worker``, a Scipion ``runJob`` or a
cluster job) can run it. :func:`train_distributed` starts ``processes`` ranks
(``torch.multiprocessing``, spawn), each in a ``torch.distributed`` group on a
free local TCP port: gloo on the CPU, NCCL on CUDA with one GPU per rank
(``cuda:<rank>`` of the visible GPUs, so a queue's or Scipion's
CUDA_VISIBLE_DEVICES chooses them). Every rank runs :func:`training.train`
with its rank: each takes a disjoint shard of every epoch and
``batch_size / processes`` images of each step (the batch size is global),
DDP averages the gradients, the metrics are summed over the ranks, and only
rank 0 writes the model directory. A rank that fails stops the others, and
its error is raised here (a ValueError keeps its message).
"""
from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import numpy as np

from ..chunks import load_job_files, save_job_files
from ..imaging.ctf import CTFParams
from ..imaging.dataset import ArrayImageSource, MrcsImageSource
from ..device import cpu_threads_available, resolve_device
from ..modes.reference import Reference

logger = logging.getLogger(__name__)

__all__ = ["TrainingJob", "train_distributed", "rank_device", "free_port"]

PathLike = Union[str, os.PathLike]


@dataclass
class TrainingJob:
    """The arguments of :func:`training.train` for M particle images (see there for each).

    images: an ``MrcsImageSource`` (stack paths and 0-based indices, with its contrast sign)
    or an ``ArrayImageSource`` (M, N, N). config: a ``training.TrainConfig``. amplitudes:
    (M, K) Å or None. poses: None or (angles (M, 3) deg, shifts (M, 2) px). ctf: the
    particles' CTFs (a ``CTFParams``) or None; phase_flip: whether the network sees
    phase-flipped images (needs ``ctf``). reference: the structure simulated from, or None.
    """
    images: Union[MrcsImageSource, ArrayImageSource]
    amplitudes: Optional[np.ndarray]
    particle_ids: np.ndarray
    config: object
    seed: int = 0
    poses: Optional[Tuple[np.ndarray, np.ndarray]] = None
    ctf: Optional[CTFParams] = None
    phase_flip: bool = False
    reference: Optional[Reference] = None

    def train(self, out_dir: PathLike, device: str = "cpu", world_size: int = 1, rank: int = 0,
              resume: bool = True) -> List[dict]:
        """:func:`training.train` of this job into ``out_dir`` as rank ``rank`` of ``world_size``."""
        from .training import train
        return train(self.images, self.amplitudes, self.particle_ids, out_dir, self.config, device=device,
                     seed=self.seed, resume=resume, poses=self.poses,
                     ctf=self.ctf if self.phase_flip else None, world_size=world_size, rank=rank,
                     reference=self.reference, particle_ctf=self.ctf)

    # ------------------------------------------------------------------ files
    def save(self, folder: PathLike) -> None:
        """Write ``job.npz`` and ``job.json`` in ``folder`` (each atomically)."""
        arrays = {"particle_ids": np.asarray(self.particle_ids)}
        meta = {"config": self.config.to_dict(), "seed": int(self.seed), "phase_flip": bool(self.phase_flip)}
        if isinstance(self.images, MrcsImageSource):
            stacks = sorted({p for p, _ in self.images.entries})
            position = {p: k for k, p in enumerate(stacks)}
            arrays["stack"] = np.array([position[p] for p, _ in self.images.entries])
            arrays["index"] = np.array([i for _, i in self.images.entries])
            meta.update(stacks=stacks, invert=self.images.invert)
        elif isinstance(self.images, ArrayImageSource):
            arrays["images"] = self.images.images
        else:
            raise ValueError(f"A training job saves MRC stacks or an array of images, not a "
                             f"{type(self.images).__name__}.")
        if self.amplitudes is not None:
            arrays["amplitudes"] = np.asarray(self.amplitudes)
        if self.poses is not None:
            arrays["angles"], arrays["shifts"] = (np.asarray(p) for p in self.poses)
        if self.ctf is not None:
            arrays.update(self.ctf.to_columns())
        if self.reference is not None:
            ref = self.reference
            arrays.update(ref_coords=ref.coords, ref_modes=ref.modes, ref_sigma=np.asarray(ref.sigma))
            if ref.weights is not None:
                arrays["ref_weights"] = np.asarray(ref.weights)
        save_job_files(folder, arrays, meta)

    @classmethod
    def load(cls, folder: PathLike) -> "TrainingJob":
        """The job saved in ``folder`` (ValueError naming the folder if it has none)."""
        from .training import TrainConfig
        arrays, meta = load_job_files(folder, "training job")
        if "images" in arrays:
            images = ArrayImageSource(arrays["images"])
        else:
            images = MrcsImageSource([(meta["stacks"][s], int(i)) for s, i in zip(arrays["stack"], arrays["index"])],
                                     invert=meta["invert"])
        reference = None
        if "ref_coords" in arrays:
            sigma = arrays["ref_sigma"]
            reference = Reference(arrays["ref_coords"], arrays["ref_modes"], sigma if sigma.ndim else float(sigma),
                                  arrays.get("ref_weights"))
        poses = (arrays["angles"], arrays["shifts"]) if "angles" in arrays else None
        return cls(images, arrays.get("amplitudes"), arrays["particle_ids"], TrainConfig.from_dict(meta["config"]),
                   int(meta["seed"]), poses, CTFParams.from_columns(arrays), bool(meta["phase_flip"]), reference)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (the rendezvous of the ranks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_device(choice: str, rank: int, processes: int) -> str:
    """The device of rank ``rank`` of ``processes``: 'cpu', or ``cuda:<rank>`` of the visible GPUs.

    choice: 'auto', 'cpu' or 'cuda' (``device.DEVICE_CHOICES``). Raises ValueError when CUDA
    is used but fewer GPUs than processes are visible (NCCL needs one GPU per rank).
    """
    device = resolve_device(choice, rank)
    if device != "cpu":
        import torch
        count = torch.cuda.device_count()
        if count < processes:
            raise ValueError(f"{processes} training processes need {processes} GPUs, {count} visible: give "
                             f"as many processes as GPUs (or choose the CPU device for CPU processes).")
    return device


def _rank_main(rank: int, job: TrainingJob, out_dir: str, processes: int, device_choice: str, port: int,
               threads: int) -> None:
    """One rank: join the group, train, leave the group."""
    import torch
    import torch.distributed as dist
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(threads)
    device = rank_device(device_choice, rank, processes)
    backend = "gloo" if device == "cpu" else "nccl"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=processes)
    try:
        job.train(out_dir, device, world_size=processes, rank=rank)
        dist.barrier()  # rank 0 has written the last epoch's files
    finally:
        dist.destroy_process_group()


def _rank_error(exc: Exception) -> Exception:
    """The failed rank's error from torch.multiprocessing's exception: a ValueError keeps its
    message (it says what to do); anything else becomes a RuntimeError naming the rank."""
    text = str(exc).strip().splitlines()
    last = text[-1] if text else repr(exc)
    rank = getattr(exc, "error_index", "?")
    said = re.match(r"(?:[\w.]+\.)?(?:ValueError|CheckpointError): (.*)", last)
    if said:
        return ValueError(said.group(1))
    return RuntimeError(f"Training process {rank} failed: {last} (its traceback is in the log above).")


def train_distributed(job: TrainingJob, out_dir: PathLike, processes: int = 1, device: str = "auto",
                      threads: int = 0) -> None:
    """Train ``job`` into ``out_dir`` on ``processes`` data-parallel ranks (DDP) of this machine.

    device: 'auto', 'cpu' or 'cuda' (CUDA: NCCL, one visible GPU per rank; CPU: gloo).
    threads: torch CPU threads per rank (0: this process's cores shared among the ranks).
    One process trains here, without a process group. The batch size of the job's config
    is global (a multiple of ``processes``); a training stopped with another number of
    processes is refused on resume. Raises ValueError (a rank's own, or a bad request) or
    RuntimeError (a rank that crashed), after the other ranks have been stopped.
    """
    processes = int(processes)
    if processes < 1:
        raise ValueError(f"Train on at least 1 process, got {processes}.")
    batch_size = job.config.optimiser.batch_size
    if batch_size % processes:
        raise ValueError(f"The batch size ({batch_size}) is the images of one step over all "
                         f"{processes} processes: make it a multiple of {processes}.")
    threads = int(threads) if threads > 0 else max(1, cpu_threads_available() // processes)
    rank_device(device, 0, processes)  # refuse too few GPUs before starting anything
    if processes == 1:
        import torch
        torch.set_num_threads(threads)
        job.train(out_dir, resolve_device(device))
        return
    import torch.multiprocessing as mp
    port = free_port()
    logger.info("Training on %d processes (%s, %d CPU threads each), rendezvous at 127.0.0.1:%d", processes,
                "CPU, gloo" if resolve_device(device) == "cpu" else "one GPU each, NCCL", threads, port)
    try:
        mp.start_processes(_rank_main, args=(job, os.fspath(out_dir), processes, device, port, threads),
                           nprocs=processes, join=True, start_method="spawn")
    except mp.ProcessRaisedException as exc:
        raise _rank_error(exc) from None
    except mp.ProcessExitedException as exc:
        raise RuntimeError(f"Training process {exc.error_index} stopped with exit code {exc.exit_code} "
                           f"(killed, or out of memory?); see the log above. Continue resumes from the "
                           f"last finished epoch.") from None
    from .training import ModelFolder
    last = ModelFolder(out_dir).last
    if not last.exists():
        raise RuntimeError(f"The training processes ended without writing {last}.")
