"""A training run: the inputs checked, the source's plan, the epochs, the model folder written, resume."""
from __future__ import annotations

import logging
import math
import os
import time
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from ...imaging.ctf import CTFParams
from ...imaging.dataset import CtfLike, as_image_source, check_images
from ...modes.reference import Reference
from ...progress import Progress, report
from .config import TrainConfig, changed_settings
from .model_folder import ModelFolder
from .sources import SOURCES, source_of
from .sources.base import DataSource, TrainingData
from .trainer import Trainer

logger = logging.getLogger(__name__)

__all__ = ["train", "split_by_particle"]


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


def _check_inputs(images, amplitudes: Optional[np.ndarray], particle_ids: np.ndarray, config: TrainConfig,
                  source: DataSource, poses: Optional[Tuple[np.ndarray, np.ndarray]], ctf: CtfLike,
                  reference: Optional[Reference], particle_ctf: Optional[CTFParams],
                  world_size: int, rank: int) -> TrainingData:
    """Shapes, values and settings of :func:`train`, checked (then the source's own checks);
    raises ValueError with the fix."""
    images = as_image_source(images)
    m, k = len(images), config.model.n_modes
    if amplitudes is None:
        if source.needs_amplitudes:
            without = ", ".join(f"source={s.name!r}" for s in SOURCES.values() if not s.needs_amplitudes)
            raise ValueError(f"Training on {source.name!r} needs the particles' amplitudes; without them, "
                             f"train on simulated particles only ({without}).")
    else:
        amplitudes = np.asarray(amplitudes, dtype=np.float64)
        if amplitudes.ndim == 1:
            amplitudes = amplitudes[:, None]
        if amplitudes.shape != (m, k):
            raise ValueError(f"Amplitudes must be (number of images, number of modes) = ({m}, {k}), got "
                             f"{amplitudes.shape}.")
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
    if config.model.predict_pose and poses is None and amplitudes is not None:  # particles' labels are used
        raise ValueError("predict_pose needs poses=(angles_deg (M, 3), shifts_px (M, 2)).")
    if config.preprocessing.pose_normalise:
        if poses is None:
            raise ValueError("Pose normalisation turns and centres every image by its pose: give the particles' "
                             "poses=(angles_deg (M, 3), shifts_px (M, 2)), or train without it.")
        if config.model.predict_pose:
            raise ValueError("Pose normalisation takes the poses as given: it cannot be combined with pose "
                             "prediction.")
        if config.optimiser.augment_rotation:
            raise ValueError("Pose normalisation turns every image to psi = 0; in-plane rotation augmentation "
                             "would undo it: use one or the other.")
    if particle_ctf is None and isinstance(ctf, CTFParams):
        particle_ctf = ctf
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size}).")
    o = config.optimiser
    if o.batch_size % world_size:
        raise ValueError(f"The batch size ({o.batch_size}) is the images of one step over all "
                         f"{world_size} processes: make it a multiple of {world_size}.")
    config.preprocessing.check(images.image_size)
    if o.epochs < 1 or o.batch_size < 1:
        raise ValueError("epochs and batch_size must be positive.")
    data = TrainingData(images, amplitudes, particle_ids, angles, shifts, ctf, reference, particle_ctf)
    source.check(config, data)
    check_images(images, particle_ids, "training")
    return data


def _resume(folder: ModelFolder, trainer: Trainer, fingerprint: str, phases) -> Trainer:
    """``trainer`` (or the trainer of the saved phase) loaded with the folder's last checkpoint, if
    there is one and it matches; else raise. Without a checkpoint, ``trainer`` itself."""
    state = folder.load_last(trainer.device)
    if state is None:
        return trainer
    config = trainer.config
    saved = TrainConfig.from_dict(state["config"]) if "config" in state else TrainConfig.load(folder.config)
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
        raise ValueError(f"Cannot continue the training in {folder.path}: " + "; ".join(problems) + ". Set "
                         "the settings back to continue it, or train anew (Restart the protocol, or train "
                         "into another folder).")
    phase = int(state.get("phase", 0))
    if phase != trainer.phase.index:
        trainer = trainer.for_phase(phases[phase], int(state["phase_start"]))
    trainer.load_state_dict(state)
    trainer.rows = [r for r in folder.read_metrics() if r["epoch"] < trainer.next_epoch]
    if math.isfinite(trainer.best_val) and not folder.best_is_sound():
        trainer.best_val = math.inf
    logger.info("Resuming %s at epoch %d (best validation loss %.4g)", folder.path, trainer.next_epoch,
                trainer.best_val)
    return trainer


def _save_epoch(folder: ModelFolder, trainer: Trainer, improved: bool, fingerprint: str) -> None:
    """best.pt (when improved), last.pt (the previous one kept as last.previous.pt), metrics.csv."""
    if improved:
        folder.save_best(trainer.model.state_dict(), trainer.next_epoch - 1, trainer.best_val)
    state = trainer.state_dict()
    state.update(config=trainer.config.to_dict(), data=fingerprint, world_size=trainer.world_size)
    folder.save_last(state)
    folder.write_metrics(trainer.rows, trainer.config.model.predict_pose)


