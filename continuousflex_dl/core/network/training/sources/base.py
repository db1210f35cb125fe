"""The interface of a training-data source, and what every source shares.

A *data source* (one module each in this package, registered in ``sources.SOURCES`` under
its :attr:`DataSource.name`, the value of ``DataConfig.source``) says what a training run
learns from. It checks its own inputs (:meth:`DataSource.check`), splits the run into
phases (:meth:`DataSource.phases`: so many epochs of a named *stream* at a peak learning
rate) and, once the inputs are checked, fits what it needs to the data and opens its streams
(:meth:`DataSource.plan`). The trainer asks a phase's stream for the batches of an epoch;
it never asks which source it trains on.

Streams yield ``(prepared images (B, 1, w, w) tensor, Labels)`` batches, prepared by the
model's one :class:`~...imaging.dataset.Preprocessing`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ....imaging.ctf import CTFParams
from ....imaging import dataset
from ....imaging.dataset import CtfLike
from ....modes.reference import Reference
from ..config import TrainConfig

__all__ = ["Labels", "TrainingData", "Phase", "Stream", "Plan", "DataSource", "particle_batches",
           "fit_label_statistics"]

Batch = Tuple[torch.Tensor, "Labels"]


@dataclass
class Labels:
    """The truth of a batch: amplitudes (B, K) Å [, angles (B, 3) deg, shifts (B, 2) px]."""
    amplitudes: np.ndarray
    angles: Optional[np.ndarray] = None
    shifts: Optional[np.ndarray] = None


@dataclass
class TrainingData:
    """The checked inputs of ``train``: the particles and what simulation needs."""
    source: object                    # image source (see dataset), M images of N px
    amplitudes: Optional[np.ndarray]  # (M, K) Å; None: simulated training without labels
    particle_ids: np.ndarray          # (M,)
    angles: Optional[np.ndarray]      # (M, 3) degrees, when poses are given
    shifts: Optional[np.ndarray]      # (M, 2) px, when poses are given
    ctf: CtfLike                      # phase flipping
    reference: Optional[Reference]    # simulation
    particle_ctf: Optional[CTFParams]  # the particles' CTFs, for simulation

    def labels(self, idx: np.ndarray) -> Labels:
        return Labels(self.amplitudes[idx], None if self.angles is None else self.angles[idx],
                      None if self.shifts is None else self.shifts[idx])


def particle_batches(data: TrainingData, config: TrainConfig, indices: np.ndarray, batch_size: int,
                     device: torch.device) -> Iterator[Batch]:
    """The particles ``indices`` (in that order) as prepared batches with their labels."""
    poses = (data.angles, data.shifts) if config.preprocessing.pose_normalise else None
    for idx, x in dataset.iterate_batches(data.source, indices, batch_size, config.preprocessing, data.ctf, None,
                                          device, poses):
        yield x, data.labels(idx)


def fit_label_statistics(config: TrainConfig, mean: np.ndarray, std: np.ndarray, shift_rms: float) -> TrainConfig:
    """``config`` with the target standardisation: amplitudes' ``mean``/``std`` (K,) Å (a std
    below 1e-8 becomes 1), shifts divided by their RMS ``shift_rms`` px when poses are predicted."""
    std = np.where(std > 1e-8, std, 1.0)
    shift_scale = shift_rms if config.model.predict_pose and shift_rms > 1e-6 else 1.0
    return config.replace(target_mean=np.asarray(mean).tolist(), target_std=np.asarray(std).tolist(),
                          shift_scale=shift_scale)


@dataclass(frozen=True)
class Phase:
    """One stage of a training run: ``epochs`` epochs of the stream named ``stream`` (a key of
    :attr:`Plan.streams`, named in the log and in ``best_epoch``) at peak ``lr``."""
    index: int
    stream: str
    epochs: int
    lr: float


class Stream:
    """The training images of an epoch: a new simulated set, or a pass over the training split."""

    def images_per_epoch(self) -> int:
        """Images of one epoch over all ranks (sets the steps of a per-batch schedule)."""
        raise NotImplementedError

    def describe(self) -> str:
        """The images of an epoch, for the log ('6000 new simulated images')."""
        raise NotImplementedError

    def batches(self, trainer, epoch: int, rng: np.random.Generator) -> Iterator[Batch]:
        """This rank's batches of ``epoch`` (``trainer``: world_size, rank, rank_batch, device,
        start, config); ``rng`` is the epoch's generator (seed, epoch), shared with augmentation."""
        raise NotImplementedError


@dataclass
class Plan:
    """What a source made of the checked data: ``config`` with its fitted values, the streams
    its phases name, and a fixed ``validation`` set of batches (None: the held-out particles)."""
    config: TrainConfig
    streams: Dict[str, Stream]
    validation: Optional[List[Batch]] = None


class DataSource:
    """A kind of training data (see the module docstring). Subclasses set the class attributes
    and implement :meth:`phases` and :meth:`plan`; :meth:`check` adds their own input checks.

    name: the registry key (``DataConfig.source``). label: the protocol's choice text.
    needs_amplitudes: training needs the particles' amplitudes. simulates: it simulates from
    the reference structure and its modes (``train``'s ``reference``; the protocol asks for the
    normal modes). settings: the ``DataConfig`` fields it reads (the protocol shows them).
    """
    name: str = ""
    label: str = ""
    needs_amplitudes: bool = True
    simulates: bool = False
    settings: Tuple[str, ...] = ()

    def check(self, config: TrainConfig, data: TrainingData) -> None:
        """Raise ValueError saying what to change when ``data`` cannot feed this source."""

    def phases(self, config: TrainConfig) -> List[Phase]:
        raise NotImplementedError

    def plan(self, config: TrainConfig, data: TrainingData, train_idx: Optional[np.ndarray],
             device: torch.device) -> Plan:
        raise NotImplementedError

    def summary(self, config: TrainConfig) -> str:
        """One sentence on what a model trained on (from its saved config), for summaries."""
        return f"Training data: {self.name}."

    def methods(self, n_particles: int) -> str:
        """What the network was trained on, completing 'was trained ... epochs <this>'."""
        return f"on {n_particles} particles"

    def fingerprint(self, data: TrainingData, config: TrainConfig, world_size: int) -> str:
        """SHA-256 of what training results depend on besides the settings and the pixels
        (with simulation: the poses, the particles' CTFs and the reference too; with pose prediction or
        pose normalisation: the poses)."""
        invert = bool(getattr(data.source, "invert", False))   # images read with the opposite sign
        h = hashlib.sha256(f"{len(data.source)} {data.source.image_size} {world_size} {invert}".encode())
        h.update(repr(data.particle_ids.tolist()).encode())
        poses = config.model.predict_pose or self.simulates or config.preprocessing.pose_normalise
        for a in (data.amplitudes, data.angles if poses else None, data.shifts if poses else None):
            if a is not None:
                h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        for ctf in (data.ctf, data.particle_ctf if self.simulates else None):
            if isinstance(ctf, CTFParams):
                for a in (ctf.defocus_u, ctf.defocus_v, ctf.defocus_angle):
                    h.update(np.ascontiguousarray(np.asarray(a, dtype=np.float64)).tobytes())
        if self.simulates:
            ref = data.reference
            for a in (ref.coords, ref.modes, ref.sigma, ref.weights):
                if a is not None:
                    h.update(np.ascontiguousarray(np.asarray(a, dtype=np.float64)).tobytes())
        return h.hexdigest()
