"""Inference: amplitudes (and poses) of new particle images with a trained model."""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import numpy as np
import torch

from ...imaging import dataset
from ...imaging.dataset import ArrayImageSource, CtfLike, as_image_source, check_images, rotate_images
from ...imaging.projection import fourier_crop
from ...progress import Progress, report
from .model_folder import LoadedModel, load_model
from .outputs import autocast, decode, decode_amplitudes

__all__ = ["predict", "images_for_model", "predict_particles"]


@torch.no_grad()
def predict(model: Union[LoadedModel, str, os.PathLike], images, batch_size: int = 64,
            device: Union[str, torch.device, None] = None, ctf: CtfLike = None,
            return_pose: bool = False, progress: Optional[Progress] = None,
            bfloat16: bool = False, rotations: int = 1, ids: Optional[np.ndarray] = None,
            poses: Optional[Tuple[np.ndarray, np.ndarray]] = None):
    """Amplitudes (and optionally poses) of new particle images.

    model: a :class:`LoadedModel` or a model folder. images: as in ``train``; they must have
    the model's ``image_size`` (and pixel size; see :func:`images_for_model`).
    ctf: phase flipping as in ``train`` (use it if the model was trained with it). Preprocessing
    and target statistics are the ones saved with the model.
    Returns amplitudes (M, K) in Å (columns = the model's modes), or with
    ``return_pose`` a tuple ``(amplitudes, angles_deg (M, 3), shifts_px (M, 2))``.
    progress: :data:`~continuousflex_dl.core.progress.Progress`, (images done, total, message)
    after each batch.
    bfloat16: run the network in bfloat16 autocast on CPU too (about twice as
    fast on CPUs with AVX512-BF16/AMX; amplitudes then differ by ~1e-2 of their
    spread). On CUDA, mixed precision follows ``amp``.
    rotations: average the amplitudes over this many in-plane rotations of
    each image (0, 360/R, ... degrees; test-time augmentation, R times the
    work), for models trained with ``augment_rotation``. Poses come from the
    unrotated image.
    ids: (M,) particle ids named when images are refused (NaN or infinite
    pixels, constant images: ValueError; None names 0-based indices).
    poses: ``(angles_deg (M, 3), shifts_px (M, 2))`` of the images (shifts in pixels of
    ``images``), required by a model trained with pose normalisation
    (``preprocessing.pose_normalise``: ValueError saying so without them), ignored otherwise.
    """
    if rotations < 1:
        raise ValueError(f"rotations must be at least 1, got {rotations}.")
    if not isinstance(model, LoadedModel):
        model = load_model(model, device or "cpu")
    elif device is not None and torch.device(device) != model.device:
        model = LoadedModel(model.model.to(device), model.config, torch.device(device))
    config = model.config
    pre = config.preprocessing
    if return_pose and not config.model.predict_pose:
        raise ValueError("This model was trained without pose prediction.")
    if pre.phase_flip != (ctf is not None):
        raise ValueError("This model was trained on phase-flipped images: give the CTFs of the new images."
                         if pre.phase_flip else
                         "This model was trained without phase flipping: do not give CTFs.")
    if pre.pose_normalise:
        if poses is None:
            raise ValueError(dataset.POSES_NEEDED)
        if rotations > 1:
            raise ValueError("A pose-normalised model sees every image at psi = 0: predict it without in-plane "
                             "rotation averaging (rotations=1).")
        if return_pose:
            raise ValueError("A pose-normalised model takes the poses as given; it does not predict them.")
    source = as_image_source(images)
    if poses is not None:
        poses = tuple(np.asarray(p, dtype=np.float64) for p in poses)
        if poses[0].shape != (len(source), 3) or poses[1].shape != (len(source), 2):
            raise ValueError(f"Need one pose per image: angles ({len(source)}, 3) and shifts ({len(source)}, 2), "
                             f"got {poses[0].shape} and {poses[1].shape}.")
    if source.image_size != config.fitted.image_size:
        raise ValueError(f"Images are {source.image_size} px but the model was trained on "
                         f"{config.fitted.image_size} px images.")
    check_images(source, ids, "predicting")
    net = model.model.eval()
    channels_last = model.device.type == "cpu"  # oneDNN convolutions are ~1.3x faster in NHWC
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    m = len(source)
    amps = np.empty((m, config.model.n_modes))
    ang = np.empty((m, 3)) if return_pose else None
    sh = np.empty((m, 2)) if return_pose else None
    done = 0
    for idx, x in dataset.iterate_batches(source, np.arange(m), batch_size, pre, ctf, None, model.device,
                                          poses if pre.pose_normalise else None):
        if rotations > 1:  # copies r = 0..R-1 of the batch, rotated by r * 360 / R degrees, stacked
            angles = torch.arange(rotations, dtype=x.dtype, device=x.device) * (360.0 / rotations)
            x = rotate_images(x.repeat(rotations, 1, 1, 1), angles.repeat_interleave(len(idx)))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(model.device, config.optimiser.amp or bfloat16, bfloat16):
            out = net(x)
        dec = decode(config, out[:len(idx)])  # the unrotated copy gives the pose
        if rotations > 1:
            dec["amplitudes"] = decode_amplitudes(config, out).reshape(rotations, len(idx), -1).mean(0)
        amps[idx] = dec["amplitudes"]
        if return_pose:
            ang[idx], sh[idx] = dec["angles"], dec["shifts"]
        done += len(idx)
        report(progress, done, m, f"predicted {done}/{m} images")
    if not np.all(np.isfinite(amps)):
        raise ValueError(f"The model gave non-finite amplitudes for {int((~np.isfinite(amps)).any(1).sum())} "
                         "images: its weights are damaged; train it again.")
    return (amps, ang, sh) if return_pose else amps


