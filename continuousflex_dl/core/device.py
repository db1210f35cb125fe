"""The compute device of a run: one rule for protocols, the command line and cluster jobs."""
from __future__ import annotations

import os

__all__ = ["DEVICE_CHOICES", "resolve_device", "cpu_threads_available"]

#: What a user may ask for: the first visible GPU if there is one, the CPU, or a GPU (required).
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(choice: str = "auto", slot: int = 0) -> str:
    """``'cpu'`` or ``'cuda:<i>'`` for a device choice of :data:`DEVICE_CHOICES`.

    slot: spreads concurrent jobs over the visible GPUs (GPU ``slot mod count``); a cluster
    job sees only the GPUs the queue gave it (CUDA_VISIBLE_DEVICES), so it uses those.
    Raises ValueError for 'cuda' without a visible GPU, or an unknown choice.
    """
    if choice not in DEVICE_CHOICES:
        raise ValueError(f"Unknown device {choice!r}: choose one of {', '.join(DEVICE_CHOICES)}.")
    if choice == "cpu":
        return "cpu"
    import torch  # here, so that forms can import the choices without torch
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        if choice == "cuda":
            raise ValueError("Device 'cuda' was chosen but no CUDA GPU is visible; choose 'auto' or 'cpu'.")
        return "cpu"
    return f"cuda:{int(slot) % count}"


def cpu_threads_available() -> int:
    """CPU cores this process may use: the queue's allocation (SLURM_CPUS_PER_TASK) when set,
    else the cores of its CPU affinity mask."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
