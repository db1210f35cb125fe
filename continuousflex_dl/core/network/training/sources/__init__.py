"""Training-data sources by name (``DataConfig.source``): one module each, one registry line each.

To add a source: write a module of this package that defines ``SOURCE``, an instance of a
:class:`~.base.DataSource` subclass (its name, label, phases and plan; see :mod:`.base`),
and add the module's name to :data:`MODULES`.
"""
from __future__ import annotations

import importlib
from typing import Dict

from ..config import TrainConfig
from .base import DataSource

__all__ = ["MODULES", "SOURCES", "DATA_CHOICES", "source_of", "DataSource"]

#: The source modules, in the order the training protocol lists their sources.
MODULES = (
    "particles",
    "simulated",
    "finetune",
)
#: The training-data sources by name.
SOURCES: Dict[str, DataSource] = {}
for _module in MODULES:
    _source = importlib.import_module(f"{__name__}.{_module}").SOURCE
    SOURCES[_source.name] = _source
#: The names of the sources (``DataConfig.source`` values).
DATA_CHOICES = tuple(SOURCES)


def source_of(config: TrainConfig) -> DataSource:
    """The source ``config`` trains on; ValueError naming the known ones."""
    try:
        return SOURCES[config.data.source]
    except KeyError:
        raise ValueError(f"Unknown training data {config.data.source!r}; choose one of "
                         f"{', '.join(SOURCES)}.") from None