def images_for_model(images, model: LoadedModel):
    """The images of particles as the model's input box: Fourier-cropped to the model's
    ``image_size`` when their box differs (the same box in Å at the model's pixel size;
    read whole into memory then), else the source itself.

    images: an image source, an array (M, N, N) or (stack path, index) pairs."""
    source = as_image_source(images)
    size = model.config.fitted.image_size
    if source.image_size == size:
        return source
    images = torch.as_tensor(source.read(np.arange(len(source))))
    return ArrayImageSource(fourier_crop(images, size, preserve="mean", correct_pixel_blur=False).numpy())


def predict_particles(model: LoadedModel, images, pixel_size: float, ctf=None, return_pose: bool = False,
                      ids: Optional[np.ndarray] = None, progress: Optional[Progress] = None,
                      poses: Optional[Tuple[np.ndarray, np.ndarray]] = None, **options):
    """:func:`predict` on particles of any pixel size covering the model's box in Å.

    images: the particles' images (see :func:`images_for_model`) at ``pixel_size`` Å/px;
    ctf: their CTFs (a ``CTFParams``), used only when the model phase-flips. poses:
    ``(angles_deg (M, 3), shifts_px (M, 2))``, shifts in pixels of the particles, used only when
    the model is pose-normalised (then required). options: of :func:`predict` (batch_size,
    bfloat16, rotations, device).
    Returns ``(amplitudes (M, K) Å, angles (M, 3) deg or None, shifts (M, 2) or None)``, the
    shifts in pixels of the particles (not the model's).
    """
    phase_flip = model.config.preprocessing.phase_flip
    if phase_flip and ctf is None:
        raise ValueError("The model was trained on phase-flipped images: the particles need a CTF.")
    if model.config.preprocessing.pose_normalise:
        if poses is None:
            raise ValueError(dataset.POSES_NEEDED)
        # the shifts in pixels of the model's box (the same box in Å)
        poses = (poses[0], np.asarray(poses[1], dtype=np.float64) * pixel_size / model.config.preprocessing.pixel_size)
    else:
        poses = None
    out = predict(model, images_for_model(images, model), ctf=ctf if phase_flip else None,
                  return_pose=return_pose, ids=ids, progress=progress, poses=poses, **options)
    if not return_pose:
        return out, None, None
    amplitudes, angles, shifts = out
    return amplitudes, angles, shifts * model.config.preprocessing.pixel_size / pixel_size
