"""Particle images for DeepHEMNMA: lazy reading, ONE preprocessing pipeline, augmentation.

Images are addressed by a global 0-based index ``i`` in ``[0, M)`` of an
*image source*: either an in-memory array (M, N, N) or a list of
``(stack path, 0-based index in the stack)`` pairs read lazily from memory-mapped
MRC or SPIDER stacks (:mod:`continuousflex_dl.core.imaging.stacks`).

Preprocessing (:class:`Preprocessing`, applied by :func:`prepare_images`) is defined once here and used, with the
parameters saved beside a trained model, identically for training, validation
and prediction:

1. optional CTF phase flip at the original size (``ctf.phase_flip``: the
   Fourier transform times the sign of the CTF, CTFs in ``rfft2`` layout), then optional
   pose normalisation (:func:`pose_normalise_images`): each image centred by its shifts and
   turned by its in-plane angle psi, so the network sees every particle as the projection at
   (rot, tilt, psi = 0) with no shift (the poses come with the images),
2. optional real-space window: the central ``window`` x ``window`` pixels
   around the box centre (:func:`window_images`), a box in Å fixed by the model,
3. optional downsampling to the working size by Fourier cropping
   (:func:`projection.fourier_crop`, pixel values kept, spectrum untouched),
4. image normalisation (:func:`normalize_images`), by default ``"zscore"``:
   each image to zero mean and unit standard deviation over the whole box.

Training may add an in-plane rotation (:func:`rotate_images`) *after*
preprocessing; the matching pose labels come from :func:`rotate_pose`
(amplitudes are unchanged by an in-plane rotation).

Images no method can use are refused by :func:`check_images` (NaN or
infinite pixels, constant images), the one check of alignment, training and
prediction.

Geometry follows :mod:`continuousflex_dl.core.imaging.geometry`: images are indexed
``[y, x]``, pixel ``(iy, ix)`` has coordinates ``(ix - n // 2, iy - n // 2)``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .ctf import CTFParams, ctf_image, phase_flip
from . import projection
from .geometry import euler_to_matrix, matrix_to_euler
from .stacks import open_stack

__all__ = [
    "NORMALIZATIONS", "Preprocessing", "normalize_images", "window_images", "prepare_images",
    "rotate_images", "rotate_pose", "pose_normalise_images", "POSES_NEEDED", "ArrayImageSource", "FourierCroppedSource",
    "MrcsImageSource", "as_image_source",
    "ctf_batch", "iterate_batches", "find_bad_images", "check_images", "FLAT_TOLERANCE",
]

#: Fraction of the box size used as the radius of the circular particle mask of
#: the ``"background"`` normalisation (pixels farther than this from the
#: centre are background).
BACKGROUND_RADIUS_FRACTION = 0.45


def _zscore(images: torch.Tensor) -> torch.Tensor:
    flat = images.reshape(images.shape[0], -1)
    mean = flat.mean(dim=1)
    std = flat.std(dim=1, unbiased=False).clamp_min(1e-8)
    return (images - mean[:, None, None]) / std[:, None, None]


def _background(images: torch.Tensor) -> torch.Tensor:
    n_y, n_x = images.shape[-2:]
    y = torch.arange(n_y, device=images.device, dtype=images.dtype) - n_y // 2
    x = torch.arange(n_x, device=images.device, dtype=images.dtype) - n_x // 2
    outside = (y[:, None] ** 2 + x[None, :] ** 2) > (BACKGROUND_RADIUS_FRACTION * min(n_y, n_x)) ** 2
    bg = images[:, outside]
    mean = bg.mean(dim=1)
    std = bg.std(dim=1, unbiased=False).clamp_min(1e-8)
    return (images - mean[:, None, None]) / std[:, None, None]


#: Image normalisations by name (the name is saved in a model's config.json).
#: ``"zscore"``: per image, zero mean and unit standard deviation over the whole box.
#: ``"background"``: per image, zero mean and unit standard deviation of the
#: background, the pixels outside a centred circle of radius
#: ``BACKGROUND_RADIUS_FRACTION * box`` (Xmipp-style particle normalisation).
NORMALIZATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "zscore": _zscore,
    "background": _background,
}


def normalize_images(images: torch.Tensor, method: str = "zscore") -> torch.Tensor:
    """Normalise each image of a batch (the one normalisation of the package).

    images: (B, H, W) real tensor (any unit). method: a key of :data:`NORMALIZATIONS`.
    Returns (B, H, W), dimensionless, same dtype/device.
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"Unknown image normalisation {method!r}; choose one of {sorted(NORMALIZATIONS)}.")
    if images.ndim != 3:
        raise ValueError(f"Expected a batch of images (B, H, W), got shape {tuple(images.shape)}.")
    return NORMALIZATIONS[method](images)


