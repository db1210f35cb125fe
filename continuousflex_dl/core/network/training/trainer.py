"""The trainer: network, optimizer, schedule and epoch counters of one phase of a training run."""
from __future__ import annotations

import math
import time
from typing import Callable, List, Optional

import numpy as np
import torch
from torch import nn

from ...imaging.dataset import rotate_images
from ...imaging.geometry import angular_distance_deg, euler_to_matrix
from ..resnet import DeepHEMNMANet
from .config import TrainConfig
from .outputs import Targets, autocast, decode
from .sources.base import Labels, Phase, Plan, TrainingData, particle_batches

__all__ = ["Trainer", "validate"]


def _make_optimizer(config: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    # The fused Adam kernel is several times faster than the per-tensor loop
    # (ResNet34 has 21 M parameters, so small batches are optimizer bound).
    decay = config.optimiser.weight_decay
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=decay)


def _make_scheduler(config: TrainConfig, optimizer, steps_per_epoch: int, epochs: int, lr: float):
    o = config.optimiser
    if o.lr_schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs,
                                                   steps_per_epoch=max(1, steps_per_epoch))
    if o.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=o.lr_patience)
    if o.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    if o.lr_schedule == "none":
        return None
    raise ValueError(f"Unknown learning-rate schedule {o.lr_schedule!r}; use onecycle, plateau, cosine or none.")


