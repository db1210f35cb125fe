"""Training and inference of the DeepHEMNMA regressor.

A *model directory* holds everything needed to predict:

* ``config.json``: the :class:`TrainConfig` (modes, sizes, pixel size,
  normalisation name, architecture, target statistics, package version),
* ``best.pt``: the weights with the lowest validation loss,
* ``last.pt``: the last epoch's weights, optimizer and scheduler states (resume),
* ``metrics.csv``: one row per epoch (epoch, train_loss, val_loss, val_mae,
  lr, images_per_s, seconds [, val_angle_deg, val_shift_px]).

Targets are standardised per output with the mean/std of the *training split*
only (saved in config.json). Shifts are divided by one isotropic scale (no
mean), so in-plane rotation augmentation commutes with standardisation; the
6-D rotation is not scaled. The split is by particle id: all images of one
particle (e.g. several noisy copies) are on the same side.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .dataset import NORMALIZATIONS, CtfLike, as_image_source, iterate_batches, rotate_images, rotate_pose
from .geometry import angular_distance_deg, euler_to_matrix, matrix_to_euler
from .network import DeepHEMNMANet, build_model, matrix_to_rotation_6d, rotation_6d_to_matrix

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "LoadedModel", "split_by_particle", "train", "load_model", "predict",
           "METRICS_COLUMNS"]

CONFIG_FILE, BEST_FILE, LAST_FILE, METRICS_FILE = "config.json", "best.pt", "last.pt", "metrics.csv"
METRICS_COLUMNS = ["epoch", "train_loss", "val_loss", "val_mae", "lr", "images_per_s", "seconds"]
POSE_METRICS_COLUMNS = ["val_angle_deg", "val_shift_px"]


@dataclass
class TrainConfig:
    """Everything that defines a DeepHEMNMA model and its training.

    modes: normal-mode numbers (1-based) in the order of the amplitude columns.
    image_size: input box (px), set by :func:`train` from the images.
    working_size: box (px) the network sees after Fourier cropping (None: image_size).
    pixel_size: Å/px of the input images.
    normalization: image normalisation name (see ``dataset.NORMALIZATIONS``).
    predict_pose: also regress the pose (6-D rotation + shifts in px).
    loss: "l1" or "mse" on standardised targets. lr_schedule: "onecycle"
    (stepped per batch: warm-up to ``learning_rate`` over the first 30 % of
    the steps, then cosine decay; runs all its epochs), "plateau" (halved
    after ``lr_patience`` epochs without improvement), "cosine" or "none".
    patience: epochs without validation improvement before stopping (not
    with "onecycle"). augment_rotation: random in-plane rotations of training
    images.
    amp: mixed precision (CUDA only).
    n_outputs, target_mean, target_std, shift_scale, version, phase_flip (images
    were CTF phase-flipped, so prediction needs CTFs too): set by :func:`train`.
    """
    modes: List[int]
    image_size: int = 0
    working_size: Optional[int] = None
    pixel_size: float = 1.0
    normalization: str = "zscore"
    architecture: str = "resnet34"
    hidden: List[int] = field(default_factory=lambda: [512, 256, 128])
    dropout: float = 0.0
    predict_pose: bool = False
    epochs: int = 50
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    loss: str = "l1"
    lr_schedule: str = "onecycle"
    lr_patience: int = 3
    patience: int = 10
    val_fraction: float = 0.1
    augment_rotation: bool = False
    pose_weight: float = 1.0
    amp: bool = True
    phase_flip: bool = False
    seed: int = 0
    n_outputs: int = 0
    target_mean: List[float] = field(default_factory=list)
    target_std: List[float] = field(default_factory=list)
    shift_scale: float = 1.0
    version: str = ""

    @property
    def n_modes(self) -> int:
        return len(self.modes)

    @property
    def input_size(self) -> int:
        """Box (px) the network sees."""
        return int(self.working_size or self.image_size)

    def save(self, path: Union[str, os.PathLike]) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "TrainConfig":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class LoadedModel:
    """A trained network in eval mode with its configuration."""
    model: DeepHEMNMANet
    config: TrainConfig
    device: torch.device


def split_by_particle(particle_ids: np.ndarray, val_fraction: float,
                      seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Split image indices into training and validation sets by particle id.

    particle_ids: (M,) one id per image; images sharing an id (copies,
    augmentations, tilts) land on the same side. Returns sorted index arrays
    ``(train (M_t,), val (M_v,))``, with about ``val_fraction`` of the
    particles (at least one) in validation.
    """
    ids = np.asarray(particle_ids)
    if ids.ndim != 1:
        raise ValueError(f"particle_ids must be one id per image (M,), got shape {ids.shape}.")
    if not 0 < val_fraction < 1:
        raise ValueError(f"Validation fraction must be between 0 and 1, got {val_fraction}.")
    unique = np.unique(ids)
    if len(unique) < 2:
        raise ValueError("At least two distinct particles are needed to split training and validation.")
    rng = np.random.default_rng(seed)
    n_val = min(len(unique) - 1, max(1, int(round(val_fraction * len(unique)))))
    val_ids = rng.choice(unique, size=n_val, replace=False)
    is_val = np.isin(ids, val_ids)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


