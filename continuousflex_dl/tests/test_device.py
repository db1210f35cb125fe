"""The one device rule of protocols, the command line and cluster jobs (core/device.py)."""
import pytest


def test_device_rule(monkeypatch):
    import torch

    from continuousflex_dl.core.device import cpu_threads_available, resolve_device
    assert resolve_device("cpu", slot=5) == "cpu"
    with pytest.raises(ValueError, match="Unknown device 'gpu'"):
        resolve_device("gpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        assert resolve_device("auto", slot=count + 1) == f"cuda:{1 % count}"  # slots spread over GPUs
    else:
        assert resolve_device("auto", slot=3) == "cpu"
        with pytest.raises(ValueError, match="no CUDA GPU is visible"):
            resolve_device("cuda")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")  # a cluster job uses what the queue gave it
    assert cpu_threads_available() == 3
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert cpu_threads_available() >= 1
