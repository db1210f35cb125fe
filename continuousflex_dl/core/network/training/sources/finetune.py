"""The simulated stream first, then fine-tuning on the particles' amplitudes from the last
simulated weights (a new optimizer and schedule at ``finetune_lr``, by default a tenth of the
learning rate)."""
from __future__ import annotations

from typing import List

from ..config import TrainConfig
from .base import Phase, TrainingData
from .simulated import SimulatedSource

__all__ = ["FinetuneSource", "SOURCE"]


class FinetuneSource(SimulatedSource):
    """``epochs`` simulated epochs, then ``finetune_epochs`` on the particles' training split."""
    name = "simulated+finetune"
    label = "simulated, then fine-tuned on the particles"
    needs_amplitudes = True
    settings = SimulatedSource.settings + ("finetune_epochs", "finetune_lr")

    def check(self, config: TrainConfig, data: TrainingData) -> None:
        super().check(config, data)
        if config.data.finetune_epochs < 1:
            raise ValueError("Fine-tuning needs at least one epoch (finetune_epochs).")

    def phases(self, config: TrainConfig) -> List[Phase]:
        o, d = config.optimiser, config.data
        return super().phases(config) + [Phase(1, "particles", d.finetune_epochs,
                                               d.finetune_lr or o.learning_rate / 10)]

    def _then(self, config: TrainConfig) -> str:
        n = config.data.finetune_epochs
        return f", then {n} epoch{'s' * (n != 1)} fine-tuned on the particles"

    def methods(self, n_particles: int) -> str:
        return super().methods(n_particles) + ", then fine-tuned on their amplitudes"


SOURCE = FinetuneSource()
