"""Stage 4 of HEMNMA: the uncertainty of every answer, the Laplace approximation of the
posterior at the final refinement's optimum."""
from __future__ import annotations

import torch

from .least_squares import Fit, curvature_units
from .sizes import noise_dof

__all__ = ["laplace_std"]


def laplace_std(fit: Fit, n_params: int, n: int) -> torch.Tensor:
    """Standard deviations (B, D) of the D = ``n_params`` parameters (amplitudes Å, rotation
    components rad, shifts px) at least-squares optima of images n x n px under white Gaussian
    noise, from their least-squares state there (:class:`Fit`): the Laplace approximation of
    the posterior with the Gauss-Newton matrix, ``s^2 (J^T J)^-1``, J the derivatives of the
    filtered projection, scaled, with respect to the parameters, the scale and the offset,
    whose block of the inverse is taken (the pose, the other amplitudes, the scale and the
    offset free: marginal standard deviations). The noise variance is ``s^2 = cost / (n_dof -
    D - 2)`` (n_dof: :func:`noise_dof`; D parameters, the scale and the offset were fitted).
    The offset is eliminated exactly by centring, the scale by its Schur complement. (The
    observed Hessian, with the residual's curvature, gave the same calibration at 128 px, SNR
    0.1, 200 particles: coverage of +-1.96 sigma 0.950 against 0.945, median sigma 3.66
    against 3.61 Å, at 2.4-2.9 ms per image more.) The noise must be white: :func:`~.sizes.crop_images`
    keeps it so."""
    d, jtj = n_params, fit.jtj
    gn = jtj[:, :d, :d] - jtj[:, :d, d:] @ jtj[:, d:, :d] / jtj[:, d:, d:]    # the scale's Schur complement
    # In the parameters scaled to unit curvature (at 60 copies of 4AKE an amplitude's curvature
    # is 1e-9 of a rotation's).
    u = curvature_units(gn)
    unit = u[:, :, None] * u[:, None, :]
    eye = torch.eye(d, dtype=gn.dtype, device=gn.device)
    cov = torch.linalg.inv(gn / unit + 1e-12 * eye) / unit
    var = fit.cost.double() / max(noise_dof(n) - d - 2, 1)
    return torch.sqrt(torch.clamp(torch.diagonal(cov, dim1=1, dim2=2), min=0.0) * var[:, None])
