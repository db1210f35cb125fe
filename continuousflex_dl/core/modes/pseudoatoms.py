"""Density maps as references: approximation of a 3-D map by Gaussian pseudoatoms.

Method (after Jonic & Sorzano, IEEE JSTSP 2016, and ContinuousFlex's
``convert_vol2pseudo``): isotropic Gaussians of one fixed width ``sigma`` (Å,
standard deviation) are added where the residual map is largest (maxima of the
residual correlated with the Gaussian, i.e. the matched filter), then their
positions and weights are refined by damped diagonal Gauss-Newton steps on the
squared error, in rounds, until the relative error reaches a target or the
number of pseudoatoms reaches a maximum.

Forward model: the same pixel-integrated Gaussians as
:func:`projection.density_map` (so maps, projections and pseudoatoms agree),
evaluated on a local patch reaching at least ``4 sigma`` from each pseudoatom
along every axis (the rest of a Gaussian holds < 2e-4 of its weight).

Conventions:

* Maps are arrays ``[z, y, x]``; voxel ``(iz, iy, ix)`` has its centre at
  ``((ix, iy, iz) - n // 2) * pixel_size`` Å. Pseudoatom coordinates (N, 3)
  ``(x, y, z)`` are written in that *box-centre frame*; add
  ``(n // 2) * pixel_size`` to overlay them on the map in a viewer that puts
  voxel 0 at the origin.
* A weight is the integral of one Gaussian in map units x voxel (voxels sum
  to the weights of the pseudoatoms inside the box).
* The approximation error is the relative L2 error over the whole box,
  ``||V - M|| / ||V||``, of the map ``V`` after thresholding / masking.
  (ContinuousFlex's percentage is the *energy* ratio ``||V - M||^2 / ||V||^2``,
  the square of this one; ours is the stricter measure at the same number.)
* PDB files follow :mod:`structure`: residue name ``PSE``, atom name ``DENS``,
  sigma (Å) in the B-factor column, weight in the occupancy column scaled so
  that the largest weight prints as ``OCCUPANCY_MAX`` (PDB keeps 2 decimals, so
  relative weights keep about 4 significant digits); ``REMARK`` lines record
  the scale back to map units, the pixel size, the box and the error reached.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from ..imaging.projection import pixel_profiles
from ..progress import Progress, report

logger = logging.getLogger(__name__)

__all__ = ["PseudoatomResult", "read_map", "write_map", "prepare_map", "render_pseudoatoms",
           "relative_error", "volume_to_pseudoatoms", "write_pseudoatoms_pdb", "read_pdb_remarks",
           "map_file_to_pseudoatoms", "interpolate_vectors", "OCCUPANCY_MAX"]

#: Occupancy printed for the largest pseudoatom weight.
OCCUPANCY_MAX = 99.0
#: Patch half-width in standard deviations.
_CUT_SIGMAS = 4.0
_CHUNK = 4096


@dataclass
class PseudoatomResult:
    """Pseudoatoms approximating a map.

    coords: (N, 3) Å ``(x, y, z)`` in the box-centre frame (module docstring).
    weights: (N,) integral of each Gaussian (map units x voxel), > 0.
    sigma: Gaussian standard deviation, Å (the same for all pseudoatoms).
    error: relative L2 error ``||V - M|| / ||V||`` reached; target_error: the one asked.
    reached: whether ``error <= target_error``.
    box: map size (voxels per side); pixel_size: Å/voxel.
    history: (number of pseudoatoms, error) after every round.
    seconds: wall time of the conversion.
    """
    coords: np.ndarray
    weights: np.ndarray
    sigma: float
    error: float
    target_error: float
    reached: bool
    box: int
    pixel_size: float
    history: List[Tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_atoms(self) -> int:
        return int(len(self.coords))


# ----------------------------------------------------------------------------- map I/O

def _strip(path) -> str:
    path = str(path)
    for suffix in (":mrcs", ":mrc"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def read_map(path: Union[str, os.PathLike]) -> Tuple[np.ndarray, float]:
    """Read a cubic MRC map: ``(volume (n, n, n) float32 [z, y, x], voxel size Å)``.

    A Scipion ``:mrc`` suffix is ignored. Raises ValueError for missing,
    non-cubic or non-3-D files.
    """
    import mrcfile
    path = _strip(path)
    if not os.path.exists(path):
        raise ValueError(f"Map file not found: {path}")
    try:
        with mrcfile.open(path, permissive=True) as mrc:
            data = np.asarray(mrc.data, dtype=np.float32).copy()
            voxel = float(mrc.voxel_size.x)
    except Exception as exc:
        raise ValueError(f"Cannot read the map {path}: {exc}") from exc
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise ValueError(f"{path} must hold a cubic 3-D map, its shape is {data.shape}.")
    return data, voxel


def write_map(path: Union[str, os.PathLike], volume, pixel_size: float,
              origin: Optional[Tuple[float, float, float]] = None) -> Path:
    """Write a map (n, n, n) ``[z, y, x]`` as MRC with voxel size ``pixel_size`` Å and, if
    given, the header ``origin`` (x, y, z) Å: where ChimeraX places voxel (0, 0, 0)."""
    import mrcfile
    path = Path(_strip(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    vol = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    with mrcfile.new(str(path), overwrite=True) as mrc:
        mrc.set_data(vol.astype(np.float32))
        mrc.voxel_size = float(pixel_size)
        if origin is not None:
            mrc.header.origin = tuple(float(v) for v in origin)
    return path


def prepare_map(volume: np.ndarray, threshold: Optional[float] = None,
                mask: Optional[np.ndarray] = None) -> np.ndarray:
    """The part of a map to approximate: values below ``threshold`` and voxels
    outside ``mask`` (same shape, nonzero = keep) set to 0. Returns float32."""
    vol = np.array(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"The map must be 3-D, got shape {vol.shape}.")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != vol.shape:
            raise ValueError(f"The mask {mask.shape} and the map {vol.shape} differ in size.")
        vol[mask == 0] = 0.0
    if threshold is not None:
        vol[vol < threshold] = 0.0
    if not np.all(np.isfinite(vol)):
        raise ValueError("The map has non-finite values.")
    return vol


# ----------------------------------------------------------------------------- forward model

def _half_width(sigma_px: float) -> int:
    # A patch reaches at least h voxels from its pseudoatom (centres are rounded to a voxel).
    return max(1, int(math.ceil(_CUT_SIGMAS * sigma_px)))


def _patches(pos: torch.Tensor, s_px: float, box: int, derivative: bool = False):
    """Local profiles of pseudoatoms at voxel coordinates ``pos`` (N, 3) ``(x, y, z)``.

    Returns flat voxel indices (N, P, P, P) (clamped), and for x, y, z the
    profiles (N, P) (zero outside the box), plus their position derivatives.
    """
    h = _half_width(s_px)
    p = 2 * h + 1
    start = torch.round(pos).long() - h                           # (N, 3)
    local = pos - start.to(pos.dtype)                             # centre within the patch
    steps = torch.arange(p, device=pos.device)
    idx = start[:, :, None] + steps                               # (N, 3, P)
    inside = (idx >= 0) & (idx < box)
    sig = torch.full((pos.shape[0],), s_px, dtype=pos.dtype, device=pos.device)
    inside = inside.transpose(0, 1).to(pos.dtype)                 # (3, N, P)
    if derivative:
        g, d = pixel_profiles(local.T, p, sig, derivative=True)   # (3, N, P) each
        g, d = g * inside, d * inside
        ders = [d[0], d[1], d[2]]
    else:
        g = pixel_profiles(local.T, p, sig) * inside
        ders = []
    profs = [g[0], g[1], g[2]]
    idx = idx.clamp(0, box - 1)
    flat = ((idx[:, 2, :, None, None] * box + idx[:, 1, None, :, None]) * box
            + idx[:, 0, None, None, :])
    return flat, profs, ders


def _outer(gz, gy, gx):
    return gz[:, :, None, None] * gy[:, None, :, None] * gx[:, None, None, :]


def _render(pos: torch.Tensor, w: torch.Tensor, s_px: float, box: int,
            start: Optional[torch.Tensor] = None, sign: float = 1.0) -> torch.Tensor:
    """``start + sign * map`` (or the map) of pseudoatoms at voxel coordinates ``pos`` (N, 3)."""
    vol = (torch.zeros(box ** 3, dtype=pos.dtype, device=pos.device) if start is None
           else start.reshape(-1).clone())
    for a in range(0, pos.shape[0], _CHUNK):
        flat, (gx, gy, gz), _ = _patches(pos[a:a + _CHUNK], s_px, box)
        vals = _outer(gz, gy, gx) * (sign * w[a:a + _CHUNK])[:, None, None, None]
        vol.index_add_(0, flat.reshape(-1), vals.reshape(-1))
    return vol.reshape(box, box, box)


def _residual(vol: torch.Tensor, pos: torch.Tensor, w: torch.Tensor, s_px: float) -> torch.Tensor:
    return _render(pos, w, s_px, vol.shape[0], start=vol, sign=-1.0)


def render_pseudoatoms(coords, weights, sigma: float, box: int, pixel_size: float,
                       device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Map (box, box, box) ``[z, y, x]`` float64 of pseudoatoms ``coords`` (N, 3) Å
    (box-centre frame), ``weights`` (N,), width ``sigma`` Å: the same values as
    :func:`projection.density_map` up to the patch truncation (< 2e-4 of each weight)."""
    if not sigma > 0 or not pixel_size > 0:
        raise ValueError("sigma (Å) and the pixel size (Å/px) must be positive.")
    dev = torch.device(device)
    pos = torch.as_tensor(np.asarray(coords, float), dtype=torch.float64, device=dev) / pixel_size + box // 2
    w = torch.as_tensor(np.asarray(weights, float), dtype=torch.float64, device=dev)
    return _render(pos.reshape(-1, 3), w.reshape(-1), sigma / pixel_size, int(box))


