"""Training on particles simulated on the fly from the reference and its modes, matched to the
data set (its CTFs, noise, amplitude range and shift range; :mod:`...simulator`): a fresh
stream every epoch. Validation is on held-out particles when they have amplitudes, else on
a fixed simulated set (epoch :data:`~...simulator.VALIDATION_EPOCH` of the stream)."""
from __future__ import annotations

import logging
import math
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from ...simulator import (VALIDATION_EPOCH, AmplitudePrior, EstimatesPrior, ParticleSimulator, SimulatedBatch,
                          default_amplitude_range, match_simulator)
from ..config import PRIOR_CHOICES, TrainConfig
from .base import Batch, DataSource, Labels, Phase, Plan, Stream, TrainingData, fit_label_statistics
from .particles import ParticleStream

logger = logging.getLogger(__name__)

__all__ = ["SimulatedSource", "SimulatedStream", "SOURCE"]


def prepare_simulated(config: TrainConfig, batch: SimulatedBatch, device: torch.device) -> Batch:
    """A simulated batch through the particles' preprocessing (phase flip with its own CTFs, pose
    normalisation with its own poses)."""
    ctf = batch.ctf_images if config.preprocessing.phase_flip else None
    return config.preprocessing.apply(batch.images, ctf, device, (batch.angles, batch.shifts)), Labels(batch.amplitudes, batch.angles,
                                                                          batch.shifts)


