"""A trained model's folder: the one owner of its file names, its checkpoint I/O and :func:`load_model`.

A model folder holds everything needed to predict and to continue a training:

* ``config.json``: the :class:`~.config.TrainConfig`, one object per section,
* ``best.pt``: the weights with the lowest validation loss,
* ``last.pt``: the last epoch's weights, optimizer, scheduler and gradient-scaler states,
  the training phase and the epoch it started at, the config and a fingerprint of the
  training data and reference (resume); ``last.previous.pt``: the epoch before (fallback),
* ``metrics.csv``: one row per epoch (:data:`METRICS_COLUMNS` [+ :data:`POSE_METRICS_COLUMNS`]).

Every file is written to a temporary name in the same folder and then ``os.replace``-d, so
a kill leaves the previous complete file. Checkpoints hold only tensors and plain values and
are loaded with ``torch.load(weights_only=True)``, which refuses anything that could run code.
Protocols and scripts name these files through :class:`ModelFolder`, never by hand.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Union

import torch

from ..resnet import DeepHEMNMANet
from .config import TrainConfig
from .sources import source_of

logger = logging.getLogger(__name__)

__all__ = ["ModelFolder", "LoadedModel", "CheckpointError", "load_model", "best_epoch", "save_checkpoint",
           "load_checkpoint", "replace_file", "METRICS_COLUMNS", "POSE_METRICS_COLUMNS"]

PathLike = Union[str, os.PathLike]
#: metrics.csv: one row per epoch; "phase": the stream it trained on (a phase's ``stream``).
METRICS_COLUMNS = ["epoch", "phase", "train_loss", "val_loss", "val_mae", "lr", "images_per_s", "seconds"]
POSE_METRICS_COLUMNS = ["val_angle_deg", "val_shift_px"]


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


def replace_file(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, then os.replace."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _write_synced(tmp, lambda fh: fh.write(data))
    os.replace(tmp, path)


def save_checkpoint(state: dict, path: PathLike, previous: Optional[PathLike] = None) -> None:
    """Save ``state`` (tensors and plain values only) to ``path`` atomically.

    The file is written to ``path + '.tmp'`` in the same folder, synced and
    renamed over ``path``, so ``path`` is always a complete checkpoint.
    previous: first move the current ``path`` there (the fallback of a resumed training).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _write_synced(tmp, lambda fh: torch.save(state, fh))
    if previous is not None and path.exists():
        os.replace(path, previous)
    os.replace(tmp, path)


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu") -> dict:
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