def relative_error(volume, approximation) -> float:
    """``||V - M|| / ||V||`` over the whole box (arrays or tensors of one shape)."""
    v = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume)
    m = torch.as_tensor(np.asarray(approximation) if not isinstance(approximation, torch.Tensor)
                        else approximation).to(v.device, v.dtype)
    return float(torch.linalg.vector_norm(v - m) / torch.linalg.vector_norm(v))


# ----------------------------------------------------------------------------- fitting

def _matched_filter(res: torch.Tensor, s_px: float) -> Tuple[torch.Tensor, float]:
    """Correlation of the residual (n, n, n) with a voxel-centred Gaussian (separable,
    three banded matrix products), and the squared norm of that Gaussian."""
    h = _half_width(s_px)
    n = res.shape[0]
    pos = torch.full((1,), float(h), dtype=res.dtype, device=res.device)
    k = pixel_profiles(pos, 2 * h + 1, torch.full((1,), s_px, dtype=res.dtype, device=res.device))[0]
    i = torch.arange(n, device=res.device)
    off = i[:, None] - i[None, :] + h
    band = torch.where((off >= 0) & (off <= 2 * h), k[off.clamp(0, 2 * h)], torch.zeros((), dtype=res.dtype,
                                                                                       device=res.device))
    x = torch.matmul(res, band)                                   # along x
    x = torch.matmul(band.T, x)                                   # along y
    x = torch.matmul(band.T, x.reshape(n, n * n)).reshape(n, n, n)  # along z
    return x, float((k ** 2).sum()) ** 3