def window_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central (B, size, size) pixels of square images (B, N, N): box centre ``N // 2``
    -> ``size // 2``, pixel size unchanged. ``size == N`` returns the input."""
    n = images.shape[-1]
    if int(size) != size or not 1 <= size <= n:
        raise ValueError(f"A window of {size} px does not fit images of {n} px: give a window "
                         f"between the working size and the image box ({n} px).")
    size = int(size)
    if size == n:
        return images
    start = n // 2 - size // 2
    return images[..., start:start + size, start:start + size]


def prepare_images(images: Union[np.ndarray, torch.Tensor], working_size: Optional[int] = None,
                   normalization: str = "zscore", ctf: Optional[torch.Tensor] = None,
                   device: Union[str, torch.device] = "cpu", window: Optional[int] = None,
                   poses: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> torch.Tensor:
    """The one preprocessing of particle images (training, validation and prediction).

    images: (B, N, N) raw images. ctf: optional (B, N, N // 2 + 1) CTFs in
    ``torch.fft.rfft2`` layout (``ctf.ctf_image``) for phase flipping at the full box.
    poses: optional ``(angles_deg (B, 3), shifts_px (B, 2))`` of the raw images: each image is
    then centred and turned to psi = 0 (:func:`pose_normalise_images`) after the phase flip.
    window: side (px) of the central real-space window kept (None keeps N, see
    :func:`window_images`). working_size: output box in px (None keeps the window),
    reached by :func:`projection.fourier_crop` of the window (pixel values kept).
    Returns a float32 tensor (B, 1, working_size, working_size) on ``device``.
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    x = x.to(device=device, dtype=torch.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"Expected images of shape (B, N, N), got {tuple(x.shape)}.")
    if ctf is not None:
        x = phase_flip(x, torch.as_tensor(ctf, device=x.device, dtype=torch.float32))
    if poses is not None:
        x = pose_normalise_images(x, poses[0], poses[1])
    if window is not None:
        x = window_images(x, int(window))
    if working_size is not None and int(working_size) != x.shape[-1]:
        x = projection.fourier_crop(x, int(working_size), preserve="mean", correct_pixel_blur=False)
    return normalize_images(x, normalization)[:, None]


@dataclass(frozen=True)
class Preprocessing:
    """The preprocessing of a model's images, one object passed whole and saved with the model.

    pixel_size: Å/px of the raw images. window: side (Å) of the central real-space window the
    network sees (None: the whole box). working_size: box (px) after Fourier cropping the
    window (None: the window's box). normalization: a key of :data:`NORMALIZATIONS`.
    phase_flip: the images are CTF phase-flipped at their raw box (so they need CTFs).
    pose_normalise: every image is centred by its shifts and turned by its in-plane angle
    before the network (:func:`pose_normalise_images`), so it needs the poses of its images,
    in training and in prediction.
    """
    pixel_size: float = 1.0
    working_size: Optional[int] = None
    window: Optional[float] = None
    normalization: str = "zscore"
    phase_flip: bool = False
    pose_normalise: bool = False

    @property
    def window_px(self) -> Optional[int]:
        """Side (px) of the real-space window, or None (the whole box)."""
        return None if self.window is None else int(round(self.window / self.pixel_size))

    def input_size(self, image_size: int) -> int:
        """Box (px) the network sees for raw images of ``image_size`` px."""
        return int(self.working_size or self.window_px or image_size)

    def check(self, image_size: int) -> None:
        """The one check of the window and working size against raw images of ``image_size`` px
        (training and its protocol's form); ValueError saying what to change."""
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"Unknown image normalisation {self.normalization!r}; "
                             f"choose one of {sorted(NORMALIZATIONS)}.")
        window = self.window_px or image_size
        if window > image_size:
            raise ValueError(f"The window ({self.window:g} Å, {window} px) is larger than the images "
                             f"({image_size} px at {self.pixel_size:g} Å/px): make it at most "
                             f"{image_size * self.pixel_size:g} Å.")
        if self.working_size is not None and self.working_size > window:
            raise ValueError(f"The working size ({self.working_size} px) exceeds the "
                             f"{'window' if self.window else 'images'} ({window} px): make it at most {window}.")

    def apply(self, images: Union[np.ndarray, torch.Tensor], ctf: Optional[torch.Tensor] = None,
              device: Union[str, torch.device] = "cpu",
              poses: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> torch.Tensor:
        """Raw images (B, N, N) -> network input (B, 1, w, w) float32 on ``device`` (:func:`prepare_images`);
        ctf: (B, N, N // 2 + 1) rfft2-layout CTFs when ``phase_flip``; poses: ``(angles_deg (B, 3),
        shifts_px (B, 2))`` of the raw images, required when ``pose_normalise`` (ignored otherwise)."""
        if self.pose_normalise and poses is None:
            raise ValueError(POSES_NEEDED)
        return prepare_images(images, self.working_size, self.normalization, ctf, device, self.window_px,
                              poses if self.pose_normalise else None)


#: The error of a pose-normalised model given images without poses.
POSES_NEEDED = ("This model turns and centres every image by its pose (pose normalisation): the particles need "
                "poses (a projection alignment, e.g. from a consensus refinement or the HEMNMA alignment). "
                "Align them first, or use a model trained without pose normalisation.")


def pose_normalise_images(images: torch.Tensor, angles_deg, shifts_px) -> torch.Tensor:
    """Images turned and centred by their poses: the projection at (rot, tilt, psi = 0) with no shift.

    images: (B, N, N) real; angles_deg: (B, 3) Euler ZYZ (rot, tilt, psi); shifts_px: (B, 2)
    (shiftX, shiftY), RELION's origin (the particle centre at box centre minus the shift, see
    :mod:`.geometry`). Each image loses its mean (so the zeros :func:`rotate_images` brings in
    the corners are neutral), is translated by ``+shift`` (a Fourier phase, sub-pixel, periodic)
    and rotated in plane by psi (:func:`rotate_images`, whose pose rule :func:`rotate_pose` gives
    psi' = 0 and shifts' = 0). Returns (B, N, N), same dtype and device.
    """
    if images.ndim != 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"Expected square images (B, N, N), got shape {tuple(images.shape)}.")
    b, n = images.shape[0], images.shape[-1]
    angles = torch.as_tensor(np.asarray(angles_deg, dtype=np.float64), device=images.device)
    shifts = torch.as_tensor(np.asarray(shifts_px, dtype=np.float64), device=images.device)
    if angles.shape != (b, 3) or shifts.shape != (b, 2):
        raise ValueError(f"Need one pose per image: angles (B, 3) and shifts (B, 2) for {b} images, got "
                         f"{tuple(angles.shape)} and {tuple(shifts.shape)}.")
    if not (torch.isfinite(angles).all() and torch.isfinite(shifts).all()):
        raise ValueError("The poses contain NaN or infinite values: align the particles again.")
    x = images - images.mean(dim=(-2, -1), keepdim=True)
    ky = torch.fft.fftfreq(n, device=images.device, dtype=torch.float64)[:, None]
    kx = torch.fft.rfftfreq(n, device=images.device, dtype=torch.float64)[None, :]
    phase = torch.exp(-2j * math.pi * (kx * shifts[:, 0, None, None] + ky * shifts[:, 1, None, None]))
    x = torch.fft.irfft2(torch.fft.rfft2(x) * phase.to(torch.complex64), s=(n, n)).to(images.dtype)
    return rotate_images(x[:, None], angles[:, 2].to(images.dtype))[:, 0]


def rotate_images(images: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
    """Rotate images in plane about their centre ``(n // 2, n // 2)``: the one in-plane
    rotation of the package (training's augmentation, the alignment's reference projections).

    images: (B, C, H, W); angles_deg: (B,) degrees. The content at image
    coordinates ``p = (x, y)`` moves to ``R(a) p`` with
    ``R(a) = [[cos a, -sin a], [sin a, cos a]]`` (bilinear interpolation,
    zero outside the box, so normalise before rotating). The pose of the
    rotated image is given by :func:`rotate_pose` with the same angles.
    """
    b, _, h, w = images.shape
    a = torch.as_tensor(angles_deg, dtype=images.dtype, device=images.device) * (math.pi / 180.0)
    cos, sin = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
    y = torch.arange(h, dtype=images.dtype, device=images.device) - h // 2
    x = torch.arange(w, dtype=images.dtype, device=images.device) - w // 2
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    # Output pixel p takes the value at R(-a) p of the input.
    src_x = cos * xx + sin * yy + w // 2
    src_y = -sin * xx + cos * yy + h // 2
    grid = torch.stack([2 * src_x / (w - 1) - 1, 2 * src_y / (h - 1) - 1], dim=-1)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                                           align_corners=True)


def rotate_pose(angles_deg: np.ndarray, shifts_px: np.ndarray,
                inplane_deg: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Pose of a particle image after :func:`rotate_images` by ``inplane_deg``.

    angles_deg: (B, 3) Euler ZYZ (rot, tilt, psi); shifts_px: (B, 2) (shiftX,
    shiftY); inplane_deg: (B,). Since a model point lands at
    ``(A r)[:2] - s`` (px), rotating the image by ``R(a)`` gives the pose
    ``A' = Rz_active(a) A`` and ``s' = R(a) s`` (so psi' = psi - a).
    Returns ``(angles_deg (B, 3), shifts_px (B, 2))``.
    """
    angles_deg = np.asarray(angles_deg, dtype=float)
    shifts_px = np.asarray(shifts_px, dtype=float)
    a = np.asarray(inplane_deg, dtype=float)
    zeros = np.zeros_like(a)
    # geometry's Rz is passive: the active rotation by a is Rz(-a).
    r3 = euler_to_matrix(np.stack([zeros, zeros, -a], -1))
    new_angles = matrix_to_euler(r3 @ euler_to_matrix(angles_deg))
    r2 = r3[..., :2, :2]
    new_shifts = np.einsum("...ij,...j->...i", r2, shifts_px)
    return new_angles, new_shifts


class ArrayImageSource:
    """Images held in memory: (M, N, N) array."""

    def __init__(self, images: np.ndarray):
        images = np.asarray(images)
        if images.ndim != 3 or images.shape[1] != images.shape[2]:
            raise ValueError(f"Expected a stack of square images (M, N, N), got shape {images.shape}.")
        self.images = images
        self.image_size = int(images.shape[-1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """Images ``indices`` as a float32 array (B, N, N)."""
        return np.asarray(self.images[np.asarray(indices, dtype=int)], dtype=np.float32)


class FourierCroppedSource:
    """The images of another source Fourier-cropped to ``size`` px as they are read (batch by
    batch, never the whole set in memory): box centre ``N // 2`` -> ``size // 2``, pixel size
    ``pixel_size * N / size`` (:func:`projection.fourier_crop`, pixel values kept, as
    :func:`prepare_images` crops)."""

    def __init__(self, source, size: int):
        if not 1 <= int(size) <= source.image_size:
            raise ValueError(f"Cannot downsample images of {source.image_size} px to {size} px: give a size "
                             f"between 1 and {source.image_size} px.")
        self.source = source
        self.image_size = int(size)

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """Images ``indices`` as a float32 array (B, size, size)."""
        return projection.fourier_crop(torch.as_tensor(self.source.read(indices)), self.image_size,
                                       preserve="mean", correct_pixel_blur=False).numpy()


class MrcsImageSource:
    """Images read lazily from MRC or SPIDER stacks, addressed by ``(path, 0-based index)`` pairs.

    Files are memory-mapped on first use (:func:`stacks.open_stack`) and kept open; the open
    handles are not pickled (data-loader workers reopen them). ``invert``: read every image with the opposite sign (particles exported
    dark on a bright background; this plugin expects white on black, as RELION).
    """

    def __init__(self, entries: Sequence[Tuple[Union[str, os.PathLike], int]], invert: bool = False):
        self.invert = bool(invert)
        if len(entries) == 0:
            raise ValueError("No particle images given.")
        try:
            self.entries: List[Tuple[str, int]] = [(os.fspath(p), int(i)) for p, i in entries]
        except (TypeError, ValueError):
            raise ValueError("Image entries must be (stack path, 0-based index) pairs.") from None
        self._handles: Dict[str, object] = {}
        first = self._data(self.entries[0][0])
        self.image_size = int(first.shape[-1])
        if first.shape[-2] != first.shape[-1]:
            raise ValueError(f"{self.entries[0][0]}: images must be square, got {first.shape[-2:]}.")

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _data(self, path: str) -> np.ndarray:
        if path not in self._handles:
            self._handles[path] = open_stack(path)
        return self._handles[path][0]

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """Images ``indices`` as a float32 array (B, N, N)."""
        out = np.empty((len(indices), self.image_size, self.image_size), dtype=np.float32)
        for k, i in enumerate(indices):
            path, j = self.entries[int(i)]
            data = self._data(path)
            if not 0 <= j < data.shape[0]:
                raise ValueError(f"{path}: image index {j} out of range (stack of {data.shape[0]}).")
            if data.shape[-1] != self.image_size or data.shape[-2] != self.image_size:
                raise ValueError(f"{path}: image size {data.shape[-2:]} differs from {self.image_size}.")
            out[k] = data[j]
        return -out if self.invert else out

    def close(self) -> None:
        for _, handle in self._handles.values():
            if handle is not None:
                handle.close()
        self._handles = {}


ImageSourceLike = Union[np.ndarray, Sequence[Tuple[Union[str, os.PathLike], int]],
                        ArrayImageSource, MrcsImageSource]


def as_image_source(images: ImageSourceLike):
    """An image source from an array (M, N, N), a list of (stack path, index) pairs, or a source."""
    if hasattr(images, "read") and hasattr(images, "image_size"):
        return images
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return ArrayImageSource(np.asarray(images))
    if isinstance(images, (list, tuple)):
        return MrcsImageSource(images)
    raise ValueError("Images must be an array (M, N, N), a list of (stack path, index) pairs "
                     f"or an image source, got {type(images).__name__}.")


CtfLike = Union[None, CTFParams, np.ndarray, torch.Tensor, Callable[[np.ndarray], np.ndarray]]


def ctf_batch(ctf: CtfLike, indices: np.ndarray, box: int, pixel_size: float) -> Optional[torch.Tensor]:
    """CTFs (B, box, box // 2 + 1) in rfft2 layout of images ``indices``, or None.

    ctf: None; a ``CTFParams`` with one entry per image of the source (or a
    single entry for all), evaluated with ``ctf_image`` at ``pixel_size``
    (Å/px of the raw images); an array (M, box, box // 2 + 1) of precomputed
    CTFs; or a callable ``ctf(indices (B,)) -> (B, box, box // 2 + 1)``.
    """
    if ctf is None:
        return None
    if isinstance(ctf, CTFParams):
        if not pixel_size or pixel_size <= 0:
            raise ValueError("Phase flipping from CTF parameters needs the pixel size (Å/px) of the images.")
        params = ctf if ctf.batch_size == 1 else ctf.select(np.asarray(indices))
        out = ctf_image(params, box, pixel_size)
        return out.expand(len(indices), -1, -1) if out.shape[0] == 1 else out
    if callable(ctf):
        return torch.as_tensor(np.asarray(ctf(np.asarray(indices)), dtype=np.float32))
    return torch.as_tensor(np.asarray(ctf[np.asarray(indices)], dtype=np.float32))


def iterate_batches(source, indices: np.ndarray, batch_size: int, preprocessing: "Preprocessing",
                    ctf: CtfLike = None, rng: Optional[np.random.Generator] = None,
                    device: Union[str, torch.device] = "cpu",
                    poses: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> Iterator[Tuple[np.ndarray, torch.Tensor]]:
    """Yield ``(batch indices (B,), prepared images (B, 1, w, w))`` over ``indices``.

    preprocessing: the model's :class:`Preprocessing` (its pixel size evaluates CTF
    parameters). ctf: phase flipping (see :func:`ctf_batch`), or None.
    rng: shuffles the order if given (otherwise the order of ``indices``).
    poses: ``(angles_deg (M, 3), shifts_px (M, 2))`` of the whole source, for pose normalisation.
    """
    if batch_size < 1:
        raise ValueError(f"Batch size must be positive, got {batch_size}.")
    order = np.asarray(indices, dtype=int)
    if rng is not None:
        order = order[rng.permutation(len(order))]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        raw = source.read(idx)
        yield idx, preprocessing.apply(raw, ctf_batch(ctf, idx, source.image_size, preprocessing.pixel_size),
                                       device, None if poses is None else (poses[0][idx], poses[1][idx]))


#: An image is constant (flat) when its pixel range (max - min) is at most this
#: fraction of its largest absolute pixel value: all-zero images, blank frames,
#: a constant written over a particle. Real particle images, even with a large
#: offset, vary by far more (their noise alone).
FLAT_TOLERANCE = 1e-5


def find_bad_images(images: ImageSourceLike, batch_size: int = 1024) -> Tuple[np.ndarray, np.ndarray]:
    """Images that no method can use, found in one pass over the source.

    images: an image source, array (M, N, N) or (stack path, index) pairs.
    Returns two sorted arrays of 0-based image indices: images with a NaN or
    infinite pixel, and constant images (see :data:`FLAT_TOLERANCE`), which
    carry no signal and which per-image normalisation cannot scale.
    """
    source = as_image_source(images)
    nonfinite: List[np.ndarray] = []
    flat: List[np.ndarray] = []
    for start in range(0, len(source), batch_size):
        idx = np.arange(start, min(start + batch_size, len(source)))
        x = source.read(idx)
        finite = np.isfinite(x).all(axis=(1, 2))
        with np.errstate(invalid="ignore", over="ignore"):
            spread = x.max(axis=(1, 2)) - x.min(axis=(1, 2))
            scale = np.abs(x).max(axis=(1, 2))
            constant = finite & (spread <= FLAT_TOLERANCE * scale)
        nonfinite.append(idx[~finite])
        flat.append(idx[constant])
    return np.concatenate(nonfinite), np.concatenate(flat)


def _which(indices: np.ndarray, ids: Optional[np.ndarray], total: int, first: int = 10) -> str:
    """'Particles with ids [...] and 3 more' (or 0-based image indices when no ids)."""
    more = f" and {len(indices) - first} more" if len(indices) > first else ""
    if ids is None:
        return f"Images with 0-based indices {indices[:first].tolist()}{more} (of {total})"
    return f"Particles with ids {np.asarray(ids)[indices[:first]].tolist()}{more}"


def check_images(images: ImageSourceLike, ids: Optional[Sequence] = None, before: str = "using them",
                 batch_size: int = 1024) -> None:
    """Refuse images with NaN or infinite pixels and constant images (the one such check).

    images: as in :func:`find_bad_images`. ids: (M,) particle ids named in
    the message (Scipion ids in protocols; None: 0-based image indices).
    before: what the user is about to do ("training", "aligning", ...).
    Raises ValueError listing the first ten offenders of each kind and their
    number, and saying to remove them.
    """
    source = as_image_source(images)
    if ids is not None and len(ids) != len(source):
        raise ValueError(f"Need one particle id per image ({len(source)}), got {len(ids)}.")
    nonfinite, flat = find_bad_images(source, batch_size)
    problems = []
    if len(nonfinite):
        problems.append(f"{_which(nonfinite, ids, len(source))} contain NaN or infinite pixels "
                        f"({len(nonfinite)} of {len(source)} images)")
    if len(flat):
        problems.append(f"{_which(flat, ids, len(source))} are constant images, every pixel the same value "
                        f"(blank or zeroed; {len(flat)} of {len(source)} images)")
    if problems:
        raise ValueError("; ".join(problems) + f". They carry no usable signal: remove them (make a subset "
                         f"without them) before {before}.")
