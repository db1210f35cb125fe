"""The image of the model fitted to each particle: the reference deformed by the particle's
amplitudes, projected in its pose, modulated by its CTF and matched to it in scale and offset,
and the residual (particle minus model). The check every HEMNMA user makes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from ..imaging.ctf import CTFParams, apply_ctf, ctf_image
from ..imaging.geometry import euler_to_matrix
from ..imaging.projection import project_gaussians
from ..modes.nma import displace

__all__ = ["ModelImages", "fitted_model_images"]


@dataclass
class ModelImages:
    """particles, models, residuals: (M, box, box) ``[y, x]`` in the particles' units, the
    models scaled and offset to their particle (``particle = scale * projection + offset +
    residual``); scale, offset: (M,); relative_residual: (M,) ``|residual|^2 / |particle -
    mean|^2`` (1: the model explains nothing, 0: everything)."""
    particles: np.ndarray
    models: np.ndarray
    residuals: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    relative_residual: np.ndarray


def fitted_model_images(images, coords: np.ndarray, modes: np.ndarray, amplitudes: np.ndarray,
                        angles: np.ndarray, shifts: np.ndarray, pixel_size: float,
                        ctf: Optional[CTFParams] = None, sigma: Union[float, np.ndarray] = 1.0,
                        weights: Optional[np.ndarray] = None, device: str = "cpu") -> ModelImages:
    """Model images of M particles.

    images: (M, box, box) particles; coords: (N, 3) Å, the reference centred as the alignment
    used it; modes: (K, N, 3) unit mode vectors; amplitudes: (M, K) Å; angles: (M, 3) deg Euler
    ZYZ and shifts (M, 2) px in Scipion's ALIGN_PROJ convention (:func:`projection.project_gaussians`);
    pixel_size: Å/px of the images; ctf: CTFParams of the M particles (or one) or None;
    sigma, weights: atom widths (Å) and weights of the projector.
    The scale and offset of each model are its least-squares fit to the particle.
    """
    y = torch.as_tensor(np.asarray(images, dtype=np.float32), device=device)
    if y.ndim != 3 or y.shape[-1] != y.shape[-2]:
        raise ValueError(f"Images must be (M, box, box); got shape {tuple(y.shape)}.")
    m, box = y.shape[0], y.shape[-1]
    q = np.asarray(amplitudes, dtype=np.float64).reshape(m, -1)
    angles = np.asarray(angles, dtype=np.float64).reshape(m, 3)
    shifts = np.asarray(shifts, dtype=np.float64).reshape(m, 2)
    x = displace(np.asarray(coords, dtype=np.float64), np.asarray(modes, dtype=np.float64), q)   # (M, N, 3)
    p = project_gaussians(torch.as_tensor(x, dtype=torch.float32, device=device), euler_to_matrix(angles),
                          shifts, box, pixel_size, sigma=sigma, weights=weights)
    if ctf is not None:
        c = ctf_image(ctf, box, pixel_size, device=device)
        if c.shape[0] not in (1, m):
            raise ValueError(f"{c.shape[0]} CTFs for {m} particles: give one CTF or one per particle.")
        p = apply_ctf(p, c)
    pc = p - p.mean(dim=(-2, -1), keepdim=True)
    yc = y - y.mean(dim=(-2, -1), keepdim=True)
    scale = (pc * yc).sum(dim=(-2, -1)) / (pc * pc).sum(dim=(-2, -1)).clamp_min(1e-30)
    offset = y.mean(dim=(-2, -1)) - scale * p.mean(dim=(-2, -1))
    model = scale[:, None, None] * p + offset[:, None, None]
    residual = y - model
    relative = (residual ** 2).sum(dim=(-2, -1)) / (yc ** 2).sum(dim=(-2, -1)).clamp_min(1e-30)
    as_np = lambda t: t.detach().cpu().numpy()  # noqa: E731
    return ModelImages(as_np(y), as_np(model), as_np(residual), as_np(scale), as_np(offset), as_np(relative))
