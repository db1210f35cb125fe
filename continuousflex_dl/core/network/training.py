"""Training and inference of the DeepHEMNMA regressor.

A *model directory* holds everything needed to predict:

* ``config.json``: the :class:`TrainConfig` (modes, sizes, pixel size,
  normalisation name, architecture, target statistics, package version),
* ``best.pt``: the weights with the lowest validation loss,
* ``last.pt``: the last epoch's weights, optimizer, scheduler and
  gradient-scaler states, the training phase (simulated or fine-tuning) and
  the epoch it started at, the config and a fingerprint of the training data
  and reference (resume); ``last.previous.pt``: the epoch before (fallback),
* ``metrics.csv``: one row per epoch (epoch, train_loss, val_loss, val_mae,
  lr, images_per_s, seconds [, val_angle_deg, val_shift_px]).

Every file is written to a temporary name in the same folder and then
``os.replace``-d, so a kill leaves the previous complete file. Checkpoints
hold only tensors and plain values and are loaded with
``torch.load(weights_only=True)``, which refuses anything that could run code.

Resuming (``train(..., resume=True)``) continues from ``last.pt`` (or from
``last.previous.pt`` when ``last.pt`` is damaged) only with the same data and
the same settings; of the settings only ``epochs`` (not with the one-cycle
schedule, which the number of epochs defines) and ``patience`` may change.
Anything else is refused with a message saying what changed.

Training data (``TrainConfig.data``): ``"particles"``, the particle images
and their amplitudes (HEMNMA or ground truth); ``"simulated"``, particles
simulated on the fly from the reference and its modes, matched to the data
set (its CTFs, noise, amplitude range and shift range; :mod:`.simulator`),
a fresh stream every epoch; ``"simulated+finetune"``, ``epochs`` epochs on
the simulated stream, then ``finetune_epochs`` on the particles' amplitudes
from the last simulated weights (a new optimizer and schedule at
``finetune_lr``). Validation is on held-out particles (their amplitudes)
whenever the particles have amplitudes, else on a fixed simulated set.

Targets are standardised per output with the mean/std of the *training split*
only (saved in config.json), or of the amplitude prior when simulating.
Shifts are divided by one isotropic scale (no mean), so in-plane rotation
augmentation commutes with standardisation; the 6-D rotation is not scaled.
The split is by particle id: all images of one particle (e.g. several noisy
copies) are on the same side. Images with NaN or
infinite pixels and constant images are refused (``dataset.check_images``).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import pickle
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..imaging.ctf import CTFParams
from ..progress import Progress, report
from ..imaging.dataset import (NORMALIZATIONS, CtfLike, as_image_source, check_images, iterate_batches, prepare_images,
                      rotate_images, rotate_pose)
from ..imaging.geometry import angular_distance_deg, euler_to_matrix, matrix_to_euler
from .resnet import DeepHEMNMANet, build_model, matrix_to_rotation_6d, rotation_6d_to_matrix
from .simulator import (VALIDATION_EPOCH, AmplitudePrior, EstimatesPrior, ParticleSimulator, Reference,
                        SimulatedBatch, default_amplitude_range, match_simulator)

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "LoadedModel", "CheckpointError", "split_by_particle", "train", "load_model",
           "best_epoch", "predict", "changed_settings", "save_checkpoint", "load_checkpoint", "METRICS_COLUMNS",
           "FITTED_FIELDS", "RESUMABLE_SETTINGS", "DATA_CHOICES", "PRIOR_CHOICES"]

CONFIG_FILE, BEST_FILE, LAST_FILE, METRICS_FILE = "config.json", "best.pt", "last.pt", "metrics.csv"
PREVIOUS_FILE = "last.previous.pt"
METRICS_COLUMNS = ["epoch", "train_loss", "val_loss", "val_mae", "lr", "images_per_s", "seconds"]
POSE_METRICS_COLUMNS = ["val_angle_deg", "val_shift_px"]


@dataclass
class TrainConfig:
    """Everything that defines a DeepHEMNMA model and its training.

    modes: normal-mode numbers (1-based) in the order of the amplitude columns.
    image_size: input box (px), set by :func:`train` from the images.
    working_size: box (px) the network sees after Fourier cropping (None: the window's or image_size).
    pixel_size: Å/px of the input images.
    window: side (Å) of the real-space window around the box centre that the
    network sees (None: the whole box), then Fourier-cropped to ``working_size``.
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
    data: training data, one of :data:`DATA_CHOICES` (see the module docstring).
    sim_images: simulated images per epoch (each one new). sim_in_plane:
    simulated orientations uniform on SO(3) (else uniform directions, psi = 0).
    sim_max_shift_px: simulated shifts uniform in [-S, S]^2 px (None: the 99th
    percentile of the particles' |shifts| when poses are given, else 0).
    sim_amplitude_range: simulated amplitudes uniform in [-R, R] Å (None: from
    the particles' amplitudes as ``sim_prior`` says; 5 sqrt(N) Å without them).
    sim_prior: how the particles' amplitudes give the simulated ones, one of
    :data:`PRIOR_CHOICES`: "estimates", a Gaussian kernel density around the
    estimates (``simulator.EstimatesPrior``: the simulated conformations
    follow the set's, as a curve stays a curve), or "range", uniform over their
    range widened by 10 % (``simulator.AmplitudePrior``).
    sim_noise_ramp: a curriculum over the first simulated epochs: the noise's
    standard deviation is ``min(1, epoch / sim_noise_ramp)`` times the particles'
    (0: the particles' noise from the start).
    finetune_epochs, finetune_lr (None: learning_rate / 10): the fine-tuning of
    "simulated+finetune".
    phase_flip (images were CTF phase-flipped, so prediction needs CTFs too)
    and seed: set by :func:`train` from its arguments.
    The fields of :data:`FITTED_FIELDS` are values :func:`train` fits to the
    data; all other fields are user settings (:meth:`settings`).
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
    window: Optional[float] = None
    data: str = "particles"
    sim_images: int = 6000
    sim_in_plane: bool = True
    sim_max_shift_px: Optional[float] = None
    sim_amplitude_range: Optional[float] = None
    sim_prior: str = "estimates"
    sim_noise_ramp: int = 0
    finetune_epochs: int = 10
    finetune_lr: Optional[float] = None
    n_outputs: int = 0
    target_mean: List[float] = field(default_factory=list)
    target_std: List[float] = field(default_factory=list)
    shift_scale: float = 1.0
    simulation: dict = field(default_factory=dict)
    version: str = ""

    @property
    def n_modes(self) -> int:
        return len(self.modes)

    @property
    def window_px(self) -> Optional[int]:
        """Side (px) of the real-space window, or None (the whole box)."""
        return None if self.window is None else int(round(self.window / self.pixel_size))

    @property
    def input_size(self) -> int:
        """Box (px) the network sees."""
        return int(self.working_size or self.window_px or self.image_size)

    @property
    def simulates(self) -> bool:
        """Whether training uses the simulated stream."""
        return self.data != "particles"

    def settings(self) -> dict:
        """The user settings (every field but :data:`FITTED_FIELDS`), as plain values."""
        return {k: v for k, v in _plain(asdict(self)).items() if k not in FITTED_FIELDS}

    def save(self, path: Union[str, os.PathLike]) -> None:
        _replace_file(Path(path), json.dumps(_plain(asdict(self)), indent=2).encode())

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """A config from saved fields (fields unknown to this version are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


#: TrainConfig fields that :func:`train` fits to the data (not user settings);
#: ``simulation`` holds what the simulator matched to the particles (SNR,
#: signal scale, noise spectrum, amplitude and shift ranges).
FITTED_FIELDS = ("image_size", "n_outputs", "target_mean", "target_std", "shift_scale", "simulation",
                 "version")
#: Training data choices (``TrainConfig.data``).
DATA_CHOICES = ("particles", "simulated", "simulated+finetune")
#: Simulated amplitude priors (``TrainConfig.sim_prior``).
PRIOR_CHOICES = ("estimates", "range")
#: Settings a stopped training may change when it continues: they decide when
#: it stops, not what an epoch computes (``epochs`` not with "onecycle").
RESUMABLE_SETTINGS = ("epochs", "patience")


def _plain(value):
    """JSON-plain copy (numpy scalars -> Python numbers, tuples -> lists)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist()))


def changed_settings(saved: TrainConfig, new: TrainConfig) -> List[str]:
    """'name: old -> new' for each setting of ``new`` that a run saved with ``saved`` cannot continue with."""
    resumable = set(RESUMABLE_SETTINGS)
    if saved.lr_schedule == "onecycle":
        resumable.discard("epochs")
    old, now = saved.settings(), new.settings()
    changes = []
    for name in now:
        if name in resumable or old.get(name) == now[name]:
            continue
        note = " (a one-cycle schedule is fixed by its number of epochs)" if name == "epochs" else ""
        changes.append(f"{name}: {old.get(name)!r} -> {now[name]!r}{note}")
    return changes


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


@dataclass
class _Labels:
    """The truth of a batch: amplitudes (B, K) Å [, angles (B, 3) deg, shifts (B, 2) px]."""
    amplitudes: np.ndarray
    angles: Optional[np.ndarray] = None
    shifts: Optional[np.ndarray] = None


class _Targets:
    """Standardised targets (B, n_outputs) from amplitudes (Å) and poses."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.mean = np.asarray(config.target_mean, dtype=np.float64)
        self.std = np.asarray(config.target_std, dtype=np.float64)

    def encode(self, labels: _Labels, inplane_deg: Optional[np.ndarray]) -> torch.Tensor:
        amp = (labels.amplitudes - self.mean) / self.std
        if not self.config.predict_pose:
            return torch.as_tensor(amp, dtype=torch.float32)
        angles, shifts = labels.angles, labels.shifts
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


def _make_optimizer(config: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    # The fused Adam kernel is several times faster than the per-tensor loop
    # (ResNet34 has 21 M parameters, so small batches are optimizer bound).
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=config.weight_decay)


def _make_scheduler(config: TrainConfig, optimizer, steps_per_epoch: int, epochs: int, lr: float):
    if config.lr_schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs,
                                                   steps_per_epoch=max(1, steps_per_epoch))
    if config.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=config.lr_patience)
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
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
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    _replace_file(path, text.getvalue().encode())


def _read_metrics(path: Path) -> List[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items() if v not in (None, "")}
            for r in rows]


# ------------------------------------------------------------------ checkpoint files

class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: damaged (empty, truncated) or, with
    ``unsafe``, holding objects other than tensors and plain values (which
    could run code, so it was not unpickled)."""

    def __init__(self, message: str, unsafe: bool = False):
        super().__init__(message)
        self.unsafe = unsafe


def _write_synced(path: Path, write: Callable) -> None:
    """``write(file)`` into a new ``path``, flushed and synced to disk."""
    with open(path, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def _replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, then os.replace."""
    tmp = path.with_name(path.name + ".tmp")
    _write_synced(tmp, lambda fh: fh.write(data))
    os.replace(tmp, path)


def save_checkpoint(state: dict, path: Union[str, os.PathLike],
                    previous: Optional[Union[str, os.PathLike]] = None) -> None:
    """Save ``state`` (tensors and plain values only) to ``path`` atomically.

    The file is written to ``path + '.tmp'`` in the same folder, synced and
    renamed over ``path``, so ``path`` is always a complete checkpoint.
    previous: first move the current ``path`` there (the fallback of :func:`train`).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _write_synced(tmp, lambda fh: torch.save(state, fh))
    if previous is not None and path.exists():
        os.replace(path, previous)
    os.replace(tmp, path)


def load_checkpoint(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> dict:
    """A checkpoint dict with a ``"model"`` state, loaded with ``weights_only=True``.

    Raises :class:`CheckpointError` naming the file when it is empty,
    truncated, not a checkpoint, or holds objects other than tensors and
    plain values (refused unread: such a file could run code).
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the run was probably killed while writing it")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise CheckpointError(f"{path} holds Python objects other than tensors and plain values, so it "
                                  "was not loaded (such a file can run code; it was not written by this "
                                  "plugin)", unsafe=True) from None
        raise CheckpointError(f"{path} ({size} bytes) is damaged: it cannot be unpickled") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} ({size} bytes) is truncated or damaged ({reason})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a DeepHEMNMA checkpoint (no model weights in it)")
    return state


def _load_last(out: Path, device: torch.device) -> Optional[dict]:
    """The newest loadable of ``last.pt`` and ``last.previous.pt`` (None: neither exists).

    A damaged ``last.pt`` falls back to ``last.previous.pt`` with a warning;
    an unsafe file, or no loadable file, raises ValueError saying what to do.
    """
    problems, damaged = [], []
    for path in (out / LAST_FILE, out / PREVIOUS_FILE):
        if not path.exists():
            continue
        try:
            state = load_checkpoint(path, device)
        except CheckpointError as err:
            if err.unsafe:
                raise ValueError(f"Cannot continue the training: {err}. Delete it to continue from the "
                                 "epoch before (if its checkpoint is sound) or from scratch, or Restart the "
                                 "protocol.") from None
            problems.append(str(err))
            damaged.append(str(path))
            continue
        if problems:
            logger.warning("%s; continuing from %s (epoch %d) instead", problems[0], path, state["epoch"])
        return state
    if problems:
        raise ValueError(f"Cannot continue the training: {'; '.join(problems)}. Delete "
                         f"{' and '.join(damaged)} to train from scratch, or Restart the protocol.")
    return None


# ------------------------------------------------------------------ training steps

@dataclass
class _Data:
    """The checked inputs of :func:`train`."""
    source: object
    amplitudes: Optional[np.ndarray]  # (M, K) Å; None: simulated training without labels
    particle_ids: np.ndarray          # (M,)
    angles: Optional[np.ndarray]      # (M, 3) degrees, when poses are given
    shifts: Optional[np.ndarray]      # (M, 2) px, when poses are given
    ctf: CtfLike                      # phase flipping
    reference: Optional[Reference]    # simulation
    particle_ctf: Optional[CTFParams]  # the particles' CTFs, for simulation

    def labels(self, idx: np.ndarray) -> _Labels:
        return _Labels(self.amplitudes[idx], None if self.angles is None else self.angles[idx],
                       None if self.shifts is None else self.shifts[idx])

    def fingerprint(self, config: TrainConfig, world_size: int) -> str:
        """SHA-256 of what training results depend on besides the settings and the pixels."""
        invert = bool(getattr(self.source, "invert", False))   # images read with the opposite sign
        h = hashlib.sha256(f"{len(self.source)} {self.source.image_size} {world_size} {invert}".encode())
        h.update(repr(self.particle_ids.tolist()).encode())
        poses = config.predict_pose or config.simulates
        for a in (self.amplitudes, self.angles if poses else None, self.shifts if poses else None):
            if a is not None:
                h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        for ctf in (self.ctf, self.particle_ctf if config.simulates else None):
            if isinstance(ctf, CTFParams):
                for a in (ctf.defocus_u, ctf.defocus_v, ctf.defocus_angle):
                    h.update(np.ascontiguousarray(np.asarray(a, dtype=np.float64)).tobytes())
        if config.simulates:
            ref = self.reference
            for a in (ref.coords, ref.modes, ref.sigma, ref.weights):
                if a is not None:
                    h.update(np.ascontiguousarray(np.asarray(a, dtype=np.float64)).tobytes())
        return h.hexdigest()


def _check_inputs(images, amplitudes: Optional[np.ndarray], particle_ids: np.ndarray, config: TrainConfig,
                  poses: Optional[Tuple[np.ndarray, np.ndarray]], ctf: CtfLike,
                  reference: Optional[Reference], particle_ctf: Optional[CTFParams],
                  world_size: int, rank: int) -> _Data:
    """Shapes, values and settings of :func:`train`, checked; raises ValueError with the fix."""
    source = as_image_source(images)
    m = len(source)
    if config.data not in DATA_CHOICES:
        raise ValueError(f"Unknown training data {config.data!r}; choose one of {', '.join(DATA_CHOICES)}.")
    if config.sim_prior not in PRIOR_CHOICES:
        raise ValueError(f"Unknown simulated amplitude prior {config.sim_prior!r}; choose one of "
                         f"{', '.join(PRIOR_CHOICES)}.")
    if amplitudes is None:
        if config.data != "simulated":
            raise ValueError(f"Training on {config.data!r} needs the particles' amplitudes; without them, "
                             "train on simulated particles only (data='simulated').")
    else:
        amplitudes = np.asarray(amplitudes, dtype=np.float64)
        if amplitudes.ndim == 1:
            amplitudes = amplitudes[:, None]
        if amplitudes.shape != (m, len(config.modes)):
            raise ValueError(f"Amplitudes must be (number of images, number of modes) = ({m}, "
                             f"{len(config.modes)}), got {amplitudes.shape}.")
        if not np.all(np.isfinite(amplitudes)):
            raise ValueError("Amplitudes contain NaN or infinite values.")
    particle_ids = np.asarray(particle_ids)
    if particle_ids.shape != (m,):
        raise ValueError(f"Need one particle id per image ({m}), got shape {particle_ids.shape}.")
    angles = shifts = None
    if poses is not None:
        angles, shifts = (np.asarray(p, dtype=np.float64) for p in poses)
        if angles.shape != (m, 3) or shifts.shape != (m, 2):
            raise ValueError(f"Poses must be angles (M, 3) and shifts (M, 2); got {angles.shape}, {shifts.shape}.")
    if config.predict_pose and poses is None and (config.data != "simulated" or amplitudes is not None):
        raise ValueError("predict_pose needs poses=(angles_deg (M, 3), shifts_px (M, 2)).")
    if particle_ctf is None and isinstance(ctf, CTFParams):
        particle_ctf = ctf
    if config.simulates:
        if reference is None:
            raise ValueError(f"Training on {config.data!r} particles needs the reference structure and its "
                             "normal modes (reference=simulator.Reference(...)).")
        if reference.n_modes != len(config.modes):
            raise ValueError(f"The reference has {reference.n_modes} modes but {len(config.modes)} are "
                             f"trained ({config.modes}): give the modes of the amplitude columns.")
        if ctf is not None and particle_ctf is None:
            raise ValueError("Simulated training with phase flipping needs the particles' CTF parameters "
                             "(a CTFParams), not precomputed CTF images.")
        if particle_ctf is not None and particle_ctf.batch_size not in (1, m):
            raise ValueError(f"Give one CTF per particle ({m}) or one for all, got {particle_ctf.batch_size}.")
        if config.sim_images < 1:
            raise ValueError(f"Simulate at least one image per epoch, got {config.sim_images}.")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size}).")
    if config.batch_size % world_size:
        raise ValueError(f"The batch size ({config.batch_size}) is the images of one step over all "
                         f"{world_size} processes: make it a multiple of {world_size}.")
    window = config.window_px or source.image_size
    if window > source.image_size:
        raise ValueError(f"The window ({config.window} Å, {window} px) is larger than the images "
                         f"({source.image_size} px at {config.pixel_size} Å/px): make it at most "
                         f"{source.image_size * config.pixel_size:g} Å.")
    if config.working_size is not None and config.working_size > window:
        raise ValueError(f"Working size {config.working_size} exceeds the "
                         f"{'window' if config.window else 'image size'} ({window} px).")
    if config.normalization not in NORMALIZATIONS:
        raise ValueError(f"Unknown image normalisation {config.normalization!r}; "
                         f"choose one of {sorted(NORMALIZATIONS)}.")
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError("epochs and batch_size must be positive.")
    if config.data == "simulated+finetune" and config.finetune_epochs < 1:
        raise ValueError("Fine-tuning needs at least one epoch (finetune_epochs).")
    check_images(source, particle_ids, "training")
    return _Data(source, amplitudes, particle_ids, angles, shifts, ctf, reference, particle_ctf)


def _fit_stats(config: TrainConfig, data: _Data, train_idx: Optional[np.ndarray],
               simulator: Optional[ParticleSimulator]) -> TrainConfig:
    """Target statistics: of the training split's labels, or of the simulator's amplitude prior."""
    if simulator is not None:
        mean, std = simulator.amplitudes.mean, simulator.amplitudes.std
        rms = simulator.max_shift_px / math.sqrt(3.0)  # uniform in [-S, S]
    else:
        mean = data.amplitudes[train_idx].mean(axis=0)
        std = data.amplitudes[train_idx].std(axis=0)
        rms = float(np.sqrt(np.mean(data.shifts[train_idx] ** 2))) if data.shifts is not None else 0.0
    std = np.where(std > 1e-8, std, 1.0)
    shift_scale = rms if config.predict_pose and rms > 1e-6 else 1.0
    return replace(config, target_mean=np.asarray(mean).tolist(), target_std=np.asarray(std).tolist(),
                   shift_scale=shift_scale)


def _make_simulator(config: TrainConfig, data: _Data, train_idx: Optional[np.ndarray],
                    device: torch.device) -> Tuple[ParticleSimulator, dict]:
    """The simulator matched to the particles, and what it matched (``TrainConfig.simulation``)."""
    ref, k = data.reference, len(config.modes)
    if config.sim_amplitude_range is not None:
        prior = AmplitudePrior.symmetric(config.sim_amplitude_range, k)
    elif data.amplitudes is not None and config.sim_prior == "estimates":
        prior = EstimatesPrior.from_estimates(data.amplitudes[train_idx])
    elif data.amplitudes is not None:
        prior = AmplitudePrior.from_estimates(data.amplitudes[train_idx])
    else:
        prior = AmplitudePrior.symmetric(default_amplitude_range(len(ref.coords)), k)
    max_shift = config.sim_max_shift_px
    if max_shift is None:
        max_shift = float(np.quantile(np.abs(data.shifts), 0.99)) if data.shifts is not None else 0.0
    box = data.source.image_size
    max_shift = min(max_shift, box / 2 - 1)
    sim = match_simulator(ref, data.source, box, config.pixel_size, data.particle_ctf, prior,
                          config.sim_in_plane, max_shift, config.seed, device)
    fitted = dict(snr=sim.noise.snr if math.isfinite(sim.noise.snr) else None, signal_scale=sim.noise.scale,
                  noise_power=sim.noise.power.tolist(),
                  amplitude_low=prior.low.tolist(), amplitude_high=prior.high.tolist(), max_shift_px=max_shift)
    if isinstance(prior, EstimatesPrior):
        fitted["amplitude_bandwidth"] = prior.bandwidth.tolist()
    logger.info("Simulating particles matched to the data: SNR %.3g, amplitudes %s%s Å, shifts within "
                "±%.2f px, %s", sim.noise.snr,
                "around the estimates, kernel width " + ", ".join(f"{h:.1f}" for h in prior.bandwidth) + " Å, in "
                if isinstance(prior, EstimatesPrior) else "uniform in ",
                ", ".join(f"[{lo:.1f}, {hi:.1f}]" for lo, hi in zip(prior.low, prior.high)), max_shift,
                "the particles' CTFs" if data.particle_ctf is not None else "no CTF")
    return sim, fitted


@dataclass(frozen=True)
class _Phase:
    """One stage of a training run: ``epochs`` epochs on ``source`` ("simulated" or "particles") at peak ``lr``."""
    index: int
    source: str
    epochs: int
    lr: float


def _phases(config: TrainConfig) -> List[_Phase]:
    """The stages of a run: one, or the simulated stream then fine-tuning on the particles."""
    if config.data == "particles":
        return [_Phase(0, "particles", config.epochs, config.learning_rate)]
    phases = [_Phase(0, "simulated", config.epochs, config.learning_rate)]
    if config.data == "simulated+finetune":
        phases.append(_Phase(1, "particles", config.finetune_epochs,
                             config.finetune_lr or config.learning_rate / 10))
    return phases


def best_epoch(model_dir: Union[str, os.PathLike]) -> Optional[dict]:
    """The metrics row of the weights kept in ``best.pt`` (the lowest validation loss) of a
    trained model folder, with ``"source"``: what that epoch trained on ("simulated" or
    "particles", the fine-tuning of "simulated+finetune"); None before the first epoch."""
    folder = Path(model_dir)
    rows = _read_metrics(folder / METRICS_FILE)
    if not rows:
        return None
    best = dict(min(rows, key=lambda r: r["val_loss"]))
    phases = _phases(TrainConfig.load(folder / CONFIG_FILE))
    best["source"] = phases[0].source if best["epoch"] <= phases[0].epochs else phases[-1].source
    return best


def _distributed(world_size: int) -> bool:
    """True when ``world_size`` ranks train together in an initialised ``torch.distributed`` group."""
    return world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def _sum_over_ranks(values: List[float], device: torch.device) -> List[float]:
    """The element-wise sums of ``values`` over the ranks of the process group (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


class _Trainer:
    """The network, optimizer, schedule and epoch counters of one phase of a training run.

    Built from a complete config (``train`` fills in the fitted values);
    ``train_epoch`` + ``evaluate`` + ``end_epoch`` make one epoch,
    ``state_dict``/``load_state_dict`` are the checkpoint (tensors and plain
    values only). ``start``: the run's epoch number of the phase's first epoch.
    With ``world_size`` ranks in a ``torch.distributed`` group, each rank trains on
    ``config.batch_size / world_size`` images of every step (the batch size is global) under
    DDP, which averages the gradients, and the epoch's training loss and the validation
    metrics are summed over the ranks, so every rank sees the same numbers.
    val_batches: a fixed validation set of (prepared images, labels) batches
    (simulated), used when there is no validation split (``val_idx`` None).
    """

    def __init__(self, config: TrainConfig, data: _Data, train_idx: Optional[np.ndarray],
                 val_idx: Optional[np.ndarray], device: torch.device, world_size: int, rank: int,
                 phase: _Phase, start: int = 1, simulator: Optional[ParticleSimulator] = None,
                 val_batches: Optional[List[Tuple[torch.Tensor, _Labels]]] = None,
                 model: Optional[DeepHEMNMANet] = None):
        self.config, self.data, self.device = config, data, device
        self.train_idx, self.val_idx, self.val_batches = train_idx, val_idx, val_batches
        self.world_size, self.rank = world_size, rank
        self.phase, self.start, self.simulator = phase, start, simulator
        if model is None:
            torch.manual_seed(config.seed)
            model = build_model(config.n_modes, config.predict_pose, config.architecture, config.hidden,
                                config.dropout).to(device)
        if _distributed(world_size) and device.type == "cuda":  # batch statistics of the global batch
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.optimizer = _make_optimizer(config, self.model, phase.lr)
        self.rank_batch = config.batch_size // world_size  # images of one step on this rank
        n_train = (config.sim_images if phase.source == "simulated" else len(train_idx)) // world_size
        self.scheduler = _make_scheduler(config, self.optimizer,
                                         (n_train + self.rank_batch - 1) // self.rank_batch,
                                         phase.epochs, phase.lr)
        self.per_batch = isinstance(self.scheduler, torch.optim.lr_scheduler.OneCycleLR)
        self.net: nn.Module = self.model
        if _distributed(world_size):
            self.net = nn.parallel.DistributedDataParallel(self.model)
        self.use_amp = config.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and not torch.cuda.is_bf16_supported()) \
            if device.type == "cuda" else None
        self.loss_fn = _loss_fn(config)
        self.targets = _Targets(config)
        self.next_epoch, self.best_val, self.bad_epochs = start, math.inf, 0
        self.rows: List[dict] = []

    @property
    def last_epoch(self) -> int:
        """The run's epoch number of the phase's last epoch."""
        return self.start + self.phase.epochs - 1

    @property
    def stopped_early(self) -> bool:
        return self.bad_epochs >= self.config.patience

    @property
    def done(self) -> bool:
        """The phase ran all its epochs or stopped early."""
        return self.stopped_early or self.next_epoch > self.last_epoch

    def next_phase(self, phase: _Phase) -> "_Trainer":
        """A trainer for ``phase`` continuing from this one's weights, best loss and epochs."""
        nxt = _Trainer(self.config, self.data, self.train_idx, self.val_idx, self.device, self.world_size,
                       self.rank, phase, self.next_epoch, self.simulator, self.val_batches, self.model)
        nxt.best_val, nxt.rows = self.best_val, self.rows
        return nxt

    def state_dict(self) -> dict:
        """The checkpoint of the epoch just ended."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": self.next_epoch - 1, "best_val": float(self.best_val),
                "bad_epochs": int(self.bad_epochs), "phase": self.phase.index, "phase_start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
            if isinstance(self.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                self.scheduler.T_max = max(1, self.phase.epochs)  # the run may be extended on resume
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.next_epoch = int(state["epoch"]) + 1
        self.best_val, self.bad_epochs = float(state["best_val"]), int(state["bad_epochs"])

    def train_batch(self, x: torch.Tensor, labels: _Labels, rng: np.random.Generator) -> float:
        """One optimisation step on prepared images x (B, 1, w, w) and their labels; returns the batch loss."""
        inplane = None
        if self.config.augment_rotation:
            inplane = rng.uniform(0.0, 360.0, len(x))
            x = rotate_images(x, torch.as_tensor(inplane, dtype=x.dtype, device=self.device))
        y = self.targets.encode(labels, inplane).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.device, self.use_amp):
            pred = self.net(x)
        loss = self.loss_fn(pred, y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if self.per_batch:
            self.scheduler.step()
        return float(loss.detach())

    def _particle_batches(self, order: np.ndarray, batch_size: int) -> Iterator[Tuple[torch.Tensor, _Labels]]:
        c = self.config
        for idx, x in iterate_batches(self.data.source, order, batch_size, c.working_size, c.normalization,
                                      self.data.ctf, None, self.device, c.pixel_size, c.window_px):
            yield x, self.data.labels(idx)

    def _simulated_batches(self, epoch: int) -> Iterator[Tuple[torch.Tensor, _Labels]]:
        """This rank's share of the epoch's new simulated images, prepared like the particles."""
        c = self.config
        n, bs = c.sim_images // self.world_size, self.rank_batch
        noise_scale = min(1.0, (epoch - self.start + 1) / c.sim_noise_ramp) if c.sim_noise_ramp > 0 else 1.0
        for b in range((n + bs - 1) // bs):
            size = min(bs, n - b * bs)
            batch = self.simulator.batch(epoch, b * self.world_size + self.rank, size, noise_scale)
            yield _prepare_simulated(c, batch, self.device)

    def train_epoch(self, epoch: int) -> dict:
        """One pass over this rank's share of the training split, or of a new simulated epoch
        (seeded by seed and epoch)."""
        config = self.config
        t0 = time.perf_counter()
        rng = np.random.default_rng([config.seed, epoch])
        torch.manual_seed(config.seed * 100003 + epoch)
        if self.phase.source == "simulated":
            batches = self._simulated_batches(epoch)
        else:
            order = self.train_idx[rng.permutation(len(self.train_idx))]
            if self.world_size > 1:  # equal shards, so that data-parallel ranks run the same number of steps
                order = order[:len(order) - len(order) % self.world_size][self.rank::self.world_size]
            batches = self._particle_batches(order, self.rank_batch)
        if self.world_size > 1:  # the shards above need the same order on every rank; augmentation does not
            rng = np.random.default_rng([config.seed, epoch, self.rank])
        self.net.train()
        total, count = 0.0, 0
        for x, labels in batches:
            total += self.train_batch(x, labels, rng) * len(x)
            count += len(x)
        if _distributed(self.world_size):
            total, count = _sum_over_ranks([total, count], self.device)
        seconds = time.perf_counter() - t0
        return {"epoch": epoch, "train_loss": total / max(count, 1),
                "lr": self.optimizer.param_groups[0]["lr"], "images_per_s": count / max(seconds, 1e-9)}

    def evaluate(self) -> dict:
        """Validation metrics of the current weights (see ``_validate``): on the held-out
        particles, or on the fixed simulated set when the particles have no amplitudes."""
        shared = _distributed(self.world_size)  # each rank validates a share; the sums are combined
        if self.val_idx is not None:
            idx = self.val_idx[self.rank::self.world_size] if shared else self.val_idx
            batches = self._particle_batches(idx, self.config.batch_size) if len(idx) else []
        else:
            batches = self.val_batches[self.rank::self.world_size] if shared else self.val_batches
        return _validate(self.model, self.config, batches, self.targets, self.loss_fn, self.device, self.use_amp,
                         (lambda sums: _sum_over_ranks(sums, self.device)) if shared else None)

    def end_epoch(self, row: dict) -> bool:
        """Step the epoch schedules and early-stopping counters; True if the validation loss improved."""
        if not math.isfinite(row["val_loss"]):
            raise ValueError(f"Training diverged at epoch {row['epoch']}: the validation loss is "
                             f"{row['val_loss']}. Lower the learning rate (now {self.phase.lr:g}) "
                             "and Restart.")
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(row["val_loss"])
        elif self.scheduler is not None and not self.per_batch:
            self.scheduler.step()
        improved = row["val_loss"] < self.best_val
        if improved:
            self.best_val, self.bad_epochs = row["val_loss"], 0
        elif not self.per_batch:  # a one-cycle run ends with its annealing: no early stop
            self.bad_epochs += 1
        self.rows.append(row)
        self.next_epoch = row["epoch"] + 1
        return improved


def _prepare_simulated(config: TrainConfig, batch: SimulatedBatch,
                       device: torch.device) -> Tuple[torch.Tensor, _Labels]:
    """A simulated batch through the particles' preprocessing (phase flip with its own CTFs)."""
    ctf = batch.ctf_images if config.phase_flip else None
    x = prepare_images(batch.images, config.working_size, config.normalization, ctf, device, config.window_px)
    return x, _Labels(batch.amplitudes, batch.angles, batch.shifts)


def _simulated_validation(config: TrainConfig, simulator: ParticleSimulator,
                          device: torch.device) -> List[Tuple[torch.Tensor, _Labels]]:
    """The fixed simulated validation set (``val_fraction`` of an epoch, at least one batch),
    drawn from epoch :data:`simulator.VALIDATION_EPOCH` of the stream, prepared once."""
    n = max(config.batch_size, int(round(config.val_fraction * config.sim_images)))
    return [_prepare_simulated(config, b, device)
            for b in simulator.batches(VALIDATION_EPOCH, n, config.batch_size)]


def _resume(out: Path, trainer: _Trainer, fingerprint: str, phases: List[_Phase]) -> _Trainer:
    """``trainer`` (or the trainer of the saved phase) loaded with ``out``'s last checkpoint, if
    there is one and it matches; else raise. Without a checkpoint, ``trainer`` itself."""
    state = _load_last(out, trainer.device)
    if state is None:
        return trainer
    config = trainer.config
    saved = TrainConfig.from_dict(state["config"]) if "config" in state else TrainConfig.load(out / CONFIG_FILE)
    problems = changed_settings(saved, config)
    saved_world = int(state.get("world_size", trainer.world_size))
    if saved_world != trainer.world_size:  # the fingerprint covers the sharding: say it plainly
        problems.append(f"it ran on {saved_world} processes, now {trainer.world_size} (the steps of an "
                        f"epoch and the shards depend on it): set the number of processes back to "
                        f"{saved_world}")
    elif state.get("data", fingerprint) != fingerprint:
        problems.append("the particles (their number, box, ids, amplitudes, poses or CTFs) or the reference "
                        "differ from those it was trained on")
    if problems:
        raise ValueError(f"Cannot continue the training in {out}: " + "; ".join(problems) + ". Set the "
                         "settings back to continue it, or train anew (Restart the protocol, or train "
                         "into another folder).")
    phase = int(state.get("phase", 0))
    if phase != trainer.phase.index:
        trainer = _Trainer(config, trainer.data, trainer.train_idx, trainer.val_idx, trainer.device,
                           trainer.world_size, trainer.rank, phases[phase], int(state["phase_start"]),
                           trainer.simulator, trainer.val_batches, trainer.model)
    trainer.load_state_dict(state)
    trainer.rows = [r for r in _read_metrics(out / METRICS_FILE) if r["epoch"] < trainer.next_epoch]
    best = out / BEST_FILE
    if math.isfinite(trainer.best_val):
        try:
            load_checkpoint(best, "cpu")
        except (CheckpointError, FileNotFoundError) as err:
            if getattr(err, "unsafe", False):
                raise ValueError(f"Cannot continue the training: {err}. Delete it and Restart.") from None
            logger.warning("%s: the best weights so far are lost; the next epoch writes %s anew",
                           err, BEST_FILE)
            trainer.best_val = math.inf
    logger.info("Resuming %s at epoch %d (best validation loss %.4g)", out, trainer.next_epoch,
                trainer.best_val)
    return trainer


def _save_epoch(out: Path, trainer: _Trainer, improved: bool, fingerprint: str, columns: List[str]) -> None:
    """best.pt (when improved), last.pt (the previous one kept as last.previous.pt), metrics.csv."""
    model = trainer.model.state_dict()
    epoch = trainer.next_epoch - 1
    if improved:
        save_checkpoint({"model": model, "epoch": epoch, "val_loss": float(trainer.best_val)}, out / BEST_FILE)
    state = trainer.state_dict()
    state.update(config=_plain(asdict(trainer.config)), data=fingerprint, world_size=trainer.world_size)
    save_checkpoint(state, out / LAST_FILE, previous=out / PREVIOUS_FILE)
    _write_metrics(out / METRICS_FILE, trainer.rows, columns)


def train(images, amplitudes: Optional[np.ndarray], particle_ids: np.ndarray, out_dir: Union[str, os.PathLike],
          config: TrainConfig, device: Union[str, torch.device] = "cpu", seed: int = 0,
          resume: bool = False, progress: Optional[Progress] = None,
          poses: Optional[Tuple[np.ndarray, np.ndarray]] = None, ctf: CtfLike = None,
          world_size: int = 1, rank: int = 0, reference: Optional[Reference] = None,
          particle_ctf: Optional[CTFParams] = None) -> List[dict]:
    """Train a DeepHEMNMA network and write a model directory ``out_dir``.

    images: (M, N, N) array, list of (stack path, 0-based index) pairs, or an
    image source (see ``dataset``); images with NaN/infinite pixels or
    constant images are refused (ValueError naming their particle ids).
    amplitudes: (M, K) in Å, columns in the order of ``config.modes`` (None
    only with ``config.data == "simulated"``: then validation is simulated).
    particle_ids: (M,) split key (images of one
    particle never straddle training and validation). poses: ``(angles_deg
    (M, 3), shifts_px (M, 2))``, required when ``config.predict_pose`` on
    particles; with simulation they give the shift range.
    ctf: optional phase flipping: ``ctf.CTFParams`` with one entry per image
    (evaluated at ``config.pixel_size``), precomputed CTFs (M, N, N // 2 + 1)
    in rfft2 layout, or a callable (see ``dataset.ctf_batch``).
    reference: the structure and modes simulated from (``config.data`` other
    than "particles"); particle_ctf: the particles' CTFs the simulator draws from
    (default: ``ctf`` when it is a CTFParams; None: simulated images without CTF).
    seed: split, initialisation, shuffling, augmentation and the simulated stream (reproducible).
    resume: continue from ``out_dir/last.pt`` if present (next epoch; a
    damaged last.pt falls back to last.previous.pt). Refused (ValueError
    saying what changed) when the data or a setting other than
    :data:`RESUMABLE_SETTINGS` differs. progress: :data:`~continuousflex_dl.core.progress.Progress`,
    (epochs done, epochs, the epoch's log line) after each epoch (its metrics: ``metrics.csv``).
    world_size/rank: data-parallel training: each rank takes a disjoint shard of every
    epoch and ``config.batch_size / world_size`` images of each step (the batch size is
    global, so must be a multiple of world_size); only rank 0 writes files. With an
    initialised ``torch.distributed`` group (see ``distributed.train_distributed``) the
    network is wrapped in DDP and the metrics are summed over the ranks; a run continues
    only with the world size it was started with.
    Returns the metrics rows of all epochs so far (see ``METRICS_COLUMNS``).
    """
    from ... import __version__
    device = torch.device(device)
    config = replace(config, seed=int(seed), phase_flip=ctf is not None)
    data = _check_inputs(images, amplitudes, particle_ids, config, poses, ctf, reference, particle_ctf,
                         world_size, rank)
    out = Path(out_dir)
    writer = rank == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    config = replace(config, modes=[int(k) for k in config.modes], image_size=data.source.image_size,
                     n_outputs=len(config.modes) + (8 if config.predict_pose else 0), version=__version__)
    train_idx = val_idx = None
    if data.amplitudes is not None:
        train_idx, val_idx = split_by_particle(data.particle_ids, config.val_fraction, seed)
    simulator = val_batches = None
    if config.simulates:
        simulator, fitted = _make_simulator(config, data, train_idx, device)
        config = replace(config, simulation=_plain(fitted))
    config = _fit_stats(config, data, train_idx, simulator)
    if simulator is not None and val_idx is None:
        val_batches = _simulated_validation(config, simulator, device)
    phases = _phases(config)
    trainer = _Trainer(config, data, train_idx, val_idx, device, world_size, rank, phases[0],
                       simulator=simulator, val_batches=val_batches)
    fingerprint = data.fingerprint(config, world_size)
    if resume:
        trainer = _resume(out, trainer, fingerprint, phases)
    if writer:
        config.save(out / CONFIG_FILE)
    columns = METRICS_COLUMNS + (POSE_METRICS_COLUMNS if config.predict_pose else [])
    n_val = len(val_idx) if val_idx is not None else sum(len(x) for x, _ in val_batches)
    logger.info("Training on %s, validating on %d %s images; %d modes %s, %s",
                " then ".join(f"{p.epochs} epochs of {config.sim_images} new simulated images"
                              if p.source == "simulated" else
                              f"{p.epochs} epochs of {len(train_idx)} images "
                              f"({len(np.unique(data.particle_ids[train_idx]))} particles)" for p in phases),
                n_val, "held-out particle" if val_idx is not None else "simulated", config.n_modes,
                config.modes, device)
    total = sum(p.epochs for p in phases)
    while True:
        while not trainer.done:
            epoch = trainer.next_epoch
            t0 = time.perf_counter()
            row = trainer.train_epoch(epoch)
            row.update(trainer.evaluate())
            row["seconds"] = time.perf_counter() - t0
            improved = trainer.end_epoch(row)
            if writer:
                _save_epoch(out, trainer, improved, fingerprint, columns)
            extra = ""
            if config.predict_pose:
                extra = f" val_angle {row['val_angle_deg']:.2f} deg val_shift {row['val_shift_px']:.2f} px"
            line = (f"epoch {epoch}/{total} ({trainer.phase.source}) train_loss {row['train_loss']:.4f} "
                    f"val_loss {row['val_loss']:.4f} val_mae {row['val_mae']:.3f} Å{extra} lr {row['lr']:.2e} "
                    f"{row['images_per_s']:.1f} images/s")
            logger.info("%s", line)
            report(progress, epoch, total, line)
            if trainer.stopped_early:
                logger.info("Early stopping after epoch %d: no validation improvement in %d epochs",
                            epoch, config.patience)
        if trainer.phase.index + 1 >= len(phases):
            break
        trainer = trainer.next_phase(phases[trainer.phase.index + 1])
        logger.info("Fine-tuning on the particles' amplitudes from epoch %d (learning rate %.2e)",
                    trainer.next_epoch, trainer.phase.lr)
    return trainer.rows


@torch.no_grad()
def _validate(model, config, batches, targets, loss_fn, device, use_amp, combine=None) -> dict:
    """Loss, amplitude MAE (Å) [and pose errors] of ``model`` over (prepared images, labels) batches.
    combine: None, or a function summing the list of error sums and the image count over ranks."""
    model.eval()
    total, abs_err, ang_err, shift_err, n = 0.0, 0.0, 0.0, 0.0, 0
    for x, labels in batches:
        with _autocast(device, use_amp):
            pred = model(x)
        total += float(loss_fn(pred, targets.encode(labels, None).to(device))) * len(x)
        dec = _decode(config, pred)
        abs_err += float(np.abs(dec["amplitudes"] - labels.amplitudes).mean(axis=1).sum())
        if config.predict_pose:
            ang_err += float(angular_distance_deg(dec["matrices"], euler_to_matrix(labels.angles)).sum())
            shift_err += float(np.linalg.norm(dec["shifts"] - labels.shifts, axis=1).sum())
        n += len(x)
    if combine is not None:
        total, abs_err, ang_err, shift_err, n = combine([total, abs_err, ang_err, shift_err, n])
    res = {"val_loss": total / n, "val_mae": abs_err / n}
    if config.predict_pose:
        res.update(val_angle_deg=ang_err / n, val_shift_px=shift_err / n)
    return res


def load_model(model_dir: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> LoadedModel:
    """Load ``model_dir/config.json`` and ``model_dir/best.pt`` into an eval-mode network.

    Raises ValueError naming the file when it is missing, damaged or holds
    anything but tensors and plain values (loaded with ``weights_only=True``).
    """
    model_dir = Path(model_dir)
    cfg_path, weights = model_dir / CONFIG_FILE, model_dir / BEST_FILE
    if not cfg_path.exists() or not weights.exists():
        raise ValueError(f"{model_dir} is not a trained DeepHEMNMA model (needs {CONFIG_FILE} and {BEST_FILE}).")
    config = TrainConfig.load(cfg_path)
    device = torch.device(device)
    model = build_model(config.n_modes, config.predict_pose, config.architecture, config.hidden,
                        config.dropout)
    try:
        state = load_checkpoint(weights, device)
    except CheckpointError as err:
        raise ValueError(f"Cannot load the trained model: {err}. Train it again (Restart the training "
                         "protocol).") from None
    model.load_state_dict(state["model"])
    return LoadedModel(model.to(device).eval(), config, device)


@torch.no_grad()
def predict(model: Union[LoadedModel, str, os.PathLike], images, batch_size: int = 64,
            device: Union[str, torch.device, None] = None, ctf: CtfLike = None,
            return_pose: bool = False, progress: Optional[Progress] = None,
            bfloat16: bool = False, rotations: int = 1, ids: Optional[np.ndarray] = None):
    """Amplitudes (and optionally poses) of new particle images.

    model: a :class:`LoadedModel` or a model directory. images: as in
    :func:`train`; they must have the model's ``image_size`` (and pixel size).
    ctf: phase flipping as in :func:`train` (use it if the model was trained with it). Preprocessing
    and target statistics are the ones saved with the model.
    Returns amplitudes (M, K) in Å (columns = ``config.modes``), or with
    ``return_pose`` a tuple ``(amplitudes, angles_deg (M, 3), shifts_px (M, 2))``.
    progress: :data:`~continuousflex_dl.core.progress.Progress`, (images done, total, message)
    after each batch.
    bfloat16: run the network in bfloat16 autocast on CPU too (about twice as
    fast on CPUs with AVX512-BF16/AMX; amplitudes then differ by ~1e-2 of their
    spread). On CUDA, mixed precision follows ``config.amp``.
    rotations: average the amplitudes over this many in-plane rotations of
    each image (0, 360/R, ... degrees; test-time augmentation, R times the
    work), for models trained with ``augment_rotation``. Poses come from the
    unrotated image.
    ids: (M,) particle ids named when images are refused (NaN or infinite
    pixels, constant images: ValueError; None names 0-based indices).
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
    check_images(source, ids, "predicting")
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
                                  config.normalization, ctf, None, model.device, config.pixel_size,
                                  config.window_px):
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
        report(progress, done, m, f"predicted {done}/{m} images")
    if not np.all(np.isfinite(amps)):
        raise ValueError(f"The model gave non-finite amplitudes for {int((~np.isfinite(amps)).any(1).sum())} "
                         "images: its weights are damaged; train it again.")
    return (amps, ang, sh) if return_pose else amps
