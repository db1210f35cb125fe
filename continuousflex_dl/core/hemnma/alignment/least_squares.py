"""Stages 2 and 3 of HEMNMA, the local refinement: Levenberg-Marquardt on the amplitudes, a
small rotation update and the shifts of many problems at once, each problem stopping on its
own, with the least-squares state (:class:`Fit`) that the uncertainty (:mod:`.uncertainty`)
is computed from.

Parameters and steps are in the order of :class:`~.model.DeformableModel`'s Jacobian
(amplitudes Å, axis-angle rad, shifts in pixels of the model's size), the image scale last.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .model import DeformableModel, apply_filter, rodrigues
from .sizes import noise_dof

__all__ = ["refine", "Fit", "least_squares_state", "scaled_solve", "curvature_units", "REFINED_AT_ONCE",
           "CONVERGED_CHI2", "FINISH_CONTRACTION"]


#: Problems refined together (Levenberg-Marquardt's steps batched over them) at the search and
#: at the working size. The Jacobian draws its profiles in blocks of its own
#: (:data:`JACOBIAN_BLOCK_BYTES`), so these bound only the memory (the derivatives, (D, n, n)
#: float32 per problem) and spread the per-step work of the solver: 16 instead of 4 problems at
#: 64 px took the seeded path of 256 particles from 17.8 to 14.2 ms per image (best of 4, one
#: AMD EPYC thread).
REFINED_AT_ONCE = (64, 16)


def refine(model: DeformableModel, images: torch.Tensor, filt: Optional[torch.Tensor], rot, q, shifts,
           q_lo, q_hi, max_shift, iters: int, chunk: int, finish: float = 0.0):
    """Levenberg-Marquardt on (amplitudes, rotation, shifts) for B problems; returns the
    refined (rot, q, shifts) and the least-squares state there (:class:`Fit`; ``.ncc`` the NCC
    of each problem). finish: see :func:`_refine_chunk`."""
    parts = []
    for start in range(0, images.shape[0], chunk):
        sl = slice(start, start + chunk)
        parts.append(_refine_chunk(model, images[sl], None if filt is None else filt[sl],
                                   rot[sl], q[sl], shifts[sl], q_lo, q_hi, max_shift, iters, finish))
    fit = Fit(*(torch.cat([p[3][i] for p in parts]) for i in range(len(Fit._fields))))
    return tuple(torch.cat([p[i] for p in parts]) for i in range(3)) + (fit,)


#: Levenberg-Marquardt stops for a problem when the Gauss-Newton step from where it stands would
#: lower the cost by less than this fraction of its noise variance (chi^2 by 0.01: the
#: parameters are within about a tenth of their standard deviation of the optimum), or when an
#: accepted step gained less than that.
CONVERGED_CHI2 = 1e-2


#: A problem finishing early (``finish`` of :func:`refine`, the config's ``finish_chi2`` or
#: ``seed_finish_chi2``) does so only when its undamped Gauss-Newton step would also gain less
#: than this fraction of what its last step gained (Gauss-Newton converging fast: where the
#: residual's curvature, which its model leaves out, matters, it converges slowly, and a step
#: from that model would stop short of the optimum).
FINISH_CONTRACTION = 0.1


def _refine_chunk(model: DeformableModel, images, filt, rot, q, shifts, q_lo, q_hi, max_shift, iters,
                  finish: float = 0.0):
    """:func:`refine` of one chunk. Each problem stops on its own (an active set): when it is
    within :data:`CONVERGED_CHI2` of the optimum, on steps rejected at large damping, or on a
    fit at the float32 precision of the image. With ``finish`` > 0 (noise variances, e.g.
    :class:`~.config.AlignConfig` ``finish_chi2``), a problem whose undamped Gauss-Newton step
    would lower the cost by less than that and than a fraction of its last step's gain
    (:data:`FINISH_CONTRACTION`), takes the step unevaluated, its least-squares state moved to
    first order (:meth:`Fit.step`), and stops: one evaluation fewer on most problems."""
    rot, q, shifts = rot.clone(), q.clone(), shifts.clone()
    fit = least_squares_state(model, images, filt, rot, q, shifts)
    lam = torch.full((images.shape[0],), 1e-3, dtype=torch.float64, device=images.device)
    dof = max(noise_dof(images.shape[-1]) - fit.jtj.shape[1] - 1, 1)
    active = torch.arange(images.shape[0], device=images.device)
    last_gain = torch.zeros(images.shape[0], dtype=torch.float64, device=images.device)
    for _ in range(iters):
        # The decrease of the cost the undamped Gauss-Newton step predicts, in noise variances.
        jtj, jtr, cost = fit.jtj[active], fit.jtr[active], fit.cost[active]
        step = scaled_solve(jtj, jtr, 0.0)
        pred = (step * jtr).sum(1) / (cost / dof + 1e-30)
        finishing = (pred < finish) & (pred < FINISH_CONTRACTION * last_gain[active])
        if bool(finishing.any()):
            last = active[finishing]
            q[last], rot[last], shifts[last], delta = _take_step(step[finishing].to(images.dtype), q[last],
                                                                 rot[last], shifts[last], q_lo, q_hi, max_shift)
            for kept, new in zip(fit, fit.select(last).step(delta)):
                kept[last] = new
        near = finishing | (pred < CONVERGED_CHI2)
        active, jtj, jtr, cost = active[~near], jtj[~near], jtr[~near], cost[~near]
        if active.numel() == 0:
            break
        a = active
        delta = scaled_solve(jtj, jtr, lam[a]).to(images.dtype)
        q_t, rot_t, s_t, _ = _take_step(delta, q[a], rot[a], shifts[a], q_lo, q_hi, max_shift)
        trial = least_squares_state(model, images[a], None if filt is None else filt[a], rot_t, q_t, s_t)
        better = trial.cost < cost
        gain = (cost - trial.cost) / (cost / dof + 1e-30)
        last_gain[a] = torch.where(better, gain.double(), last_gain[a])
        ok = a[better]
        q[ok], shifts[ok], rot[ok] = q_t[better], s_t[better], rot_t[better]
        for kept, new in zip(fit, trial):
            kept[ok] = new[better]
        lam[a] = torch.where(better, lam[a] * 0.3, lam[a] * 10).clamp(1e-8, 1e8)
        done = (better & (gain < CONVERGED_CHI2)) | (lam[a] > 1e4) | (fit.cost[a] < 1e-7 * fit.energy[a])
        active = a[~done]
    return rot, q, shifts, fit


def curvature_units(curvature: torch.Tensor) -> torch.Tensor:
    """The units (B, D) ``u = sqrt(diag(curvature))`` of curvature matrices (B, D, D) that give
    every parameter unit curvature: ``curvature / (u_i u_j)`` has ones on its diagonal, and
    tests and floors on it do not depend on the parameters' units."""
    return torch.sqrt(torch.diagonal(curvature, dim1=1, dim2=2)).clamp_min(1e-150)