def train(images, amplitudes: Optional[np.ndarray], particle_ids: np.ndarray, out_dir: Union[str, os.PathLike],
          config: TrainConfig, device: Union[str, torch.device] = "cpu", seed: int = 0,
          resume: bool = False, progress: Optional[Progress] = None,
          poses: Optional[Tuple[np.ndarray, np.ndarray]] = None, ctf: CtfLike = None,
          world_size: int = 1, rank: int = 0, reference: Optional[Reference] = None,
          particle_ctf: Optional[CTFParams] = None) -> List[dict]:
    """Train a DeepHEMNMA network and write a model folder ``out_dir`` (see :mod:`.model_folder`).

    images: (M, N, N) array, list of (stack path, 0-based index) pairs, or an
    image source (see ``dataset``); images with NaN/infinite pixels or
    constant images are refused (ValueError naming their particle ids).
    amplitudes: (M, K) in Å, columns in the order of ``config.model.modes`` (None
    only with a source that does not need them, e.g. "simulated": then validation is simulated).
    particle_ids: (M,) split key (images of one particle never straddle training and
    validation; about ``val_fraction`` of the particles are held out). poses: ``(angles_deg
    (M, 3), shifts_px (M, 2))``, required when ``predict_pose`` on particles; with simulation
    they give the shift range.
    ctf: optional phase flipping: ``ctf.CTFParams`` with one entry per image
    (evaluated at the pixel size), precomputed CTFs (M, N, N // 2 + 1)
    in rfft2 layout, or a callable (see ``dataset.ctf_batch``).
    reference: the structure and modes simulated from (sources that simulate); particle_ctf:
    the particles' CTFs the simulator draws from (default: ``ctf`` when it is a CTFParams;
    None: simulated images without CTF).
    seed: split, initialisation, shuffling, augmentation and the simulated stream (reproducible).
    resume: continue from ``out_dir/last.pt`` if present (next epoch; a
    damaged last.pt falls back to last.previous.pt). Refused (ValueError
    saying what changed) when the data or a setting other than
    ``RESUMABLE_SETTINGS`` differs. progress: :data:`~continuousflex_dl.core.progress.Progress`,
    (epochs done, epochs, the epoch's log line) after each epoch (its metrics: ``metrics.csv``).
    world_size/rank: data-parallel training: each rank takes a disjoint shard of every
    epoch and ``batch_size / world_size`` images of each step (the batch size is
    global, so must be a multiple of world_size); only rank 0 writes files. With an
    initialised ``torch.distributed`` group (see ``distributed.train_distributed``) the
    network is wrapped in DDP and the metrics are summed over the ranks; a run continues
    only with the world size it was started with.
    Returns the metrics rows of all epochs so far (see ``METRICS_COLUMNS``).
    """
    from .... import __version__
    device = torch.device(device)
    config = config.replace(seed=int(seed), phase_flip=ctf is not None)
    source = source_of(config)
    data = _check_inputs(images, amplitudes, particle_ids, config, source, poses, ctf, reference, particle_ctf,
                         world_size, rank)
    folder = ModelFolder(out_dir)
    writer = rank == 0
    if writer:
        folder.path.mkdir(parents=True, exist_ok=True)
    config = config.replace(modes=[int(k) for k in config.model.modes], image_size=data.source.image_size,
                            n_outputs=config.model.n_outputs, version=__version__)
    train_idx = val_idx = None
    if data.amplitudes is not None:
        train_idx, val_idx = split_by_particle(data.particle_ids, config.optimiser.val_fraction, seed)
    plan = source.plan(config, data, train_idx, device)
    config = plan.config
    phases = source.phases(config)
    trainer = Trainer(config, data, plan, val_idx, device, world_size, rank, phases[0])
    fingerprint = source.fingerprint(data, config, world_size)
    if resume:
        trainer = _resume(folder, trainer, fingerprint, phases)
    if writer:
        folder.write_config(config)
    n_val = len(val_idx) if val_idx is not None else sum(len(x) for x, _ in plan.validation)
    logger.info("Training on %s, validating on %d %s images; %d modes %s, %s",
                " then ".join(_describe_phase(p, plan) for p in phases), n_val,
                "held-out particle" if val_idx is not None else "simulated", config.model.n_modes,
                config.model.modes, device)
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
                _save_epoch(folder, trainer, improved, fingerprint)
            extra = ""
            if config.model.predict_pose:
                extra = f" val_angle {row['val_angle_deg']:.2f} deg val_shift {row['val_shift_px']:.2f} px"
            line = (f"epoch {epoch}/{total} ({trainer.phase.stream}) train_loss {row['train_loss']:.4f} "
                    f"val_loss {row['val_loss']:.4f} val_mae {row['val_mae']:.3f} Å{extra} lr {row['lr']:.2e} "
                    f"{row['images_per_s']:.1f} images/s")
            logger.info("%s", line)
            report(progress, epoch, total, line)
            if trainer.stopped_early:
                logger.info("Early stopping after epoch %d: no validation improvement in %d epochs",
                            epoch, config.optimiser.patience)
        if trainer.phase.index + 1 >= len(phases):
            break
        trainer = trainer.next_phase(phases[trainer.phase.index + 1])
        logger.info("Next phase from epoch %d: %s (learning rate %.2e)", trainer.next_epoch,
                    _describe_phase(trainer.phase, plan), trainer.phase.lr)
    return trainer.rows



def _describe_phase(phase, plan) -> str:
    """'3 epochs of 6000 new simulated images', '10 epochs of 270 images (135 particles)'."""
    return f"{phase.epochs} epochs of {plan.streams[phase.stream].describe()}"
