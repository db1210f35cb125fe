"""Stage 1 of HEMNMA, the global search: a quasi-uniform rotation grid, every image scored
against the reference projections over all shifts of a window, the distinct best rotations of
each image and the best of an amplitude grid at each; the contrast check on the way.

Shifts are integer displacements in pixels of the search size with the pose's sign
(:func:`geometry.particle_offset_px`: the particle centre sits at box centre minus the shift).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ...imaging.geometry import euler_to_matrix, particle_offset_px
from ...imaging.dataset import rotate_images
from .model import DeformableModel

__all__ = ["rotation_grid", "in_plane_rotations", "score_references", "check_contrast", "distinct_candidates",
           "amplitude_grid_search", "SEARCH_REFERENCES", "SEARCH_GEMM_SHIFTS", "POLARITY_MIN_IMAGES",
           "POLARITY_FRACTION", "CANDIDATE_SPREAD_FRACTION", "CANDIDATE_POOL", "CANDIDATE_MOST"]


def rotation_grid(step_deg: float, return_n_psi: bool = False):
    """Quasi-uniform rotations about ``step_deg`` apart, (R, 3, 3).

    Projection directions on a Fibonacci sphere (about ``4 pi / step^2`` of them)
    times in-plane angles ``psi`` every ``step_deg`` degrees (``psi`` varies fastest,
    starting at 0). With ``return_n_psi`` also returns the number of ``psi`` values.
    """
    if not 0 < step_deg <= 90:
        raise ValueError(f"The angular step must be in (0, 90] degrees, got {step_deg}.")
    step = math.radians(step_deg)
    n_dir = max(2, int(round(4 * math.pi / step ** 2)))
    i = np.arange(n_dir) + 0.5
    tilt = np.degrees(np.arccos(1 - 2 * i / n_dir))
    rot = np.degrees(np.mod(i * math.pi * (3 - math.sqrt(5)), 2 * math.pi))
    n_psi = max(1, int(round(360.0 / step_deg)))
    psi = np.arange(n_psi) * (360.0 / n_psi)
    angles = np.stack([np.repeat(rot, n_psi), np.repeat(tilt, n_psi), np.tile(psi, n_dir)], -1)
    mats = euler_to_matrix(angles)
    return (mats, n_psi) if return_n_psi else mats


def in_plane_rotations(images: torch.Tensor, psi_deg: torch.Tensor) -> torch.Tensor:
    """Images (P, n, n) rotated in plane about the centre ``n // 2`` by every angle of
    ``psi_deg`` (L,) degrees: (P * L, n, n), psi fastest. Matches adding ``psi`` to the Euler
    angle psi of a projection: :func:`dataset.rotate_images` by ``-psi`` (bilinear), the P
    images as the channels of one batch item per angle, so each angle's grid is made once."""
    p, n = images.shape[0], images.shape[-1]
    out = rotate_images(images[None].expand(len(psi_deg), -1, -1, -1), -psi_deg)           # (L, P, n, n)
    return out.transpose(0, 1).reshape(p * len(psi_deg), n, n)


