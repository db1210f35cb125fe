"""The configuration of a DeepHEMNMA model and its training, in sections.

A :class:`TrainConfig` has one section per concern, saved as one JSON object per
section in the model folder's ``config.json`` (as cryoDRGN's ``save_config``):

* ``model`` (:class:`ModelConfig`): what builds the network (modes, architecture);
* ``preprocessing`` (:class:`~...imaging.dataset.Preprocessing`): what the network sees;
* ``optimiser`` (:class:`OptimiserConfig`): how it is trained (epochs, schedule, loss, seed);
* ``data`` (:class:`DataConfig`): the training data source and its settings;
* ``fitted`` (:class:`Fitted`): values :func:`train` fits to the data (never user settings).

Field names are unique over the sections, so a setting is named by its field name alone
(:meth:`TrainConfig.build`, :meth:`TrainConfig.replace`, :meth:`TrainConfig.settings`,
:func:`changed_settings`), and a flat ``config.json`` written by versions up to 0.3 loads
the same way (:meth:`TrainConfig.from_dict`).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import List, Optional, Union

from ...imaging.dataset import Preprocessing
from ..resnet import DeepHEMNMANet, build_model

__all__ = ["ModelConfig", "OptimiserConfig", "DataConfig", "Fitted", "TrainConfig", "changed_settings",
           "FITTED_FIELDS", "RESUMABLE_SETTINGS", "PRIOR_CHOICES", "SECTIONS", "plain"]


@dataclass(frozen=True)
class ModelConfig:
    """The network: modes (1-based numbers, in the order of the amplitude columns), ResNet
    ``architecture``, the perceptron's ``hidden`` widths and ``dropout``; ``predict_pose``:
    also regress the pose (6-D rotation + shifts in px)."""
    modes: List[int]
    architecture: str = "resnet34"
    hidden: List[int] = field(default_factory=lambda: [512, 256, 128])
    dropout: float = 0.0
    predict_pose: bool = False

    @property
    def n_modes(self) -> int:
        return len(self.modes)

    @property
    def n_outputs(self) -> int:
        """Outputs of the network: K amplitudes [+ 6-D rotation + 2 shifts]."""
        return self.n_modes + (8 if self.predict_pose else 0)

    def build(self) -> DeepHEMNMANet:
        """A new network of this architecture (random weights)."""
        return build_model(self.n_modes, self.predict_pose, self.architecture, self.hidden, self.dropout)


@dataclass(frozen=True)
class OptimiserConfig:
    """How the network is trained.

    loss: "l1" or "mse" on standardised targets. lr_schedule: "onecycle" (stepped per batch:
    warm-up to ``learning_rate`` over the first 30 % of the steps, then cosine decay; runs all
    its epochs), "plateau" (halved after ``lr_patience`` epochs without improvement), "cosine"
    or "none". patience: epochs without validation improvement before stopping (not with
    "onecycle"). augment_rotation: random in-plane rotations of training images. pose_weight:
    weight of the pose terms of the loss. amp: mixed precision (CUDA only). seed: split,
    initialisation, shuffling, augmentation and simulation (set by :func:`train`).
    """
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
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    """The training data: ``source``, a name of the source registry (``sources.SOURCES``), and the
    settings of the sources that simulate (see ``sources.simulated``) or fine-tune.

    sim_images: simulated images per epoch (each one new). sim_in_plane: simulated
    orientations uniform on SO(3) (else uniform directions, psi = 0). sim_max_shift_px:
    simulated shifts uniform in [-S, S]^2 px (None: the 99th percentile of the particles'
    |shifts| when poses are given, else 0). sim_amplitude_range: simulated amplitudes uniform
    in [-R, R] Å (None: from the particles' amplitudes as ``sim_prior`` says; 5 sqrt(N) Å
    without them). sim_prior: one of :data:`PRIOR_CHOICES`: "estimates", a Gaussian kernel
    density around the estimates (``simulator.EstimatesPrior``), or "range", uniform over their
    range widened by 10 % (``simulator.AmplitudePrior``). sim_noise_ramp: the noise's standard
    deviation is ``min(1, epoch / sim_noise_ramp)`` times the particles' over the first
    simulated epochs (0: the particles' noise from the start). finetune_epochs, finetune_lr
    (None: learning_rate / 10): the fine-tuning on the particles after the simulated epochs.
    """
    source: str = "particles"
    sim_images: int = 6000
    sim_in_plane: bool = True
    sim_max_shift_px: Optional[float] = None
    sim_amplitude_range: Optional[float] = None
    sim_prior: str = "estimates"
    sim_noise_ramp: int = 0
    finetune_epochs: int = 10
    finetune_lr: Optional[float] = None


@dataclass(frozen=True)
class Fitted:
    """Values :func:`train` fits to the data: the raw ``image_size`` (px), ``n_outputs``,
    the target standardisation (``target_mean``/``target_std`` per amplitude in Å,
    ``shift_scale`` px), ``simulation`` (what the simulator matched to the particles: SNR,
    signal scale, noise spectrum, amplitude and shift ranges) and the package ``version``."""
    image_size: int = 0
    n_outputs: int = 0
    target_mean: List[float] = field(default_factory=list)
    target_std: List[float] = field(default_factory=list)
    shift_scale: float = 1.0
    simulation: dict = field(default_factory=dict)
    version: str = ""


#: The sections of a TrainConfig, in the order of config.json.
SECTIONS = {"model": ModelConfig, "preprocessing": Preprocessing, "optimiser": OptimiserConfig,
            "data": DataConfig, "fitted": Fitted}
#: Fields :func:`train` fits to the data (not user settings): those of :class:`Fitted`.
FITTED_FIELDS = tuple(f.name for f in fields(Fitted))
#: Simulated amplitude priors (``DataConfig.sim_prior``).
PRIOR_CHOICES = ("estimates", "range")
#: Settings a stopped training may change when it continues: they decide when
#: it stops, not what an epoch computes (``epochs`` not with "onecycle").
RESUMABLE_SETTINGS = ("epochs", "patience")
_SECTION_OF = {f.name: name for name, cls in SECTIONS.items() for f in fields(cls)}


def plain(value):
    """JSON-plain copy (numpy scalars -> Python numbers, tuples -> lists)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist()))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a DeepHEMNMA model and its training, in sections (see the module)."""
    model: ModelConfig
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    optimiser: OptimiserConfig = field(default_factory=OptimiserConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fitted: Fitted = field(default_factory=Fitted)

    @classmethod
    def build(cls, **values) -> "TrainConfig":
        """A config from field values named alone (``modes=[7, 8], epochs=4, window=60.0``);
        ``modes`` is required. Unknown names raise ValueError."""
        if "modes" not in values:
            raise ValueError("A training config needs the modes (modes=[7, 8, ...]).")
        unknown = sorted(set(values) - set(_SECTION_OF))
        if unknown:
            raise ValueError(f"Unknown training settings {unknown}; known: {sorted(_SECTION_OF)}.")
        parts = {name: {} for name in SECTIONS}
        for key, value in values.items():
            parts[_SECTION_OF[key]][key] = value
        return cls(**{name: SECTIONS[name](**parts[name]) for name in SECTIONS})

    def replace(self, **values) -> "TrainConfig":
        """A copy with the given fields (named alone) changed."""
        unknown = sorted(set(values) - set(_SECTION_OF))
        if unknown:
            raise ValueError(f"Unknown training settings {unknown}; known: {sorted(_SECTION_OF)}.")
        changed = {}
        for name in SECTIONS:
            mine = {k: v for k, v in values.items() if _SECTION_OF[k] == name}
            if mine:
                changed[name] = replace(getattr(self, name), **mine)
        return replace(self, **changed)

    def to_dict(self) -> dict:
        """The sections as plain JSON values: ``{"model": {...}, "preprocessing": {...}, ...}``."""
        return plain({name: asdict(getattr(self, name)) for name in SECTIONS})

    def settings(self) -> dict:
        """The user settings (every field but :data:`FITTED_FIELDS`), named alone, as plain values."""
        return {k: v for name, section in self.to_dict().items() if name != "fitted" for k, v in section.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """A config from saved sections, or from the flat fields of a 0.2/0.3 config.json
        (fields unknown to this version are ignored)."""
        if isinstance(data.get("model"), dict):
            flat = {k: v for name in SECTIONS for k, v in data.get(name, {}).items()}
        else:  # 0.2/0.3: one flat object, the data source under "data"
            flat = {("source" if k == "data" else k): v for k, v in data.items()}
        return cls.build(**{k: v for k, v in flat.items() if k in _SECTION_OF})

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "TrainConfig":
        """The config saved at ``path`` (ValueError naming it when it is not a config)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"Cannot read the training config {path}: {err}. Train the model again.") from None
        if not isinstance(data, dict) or not (isinstance(data.get("model"), dict) or "modes" in data):
            raise ValueError(f"{path} is not a DeepHEMNMA training config (no modes in it): train the model "
                             "again.")
        return cls.from_dict(data)


def changed_settings(saved: TrainConfig, new: TrainConfig) -> List[str]:
    """'name: old -> new' for each setting of ``new`` that a run saved with ``saved`` cannot continue with."""
    resumable = set(RESUMABLE_SETTINGS)
    if saved.optimiser.lr_schedule == "onecycle":
        resumable.discard("epochs")
    old, now = saved.settings(), new.settings()
    changes = []
    for name in now:
        if name in resumable or old.get(name) == now[name]:
            continue
        note = " (a one-cycle schedule is fixed by its number of epochs)" if name == "epochs" else ""
        changes.append(f"{name}: {old.get(name)!r} -> {now[name]!r}{note}")
    return changes
