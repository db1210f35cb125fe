"""Elastic network (ANM) normal modes and displacement along them."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["displace"]


def displace(coords, modes, amplitudes):
    """Displaced structures ``x + sum_k q_k v_k``.

    coords: (N, 3) Å; modes: (K, N, 3) unit-norm mode vectors (as 3N vectors);
    amplitudes: (..., K) in Å. Returns (..., N, 3). numpy or torch (not mixed).
    """
    if isinstance(amplitudes, torch.Tensor):
        return coords + torch.einsum("...k,knd->...nd", amplitudes, modes)
    return np.asarray(coords) + np.einsum("...k,knd->...nd", np.asarray(amplitudes), np.asarray(modes))