def score_references(ref_ft: torch.Tensor, img: torch.Tensor,
                   filt: torch.Tensor, max_shift: float):
    """NCC of every image (M, n, n) with every reference spectrum (P, n, n//2+1) over integer
    shifts within ``max_shift`` px. Returns scores (M, P), the best shifts (M, P, 2) px and
    each image's best anti-correlation (M,): the largest ``-NCC`` over references and shifts,
    which beats the best score when the image's contrast is inverted.

    The cross-correlations at the S shifts of the window are one real matrix product,
    (M S, 2H) phase-shifted image half-spectra against (2H, P) reference half-spectra (real
    and imaginary parts side by side, Parseval weights on the images), when S is at most
    :data:`SEARCH_GEMM_SHIFTS`; with more shifts, an inverse FFT per image and reference
    gives every shift at once (:func:`_search_fft`). Both are the same sums: at 32 px and 9
    shifts (5 px at 128 px), the product took 91 -> 14 ms per image on one Intel Xeon thread."""
    m, n = img.shape[0], img.shape[-1]
    window, flat = _shift_window(max_shift, n, img.device)
    img = img - img.mean(dim=(-2, -1), keepdim=True)
    f_img = torch.fft.rfft2(img) * filt
    img_norm = torch.sqrt((img * img).sum(dim=(-2, -1)))
    wgt = _half_plane_weights(n, img.device, img.dtype)
    filt2 = (filt * filt * wgt).reshape(m, -1) / (n * n)
    scores = torch.empty(m, ref_ft.shape[0], dtype=img.dtype, device=img.device)
    best = torch.empty(m, ref_ft.shape[0], 2, dtype=img.dtype, device=img.device)
    anti = torch.full((m,), -math.inf, dtype=img.dtype, device=img.device)
    gemm = len(flat) <= SEARCH_GEMM_SHIFTS
    if gemm:
        # cc[s] = (1/n^2) sum_half w_k Re(F_img(k) e^{2 pi i k.d_s / n} conj(F_ref(k))): the
        # inverse rfft2 at displacement d_s = flat[s] (row dy, column dx of the map).
        dy, dx = flat // n, flat % n
        ky = torch.fft.fftfreq(n, 1.0 / n, device=img.device, dtype=img.dtype)[:, None]
        kx = torch.fft.rfftfreq(n, 1.0 / n, device=img.device, dtype=img.dtype)[None, :]
        phase = torch.polar(wgt / (n * n) * torch.ones_like(ky),
                            (2 * math.pi / n) * (ky[None] * dy[:, None, None].to(img.dtype)
                                                 + kx[None] * dx[:, None, None].to(img.dtype)))
        shifted = torch.view_as_real(f_img[:, None] * phase[None])          # (M, S, n, h, 2)
        shifted = shifted.reshape(m * len(flat), -1)
    block = SEARCH_REFERENCES if gemm else 64  # FFT tiles of 16 images x 64 references stay in cache
    for start in range(0, ref_ft.shape[0], block):
        f_ref = ref_ft[start:start + block]
        power = (f_ref.real ** 2 + f_ref.imag ** 2).reshape(f_ref.shape[0], -1)
        ref_norm = torch.sqrt(torch.matmul(filt2, power.T) + 1e-30)      # (M, Pc)
        if gemm:
            cc = torch.matmul(shifted, torch.view_as_real(f_ref).reshape(f_ref.shape[0], -1).T)
            cc = cc.reshape(m, len(flat), -1).transpose(1, 2)                # (M, Pc, S)
        else:
            cc = _search_fft(f_img, f_ref, n, flat)
        val, arg = cc.max(-1)
        norm = img_norm[:, None] * ref_norm
        scores[:, start:start + f_ref.shape[0]] = val / norm
        best[:, start:start + f_ref.shape[0]] = window[arg].to(img.dtype)
        anti = torch.maximum(anti, (-cc.min(-1).values / norm).max(-1).values)
    return scores, best, anti


def _search_fft(f_img: torch.Tensor, f_ref: torch.Tensor, n: int, flat: torch.Tensor) -> torch.Tensor:
    """Cross-correlations (M, Pc, S) of image spectra (M, n, h) with reference spectra
    (Pc, n, h) at the flat map indices ``flat`` (S,), by inverse FFTs, 16 images at a time."""
    out = []
    for i0 in range(0, f_img.shape[0], 16):
        cc = torch.fft.irfft2(f_img[i0:i0 + 16, None] * f_ref.conj()[None], s=(n, n))
        out.append(cc.reshape(cc.shape[0], cc.shape[1], -1)[..., flat])
    return torch.cat(out)