def _new_atoms(res: torch.Tensor, allowed: torch.Tensor, s_px: float, n_add: int,
               floor: float = 0.0):
    """Up to ``n_add`` pseudoatoms at the largest local maxima of the matched filter
    (only maxima above ``floor`` times the largest value)."""
    filt, g2 = _matched_filter(res, s_px)
    peaks = (filt == F.max_pool3d(filt[None, None], 3, 1, 1)[0, 0]) & (filt > 0) & allowed
    peaks &= filt >= floor * filt.max()
    values = filt[peaks]
    if values.numel() == 0:
        return None, None
    order = torch.argsort(values, descending=True)[:n_add]
    zyx = torch.nonzero(peaks)[order]
    return zyx.flip(1).to(res.dtype), values[order] / g2


def _merge_close(pos: torch.Tensor, w: torch.Tensor, distance: float):
    """Merge pseudoatoms closer than ``distance`` voxels (heaviest first) into one at their
    weighted mean with the summed weight: two Gaussians of one width that close are
    nearly one Gaussian, and near-duplicates make elastic networks floppy."""
    if distance <= 0 or pos.shape[0] < 2:
        return pos, w
    from scipy.spatial import cKDTree
    p = pos.detach().cpu().double().numpy()
    wt = w.detach().cpu().double().numpy()
    pairs = cKDTree(p).query_pairs(distance, output_type="ndarray")
    if len(pairs) == 0:
        return pos, w
    neighbours = [[] for _ in range(len(p))]
    for i, j in pairs:
        neighbours[i].append(j)
        neighbours[j].append(i)
    taken = np.zeros(len(p), bool)
    new_p, new_w = [], []
    for i in np.argsort(-wt, kind="stable"):
        if taken[i]:
            continue
        group = [i] + [j for j in neighbours[i] if not taken[j]]
        taken[group] = True
        gw = wt[group]
        new_w.append(gw.sum())
        new_p.append((p[group] * gw[:, None]).sum(0) / max(gw.sum(), 1e-30))
    return (torch.as_tensor(np.array(new_p), dtype=pos.dtype, device=pos.device),
            torch.as_tensor(np.array(new_w), dtype=w.dtype, device=w.device))


