"""The image sizes of an alignment: input images reduced to the search and working sizes, the
filters that make the projections at those sizes match them, and the pixel frames of shifts.

Shifts in pixels of a size ``n`` are those of the input images (``box`` px) times ``n / box``
(:meth:`ImageScale.shifts_here`, :meth:`ImageScale.shifts_input`); the sign is the pose's
(RELION's origin: the particle centre sits at box centre minus the shift).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ...imaging.projection import fourier_crop
from .model import DeformableModel

__all__ = ["ImageScale", "crop_images", "projection_filters", "nyquist_mask", "noise_dof", "as_images",
           "ANTI_ALIAS_PX"]


def as_images(images, device) -> torch.Tensor:
    """Images (M, box, box) (numpy or torch; one (box, box) image is M = 1) as a float32 tensor
    on ``device``; ValueError unless they are square."""
    t = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    t = t.to(device=device, dtype=torch.float32)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[-1] != t.shape[-2]:
        raise ValueError(f"Images must be square, shape (M, box, box); got {tuple(t.shape)}.")
    return t


def crop_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images (B, n, n) Fourier-cropped to (B, size, size) (:func:`projection.fourier_crop`,
    pixel sums kept) *without* the pixel-blur correction: white noise stays white (with the
    correction its high frequencies would be damped, and a least-squares fit weighing all
    pixels alike would misjudge its noise); the model side carries the blur instead
    (:func:`projection_filters` with ``source_box``). Even at ``size == n`` the Nyquist row and
    column of an even size are dropped (:func:`noise_dof` counts them out)."""
    return fourier_crop(images, size, preserve="sum", correct_pixel_blur=False)




class ImageScale:
    """One image size of the alignment: its model, its pixel size and the conversions of
    shifts between its pixels and those of the input images. With ``anti_alias`` (the final
    refinement's size) a size below the box draws its atoms :data:`ANTI_ALIAS_PX` wider and
    its filters undo it; the search size leaves that to its low-pass (``search_lowpass``).
    deformation, blocks: how the model's atoms move (:class:`~.model.DeformableModel`)."""

    def __init__(self, size: int, box: int, pixel_size: float, model_args, device, anti_alias: bool = False,
                 deformation: str = "linear", blocks=None):
        self.size, self.box = int(size), int(box)
        self.pixel_size = pixel_size * box / size            # Å/px at this size
        # Å: the atoms' widening against aliasing (ANTI_ALIAS_PX), undone by the filters.
        self.blur = ANTI_ALIAS_PX * self.pixel_size if anti_alias and self.size < self.box else 0.0
        coords, modes, sigma, weights = model_args
        self.model = DeformableModel(coords, modes, np.sqrt(np.asarray(sigma) ** 2 + self.blur ** 2), weights,
                                     self.size, self.pixel_size, device, deformation=deformation, blocks=blocks)
        self.device = device

    def shifts_here(self, shifts_px: torch.Tensor) -> torch.Tensor:
        """Input-image pixels -> pixels of this size."""
        return shifts_px * (self.size / self.box)

    def shifts_input(self, shifts: torch.Tensor) -> torch.Tensor:
        """Pixels of this size -> input-image pixels."""
        return shifts * (self.box / self.size)

    def max_shift(self, max_shift_px: float, margin: float = 1.0) -> float:
        """The largest shift in pixels of this size (``margin``: slack of the refinements)."""
        return max_shift_px * self.size / self.box * margin

    def images(self, batch: torch.Tensor) -> torch.Tensor:
        """Input images (B, box, box) at this size: :func:`crop_images`."""
        return crop_images(batch, self.size)

    def filters(self, ctf, m: int) -> torch.Tensor:
        """(M, size, size//2+1) filters of the projections at this size (:func:`projection_filters`)."""
        return projection_filters(ctf, m, self.size, self.pixel_size, self.device, torch.float32,
                                  source_box=self.box, blur=self.blur)


#: Projections at a size coarser than the images (reduced by :func:`crop_images`) draw every atom
#: wider by this many pixels of that size (in quadrature) and undo the extra Gaussian blur in
#: their filter (:func:`projection_filters` ``blur``): the same projection on the frequencies the crop
#: keeps, but with far less of the content above the coarse Nyquist frequency aliased into
#: them. The crop has no such aliases; without the blur the model's 1 Å atoms at 2 Å/px put
#: them into its Jacobian and the Laplace uncertainty counted 3.5 % too much information.
ANTI_ALIAS_PX = 0.75


def projection_filters(ctf, m: int, n: int, pixel_size: float, device, dtype,
                       source_box: Optional[int] = None, blur: float = 0.0) -> torch.Tensor:
    """(M, n, n//2+1): what projections at n px (``pixel_size`` Å/px) are multiplied by to match
    the images: the CTF (or 1) times the Nyquist mask and, for images of ``source_box`` px
    reduced to n px by :func:`crop_images`, the ratio ``sinc(f n / source_box) / sinc(f)`` per axis
    (``f`` cycles/px) that turns a projection integrated over the n-px pixel into one
    integrated over the input pixel (the inverse of :func:`fourier_crop`'s correction); blur:
    Å, the width the atoms of the projections were widened by (:data:`ANTI_ALIAS_PX`), undone
    by ``exp(2 pi^2 blur^2 |f|^2)`` (``f`` cycles/Å)."""
    mask = nyquist_mask(n, device, dtype)
    fy = torch.fft.fftfreq(n, device=device, dtype=dtype)[:, None]
    fx = torch.fft.rfftfreq(n, device=device, dtype=dtype)[None, :]
    if source_box is not None and source_box != n:
        r = n / source_box
        mask = mask * (torch.sinc(fy * r) * torch.sinc(fx * r) / (torch.sinc(fy) * torch.sinc(fx)))
    if blur > 0:
        mask = mask * torch.exp(2 * math.pi ** 2 * (blur / pixel_size) ** 2 * (fy * fy + fx * fx))
    if ctf is None:
        return mask.expand(m, -1, -1)
    from ...imaging.ctf import ctf_image
    if ctf.batch_size not in (1, m):
        raise ValueError(f"The CTF describes {ctf.batch_size} images but {m} images were given.")
    c = ctf_image(ctf, n, pixel_size, device=device, dtype=dtype) * mask
    return c.expand(m, -1, -1)


def nyquist_mask(n: int, device, dtype) -> torch.Tensor:
    """(n, n//2+1) ones, with zeros on the Nyquist row and column of an even n."""
    mask = torch.ones(n, n // 2 + 1, device=device, dtype=dtype)
    if n % 2 == 0:
        mask[n // 2, :] = 0
        mask[:, n // 2] = 0
    return mask


def noise_dof(n: int) -> int:
    """Independent real values of an n x n image whose Nyquist row and column are removed
    (:func:`fourier_crop` does so for even n): the residual's degrees of freedom before fitting."""
    return n * n - (2 * n - 1 if n % 2 == 0 else 0)