#: With at most SEARCH_GEMM_SHIFTS shifts in its window (9 at the defaults), the global
#: search scores blocks of SEARCH_REFERENCES references by one matrix product each; the
#: inverse FFTs, whose cost does not grow with the window, were as fast at about 150 shifts
#: (32 px, one Intel Xeon thread: 14 / 39 / 122 ms per image at 9 / 49 shifts / by FFT).
SEARCH_REFERENCES, SEARCH_GEMM_SHIFTS = 1024, 128


def _half_plane_weights(n: int, device, dtype) -> torch.Tensor:
    """Parseval weights of an rfft2 half-plane (n, n//2+1): columns counted twice except 0 and Nyquist."""
    w = torch.full((n // 2 + 1,), 2.0, device=device, dtype=dtype)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return w


def _shift_window(max_shift: float, n: int, device):
    """The integer particle displacements within ``max_shift`` px of the box centre, as pose
    shifts (S, 2) px, and their flat indices (S,) in an n x n cross-correlation map."""
    r = int(math.ceil(max_shift))
    d = torch.arange(-r, r + 1, device=device)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    keep = (dx * dx + dy * dy) <= (max_shift + 0.5) ** 2
    dx, dy = dx[keep], dy[keep]
    return particle_offset_px(torch.stack([dx, dy], -1)), (dy % n) * n + (dx % n)


#: Fewest images of a batch on which inverted contrast is judged, and the fraction of them
#: whose best anti-correlation must beat their best correlation. Images of a hopeless SNR
#: split about evenly; inverted particles at SNR 0.1 do so for nearly all.
POLARITY_MIN_IMAGES, POLARITY_FRACTION = 10, 0.75


def check_contrast(best: np.ndarray, anti: np.ndarray) -> None:
    """Refuse particles whose contrast is inverted (dark protein on a bright background).

    best, anti: (M,) each image's best correlation and best anti-correlation with the
    reference projections (:func:`score_references`). Raises ValueError when, of at least
    :data:`POLARITY_MIN_IMAGES` images, more than :data:`POLARITY_FRACTION` match the
    reference better with the opposite sign.
    """
    best, anti = np.asarray(best, dtype=float), np.asarray(anti, dtype=float)
    inverted = anti > best
    if len(best) >= POLARITY_MIN_IMAGES and inverted.mean() > POLARITY_FRACTION:
        raise ValueError(
            f"The particles look contrast-inverted (dark protein on a bright background): "
            f"{int(inverted.sum())} of {len(best)} images match the reference better with the "
            f"opposite sign (median correlation {np.median(best):.3f}, anti-correlation "
            f"{np.median(anti):.3f}). Set 'Invert contrast' to Yes (or invert the stack) and "
            f"run again; this plugin expects white particles on black, as RELION does.")


#: The global search hands on more than ``n_candidates`` distinct rotations of an image whose
#: ranking is flat: every one scoring within this fraction of the spread between its best score
#: and the worst of its :data:`CANDIDATE_POOL` x ``n_candidates`` best distinct rotations, up to
#: :data:`CANDIDATE_MOST` x ``n_candidates``. A structure whose search-size projections tell
#: few orientations apart (an assembly of 12 copies of 4AKE, 11.5 Å per search pixel, nearly
#: D4-symmetric at that resolution) ranks the rotation nearest the truth up to 20th; of 48
#: particles 88 % had it among the best 8, 98 % among those within half the spread (14 per
#: image on average); 4AKE itself (4 Å per search pixel) had it among the best 8 for all and
#: keeps 8.7 per image (128 px, SNR 0.1, CTF 0.5 µm).
CANDIDATE_SPREAD_FRACTION, CANDIDATE_POOL, CANDIDATE_MOST = 0.5, 8, 4


def distinct_candidates(scores: np.ndarray, rot_index: np.ndarray, rots: np.ndarray,
                         n_keep: int, min_angle: float, adaptive: bool = False) -> np.ndarray:
    """Indices into ``scores`` (P,) of the ``n_keep`` best references of one image whose
    rotations (``rots[rot_index]``) differ by more than ``min_angle`` degrees (greedy
    non-maximum suppression); fewer distinct ones than asked repeat the best. With ``adaptive``,
    at least ``n_keep`` and more where the ranking is flat (:data:`CANDIDATE_SPREAD_FRACTION`)."""
    want = n_keep * CANDIDATE_POOL if adaptive else n_keep
    order = np.argsort(-scores)[: max(50, 30 * want)]
    # The best reference of each rotation (the others are within 0 degrees of it).
    _, first = np.unique(rot_index[order], return_index=True)
    order = order[np.sort(first)]
    mats = rots[rot_index[order]].reshape(len(order), 9)
    cos_min = 1.0 + 2.0 * math.cos(math.radians(min_angle))   # trace(A^T B) at min_angle apart
    free = np.ones(len(order), dtype=bool)
    chosen = []
    for i in range(len(order)):
        if not free[i]:
            continue
        chosen.append(order[i])
        if len(chosen) == want:
            break
        free[i:] &= mats[i:] @ mats[i] < cos_min               # trace(A^T B) = sum of products
    chosen = np.array(chosen)
    if adaptive and len(chosen) > n_keep:
        s = scores[chosen]
        close = int(np.sum(s[0] - s < CANDIDATE_SPREAD_FRACTION * (s[0] - s[-1])))
        chosen = chosen[:min(max(n_keep, close), n_keep * CANDIDATE_MOST)]
    if len(chosen) < n_keep:             # fewer distinct ones than asked: repeat the best
        chosen = np.concatenate([chosen, np.repeat(chosen[:1], n_keep - len(chosen))])
    return chosen


def amplitude_grid_search(model: DeformableModel, img: torch.Tensor, filt: torch.Tensor, rot: torch.Tensor,
                           grid: torch.Tensor, max_shift: float, chunk: int = 8):
    """For B candidate poses (rot (B,3,3)) of images img (B, n, n), the best of the G
    amplitude vectors ``grid`` (G, K) and its integer shift: returns (q (B,K), shifts (B,2), ncc (B,))."""
    b_all, n, g = img.shape[0], img.shape[-1], grid.shape[0]
    window, flat = _shift_window(max_shift, n, img.device)
    wgt = _half_plane_weights(n, img.device, img.dtype)
    out_q, out_s, out_c = [], [], []
    for b0 in range(0, b_all, chunk):
        im = img[b0:b0 + chunk]
        b = im.shape[0]
        im = im - im.mean(dim=(-2, -1), keepdim=True)
        f_img = torch.fft.rfft2(im) * filt[b0:b0 + chunk]
        rr = rot[b0:b0 + chunk].repeat_interleave(g, 0)
        qq = grid.repeat(b, 1)
        ref = model.project(rr, qq, torch.zeros(b * g, 2, device=img.device, dtype=img.dtype))
        f_ref = torch.fft.rfft2(ref).reshape(b, g, n, n // 2 + 1)
        f_ref[..., 0, 0] = 0
        power = (f_ref.real ** 2 + f_ref.imag ** 2) * (filt[b0:b0 + chunk, None] ** 2) * wgt
        ref_norm = torch.sqrt(power.sum(dim=(-2, -1)) / (n * n) + 1e-30)           # (b, g)
        cc = torch.fft.irfft2(f_img[:, None] * f_ref.conj(), s=(n, n)).reshape(b, g, -1)[..., flat]
        val, arg = cc.max(-1)
        ncc = val / (torch.sqrt((im * im).sum(dim=(-2, -1)))[:, None] * ref_norm)
        best = ncc.argmax(1)
        ar = torch.arange(b, device=img.device)
        out_q.append(grid[best])
        out_s.append(window[arg[ar, best]].to(img.dtype))
        out_c.append(ncc[ar, best])
    return torch.cat(out_q), torch.cat(out_s), torch.cat(out_c)
