"""What goes into and comes out of the network: standardised targets and their decoding,
and the numeric precision it runs at."""
from __future__ import annotations

import contextlib
from typing import Dict, Optional

import numpy as np
import torch

from ...imaging.dataset import rotate_pose
from ...imaging.geometry import euler_to_matrix, matrix_to_euler
from ..resnet import matrix_to_rotation_6d, rotation_6d_to_matrix
from .config import TrainConfig
from .sources.base import Labels

__all__ = ["Targets", "decode", "decode_amplitudes", "autocast"]


class Targets:
    """Standardised targets (B, n_outputs) from amplitudes (Å) and poses.

    Amplitudes are standardised per output with ``Fitted.target_mean``/``target_std``;
    shifts are divided by one isotropic ``shift_scale`` (no mean), so that in-plane rotation
    augmentation commutes with standardisation; the 6-D rotation is not scaled."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.mean = np.asarray(config.fitted.target_mean, dtype=np.float64)
        self.std = np.asarray(config.fitted.target_std, dtype=np.float64)

    def encode(self, labels: Labels, inplane_deg: Optional[np.ndarray]) -> torch.Tensor:
        """labels of B images (rotated in plane by ``inplane_deg`` (B,) degrees, or None) -> (B, n_outputs)."""
        amp = (labels.amplitudes - self.mean) / self.std
        if not self.config.model.predict_pose:
            return torch.as_tensor(amp, dtype=torch.float32)
        angles, shifts = labels.angles, labels.shifts
        if inplane_deg is not None:
            angles, shifts = rotate_pose(angles, shifts, inplane_deg)
        d6 = matrix_to_rotation_6d(torch.as_tensor(euler_to_matrix(angles)))
        return torch.cat([torch.as_tensor(amp), d6, torch.as_tensor(shifts / self.config.fitted.shift_scale)],
                         dim=1).float()


def decode_amplitudes(config: TrainConfig, out: torch.Tensor) -> np.ndarray:
    """Network outputs (B, n_outputs) -> amplitudes (B, K) in Å (standardisation undone)."""
    amplitudes = out.detach().float().cpu()[:, :config.model.n_modes].double().numpy()
    return amplitudes * np.asarray(config.fitted.target_std) + np.asarray(config.fitted.target_mean)


def decode(config: TrainConfig, out: torch.Tensor) -> Dict[str, np.ndarray]:
    """Network outputs (B, n_outputs) -> amplitudes (B, K) Å [, matrices (B, 3, 3), angles (B, 3) deg,
    shifts (B, 2) px]."""
    res = {"amplitudes": decode_amplitudes(config, out)}
    out = out.detach().float().cpu()
    k = config.model.n_modes
    if config.model.predict_pose:
        mat = rotation_6d_to_matrix(out[:, k:k + 6].double()).numpy()
        res["matrices"] = mat
        res["angles"] = matrix_to_euler(mat)
        res["shifts"] = out[:, k + 6:k + 8].double().numpy() * config.fitted.shift_scale
    return res


def autocast(device: torch.device, enabled: bool, cpu_bfloat16: bool = False):
    """Mixed precision on CUDA when ``enabled``; bfloat16 on CPU only when asked (inference)."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if cpu_bfloat16 and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