class _Targets:
    """Standardised targets (B, n_outputs) from amplitudes (Å) and poses, and back."""

    def __init__(self, config: TrainConfig, amplitudes: np.ndarray,
                 angles: Optional[np.ndarray], shifts: Optional[np.ndarray]):
        self.config = config
        self.amplitudes, self.angles, self.shifts = amplitudes, angles, shifts
        self.mean = np.asarray(config.target_mean, dtype=np.float64)
        self.std = np.asarray(config.target_std, dtype=np.float64)

    def batch(self, idx: np.ndarray, inplane_deg: Optional[np.ndarray]) -> torch.Tensor:
        amp = (self.amplitudes[idx] - self.mean) / self.std
        if not self.config.predict_pose:
            return torch.as_tensor(amp, dtype=torch.float32)
        angles, shifts = self.angles[idx], self.shifts[idx]
        if inplane_deg is not None:
            angles, shifts = rotate_pose(angles, shifts, inplane_deg)
        d6 = matrix_to_rotation_6d(torch.as_tensor(euler_to_matrix(angles)))
        return torch.cat([torch.as_tensor(amp), d6, torch.as_tensor(shifts / self.config.shift_scale)],
                         dim=1).float()


def _decode_amplitudes(config: TrainConfig, out: torch.Tensor) -> np.ndarray:
    """Network outputs (B, n_outputs) -> amplitudes (B, K) in Å (standardisation undone)."""
    amplitudes = out.detach().float().cpu()[:, :config.n_modes].double().numpy()
    return amplitudes * np.asarray(config.target_std) + np.asarray(config.target_mean)


def _decode(config: TrainConfig, out: torch.Tensor) -> Dict[str, np.ndarray]:
    """Network outputs (B, n_outputs) -> amplitudes (B, K) Å [, angles (B, 3) deg, shifts (B, 2) px]."""
    res = {"amplitudes": _decode_amplitudes(config, out)}
    out = out.detach().float().cpu()
    k = config.n_modes
    if config.predict_pose:
        mat = rotation_6d_to_matrix(out[:, k:k + 6].double()).numpy()
        res["matrices"] = mat
        res["angles"] = matrix_to_euler(mat)
        res["shifts"] = out[:, k + 6:k + 8].double().numpy() * config.shift_scale
    return res