def _refine(vol, pos, w, s_px, box, iterations, step, target_norm, lo, hi):
    """Damped diagonal Gauss-Newton on weights and positions; returns pos, w, residual, step."""
    res = _residual(vol, pos, w, s_px)
    err = float(torch.linalg.vector_norm(res))
    for _ in range(iterations):
        dw = torch.empty_like(w)
        dpos = torch.empty_like(pos)
        rflat = res.reshape(-1)
        for a in range(0, pos.shape[0], _CHUNK):
            sl = slice(a, a + _CHUNK)
            flat, (gx, gy, gz), (dx, dy, dz) = _patches(pos[sl], s_px, box, derivative=True)
            n, p = gx.shape
            r = rflat[flat].reshape(n, p, p * p)                     # (n, Pz, Py*Px)
            rz = torch.bmm(torch.stack([gz, dz], 1), r).reshape(n, 2, p, p)   # z contracted
            ry = torch.einsum("nkyx,ny->nkx", rz, gy)                # (n, 2, Px): [g_z g_y, d_z g_y]
            c0 = (ry[:, 0] * gx).sum(1)
            cx = (ry[:, 0] * dx).sum(1)
            cz = (ry[:, 1] * gx).sum(1)
            cy = torch.einsum("nyx,ny,nx->n", rz[:, 0], dy, gx)
            sx, sy, sz = (gx * gx).sum(1), (gy * gy).sum(1), (gz * gz).sum(1)
            tx, ty, tz = (dx * dx).sum(1), (dy * dy).sum(1), (dz * dz).sum(1)
            wi = w[sl].clamp_min(1e-12)
            dw[sl] = c0 / (sx * sy * sz)
            dpos[sl, 0] = cx / (wi * tx * sy * sz)
            dpos[sl, 1] = cy / (wi * sx * ty * sz)
            dpos[sl, 2] = cz / (wi * sx * sy * tz)
        dpos = dpos.clamp(-0.5, 0.5)
        while True:
            new_w = (w + step * dw).clamp_min(0.0)
            new_pos = torch.minimum(torch.maximum(pos + step * dpos, lo), hi)
            new_res = _residual(vol, new_pos, new_w, s_px)
            new_err = float(torch.linalg.vector_norm(new_res))
            if new_err < err or step < 1e-3:
                break
            step *= 0.5
        if new_err >= err:
            break
        pos, w, res = new_pos, new_w, new_res
        improvement = (err - new_err) / max(err, 1e-30)
        err = new_err
        step = min(1.0, step * 1.25)
        if err <= target_norm or improvement < 1e-4:
            break
    return pos, w, res, step