def scaled_solve(jtj: torch.Tensor, jtr: torch.Tensor, lam) -> torch.Tensor:
    """Levenberg-Marquardt steps (B, D): ``(JtJ + (lam + 1e-9) diag(JtJ)) step = Jtr``, solved in
    the parameters scaled to unit curvature, so the damping and its floor act alike on every
    parameter whatever its unit. (A floor of 1e-9 times the largest diagonal, as before, held
    back the amplitudes of large assemblies: at 60 copies of 4AKE, 1 Å of a mode moves each
    atom by 1/300 Å, and the final refinement crept to its iteration limit in steps of 25 %.)"""
    d = curvature_units(jtj)                                                 # (B, D)
    lam = torch.as_tensor(lam, dtype=jtj.dtype, device=jtj.device).reshape(-1, 1, 1)
    eye = torch.eye(jtj.shape[1], dtype=jtj.dtype, device=jtj.device)
    return torch.linalg.solve(jtj / (d[:, :, None] * d[:, None, :]) + (lam + 1e-9) * eye, jtr / d) / d


def _take_step(delta, q, rot, shifts, q_lo, q_hi, max_shift):
    """Parameters moved by steps delta (B, K + 6: amplitudes Å, axis-angle rad, shifts px, the
    scale last) within the amplitude box and the shift limit: (q, rot, shifts, delta with the
    bounds applied)."""
    k = q.shape[1]
    q_t = torch.minimum(torch.maximum(q + delta[:, :k], q_lo), q_hi)
    s_t = (shifts + delta[:, k + 3:k + 5]).clamp(-max_shift, max_shift)
    taken = torch.cat([q_t - q, delta[:, k:k + 3], s_t - shifts, delta[:, k + 5:]], 1)
    return q_t, torch.matmul(rodrigues(delta[:, k:k + 3]), rot), s_t, taken