def _autocast(device: torch.device, enabled: bool, cpu_bfloat16: bool = False):
    """Mixed precision on CUDA when ``enabled``; bfloat16 on CPU only when asked (inference)."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if cpu_bfloat16 and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # The fused Adam kernel is several times faster than the per-tensor loop
    # (ResNet34 has 21 M parameters, so small batches are optimizer bound).
    try:
        return torch.optim.Adam(model.parameters(), lr=config.learning_rate,
                                weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=config.learning_rate,
                                weight_decay=config.weight_decay)


def _make_scheduler(config: TrainConfig, optimizer, steps_per_epoch: int):
    if config.lr_schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate,
                                                   epochs=config.epochs, steps_per_epoch=max(1, steps_per_epoch))
    if config.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=config.lr_patience)
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs))
    if config.lr_schedule == "none":
        return None
    raise ValueError(f"Unknown learning-rate schedule {config.lr_schedule!r}; use onecycle, plateau, cosine or none.")


def _loss_fn(config: TrainConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if config.loss == "l1":
        base = nn.functional.l1_loss
    elif config.loss == "mse":
        base = nn.functional.mse_loss
    else:
        raise ValueError(f"Unknown loss {config.loss!r}; use l1 or mse.")
    k = config.n_modes

    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred = pred.float()
        value = base(pred[:, :k], target[:, :k])
        if config.predict_pose:
            value = value + config.pose_weight * base(pred[:, k:], target[:, k:])
        return value
    return loss


def _write_metrics(path: Path, rows: List[dict], columns: List[str]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _read_metrics(path: Path) -> List[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items() if v not in (None, "")}
            for r in rows]


def _fit_stats(config: TrainConfig, amplitudes: np.ndarray, shifts: Optional[np.ndarray],
               train_idx: np.ndarray) -> TrainConfig:
    mean = amplitudes[train_idx].mean(axis=0)
    std = amplitudes[train_idx].std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    shift_scale = 1.0
    if shifts is not None:
        rms = float(np.sqrt(np.mean(shifts[train_idx] ** 2)))
        shift_scale = rms if rms > 1e-6 else 1.0
    return replace(config, target_mean=mean.tolist(), target_std=std.tolist(), shift_scale=shift_scale)


def train(images, amplitudes: np.ndarray, particle_ids: np.ndarray, out_dir: Union[str, os.PathLike],
          config: TrainConfig, device: Union[str, torch.device] = "cpu", seed: int = 0,
          resume: bool = False, progress: Optional[Callable[[dict], None]] = None,
          poses: Optional[Tuple[np.ndarray, np.ndarray]] = None, ctf: CtfLike = None,
          world_size: int = 1, rank: int = 0) -> List[dict]:
    """Train a DeepHEMNMA network and write a model directory ``out_dir``.

    images: (M, N, N) array, list of (stack path, 0-based index) pairs, or an
    image source (see ``dataset``). amplitudes: (M, K) in Å, columns in the
    order of ``config.modes``. particle_ids: (M,) split key (images of one
    particle never straddle training and validation). poses: ``(angles_deg
    (M, 3), shifts_px (M, 2))``, required when ``config.predict_pose``.
    ctf: optional phase flipping: ``ctf.CTFParams`` with one entry per image
    (evaluated at ``config.pixel_size``), precomputed CTFs (M, N, N // 2 + 1)
    in rfft2 layout, or a callable (see ``dataset.ctf_batch``).
    seed: split, initialisation, shuffling and augmentation (reproducible).
    resume: continue from ``out_dir/last.pt`` if present (same split and
    statistics, next epoch). progress: called with each epoch's metrics dict.
    world_size/rank: data-parallel sharding of training batches; only rank 0
    writes files (wrap in DDP yourself after ``torch.distributed`` init).
    Returns the metrics rows of all epochs so far (see ``METRICS_COLUMNS``).
    """
    from .. import __version__
    device = torch.device(device)
    source = as_image_source(images)
    amplitudes = np.asarray(amplitudes, dtype=np.float64)
    if amplitudes.ndim == 1:
        amplitudes = amplitudes[:, None]
    m = len(source)
    if amplitudes.shape != (m, len(config.modes)):
        raise ValueError(f"Amplitudes must be (number of images, number of modes) = ({m}, "
                         f"{len(config.modes)}), got {amplitudes.shape}.")
    if not np.all(np.isfinite(amplitudes)):
        raise ValueError("Amplitudes contain NaN or infinite values.")
    particle_ids = np.asarray(particle_ids)
    if particle_ids.shape != (m,):
        raise ValueError(f"Need one particle id per image ({m}), got shape {particle_ids.shape}.")
    angles = shifts = None
    if config.predict_pose:
        if poses is None:
            raise ValueError("predict_pose needs poses=(angles_deg (M, 3), shifts_px (M, 2)).")
        angles, shifts = (np.asarray(p, dtype=np.float64) for p in poses)
        if angles.shape != (m, 3) or shifts.shape != (m, 2):
            raise ValueError(f"Poses must be angles (M, 3) and shifts (M, 2); got {angles.shape}, {shifts.shape}.")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size}).")
    if config.working_size is not None and config.working_size > source.image_size:
        raise ValueError(f"Working size {config.working_size} exceeds the image size {source.image_size}.")
    if config.normalization not in NORMALIZATIONS:
        raise ValueError(f"Unknown image normalisation {config.normalization!r}; "
                         f"choose one of {sorted(NORMALIZATIONS)}.")
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError("epochs and batch_size must be positive.")

    out = Path(out_dir)
    writer = rank == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    config = replace(config, modes=[int(k) for k in config.modes], image_size=source.image_size,
                     n_outputs=len(config.modes) + (8 if config.predict_pose else 0),
                     version=__version__, seed=int(seed), phase_flip=ctf is not None)
    train_idx, val_idx = split_by_particle(particle_ids, config.val_fraction, seed)
    config = _fit_stats(config, amplitudes, shifts, train_idx)
    loss_fn = _loss_fn(config)

    torch.manual_seed(seed)
    model = build_model(config.n_modes, config.predict_pose, config.architecture, config.hidden,
                        config.dropout).to(device)
    optimizer = _make_optimizer(config, model)
    n_train = len(train_idx) // world_size
    scheduler = _make_scheduler(config, optimizer, (n_train + config.batch_size - 1) // config.batch_size)
    per_batch = isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)
    start_epoch, best_val, bad_epochs = 1, math.inf, 0
    rows: List[dict] = []
    last_path = out / LAST_FILE
    if resume and last_path.exists():
        state = torch.load(last_path, map_location=device, weights_only=False)
        saved = TrainConfig.load(out / CONFIG_FILE)
        if saved.modes != config.modes or saved.predict_pose != config.predict_pose:
            raise ValueError(f"Cannot resume: {out} was trained for modes {saved.modes} "
                             f"(pose {saved.predict_pose}), not {config.modes}.")
        config = replace(config, target_mean=saved.target_mean, target_std=saved.target_std,
                         shift_scale=saved.shift_scale)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
            if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                scheduler.T_max = max(1, config.epochs)  # the run may be extended on resume
        if per_batch and state.get("epochs", config.epochs) != config.epochs:
            raise ValueError(f"Cannot resume a one-cycle run of {state['epochs']} epochs with {config.epochs} "
                             "epochs: keep the number of epochs, or train anew.")
        start_epoch, best_val, bad_epochs = state["epoch"] + 1, state["best_val"], state["bad_epochs"]
        rows = [r for r in _read_metrics(out / METRICS_FILE) if r["epoch"] < start_epoch]
        logger.info("Resuming %s at epoch %d (best validation loss %.4g)", out, start_epoch, best_val)
    if writer:
        config.save(out / CONFIG_FILE)
    targets = _Targets(config, amplitudes, angles, shifts)

    net: nn.Module = model
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        net = nn.parallel.DistributedDataParallel(model)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and not torch.cuda.is_bf16_supported()) \
        if device.type == "cuda" else None
    columns = METRICS_COLUMNS + (POSE_METRICS_COLUMNS if config.predict_pose else [])
    logger.info("Training on %d images (%d particles), validating on %d images; %d modes %s, %s",
                len(train_idx), len(np.unique(particle_ids[train_idx])), len(val_idx), config.n_modes,
                config.modes, device)

    for epoch in range(start_epoch, config.epochs + 1):
        if bad_epochs >= config.patience:
            break
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, epoch])
        torch.manual_seed(seed * 100003 + epoch)
        order = train_idx[rng.permutation(len(train_idx))]
        # equal shards, so that data-parallel ranks run the same number of steps
        order = order[:len(order) - len(order) % world_size][rank::world_size] if world_size > 1 else order
        net.train()
        total, count = 0.0, 0
        for idx, x in iterate_batches(source, order, config.batch_size, config.working_size,
                                      config.normalization, ctf, None, device, config.pixel_size):
            inplane = None
            if config.augment_rotation:
                inplane = rng.uniform(0.0, 360.0, len(idx))
                x = rotate_images(x, torch.as_tensor(inplane, dtype=x.dtype, device=device))
            y = targets.batch(idx, inplane).to(device)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, use_amp):
                pred = net(x)
            loss = loss_fn(pred, y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if per_batch:
                scheduler.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        train_seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "train_loss": total / max(count, 1),
               "lr": optimizer.param_groups[0]["lr"], "images_per_s": count / max(train_seconds, 1e-9)}
        row.update(_validate(model, config, source, val_idx, targets, amplitudes, angles, shifts,
                             loss_fn, ctf, device, use_amp))
        row["seconds"] = time.perf_counter() - t0
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(row["val_loss"])
        elif scheduler is not None and not per_batch:
            scheduler.step()
        improved = row["val_loss"] < best_val
        if improved:
            best_val, bad_epochs = row["val_loss"], 0
        elif not per_batch:  # a one-cycle run ends with its annealing: no early stop
            bad_epochs += 1
        rows.append(row)
        if writer:
            if improved:
                torch.save({"model": model.state_dict(), "epoch": epoch, "val_loss": best_val},
                           out / BEST_FILE)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "epoch": epoch, "epochs": config.epochs, "best_val": best_val,
                        "bad_epochs": bad_epochs}, last_path)
            _write_metrics(out / METRICS_FILE, rows, columns)
        extra = ""
        if config.predict_pose:
            extra = f" val_angle {row['val_angle_deg']:.2f} deg val_shift {row['val_shift_px']:.2f} px"
        logger.info("epoch %d/%d train_loss %.4f val_loss %.4f val_mae %.3f A%s lr %.2e %.1f images/s",
                    epoch, config.epochs, row["train_loss"], row["val_loss"], row["val_mae"], extra,
                    row["lr"], row["images_per_s"])
        if progress is not None:
            progress(dict(row))
        if bad_epochs >= config.patience:
            logger.info("Early stopping after epoch %d: no validation improvement in %d epochs",
                        epoch, config.patience)
    return rows


@torch.no_grad()
def _validate(model, config, source, val_idx, targets, amplitudes, angles, shifts, loss_fn, ctf,
              device, use_amp) -> dict:
    model.eval()
    total, abs_err, ang_err, shift_err, n = 0.0, 0.0, 0.0, 0.0, 0
    for idx, x in iterate_batches(source, val_idx, config.batch_size, config.working_size,
                                  config.normalization, ctf, None, device, config.pixel_size):
        with _autocast(device, use_amp):
            pred = model(x)
        total += float(loss_fn(pred, targets.batch(idx, None).to(device))) * len(idx)
        dec = _decode(config, pred)
        abs_err += float(np.abs(dec["amplitudes"] - amplitudes[idx]).mean(axis=1).sum())
        if config.predict_pose:
            ang_err += float(angular_distance_deg(dec["matrices"], euler_to_matrix(angles[idx])).sum())
            shift_err += float(np.linalg.norm(dec["shifts"] - shifts[idx], axis=1).sum())
        n += len(idx)
    res = {"val_loss": total / n, "val_mae": abs_err / n}
    if config.predict_pose:
        res.update(val_angle_deg=ang_err / n, val_shift_px=shift_err / n)
    return res


def load_model(model_dir: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> LoadedModel:
    """Load ``model_dir/config.json`` and ``model_dir/best.pt`` into an eval-mode network."""
    model_dir = Path(model_dir)
    cfg_path, weights = model_dir / CONFIG_FILE, model_dir / BEST_FILE
    if not cfg_path.exists() or not weights.exists():
        raise ValueError(f"{model_dir} is not a trained DeepHEMNMA model (needs {CONFIG_FILE} and {BEST_FILE}).")
    config = TrainConfig.load(cfg_path)
    device = torch.device(device)
    model = build_model(config.n_modes, config.predict_pose, config.architecture, config.hidden,
                        config.dropout)
    state = torch.load(weights, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    return LoadedModel(model.to(device).eval(), config, device)


@torch.no_grad()
def predict(model: Union[LoadedModel, str, os.PathLike], images, batch_size: int = 64,
            device: Union[str, torch.device, None] = None, ctf: CtfLike = None,
            return_pose: bool = False, progress: Optional[Callable[[int, int], None]] = None,
            bfloat16: bool = False, rotations: int = 1):
    """Amplitudes (and optionally poses) of new particle images.

    model: a :class:`LoadedModel` or a model directory. images: as in
    :func:`train`; they must have the model's ``image_size`` (and pixel size).
    ctf: phase flipping as in :func:`train` (use it if the model was trained with it). Preprocessing
    and target statistics are the ones saved with the model.
    Returns amplitudes (M, K) in Å (columns = ``config.modes``), or with
    ``return_pose`` a tuple ``(amplitudes, angles_deg (M, 3), shifts_px (M, 2))``.
    progress: called with (images done, total) after each batch.
    bfloat16: run the network in bfloat16 autocast on CPU too (about twice as
    fast on CPUs with AVX512-BF16/AMX; amplitudes then differ by ~1e-2 of their
    spread). On CUDA, mixed precision follows ``config.amp``.
    rotations: average the amplitudes over this many in-plane rotations of
    each image (0, 360/R, ... degrees; test-time augmentation, R times the
    work), for models trained with ``augment_rotation``. Poses come from the
    unrotated image.
    """
    if rotations < 1:
        raise ValueError(f"rotations must be at least 1, got {rotations}.")
    if not isinstance(model, LoadedModel):
        model = load_model(model, device or "cpu")
    elif device is not None and torch.device(device) != model.device:
        model = LoadedModel(model.model.to(device), model.config, torch.device(device))
    config = model.config
    if return_pose and not config.predict_pose:
        raise ValueError("This model was trained without pose prediction.")
    if config.phase_flip != (ctf is not None):
        raise ValueError("This model was trained on phase-flipped images: give the CTFs of the new images."
                         if config.phase_flip else
                         "This model was trained without phase flipping: do not give CTFs.")
    source = as_image_source(images)
    if source.image_size != config.image_size:
        raise ValueError(f"Images are {source.image_size} px but the model was trained on "
                         f"{config.image_size} px images.")
    net = model.model.eval()
    channels_last = model.device.type == "cpu"  # oneDNN convolutions are ~1.3x faster in NHWC
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    m = len(source)
    amps = np.empty((m, config.n_modes))
    ang = np.empty((m, 3)) if return_pose else None
    sh = np.empty((m, 2)) if return_pose else None
    done = 0
    for idx, x in iterate_batches(source, np.arange(m), batch_size, config.working_size,
                                  config.normalization, ctf, None, model.device, config.pixel_size):
        if rotations > 1:  # copies r = 0..R-1 of the batch, rotated by r * 360 / R degrees, stacked
            angles = torch.arange(rotations, dtype=x.dtype, device=x.device) * (360.0 / rotations)
            x = rotate_images(x.repeat(rotations, 1, 1, 1), angles.repeat_interleave(len(idx)))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(model.device, config.amp or bfloat16, bfloat16):
            out = net(x)
        dec = _decode(config, out[:len(idx)])  # the unrotated copy gives the pose
        if rotations > 1:
            dec["amplitudes"] = _decode_amplitudes(config, out).reshape(rotations, len(idx), -1).mean(0)
        amps[idx] = dec["amplitudes"]
        if return_pose:
            ang[idx], sh[idx] = dec["angles"], dec["shifts"]
        done += len(idx)
        if progress is not None:
            progress(done, m)
    return (amps, ang, sh) if return_pose else amps
