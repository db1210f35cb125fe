"""The DeepHEMNMA regressor: ResNet34 features + a 4-layer MLP.

A torchvision ``resnet34(weights=None)`` with a one-channel ``conv1`` and its
``fc`` removed maps a particle image (B, 1, H, W) to 512 pooled features; a
4-layer MLP maps those to the outputs:

* the K normal-mode amplitudes (standardised, see ``training``), then,
  when the pose is predicted,
* a continuous 6-D rotation representation (Zhou et al., CVPR 2019): the first
  two columns of the projection matrix ``A`` of :mod:`.geometry`, and
* the two in-plane shifts (standardised).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["DeepHEMNMANet", "build_model", "ARCHITECTURES", "POSE_OUTPUTS",
           "rotation_6d_to_matrix", "matrix_to_rotation_6d"]

#: Extra outputs when the pose is predicted: 6-D rotation + 2 shifts.
POSE_OUTPUTS = 8

#: Feature extractors by name: (torchvision builder name, number of pooled features).
ARCHITECTURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


def matrix_to_rotation_6d(matrix: torch.Tensor) -> torch.Tensor:
    """6-D representation (..., 6): the first two columns of (..., 3, 3) rotations, column-major."""
    return torch.cat([matrix[..., :, 0], matrix[..., :, 1]], dim=-1)


def rotation_6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) from 6-D vectors (..., 6) by Gram-Schmidt (Zhou et al. 2019)."""
    a1, a2 = d6[..., :3], d6[..., 3:6]
    b1 = nn.functional.normalize(a1, dim=-1)
    b2 = nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


class DeepHEMNMANet(nn.Module):
    """ResNet feature extractor (one input channel) + 4-layer MLP head.

    forward: images (B, 1, H, W) (or (B, H, W)), normalised -> (B, n_outputs).
    ``n_outputs = n_modes + (POSE_OUTPUTS if predict_pose else 0)``.
    """

    def __init__(self, n_modes: int, predict_pose: bool = False, architecture: str = "resnet34",
                 hidden: Sequence[int] = (512, 256, 128), dropout: float = 0.0):
        super().__init__()
        import torchvision
        if architecture not in ARCHITECTURES:
            raise ValueError(f"Unknown architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}.")
        if n_modes < 1:
            raise ValueError(f"The network needs at least one mode to predict, got {n_modes}.")
        if len(hidden) != 3:
            raise ValueError(f"The MLP has 4 layers, so give 3 hidden widths, got {list(hidden)}.")
        self.n_modes = int(n_modes)
        self.predict_pose = bool(predict_pose)
        self.n_outputs = self.n_modes + (POSE_OUTPUTS if predict_pose else 0)
        backbone = getattr(torchvision.models, architecture)(weights=None)
        backbone.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
        backbone.fc = nn.Identity()
        self.backbone = backbone
        widths = [ARCHITECTURES[architecture], *hidden]
        layers = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(widths[-1], self.n_outputs))
        self.head = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim == 3:
            images = images[:, None]
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"Expected images (B, 1, H, W), got shape {tuple(images.shape)}.")
        return self.head(self.backbone(images))


def build_model(n_modes: int, predict_pose: bool = False, architecture: str = "resnet34",
                hidden: Sequence[int] = (512, 256, 128), dropout: float = 0.0) -> DeepHEMNMANet:
    """A fresh (randomly initialised, seed with ``torch.manual_seed``) DeepHEMNMA network.

    n_modes: number of amplitudes K. predict_pose: also output a 6-D rotation
    and 2 shifts. Returns a module mapping (B, 1, H, W) -> (B, K [+ 8]).
    """
    return DeepHEMNMANet(n_modes, predict_pose, architecture, hidden, dropout)
