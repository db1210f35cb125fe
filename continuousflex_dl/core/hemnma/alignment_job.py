"""A HEMNMA alignment split into chunks that any process can compute from a folder.

The protocol (or a script) writes an :class:`AlignmentJob` into a folder once;
each chunk of rows ``[start, stop)`` is then aligned by :func:`run_chunk`, in
the same process, in a thread, or in a separate process on another node
(``python -m continuousflex_dl align-chunk``), and :func:`gather` places the
results by particle id. The job's :meth:`~AlignmentJob.fingerprint` covers
everything that changes the results (reference, modes, particles, CTFs,
settings, package version); a chunk file is reused only when it was computed
from the same job fingerprint, the same rows and the same image bytes.

Folder layout: ``job.npz`` + ``job.json`` (the job), ``chunks/rows_<start>_<stop>.npz``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from .alignment import RESULT_ARRAYS, AlignConfig, AlignmentResult, align_particles, alignment_deformation
from ..modes.reference import Reference
from ..progress import Progress
from .. import chunks
from ..chunks import Chunk, ChunkedJob, chunk_path, fingerprint, load_job_files, save_job_files
from ..imaging.ctf import CTFParams
from .image_model import ImageModel, refine_image_model

logger = logging.getLogger(__name__)

__all__ = ["AlignmentJob", "run_chunk", "finished_chunk", "gather", "chunk_path", "alignment_chunk_size",
           "ALIGN_CHUNK_SMALLEST"]

PathLike = Union[str, os.PathLike]
#: The AlignmentResult arrays a chunk file holds (per particle).
RESULT_KEYS = RESULT_ARRAYS + ("path", "at_limit")
#: The arrays of a first answer per particle (AlignmentResult fields) that seed the alignment.
SEED_KEYS = ("amplitudes", "angles", "shifts")


@dataclass
class AlignmentJob(ChunkedJob):
    """Inputs and settings of a HEMNMA alignment of M particles with K modes.

    reference: the centred structure, its K unit-norm modes, its atoms' widths (Å) and weights
    (:class:`~continuousflex_dl.core.modes.reference.Reference`, validated there);
    mode_numbers: the K mode numbers.
    ids: (M,) particle ids; stacks: M stack paths; indices: (M,) 0-based indices in the stacks.
    pixel_size: Å/px of the images. ctf: None, or the CTF of every particle (B = M).
    options: keyword arguments of :func:`alignment.align_particles` (JSON-able), with
    ``amplitude_range`` a number R (search ``[-R, R]`` Å on every mode) or None (default).
    invert: read the images with the opposite sign (dark-on-bright particles).
    seeds: None, or a first answer per particle (:data:`SEED_KEYS` -> (M, ...) arrays,
    amplitudes Å, angles deg, shifts px) that replaces the global search (seeded path);
    seed_source: what the seeds were computed from (e.g. the network's weights file and its
    date), which the fingerprint covers, so that it is known before the seeds are computed.
    atom_types: (N,) atom type of each atom (:func:`image_model.atom_types`) of ``type_names``;
    model_fit_particles: refine the image model (:mod:`image_model`) on this many particles
    of the set before aligning it (0: no refinement); image_model: the fitted
    :meth:`ImageModel.to_dict`, written by :meth:`fit_image_model` (derived from the job, so
    outside the fingerprint; the chunks refuse to run without it when a refinement is asked).
    """
    reference: Reference
    mode_numbers: List[int]
    ids: np.ndarray
    stacks: List[str]
    indices: np.ndarray
    pixel_size: float
    ctf: Optional[CTFParams] = None
    options: dict = field(default_factory=dict)
    invert: bool = False
    seeds: Optional[Dict[str, np.ndarray]] = None
    seed_source: str = ""
    atom_types: Optional[np.ndarray] = None
    type_names: List[str] = field(default_factory=list)
    model_fit_particles: int = 0
    image_model: Optional[dict] = None
    WHAT, DONE, USE = "alignment job", "aligned", "aligning"  # in messages (ChunkedJob)

    def __post_init__(self):
        if self.ctf is not None:
            self.ctf = self.ctf.expand(len(self.ids))

    def _ctf_columns(self) -> Dict[str, np.ndarray]:
        return {} if self.ctf is None else self.ctf.to_columns()

    def _seed_columns(self) -> Dict[str, np.ndarray]:
        return {"seed_" + k: np.asarray(v, dtype=np.float64) for k, v in (self.seeds or {}).items()}

    def fingerprint(self) -> str:
        """Digest of everything that changes the results (and the package version)."""
        from ... import __version__
        ref = self.reference
        return fingerprint(__version__, ref.coords, ref.modes, np.asarray(ref.sigma),
                           ref.weights, list(self.mode_numbers), self.ids, list(self.stacks),
                           self.indices, float(self.pixel_size), self._ctf_columns(), self.options,
                           bool(self.invert), self.seed_source, *self._model_key(),
                           *(() if ref.blocks is None else ("blocks", ref.blocks)))

    def _model_key(self) -> tuple:
        """What the image-model refinement adds to the fingerprint (nothing when it is off, so
        jobs without it keep their fingerprint)."""
        if not self.model_fit_particles:
            return ()
        return "image model", int(self.model_fit_particles), self.atom_types, list(self.type_names)

    # ------------------------------------------------------------------ files
    def save(self, folder: PathLike) -> None:
        """Write ``job.npz`` and ``job.json`` in ``folder`` (each atomically)."""
        ref = self.reference
        arrays = dict(coords=ref.coords, modes=ref.modes, sigma=np.asarray(ref.sigma),
                      ids=self.ids, indices=self.indices)
        if ref.weights is not None:
            arrays["weights"] = ref.weights
        if ref.blocks is not None:
            arrays["blocks"] = ref.blocks
        arrays.update(self._ctf_columns())
        arrays.update(self._seed_columns())
        if self.atom_types is not None:
            arrays["atom_types"] = np.asarray(self.atom_types, dtype=np.int64)
        meta = dict(mode_numbers=[int(m) for m in self.mode_numbers], stacks=list(self.stacks),
                    pixel_size=float(self.pixel_size), options=self.options, invert=bool(self.invert),
                    seed_source=self.seed_source, type_names=list(self.type_names),
                    model_fit_particles=int(self.model_fit_particles), image_model=self.image_model,
                    fingerprint=self.fingerprint())
        save_job_files(folder, arrays, meta)

    @classmethod
    def load(cls, folder: PathLike) -> "AlignmentJob":
        """The job saved in ``folder`` (ValueError naming the folder if it has none)."""
        arrays, meta = load_job_files(folder, "alignment job")
        seeds = {k[5:]: v for k, v in arrays.items() if k.startswith("seed_")} or None
        reference = Reference(arrays["coords"], arrays["modes"], arrays["sigma"], arrays.get("weights"),
                              arrays.get("blocks"))
        job = cls(reference=reference,
                  mode_numbers=meta["mode_numbers"], ids=arrays["ids"],
                  stacks=meta["stacks"], indices=arrays["indices"], pixel_size=meta["pixel_size"],
                  ctf=CTFParams.from_columns(arrays), options=meta["options"],
                  invert=bool(meta.get("invert", False)), seeds=seeds,
                  seed_source=meta.get("seed_source", ""), atom_types=arrays.get("atom_types"),
                  type_names=list(meta.get("type_names", [])),
                  model_fit_particles=int(meta.get("model_fit_particles", 0)),
                  image_model=meta.get("image_model"))
        return job.verified(folder, meta["fingerprint"])

    # ------------------------------------------------------------------ work
    def compute(self, images: np.ndarray, start: int, stop: int, device: str = "cpu",
                progress: Optional[Progress] = None) -> Dict[str, np.ndarray]:
        """The AlignmentResult arrays (:data:`RESULT_KEYS`) of rows ``[start, stop)``; progress:
        (images aligned, images of the rows, message)."""
        result = self.align(images, start, stop, device=device, progress=progress)
        logger.info("rows %d-%d: mean score %.3f", start, stop, float(result.score.mean()))
        return result.to_dict()

    def align(self, images: np.ndarray, start: int, stop: int, device: str = "cpu",
              progress: Optional[Progress] = None) -> AlignmentResult:
        """Align the images (B, box, box) of rows ``[start, stop)``."""
        rows = np.arange(start, stop)
        ctf = None if self.ctf is None else self.ctf.select(rows)
        seeds = None
        if self.seeds is not None:
            seeds = AlignmentResult(score=np.zeros(len(rows)), **{k: v[rows] for k, v in self.seeds.items()})
        options = self._align_options(images.shape[-1])
        sigma, weights = self._atom_model()
        return align_particles(images, self.reference.coords, self.reference.modes, self.pixel_size, ctf=ctf,
                               sigma=sigma, weights=weights, blocks=self.reference.blocks, seeds=seeds,
                               device=device, progress=progress,
                               **options)

    def align_images(self, images: np.ndarray, ctf: Optional[CTFParams], device: str = "cpu",
                     **settings) -> AlignmentResult:
        """Align any images (B, box, box) with CTF ``ctf`` (one or B, or None) as the job aligns its
        particles (same reference, atom model and options; no seeds), with ``settings`` (fields
        of AlignConfig) changed: e.g. particles simulated to calibrate the answers
        (:mod:`reliability`)."""
        sigma, weights = self._atom_model()
        options = {**self._align_options(images.shape[-1]), **settings}
        return align_particles(images, self.reference.coords, self.reference.modes, self.pixel_size, ctf=ctf,
                               sigma=sigma, weights=weights, blocks=self.reference.blocks, device=device,
                               **options)

    def deformation(self) -> str:
        """The deformation the alignment refines with (:func:`~.alignment.alignment_deformation`),
        which turns its amplitudes into structures (with ``reference.blocks``)."""
        default = AlignConfig()
        return alignment_deformation(self.reference, self.options.get("deformation", default.deformation),
                                     self.options.get("max_final_points", default.max_final_points))

    def _align_options(self, box: int) -> dict:
        """Keyword arguments of align_particles for images of ``box`` px: the options, with the
        amplitude range as a (K, 2) array and the working size at most the box."""
        options = dict(self.options)
        r = options.pop("amplitude_range", None)
        options["amplitude_range"] = np.tile([-float(r), float(r)], (self.reference.n_modes, 1)) if r else None
        options["working_size"] = min(int(options.get("working_size", 64)), box)
        return options

    def _atom_model(self):
        """Atom widths (N,) Å and weights (N,) or None of the alignment: the reference's, or
        those of the fitted image model; ValueError when a refinement is asked but not done."""
        if not self.model_fit_particles:
            return self.reference.sigma, self.reference.weights
        if self.image_model is None:
            raise ValueError("This alignment refines the image model first, but the job has no fitted "
                             "model yet: Continue the run (the image-model step fits it).")
        return ImageModel.from_dict(self.image_model).apply(self.atom_types, self.reference.sigma,
                                                            self.reference.weights)

    def fit_image_model(self, device: str = "cpu", progress: Optional[Progress] = None) -> ImageModel:
        """Fit the image model (:func:`image_model.refine_image_model`) on
        ``model_fit_particles`` particles spread evenly over the set, and keep it in
        :attr:`image_model` (save the job to pass it to the chunks). Returns the model."""
        if not self.model_fit_particles or self.atom_types is None:
            raise ValueError("The job asks for no image-model refinement (or has no atom types): set "
                             "model_fit_particles and atom_types.")
        m = len(self.ids)
        rows = np.unique(np.linspace(0, m - 1, min(int(self.model_fit_particles), m)).round().astype(int))
        images = self.read_rows(rows)
        options = self._align_options(images.shape[-1])
        ref = self.reference
        model, _ = refine_image_model(images, ref.coords, ref.modes, self.pixel_size, self.atom_types,
                                      self.type_names, ctf=None if self.ctf is None else self.ctf.select(rows),
                                      sigma=ref.sigma, weights=ref.weights, blocks=ref.blocks, device=device,
                                      progress=progress, **options)
        self.image_model = model.to_dict()
        return model


#: Align rows ``[start, stop)`` of the job in a folder unless an up-to-date chunk file exists
#: (:meth:`chunks.ChunkedJob.run_folder_chunk`): ``run_chunk(folder, start, stop,
#: expected_fingerprint=None, device="cpu", progress=None) -> (chunk file, computed)``.
run_chunk = AlignmentJob.run_folder_chunk


#: Automatic alignment chunks hold at least this many particles when the set leaves every
#: worker one: a chunk process starts in about 1.5 s (``import torch``, 1.50 s, nearly all
#: of it), at most 5 % of a chunk of 279 particles at 128 px and 0.114 CPU s per image (2
#: Intel Xeon cores, bench/bench_align_chunk.py); chunks of 20 spent 36 % of their time so.
ALIGN_CHUNK_SMALLEST = 300


def alignment_chunk_size(n: int, workers: int) -> int:
    """Particles per alignment chunk for ``n`` particles and ``workers`` parallel chunks:
    about 4 chunks per worker, of :data:`ALIGN_CHUNK_SMALLEST` to 500 particles, fewer only
    so that every worker has one (:func:`chunks.auto_chunk_size`)."""
    return chunks.auto_chunk_size(n, workers, smallest=ALIGN_CHUNK_SMALLEST, largest=500)


def finished_chunk(folder: PathLike, start: int, stop: int, job_fingerprint: str) -> Chunk:
    """The chunk file of rows ``[start, stop)`` computed for the job ``job_fingerprint``
    (ValueError saying to Continue when it is missing, damaged, or from another job)."""
    return chunks.finished_chunk(folder, start, stop, job_fingerprint, AlignmentJob.DONE)


def gather(folder: PathLike, expected_fingerprint: Optional[str], chunk_size: int
           ) -> Tuple[AlignmentJob, AlignmentResult]:
    """The job and its AlignmentResult (M rows in the order of ``job.ids``), each chunk's rows
    placed by particle id.

    chunk_size: the chunking the results were computed with (:func:`chunks.chunk_bounds`).
    Raises ValueError when a chunk is missing or was computed for another job or other rows.
    """
    job = AlignmentJob.load_checked(folder, expected_fingerprint)
    arrays = job.gather(folder, chunk_size)
    return job, AlignmentResult(**{k: arrays[k] for k in RESULT_KEYS})
