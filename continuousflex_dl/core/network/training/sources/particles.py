"""Training on the particles' own images and amplitudes (HEMNMA's or ground truth), as in the paper."""
from __future__ import annotations

from typing import Iterator, List, Optional

import numpy as np
import torch

from ..config import TrainConfig
from .base import Batch, DataSource, Phase, Plan, Stream, TrainingData, fit_label_statistics, particle_batches

__all__ = ["ParticlesSource", "ParticleStream", "SOURCE"]


class ParticleStream(Stream):
    """Every epoch, the training split in a new order (seeded by seed and epoch); with several
    ranks, equal disjoint shards of it, so that all ranks run the same number of steps."""

    def __init__(self, data: TrainingData, train_idx: np.ndarray):
        self.data, self.train_idx = data, train_idx

    def images_per_epoch(self) -> int:
        return len(self.train_idx)

    def describe(self) -> str:
        n = len(np.unique(self.data.particle_ids[self.train_idx]))
        return f"{len(self.train_idx)} images ({n} particles)"

    def batches(self, trainer, epoch: int, rng: np.random.Generator) -> Iterator[Batch]:
        order = self.train_idx[rng.permutation(len(self.train_idx))]
        if trainer.world_size > 1:
            order = order[:len(order) - len(order) % trainer.world_size][trainer.rank::trainer.world_size]
        return particle_batches(self.data, trainer.config, order, trainer.rank_batch, trainer.device)


class ParticlesSource(DataSource):
    """One phase on the training split; targets standardised by its amplitudes (and shifts)."""
    name = "particles"
    label = "particles' amplitudes"

    def phases(self, config: TrainConfig) -> List[Phase]:
        return [Phase(0, "particles", config.optimiser.epochs, config.optimiser.learning_rate)]

    def plan(self, config: TrainConfig, data: TrainingData, train_idx: Optional[np.ndarray],
             device: torch.device) -> Plan:
        labels = data.labels(train_idx)
        rms = float(np.sqrt(np.mean(labels.shifts ** 2))) if labels.shifts is not None else 0.0
        config = fit_label_statistics(config, labels.amplitudes.mean(axis=0), labels.amplitudes.std(axis=0), rms)
        return Plan(config, {"particles": ParticleStream(data, train_idx)})

    def summary(self, config: TrainConfig) -> str:
        return "Training data: the particles' amplitudes."


SOURCE = ParticlesSource()