class _File:
    """A file of a model folder by its role: ``folder.best`` is the path, ``ModelFolder.best.name`` the name."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, folder, owner):
        return self if folder is None else folder.path / self.name


class ModelFolder:
    """The files of a model folder (see the module docstring), by role."""
    config, best, last = _File("config.json"), _File("best.pt"), _File("last.pt")
    previous, metrics = _File("last.previous.pt"), _File("metrics.csv")

    def __init__(self, path: PathLike):
        self.path = Path(path)

    def is_trained(self) -> bool:
        """Whether the folder has a config and best weights (what prediction needs)."""
        return self.config.exists() and self.best.exists()

    def stamp(self) -> str:
        """What identifies the trained model's files now: path, size and modification time of its
        config and best weights (a continued training changes it)."""
        parts = []
        for path in (self.config, self.best):
            path = Path(os.path.abspath(path))
            st = os.stat(path) if path.exists() else None
            parts.append(f"{path}:{st.st_size}@{st.st_mtime_ns}" if st else f"{path}:missing")
        return ";".join(parts)

    def weights_stamp(self) -> str:
        """The best weights' path and modification time ('@0' before training)."""
        path = os.path.abspath(self.best)
        return f"{path}@{os.path.getmtime(path) if os.path.exists(path) else 0}"

    # ------------------------------------------------------------------ config and metrics
    def read_config(self) -> Optional[TrainConfig]:
        """The saved config, or None before training."""
        return TrainConfig.load(self.config) if self.config.exists() else None

    def write_config(self, config: TrainConfig) -> None:
        replace_file(self.config, json.dumps(config.to_dict(), indent=2).encode())

    def read_metrics(self) -> List[dict]:
        """The metrics rows (epoch an int, phase a string, the rest floats); [] before the first epoch."""
        if not self.metrics.exists():
            return []
        with open(self.metrics, newline="") as fh:
            rows = list(csv.DictReader(fh))
        return [{k: (int(v) if k == "epoch" else v if k == "phase" else float(v)) for k, v in r.items()
                 if v not in (None, "")} for r in rows]

    def write_metrics(self, rows: List[dict], pose: bool) -> None:
        """metrics.csv of ``rows`` (with the pose columns when the model predicts poses)."""
        columns = METRICS_COLUMNS + (POSE_METRICS_COLUMNS if pose else [])
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        replace_file(self.metrics, text.getvalue().encode())

    # ------------------------------------------------------------------ checkpoints
    def save_best(self, model_state: dict, epoch: int, val_loss: float) -> None:
        save_checkpoint({"model": model_state, "epoch": epoch, "val_loss": float(val_loss)}, self.best)

    def save_last(self, state: dict) -> None:
        """``last.pt``, the one before kept as ``last.previous.pt``."""
        save_checkpoint(state, self.last, previous=self.previous)

    def load_last(self, device: Union[str, torch.device]) -> Optional[dict]:
        """The newest loadable of ``last.pt`` and ``last.previous.pt`` (None: neither exists).

        A damaged ``last.pt`` falls back to ``last.previous.pt`` with a warning;
        an unsafe file, or no loadable file, raises ValueError saying what to do.
        """
        problems, damaged = [], []
        for path in (self.last, self.previous):
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

    def best_is_sound(self) -> bool:
        """Whether ``best.pt`` loads; an unsafe file raises ValueError (delete it and Restart)."""
        try:
            load_checkpoint(self.best, "cpu")
        except (CheckpointError, FileNotFoundError) as err:
            if getattr(err, "unsafe", False):
                raise ValueError(f"Cannot continue the training: {err}. Delete it and Restart.") from None
            logger.warning("%s: the best weights so far are lost; the next epoch writes %s anew", err, self.BEST)
            return False
        return True


@dataclass
class LoadedModel:
    """A trained network in eval mode with its configuration."""
    model: DeepHEMNMANet
    config: TrainConfig
    device: torch.device


def load_model(model_dir: PathLike, device: Union[str, torch.device] = "cpu") -> LoadedModel:
    """The network of a model folder, rebuilt from its files alone (config.json's ``model``
    section, ``best.pt``'s weights), in eval mode on ``device``.

    Raises ValueError naming the file when it is missing, damaged or holds
    anything but tensors and plain values (loaded with ``weights_only=True``).
    """
    folder = ModelFolder(model_dir)
    if not folder.is_trained():
        raise ValueError(f"{folder.path} is not a trained DeepHEMNMA model (needs {folder.config.name} and "
                         f"{folder.best.name}).")
    config = TrainConfig.load(folder.config)
    device = torch.device(device)
    model = config.model.build()
    try:
        state = load_checkpoint(folder.best, device)
    except CheckpointError as err:
        raise ValueError(f"Cannot load the trained model: {err}. Train it again (Restart the training "
                         "protocol).") from None
    model.load_state_dict(state["model"])
    return LoadedModel(model.to(device).eval(), config, device)


def best_epoch(model_dir: PathLike) -> Optional[dict]:
    """The metrics row of the weights kept in ``best.pt`` (the lowest validation loss) of a
    trained model folder, with ``"source"``: the stream that epoch trained on (a phase's
    ``stream``, e.g. "simulated" or "particles"); None before the first epoch."""
    folder = ModelFolder(model_dir)
    rows = folder.read_metrics()
    if not rows:
        return None
    best = dict(min(rows, key=lambda r: r["val_loss"]))
    if "phase" in best:
        best["source"] = best["phase"]
        return best
    config = TrainConfig.load(folder.config)  # a metrics.csv of 0.2, without the phase column
    end = 0
    for phase in source_of(config).phases(config):
        end += phase.epochs
        best["source"] = phase.stream
        if best["epoch"] <= end:
            break
    return best