class Fit(NamedTuple):
    """The least-squares state of B problems at their parameters (:func:`least_squares_state`):
    cost (B,) with the best scale and offset, NCC (B,), the normal equations jtj (B, D+1, D+1) and jtr
    (B, D+1) of the parameters plus the scale, the images' energy (B,), the residuals (B, n * n),
    the scales (B,) and the derivatives of the scaled projection (B, D+1, n * n) whose products
    the normal equations are."""
    cost: torch.Tensor
    ncc: torch.Tensor
    jtj: torch.Tensor
    jtr: torch.Tensor
    energy: torch.Tensor
    resid: torch.Tensor
    scale: torch.Tensor
    jac: torch.Tensor

    def select(self, index) -> "Fit":
        return Fit(*(x[index] for x in self))

    def step(self, delta: torch.Tensor) -> "Fit":
        """The state after steps delta (B, D+1) of the parameters and the scale, to first order:
        the residual moved along the derivatives, the normal equations kept."""
        resid = self.resid - torch.matmul(delta[:, None], self.jac)[:, 0]
        cost = (resid * resid).sum(1)
        scale = self.scale + delta[:, -1]
        ncc = torch.sign(scale) * torch.sqrt(torch.clamp(1 - cost / (self.energy + 1e-30), min=0.0))
        jtr = self.jtr - torch.matmul(self.jtj, delta.double()[..., None])[..., 0]
        return Fit(cost=cost, ncc=ncc, jtj=self.jtj, jtr=jtr, energy=self.energy, resid=resid,
                    scale=scale, jac=self.jac)


def least_squares_state(model: DeformableModel, images: torch.Tensor, filt: Optional[torch.Tensor],
                        rot, q, shifts) -> Fit:
    """The least-squares state (:class:`Fit`) of images (B, n, n) against the filtered
    projections at (rot, q, shifts); the free offset is eliminated exactly (centring)."""
    p, j = model.project_with_jacobian(rot, q, shifts)
    p, j = apply_filter(p, filt), apply_filter(j, filt)
    b = p.shape[0]
    pf = p.reshape(b, -1)
    pf = pf - pf.mean(1, keepdim=True)
    im = images.reshape(b, -1)
    im = im - im.mean(1, keepdim=True)
    jf = j.reshape(b, j.shape[1], -1)
    jf = jf - jf.mean(2, keepdim=True)
    pp, pi, ii = (pf * pf).sum(1), (pf * im).sum(1), (im * im).sum(1)
    scale = pi / (pp + 1e-30)
    resid = im - scale[:, None] * pf
    full = torch.cat([scale[:, None, None] * jf, pf[:, None]], 1)
    return Fit(cost=(resid * resid).sum(1), ncc=pi / torch.sqrt(pp * ii + 1e-30),
                jtj=torch.matmul(full, full.transpose(1, 2)).double(),
                jtr=torch.matmul(full, resid[..., None])[..., 0].double(), energy=ii, resid=resid, scale=scale,
                jac=full)