class SimulatedStream(Stream):
    """``sim_images`` new simulated images every epoch, each rank its share; the noise ramps up
    over the first ``sim_noise_ramp`` epochs of the phase."""

    def __init__(self, simulator: ParticleSimulator, config: TrainConfig):
        self.simulator, self.config = simulator, config

    def images_per_epoch(self) -> int:
        return self.config.data.sim_images

    def describe(self) -> str:
        return f"{self.config.data.sim_images} new simulated images"

    def batches(self, trainer, epoch: int, rng: np.random.Generator) -> Iterator[Batch]:
        d = self.config.data
        n, bs = d.sim_images // trainer.world_size, trainer.rank_batch
        noise_scale = min(1.0, (epoch - trainer.start + 1) / d.sim_noise_ramp) if d.sim_noise_ramp > 0 else 1.0
        for b in range((n + bs - 1) // bs):
            size = min(bs, n - b * bs)
            batch = self.simulator.batch(epoch, b * trainer.world_size + trainer.rank, size, noise_scale)
            yield prepare_simulated(trainer.config, batch, trainer.device)


class SimulatedSource(DataSource):
    """One phase on the simulated stream; targets standardised by the amplitude prior's moments."""
    name = "simulated"
    label = "simulated from the reference"
    needs_amplitudes = False
    simulates = True
    settings = ("sim_images", "sim_in_plane", "sim_max_shift_px", "sim_amplitude_range", "sim_prior",
                "sim_noise_ramp")

    def check(self, config: TrainConfig, data: TrainingData) -> None:
        d, m = config.data, len(data.source)
        if d.sim_prior not in PRIOR_CHOICES:
            raise ValueError(f"Unknown simulated amplitude prior {d.sim_prior!r}; choose one of "
                             f"{', '.join(PRIOR_CHOICES)}.")
        if data.reference is None:
            raise ValueError(f"Training on {self.name!r} particles needs the reference structure and its "
                             "normal modes (reference=simulator.Reference(...)).")
        if data.reference.n_modes != config.model.n_modes:
            raise ValueError(f"The reference has {data.reference.n_modes} modes but {config.model.n_modes} are "
                             f"trained ({config.model.modes}): give the modes of the amplitude columns.")
        if data.ctf is not None and data.particle_ctf is None:
            raise ValueError("Simulated training with phase flipping needs the particles' CTF parameters "
                             "(a CTFParams), not precomputed CTF images.")
        if data.particle_ctf is not None and data.particle_ctf.batch_size not in (1, m):
            raise ValueError(f"Give one CTF per particle ({m}) or one for all, got {data.particle_ctf.batch_size}.")
        if d.sim_images < 1:
            raise ValueError(f"Simulate at least one image per epoch, got {d.sim_images}.")

    def phases(self, config: TrainConfig) -> List[Phase]:
        return [Phase(0, "simulated", config.optimiser.epochs, config.optimiser.learning_rate)]

    def plan(self, config: TrainConfig, data: TrainingData, train_idx: Optional[np.ndarray],
             device: torch.device) -> Plan:
        simulator, fitted = self._simulator(config, data, train_idx, device)
        config = config.replace(simulation=fitted)
        prior = simulator.amplitudes
        config = fit_label_statistics(config, prior.mean, prior.std, simulator.max_shift_px / math.sqrt(3.0))
        streams = {"simulated": SimulatedStream(simulator, config)}
        if train_idx is not None:
            streams["particles"] = ParticleStream(data, train_idx)
            return Plan(config, streams)
        return Plan(config, streams, self._validation(config, simulator, device))

    @staticmethod
    def _simulator(config: TrainConfig, data: TrainingData, train_idx: Optional[np.ndarray],
                   device: torch.device) -> Tuple[ParticleSimulator, dict]:
        """The simulator matched to the particles, and what it matched (``Fitted.simulation``)."""
        d, k = config.data, config.model.n_modes
        if d.sim_amplitude_range is not None:
            prior = AmplitudePrior.symmetric(d.sim_amplitude_range, k)
        elif data.amplitudes is not None and d.sim_prior == "estimates":
            prior = EstimatesPrior.from_estimates(data.amplitudes[train_idx])
        elif data.amplitudes is not None:
            prior = AmplitudePrior.from_estimates(data.amplitudes[train_idx])
        else:
            prior = AmplitudePrior.symmetric(default_amplitude_range(len(data.reference.coords)), k)
        max_shift = d.sim_max_shift_px
        if max_shift is None:
            max_shift = float(np.quantile(np.abs(data.shifts), 0.99)) if data.shifts is not None else 0.0
        box = data.source.image_size
        max_shift = min(max_shift, box / 2 - 1)
        sim = match_simulator(data.reference, data.source, box, config.preprocessing.pixel_size, data.particle_ctf,
                              prior, d.sim_in_plane, max_shift, config.optimiser.seed, device)
        fitted = dict(snr=sim.noise.snr if math.isfinite(sim.noise.snr) else None, signal_scale=sim.noise.scale,
                      noise_power=sim.noise.power.tolist(),
                      amplitude_low=prior.low.tolist(), amplitude_high=prior.high.tolist(), max_shift_px=max_shift)
        if isinstance(prior, EstimatesPrior):
            fitted["amplitude_bandwidth"] = prior.bandwidth.tolist()
        logger.info("Simulating particles matched to the data: SNR %.3g, amplitudes %s%s Å, shifts within "
                    "±%.2f px, %s", sim.noise.snr,
                    "around the estimates, kernel width " + ", ".join(f"{h:.1f}" for h in prior.bandwidth)
                    + " Å, in " if isinstance(prior, EstimatesPrior) else "uniform in ",
                    ", ".join(f"[{lo:.1f}, {hi:.1f}]" for lo, hi in zip(prior.low, prior.high)), max_shift,
                    "the particles' CTFs" if data.particle_ctf is not None else "no CTF")
        return sim, fitted

    @staticmethod
    def _validation(config: TrainConfig, simulator: ParticleSimulator, device: torch.device) -> List[Batch]:
        """The fixed simulated validation set (``val_fraction`` of an epoch, at least one batch),
        drawn from epoch :data:`VALIDATION_EPOCH` of the stream, prepared once."""
        o = config.optimiser
        n = max(o.batch_size, int(round(o.val_fraction * config.data.sim_images)))
        return [prepare_simulated(config, b, device) for b in simulator.batches(VALIDATION_EPOCH, n, o.batch_size)]

    def _then(self, config: TrainConfig) -> str:
        """What follows the simulated epochs ('' here)."""
        return ""

    def summary(self, config: TrainConfig) -> str:
        sim = config.fitted.simulation
        snr = "none found" if sim.get("snr") is None else f"{sim['snr']:.3g}"
        amplitudes = ("around the particles' (kernel widths "
                      + ", ".join(f"{h:.0f}" for h in sim["amplitude_bandwidth"]) + " Å)."
                      if "amplitude_bandwidth" in sim else "uniform in "
                      + ", ".join(f"[{lo:.0f}, {hi:.0f}]" for lo, hi in
                                  zip(sim["amplitude_low"], sim["amplitude_high"])) + " Å.")
        return (f"Training data: {self.label} ({config.data.sim_images} new simulated images per epoch"
                f"{self._then(config)}); particles' SNR estimated at {snr}, shifts within "
                f"±{sim.get('max_shift_px', 0.0):.1f} px, amplitudes {amplitudes}")

    def methods(self, n_particles: int) -> str:
        return (f"on particles simulated from the normal modes' structure and matched to {n_particles} "
                "particles (their CTFs, noise and amplitude range)")


SOURCE = SimulatedSource()
