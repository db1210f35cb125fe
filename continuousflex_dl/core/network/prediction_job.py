"""A DeepHEMNMA prediction split into chunks that any process can compute from a folder.

The protocol (or a script) writes a :class:`PredictionJob` into a folder once;
each chunk of rows ``[start, stop)`` is then predicted by :func:`run_chunk`, in
this process or in another one (``python -m continuousflex_dl predict-chunk``,
a cluster job), and :meth:`~chunks.ChunkedJob.gather` places the results by
particle id. The fingerprint covers the model (its files, by path, size and
date), the particles, their CTFs (for a model that phase-flips), the contrast
sign, the settings and the package version; a chunk file is reused only when
it was computed from the same fingerprint, rows and image bytes.

Folder layout: ``job.npz`` + ``job.json`` (the job), ``chunks/rows_<start>_<stop>.npz``
holding ``amplitudes`` (B, K) Å and, for a model with poses, ``angles`` (B, 3) deg
and ``shifts`` (B, 2) in pixels of the particles.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import numpy as np

from ..chunks import ChunkedJob, auto_chunk_size, fingerprint, load_job_files, save_job_files
from ..imaging.ctf import CTFParams
from ..progress import Progress

logger = logging.getLogger(__name__)

__all__ = ["PredictionJob", "run_chunk", "prediction_chunk_size"]

PathLike = Union[str, os.PathLike]
#: Options of :func:`training.predict` a job passes on (and their defaults).
OPTIONS = {"batch_size": 128, "bfloat16": False, "rotations": 1}


def prediction_chunk_size(n: int, workers: int, smallest: int = 5000, largest: int = 20000) -> int:
    """Particles per prediction chunk for ``n`` particles and ``workers`` parallel chunks.

    A chunk pays a process start and a model load (a few seconds) and predicts about a
    thousand images per second on a GPU (tens to hundreds on a CPU), so a set of fewer
    than ``smallest`` particles per worker is one chunk per worker it fills (a small set:
    one chunk); larger sets get about two chunks per worker, of at most ``largest``.
    """
    workers = max(1, min(int(workers), n // smallest))
    return auto_chunk_size(n, workers, per_worker=2, smallest=smallest, largest=largest)


@dataclass
class PredictionJob(ChunkedJob):
    """A trained model's prediction over M particles.

    model_dir: the model folder (``training.load_model``); stamp: ``training.ModelFolder.stamp``
    of it when the job was made. ids: (M,) particle ids; stacks: M stack paths; indices:
    (M,) 0-based indices in the stacks; pixel_size: Å/px of the particles (images of
    another box than the model's are Fourier-cropped to it). invert: read the images with
    the opposite sign. ctf: the particles' CTFs, given when the model phase-flips.
    pose: also predict angles and shifts. angles (M, 3) deg, shifts (M, 2) px of the particles:
    their poses, given when the model is pose-normalised (it turns and centres every image by
    them). options: of :func:`training.predict` (:data:`OPTIONS`: batch_size, bfloat16, rotations).
    """
    model_dir: str
    stamp: str
    ids: np.ndarray
    stacks: List[str]
    indices: np.ndarray
    pixel_size: float
    invert: bool = False
    ctf: Optional[CTFParams] = None
    pose: bool = False
    options: dict = field(default_factory=lambda: dict(OPTIONS))
    angles: Optional[np.ndarray] = None
    shifts: Optional[np.ndarray] = None
    WHAT, DONE, USE = "prediction job", "predicted", "predicting"  # in messages (ChunkedJob)

    def __post_init__(self):
        unknown = set(self.options) - set(OPTIONS)
        if unknown:
            raise ValueError(f"Unknown prediction options {sorted(unknown)}; give some of {sorted(OPTIONS)}.")
        self.options = {**OPTIONS, **self.options}
        if self.ctf is not None:
            self.ctf = self.ctf.expand(len(self.ids))
        if (self.angles is None) != (self.shifts is None):
            raise ValueError("Give the particles' angles and shifts together, or neither.")
        if self.angles is not None:
            self.angles = np.asarray(self.angles, dtype=np.float64).reshape(len(self.ids), 3)
            self.shifts = np.asarray(self.shifts, dtype=np.float64).reshape(len(self.ids), 2)

    def _ctf_columns(self) -> Dict[str, np.ndarray]:
        return {} if self.ctf is None else self.ctf.to_columns()

    def _pose_columns(self) -> Dict[str, np.ndarray]:
        return {} if self.angles is None else {"pose_angles": self.angles, "pose_shifts": self.shifts}

    def fingerprint(self) -> str:
        """Digest of everything that changes the results (and the package version)."""
        from ... import __version__
        return fingerprint(__version__, os.path.abspath(self.model_dir), self.stamp, self.ids, list(self.stacks),
                           self.indices, float(self.pixel_size), bool(self.invert), self._ctf_columns(),
                           bool(self.pose), self.options, *self._pose_columns().values())

    # ------------------------------------------------------------------ files
    def save(self, folder: PathLike) -> None:
        """Write ``job.npz`` and ``job.json`` in ``folder`` (each atomically)."""
        arrays = dict(ids=self.ids, indices=self.indices, **self._ctf_columns(), **self._pose_columns())
        meta = dict(model_dir=os.path.abspath(self.model_dir), stamp=self.stamp, stacks=list(self.stacks),
                    pixel_size=float(self.pixel_size), invert=bool(self.invert), pose=bool(self.pose),
                    options=self.options, fingerprint=self.fingerprint())
        save_job_files(folder, arrays, meta)

    @classmethod
    def load(cls, folder: PathLike) -> "PredictionJob":
        """The job saved in ``folder`` (ValueError naming the folder if it has none)."""
        arrays, meta = load_job_files(folder, "prediction job")
        job = cls(model_dir=meta["model_dir"], stamp=meta["stamp"], ids=arrays["ids"], stacks=meta["stacks"],
                  indices=arrays["indices"], pixel_size=meta["pixel_size"], invert=bool(meta["invert"]),
                  ctf=CTFParams.from_columns(arrays), pose=bool(meta["pose"]), options=meta["options"],
                  angles=arrays.get("pose_angles"), shifts=arrays.get("pose_shifts"))
        return job.verified(folder, meta["fingerprint"])

    # ------------------------------------------------------------------ work
    def compute(self, images: np.ndarray, start: int, stop: int, device: str = "cpu",
                progress: Optional[Progress] = None) -> Dict[str, np.ndarray]:
        """Amplitudes (B, K) Å [angles (B, 3) deg, shifts (B, 2) particle px] of rows ``[start, stop)``
        from their images (B, box, box)."""
        from .training import ModelFolder, load_model, predict_particles
        if ModelFolder(self.model_dir).stamp() != self.stamp:
            raise ValueError(f"The model in {self.model_dir} changed since this prediction was prepared "
                             f"(trained further?): Continue the run to prepare it again.")
        loaded = load_model(self.model_dir, device)
        rows = np.arange(start, stop)
        amplitudes, angles, shifts = predict_particles(
            loaded, images, self.pixel_size, None if self.ctf is None else self.ctf.select(rows),
            return_pose=self.pose, ids=self.ids[rows], progress=progress,
            poses=None if self.angles is None else (self.angles[rows], self.shifts[rows]),
            batch_size=int(self.options["batch_size"]), bfloat16=bool(self.options["bfloat16"]),
            rotations=int(self.options["rotations"]))
        if not self.pose:
            return {"amplitudes": amplitudes}
        return {"amplitudes": amplitudes, "angles": angles, "shifts": shifts}

    def predict_all(self, device: str = "cpu", progress: Optional[Progress] = None
                    ) -> Dict[str, np.ndarray]:
        """The results of all M rows, in this process (no chunk files)."""
        return self.compute(self.read_images(0, len(self.ids)), 0, len(self.ids), device, progress)


#: Predict rows ``[start, stop)`` of the job in a folder unless an up-to-date chunk file exists
#: (:meth:`chunks.ChunkedJob.run_folder_chunk`): ``run_chunk(folder, start, stop,
#: expected_fingerprint=None, device="cpu", progress=None) -> (chunk file, computed)``.
run_chunk = PredictionJob.run_folder_chunk
