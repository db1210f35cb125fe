"""Training-data sources by name (``DataConfig.source``): one module each, one line each below.

To add a source: write a module with a :class:`~.base.DataSource` subclass (its name, label,
phases and plan; see :mod:`.base`) and add one line to :data:`SOURCES`.
"""
from __future__ import annotations

from typing import Dict

from ..config import TrainConfig
from .base import DataSource
from .finetune import FinetuneSource
from .particles import ParticlesSource
from .simulated import SimulatedSource

__all__ = ["SOURCES", "DATA_CHOICES", "source_of", "DataSource"]

#: The training-data sources, in the order the training protocol lists them.
SOURCES: Dict[str, DataSource] = {s.name: s for s in (
    ParticlesSource(),
    SimulatedSource(),
    FinetuneSource(),
)}
#: The names of the sources (``DataConfig.source`` values).
DATA_CHOICES = tuple(SOURCES)


def source_of(config: TrainConfig) -> DataSource:
    """The source ``config`` trains on; ValueError naming the known ones."""
    try:
        return SOURCES[config.data.source]
    except KeyError:
        raise ValueError(f"Unknown training data {config.data.source!r}; choose one of "
                         f"{', '.join(SOURCES)}.") from None