def volume_to_pseudoatoms(volume, pixel_size: float, sigma: Optional[float] = None, *,
                          target_error: float = 0.05, max_atoms: int = 20000,
                          threshold: Optional[float] = None, mask: Optional[np.ndarray] = None,
                          grow_fraction: float = 0.3, min_grow: int = 32,
                          iterations: int = 10, final_iterations: int = 30,
                          min_weight: float = 1e-3, merge_distance: float = 1.0,
                          device: Union[str, torch.device] = "cpu",
                          progress: Optional[Progress] = None) -> PseudoatomResult:
    """Approximate a map by Gaussian pseudoatoms of width ``sigma`` Å.

    volume: (n, n, n) ``[z, y, x]`` map (numpy or torch); pixel_size: Å/voxel.
    sigma: Gaussian standard deviation in Å (default: one voxel).
    target_error: relative L2 error ``||V - M|| / ||V||`` to reach (0.05 = 5 %).
    max_atoms: the most pseudoatoms; the result says honestly whether the target was reached.
    threshold / mask: see :func:`prepare_map`; new pseudoatoms are placed only
    where the prepared map is positive.
    grow_fraction / min_grow: the first round places a pseudoatom on every maximum of
    the matched-filtered map above 20 % of the largest; each further round adds
    ``max(min_grow, grow_fraction * N)`` at the largest maxima of the residual.
    iterations / final_iterations: refinement steps per round and at the end.
    min_weight: pseudoatoms lighter than this fraction of the heaviest are removed.
    merge_distance: pseudoatoms closer than this many sigmas are merged into one.
    progress: :data:`~continuousflex_dl.core.progress.Progress`, called after each round with
    the per cent of the way (log scale) from an error of 1 to the target error, of 100.
    Deterministic (no random choices). Returns a :class:`PseudoatomResult`.
    """
    t0 = time.time()
    vol_np = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else volume
    vol_np = prepare_map(vol_np, threshold, mask)
    box = vol_np.shape[0]
    if len(set(vol_np.shape)) != 1:
        raise ValueError(f"The map must be cubic, got shape {vol_np.shape}.")
    if not pixel_size > 0:
        raise ValueError(f"The pixel size must be positive (Å/voxel), got {pixel_size}.")
    sigma = float(pixel_size if sigma is None else sigma)
    if not sigma > 0:
        raise ValueError(f"The pseudoatom width sigma must be positive (Å), got {sigma}.")
    if not 0 < target_error < 1:
        raise ValueError(f"The target error is a fraction in (0, 1), e.g. 0.05, not {target_error}.")
    if int(max_atoms) < 1:
        raise ValueError(f"The maximum number of pseudoatoms must be >= 1, got {max_atoms}.")
    if not np.any(vol_np > 0):
        raise ValueError("The map has no positive density left (check the threshold or the mask).")
    dev = torch.device(device)
    vol = torch.as_tensor(vol_np, dtype=torch.float32, device=dev)
    allowed = vol > 0
    s_px = sigma / pixel_size
    norm_v = float(torch.linalg.vector_norm(vol))
    target_norm = target_error * norm_v
    lo = torch.zeros(3, dtype=vol.dtype, device=dev)
    hi = torch.full((3,), box - 1.0, dtype=vol.dtype, device=dev)

    pos = torch.zeros(0, 3, dtype=vol.dtype, device=dev)
    w = torch.zeros(0, dtype=vol.dtype, device=dev)
    res = vol.clone()
    history: List[Tuple[int, float]] = []
    step = 0.5
    err = 1.0
    stalled = 0
    while True:
        room = int(max_atoms) - pos.shape[0]
        first = pos.shape[0] == 0
        n_add = room if first else min(room, max(int(min_grow), int(grow_fraction * pos.shape[0])))
        if n_add <= 0:
            break
        # First round: every clear blob of the map (matched-filter maxima above 20 % of the top).
        new_pos, new_w = _new_atoms(res, allowed, s_px, n_add, 0.2 if first else 0.0)
        if new_pos is None:
            break
        pos = torch.cat([pos, new_pos])
        w = torch.cat([w, new_w])
        pos, w, res, step = _refine(vol, pos, w, s_px, box, iterations, max(step, 0.25),
                                    target_norm, lo, hi)
        keep = w > min_weight * w.max()
        n_before = pos.shape[0]
        pos, w = _merge_close(pos[keep], w[keep], merge_distance * s_px)
        if pos.shape[0] != n_before:
            res = _residual(vol, pos, w, s_px)
        new_err = float(torch.linalg.vector_norm(res)) / norm_v
        history.append((int(pos.shape[0]), new_err))
        logger.info("Pseudoatoms: %d, relative error %.4f (target %.4f)", pos.shape[0], new_err,
                    target_error)
        report(progress, round(100 * min(1.0, max(0.0, math.log(max(new_err, 1e-12)) / math.log(target_error)))),
               100, f"{pos.shape[0]} pseudoatoms, error {new_err:.4f}")
        stalled = stalled + 1 if new_err > 0.995 * err else 0
        err = new_err
        if err <= target_error or stalled >= 3:
            break
    pos, w, res, step = _refine(vol, pos, w, s_px, box, final_iterations, step, 0.0, lo, hi)
    keep = w > min_weight * w.max()
    pos, w = _merge_close(pos[keep], w[keep], merge_distance * s_px)
    err = relative_error(vol, _render(pos, w, s_px, box))
    history.append((int(pos.shape[0]), err))
    coords = ((pos - box // 2) * pixel_size).cpu().numpy()
    seconds = time.time() - t0
    logger.info("Map of %d^3 voxels -> %d pseudoatoms (sigma %.2f Å), relative error %.4f "
                "(target %.4f, %s) in %.1f s", box, len(coords), sigma, err, target_error,
                "reached" if err <= target_error else "NOT reached", seconds)
    return PseudoatomResult(coords=coords, weights=w.cpu().numpy(), sigma=sigma, error=err,
                            target_error=float(target_error), reached=bool(err <= target_error),
                            box=int(box), pixel_size=float(pixel_size), history=history,
                            seconds=seconds)


# ----------------------------------------------------------------------------- PDB files

def write_pseudoatoms_pdb(path: Union[str, os.PathLike], result: PseudoatomResult) -> Path:
    """Write pseudoatoms as PDB (convention in the module docstring); returns the path.

    Readable by :func:`structure.load_atoms` (sigma from B-factors, weights from
    occupancies, up to the scale in ``REMARK  PSEUDOATOMS WEIGHT_SCALE``).
    """
    coords = np.asarray(result.coords, float)
    if np.abs(coords).max(initial=0) >= 9999.0:
        raise ValueError("Pseudoatom coordinates do not fit the PDB format (|x| >= 9999 Å).")
    if result.sigma >= 999.0:
        raise ValueError("The pseudoatom width does not fit the PDB B-factor column.")
    weights = np.asarray(result.weights, float)
    scale = float(weights.max()) / OCCUPANCY_MAX if len(weights) else 1.0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "REMARK  PSEUDOATOMS continuousflex_dl Gaussian pseudoatoms of a density map",
        f"REMARK  PSEUDOATOMS SIGMA_A {result.sigma:.6g}",
        f"REMARK  PSEUDOATOMS WEIGHT_SCALE {scale:.8g}",
        f"REMARK  PSEUDOATOMS PIXEL_SIZE {result.pixel_size:.6g}",
        f"REMARK  PSEUDOATOMS BOX {result.box}",
        f"REMARK  PSEUDOATOMS RELATIVE_ERROR {result.error:.6g}",
        f"REMARK  PSEUDOATOMS TARGET_ERROR {result.target_error:.6g}",
        "REMARK  PSEUDOATOMS FRAME box-centre (voxel n//2 at 0 A)",
    ]
    for i, ((x, y, z), wt) in enumerate(zip(coords, weights)):
        occ = wt / scale
        lines.append("ATOM  %5d DENS PSE A%4d    %8.3f%8.3f%8.3f%6.2f%6.2f          %2s"
                     % ((i + 1) % 100000, (i + 1) % 10000, x, y, z, occ, result.sigma, "C"))
    lines.append("END")
    path.write_text("\n".join(lines) + "\n")
    return path


def read_pdb_remarks(path: Union[str, os.PathLike]) -> dict:
    """The ``REMARK  PSEUDOATOMS KEY value`` records of a pseudoatom PDB as a dict of strings."""
    out = {}
    with open(path) as fh:
        for line in fh:
            if line.startswith("REMARK  PSEUDOATOMS "):
                parts = line.split(None, 3)
                if len(parts) == 4:
                    out[parts[2]] = parts[3].strip()
    return out


def map_file_to_pseudoatoms(map_path: Union[str, os.PathLike], pdb_path: Union[str, os.PathLike],
                            sigma_voxels: float = 1.0, **kwargs) -> PseudoatomResult:
    """Read an MRC map, approximate it (:func:`volume_to_pseudoatoms`, keyword
    arguments passed on) with pseudoatoms of ``sigma_voxels`` x voxel size, write the PDB."""
    vol, voxel = read_map(map_path)
    if not sigma_voxels > 0:
        raise ValueError(f"The pseudoatom width must be positive, got {sigma_voxels} voxels.")
    result = volume_to_pseudoatoms(vol, voxel, sigma_voxels * voxel, **kwargs)
    write_pseudoatoms_pdb(pdb_path, result)
    return result


# ----------------------------------------------------------------------------- comparisons

def interpolate_vectors(coords: np.ndarray, vectors: np.ndarray, points: np.ndarray,
                        radius: float) -> np.ndarray:
    """Displacement fields (K, N, 3) given at atoms ``coords`` (N, 3) Å, averaged at
    ``points`` (P, 3) Å with Gaussian weights ``exp(-d^2 / (2 radius^2))`` over the atoms
    within ``3 radius`` (the nearest atom when none is). Returns (K, P, 3)."""
    from scipy.spatial import cKDTree
    coords = np.asarray(coords, float)
    vectors = np.asarray(vectors, float)
    points = np.asarray(points, float)
    if vectors.ndim != 3 or vectors.shape[1:] != coords.shape:
        raise ValueError(f"vectors must have shape (K, {len(coords)}, 3), got {vectors.shape}.")
    if not radius > 0:
        raise ValueError(f"The radius must be positive (Å), got {radius}.")
    tree = cKDTree(coords)
    out = np.zeros((len(vectors), len(points), 3))
    neighbours = tree.query_ball_point(points, 3.0 * radius)
    for p, idx in enumerate(neighbours):
        if not idx:
            idx = [int(tree.query(points[p])[1])]
        d2 = np.sum((coords[idx] - points[p]) ** 2, axis=1)
        g = np.exp(-d2 / (2.0 * radius ** 2))
        g = g / g.sum() if g.sum() > 0 else np.full(len(idx), 1.0 / len(idx))
        out[:, p] = np.einsum("a,kad->kd", g, vectors[:, idx])
    return out