def _loss_fn(config: TrainConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if config.optimiser.loss == "l1":
        base = nn.functional.l1_loss
    elif config.optimiser.loss == "mse":
        base = nn.functional.mse_loss
    else:
        raise ValueError(f"Unknown loss {config.optimiser.loss!r}; use l1 or mse.")
    k, pose, weight = config.model.n_modes, config.model.predict_pose, config.optimiser.pose_weight

    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred = pred.float()
        value = base(pred[:, :k], target[:, :k])
        if pose:
            value = value + weight * base(pred[:, k:], target[:, k:])
        return value
    return loss


def distributed(world_size: int) -> bool:
    """True when ``world_size`` ranks train together in an initialised ``torch.distributed`` group."""
    return world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def _sum_over_ranks(values: List[float], device: torch.device) -> List[float]:
    """The element-wise sums of ``values`` over the ranks of the process group (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def validate(model, config, batches, targets, loss_fn, device, use_amp, combine=None) -> dict:
    """Loss, amplitude MAE (Å) [and pose errors] of ``model`` over (prepared images, labels) batches.
    combine: None, or a function summing the list of error sums and the image count over ranks."""
    model.eval()
    total, abs_err, ang_err, shift_err, n = 0.0, 0.0, 0.0, 0.0, 0
    pose = config.model.predict_pose
    for x, labels in batches:
        with autocast(device, use_amp):
            pred = model(x)
        total += float(loss_fn(pred, targets.encode(labels, None).to(device))) * len(x)
        dec = decode(config, pred)
        abs_err += float(np.abs(dec["amplitudes"] - labels.amplitudes).mean(axis=1).sum())
        if pose:
            ang_err += float(angular_distance_deg(dec["matrices"], euler_to_matrix(labels.angles)).sum())
            shift_err += float(np.linalg.norm(dec["shifts"] - labels.shifts, axis=1).sum())
        n += len(x)
    if combine is not None:
        total, abs_err, ang_err, shift_err, n = combine([total, abs_err, ang_err, shift_err, n])
    res = {"val_loss": total / n, "val_mae": abs_err / n}
    if pose:
        res.update(val_angle_deg=ang_err / n, val_shift_px=shift_err / n)
    return res


class Trainer:
    """The network, optimizer, schedule and epoch counters of one phase of a training run.

    Built from a complete config (``train`` fills in the fitted values) and the source's
    :class:`~.sources.base.Plan`, whose stream named by ``phase.stream`` gives the epochs'
    batches; ``train_epoch`` + ``evaluate`` + ``end_epoch`` make one epoch,
    ``state_dict``/``load_state_dict`` are the checkpoint (tensors and plain
    values only). ``start``: the run's epoch number of the phase's first epoch.
    With ``world_size`` ranks in a ``torch.distributed`` group, each rank trains on
    ``batch_size / world_size`` images of every step (the batch size is global) under
    DDP, which averages the gradients, and the epoch's training loss and the validation
    metrics are summed over the ranks, so every rank sees the same numbers.
    Validation is on the held-out particles ``val_idx``, or on the plan's fixed
    validation batches when there are none (``val_idx`` None).
    """

    def __init__(self, config: TrainConfig, data: TrainingData, plan: Plan, val_idx: Optional[np.ndarray],
                 device: torch.device, world_size: int, rank: int, phase: Phase, start: int = 1,
                 model: Optional[DeepHEMNMANet] = None):
        self.config, self.data, self.plan, self.device = config, data, plan, device
        self.val_idx = val_idx
        self.world_size, self.rank = world_size, rank
        self.phase, self.start = phase, start
        self.stream = plan.streams[phase.stream]
        o = config.optimiser
        if model is None:
            torch.manual_seed(o.seed)
            model = config.model.build().to(device)
        if distributed(world_size) and device.type == "cuda":  # batch statistics of the global batch
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.optimizer = _make_optimizer(config, self.model, phase.lr)
        self.rank_batch = o.batch_size // world_size  # images of one step on this rank
        n_train = self.stream.images_per_epoch() // world_size
        self.scheduler = _make_scheduler(config, self.optimizer,
                                         (n_train + self.rank_batch - 1) // self.rank_batch,
                                         phase.epochs, phase.lr)
        self.per_batch = isinstance(self.scheduler, torch.optim.lr_scheduler.OneCycleLR)
        self.net: nn.Module = self.model
        if distributed(world_size):
            self.net = nn.parallel.DistributedDataParallel(self.model)
        self.use_amp = o.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and not torch.cuda.is_bf16_supported()) \
            if device.type == "cuda" else None
        self.loss_fn = _loss_fn(config)
        self.targets = Targets(config)
        self.next_epoch, self.best_val, self.bad_epochs = start, math.inf, 0
        self.rows: List[dict] = []

    @property
    def last_epoch(self) -> int:
        """The run's epoch number of the phase's last epoch."""
        return self.start + self.phase.epochs - 1

    @property
    def stopped_early(self) -> bool:
        return self.bad_epochs >= self.config.optimiser.patience

    @property
    def done(self) -> bool:
        """The phase ran all its epochs or stopped early."""
        return self.stopped_early or self.next_epoch > self.last_epoch

    def for_phase(self, phase: Phase, start: int) -> "Trainer":
        """A trainer for ``phase`` starting at epoch ``start``, with this one's weights."""
        return Trainer(self.config, self.data, self.plan, self.val_idx, self.device, self.world_size,
                       self.rank, phase, start, self.model)

    def next_phase(self, phase: Phase) -> "Trainer":
        """A trainer for ``phase`` continuing from this one's weights, best loss and epochs."""
        nxt = self.for_phase(phase, self.next_epoch)
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

    def train_batch(self, x: torch.Tensor, labels: Labels, rng: np.random.Generator) -> float:
        """One optimisation step on prepared images x (B, 1, w, w) and their labels; returns the batch loss."""
        inplane = None
        if self.config.optimiser.augment_rotation:
            inplane = rng.uniform(0.0, 360.0, len(x))
            x = rotate_images(x, torch.as_tensor(inplane, dtype=x.dtype, device=self.device))
        y = self.targets.encode(labels, inplane).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.use_amp):
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

    def train_epoch(self, epoch: int) -> dict:
        """One pass over this rank's share of the phase's stream for ``epoch`` (seeded by seed and epoch)."""
        seed = self.config.optimiser.seed
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, epoch])
        torch.manual_seed(seed * 100003 + epoch)
        batches = self.stream.batches(self, epoch, rng)
        if self.world_size > 1:  # the shards need the same order on every rank; augmentation does not
            rng = np.random.default_rng([seed, epoch, self.rank])
        self.net.train()
        total, count = 0.0, 0
        for x, labels in batches:
            total += self.train_batch(x, labels, rng) * len(x)
            count += len(x)
        if distributed(self.world_size):
            total, count = _sum_over_ranks([total, count], self.device)
        seconds = time.perf_counter() - t0
        return {"epoch": epoch, "phase": self.phase.stream, "train_loss": total / max(count, 1),
                "lr": self.optimizer.param_groups[0]["lr"], "images_per_s": count / max(seconds, 1e-9)}

    def evaluate(self) -> dict:
        """Validation metrics of the current weights (see :func:`validate`): on the held-out
        particles, or on the plan's fixed validation set when the particles have no amplitudes."""
        shared = distributed(self.world_size)  # each rank validates a share; the sums are combined
        if self.val_idx is not None:
            idx = self.val_idx[self.rank::self.world_size] if shared else self.val_idx
            batches = particle_batches(self.data, self.config, idx, self.config.optimiser.batch_size,
                                       self.device) if len(idx) else []
        else:
            batches = self.plan.validation[self.rank::self.world_size] if shared else self.plan.validation
        return validate(self.model, self.config, batches, self.targets, self.loss_fn, self.device, self.use_amp,
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
