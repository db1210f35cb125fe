"""Work over particles in chunks: plans, fingerprints and chunk files written atomically.

A chunk file holds the results of rows ``[start, stop)`` of a set, the ids of
those particles, and a *provenance* record (a JSON-able dict) of what it was
computed from. A later run reuses a chunk file only when its provenance equals
the one the run expects (:func:`read_chunk` with ``expected``), and results are
gathered by particle id (:func:`gather_by_id`), never by file order, so a
changed chunk size, mode list or input set can never mix rows of different
particles or settings.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from .progress import Progress

logger = logging.getLogger(__name__)

__all__ = ["fingerprint", "chunk_bounds", "auto_chunk_size", "Chunk", "write_chunk", "read_chunk",
           "gather_by_id", "save_job_files", "load_job_files", "chunk_path", "chunk_error_path", "write_chunk_error",
           "read_chunk_error", "chunk_problem", "finished_chunk", "ChunkedJob", "DiskFullError"]

PathLike = Union[str, os.PathLike]
_PROVENANCE_KEY = "__provenance__"


def _feed(h, value) -> None:
    """Feed an unambiguous encoding of ``value`` (nested dict/list/tuple of numbers, str,
    bool, None, numpy arrays) into the hash ``h``."""
    if isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        if a.dtype.kind in "OU":  # object/str arrays: hash their text
            _feed(h, a.tolist())
            return
        h.update(b"A" + f"{a.dtype.str}{a.shape}".encode() + b":")
        h.update(a.tobytes())
    elif isinstance(value, Mapping):
        h.update(b"D%d:" % len(value))
        for key in sorted(value, key=str):
            _feed(h, str(key))
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(b"L%d:" % len(value))
        for item in value:
            _feed(h, item)
    elif isinstance(value, (bool, np.bool_)) or value is None:
        h.update(b"B" + repr(None if value is None else bool(value)).encode())
    elif isinstance(value, (int, np.integer)):
        h.update(b"I%d;" % int(value))
    elif isinstance(value, (float, np.floating)):
        h.update(b"F" + float(value).hex().encode() + b";")
    elif isinstance(value, str):
        data = value.encode()
        h.update(b"S%d:" % len(data) + data)
    else:
        raise ValueError(f"Cannot fingerprint a {type(value).__name__}: use numbers, strings, lists, "
                         f"dicts or numpy arrays.")


def fingerprint(*parts) -> str:
    """SHA-256 hex digest (64 characters) of ``parts``: numbers, strings, None, lists,
    dicts (key order ignored) and numpy arrays (dtype, shape and bytes). Equal inputs give
    equal digests on every machine; ``1`` and ``1.0`` differ, as do float32 and float64."""
    h = hashlib.sha256()
    _feed(h, list(parts))
    return h.hexdigest()


def chunk_bounds(n_items: int, chunk_size: int) -> List[Tuple[int, int]]:
    """Rows ``[(start, stop), ...]`` of consecutive chunks of at most ``chunk_size`` items
    covering ``range(n_items)`` (the last chunk may be shorter; none when ``n_items`` is 0)."""
    if chunk_size < 1:
        raise ValueError(f"The chunk size must be at least 1 particle, got {chunk_size}.")
    if n_items < 0:
        raise ValueError(f"The number of items must not be negative, got {n_items}.")
    n_chunks = math.ceil(n_items / chunk_size)
    return [(k * chunk_size, min((k + 1) * chunk_size, n_items)) for k in range(n_chunks)]


def auto_chunk_size(n_items: int, workers: int, per_worker: int = 4, smallest: int = 20,
                    largest: int = 500) -> int:
    """A chunk size for ``n_items`` spread over ``workers`` parallel workers.

    About ``per_worker`` chunks per worker (load balance, and little lost work when a run
    stops), but chunks of at least ``smallest`` items (each chunk pays a process start and
    input loading) unless that leaves a worker idle, and at most ``largest`` (memory, and
    the granularity of a continued run). Every worker gets work when
    ``n_items >= workers``.
    """
    if workers < 1:
        raise ValueError(f"The number of workers must be at least 1, got {workers}.")
    if n_items <= 0:
        return 1
    even = max(1, n_items // workers)  # at least one chunk per worker
    return max(1, max(min(smallest, even), min(largest, math.ceil(even / per_worker))))


class DiskFullError(OSError):
    """A file could not be written for want of space (ENOSPC, EDQUOT); ``str()`` is a message
    for the user naming the folder and the space needed."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def _size(n_bytes: float) -> str:
    """A byte count for people: '13 kB', '4.2 MB', '1.5 GB'."""
    if n_bytes < 1e6:
        return f"{max(1, round(n_bytes / 1e3))} kB"
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes < 1e9 else f"{n_bytes / 1e9:.1f} GB"


def _disk_full_message(folder: Path, needed: int) -> str:
    try:
        free = f"{_size(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    return (f"No space left on the disk of {folder}: writing a file of about {_size(needed)} failed ({free}). "
            f"Free some space there, then Continue the run.")


def _atomic_write(path: Path, write: Callable[[Path], None], needed: int) -> None:
    """Write ``path`` through ``write(temporary path)`` in the same folder, then ``os.replace``:
    the file exists only when complete. On any failure the temporary file is removed; a full disk
    (ENOSPC, EDQUOT) raises :class:`DiskFullError` naming the folder and the ``needed`` bytes."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(exc.errno, _disk_full_message(path.parent, needed)) from None
        raise


def _savez(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    """``np.savez`` of ``arrays`` to ``path`` atomically (see :func:`_atomic_write`)."""
    needed = sum(np.asarray(a).nbytes for a in arrays.values()) + 1000 * len(arrays)
    _atomic_write(Path(path), lambda tmp: np.savez(tmp, **arrays), needed)


def write_chunk(path: PathLike, provenance: dict, ids: np.ndarray, arrays: Dict[str, np.ndarray]) -> None:
    """Save one chunk's results atomically (a temporary file in the same folder, then
    ``os.replace``): the file exists only when complete, and a failed write leaves no
    temporary file (a full disk raises :class:`DiskFullError`, naming the folder and the space).

    provenance: JSON-able dict of what the chunk was computed from. ids: (B,) particle ids.
    arrays: per-particle results, each with B rows (any trailing shape).
    """
    ids = np.asarray(ids)
    for key, value in arrays.items():
        if len(value) != len(ids):
            raise ValueError(f"Chunk result '{key}' has {len(value)} rows for {len(ids)} particles.")
    if "ids" in arrays or _PROVENANCE_KEY in arrays:
        raise ValueError("Chunk result names 'ids' and '__provenance__' are reserved.")
    _savez(Path(path), {"ids": ids, _PROVENANCE_KEY: np.array(json.dumps(provenance, sort_keys=True)), **arrays})


class Chunk(NamedTuple):
    """A chunk file's content: provenance dict, ids (B,), results {name: (B, ...)}."""
    provenance: dict
    ids: np.ndarray
    arrays: Dict[str, np.ndarray]


def read_chunk(path: PathLike, expected: Optional[dict] = None) -> Optional[Chunk]:
    """The :class:`Chunk` in a file, or None when the file is missing, unreadable
    (damaged), or was computed from something else: its provenance differs from
    ``expected`` (when given; a JSON round trip of ``expected`` is compared)."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            provenance = json.loads(str(data[_PROVENANCE_KEY]))
            ids = data["ids"]
            arrays = {k: data[k] for k in data.files if k not in ("ids", _PROVENANCE_KEY)}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        logger.warning("The chunk file %s is damaged (%s).", path, exc)
        return None
    if expected is not None and provenance != json.loads(json.dumps(expected, sort_keys=True)):
        logger.info("The chunk file %s was computed from other inputs or settings.", path)
        return None
    return Chunk(provenance, ids, arrays)


def gather_by_id(ids: np.ndarray, pieces: Sequence[Tuple[np.ndarray, Dict[str, np.ndarray]]]
                 ) -> Dict[str, np.ndarray]:
    """Place the rows of chunk results at the position of their particle id in ``ids``.

    ids: (M,) the particle ids in output order. pieces: ``(ids (B,), {name: (B, ...)})``
    per chunk. Returns ``{name: (M, ...)}``. Raises ValueError when a particle has no
    result, has two, or a result belongs to a particle that is not in ``ids``.
    """
    ids = np.asarray(ids)
    position = {int(i): k for k, i in enumerate(ids)}
    if len(position) != len(ids):
        raise ValueError("The particle ids are not unique.")
    out: Dict[str, np.ndarray] = {}
    seen = np.zeros(len(ids), dtype=bool)
    for chunk_ids, arrays in pieces:
        try:
            rows = np.array([position[int(i)] for i in chunk_ids], dtype=int)
        except KeyError as exc:
            raise ValueError(f"A chunk holds particle id {exc.args[0]}, which is not in the input set.") from None
        if seen[rows].any():
            raise ValueError(f"Particle ids {ids[rows[seen[rows]]][:10].tolist()} have two chunk results.")
        seen[rows] = True
        for key, value in arrays.items():
            if key not in out:
                out[key] = np.zeros((len(ids),) + value.shape[1:], dtype=value.dtype)
            out[key][rows] = value
    if not seen.all():
        raise ValueError(f"{int((~seen).sum())} particles have no result (ids {ids[~seen][:10].tolist()}): "
                         f"Continue the run to compute the missing chunks.")
    return out


def save_job_files(folder: PathLike, arrays: Dict[str, np.ndarray], meta: dict) -> None:
    """Write a job folder's ``job.npz`` (``arrays``) and ``job.json`` (``meta``, JSON-able),
    each atomically (temporary name, then ``os.replace``; a full disk raises
    :class:`DiskFullError`); ``chunks/`` is created too."""
    folder = Path(folder)
    (folder / "chunks").mkdir(parents=True, exist_ok=True)
    _savez(folder / "job.npz", arrays)
    text = json.dumps(meta)
    _atomic_write(folder / "job.json", lambda tmp: tmp.write_text(text), len(text))


def load_job_files(folder: PathLike, what: str) -> Tuple[Dict[str, np.ndarray], dict]:
    """``(arrays, meta)`` of a job folder written by :func:`save_job_files`; ValueError naming
    the folder when it holds no readable job (``what``: e.g. "alignment job", for the message)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "job.json").read_text())
        with np.load(folder / "job.npz", allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"No readable {what} in {folder} ({exc}): run the protocol's conversion "
                         f"step again (Continue does it).") from None
    return arrays, meta


# ------------------------------------------------------------------ jobs computed in chunks

def chunk_path(folder: PathLike, start: int, stop: int) -> Path:
    """The chunk file of rows ``[start, stop)`` in a job folder."""
    return Path(folder) / "chunks" / ("rows_%07d_%07d.npz" % (start, stop))


def chunk_error_path(folder: PathLike, start: int, stop: int) -> Path:
    """The file in which a chunk process of rows ``[start, stop)`` leaves the reason it failed
    (beside its chunk file, so that it reaches the protocol from a cluster job too)."""
    return Path(folder) / "chunks" / ("rows_%07d_%07d.error.txt" % (start, stop))


def write_chunk_error(folder: PathLike, start: int, stop: int, message: str) -> None:
    """Leave ``message`` (why rows ``[start, stop)`` failed) in :func:`chunk_error_path`, atomically."""
    path = chunk_error_path(folder, start, stop)
    path.parent.mkdir(exist_ok=True)
    _atomic_write(path, lambda tmp: tmp.write_text(message), len(message.encode()))


def read_chunk_error(folder: PathLike, start: int, stop: int) -> Optional[str]:
    """The message a failed chunk process of rows ``[start, stop)`` left, or None."""
    try:
        return chunk_error_path(folder, start, stop).read_text().strip() or None
    except OSError:
        return None


def chunk_problem(folder: PathLike, start: int, stop: int, job_fingerprint: str) -> Optional[str]:
    """Why the chunk file of rows ``[start, stop)`` is not a result of the job ``job_fingerprint``
    ("missing", "damaged (...)", "computed for other inputs or settings"), or None when it is."""
    path = chunk_path(folder, start, stop)
    if not path.exists():
        return "missing"
    try:
        with np.load(path, allow_pickle=False) as data:
            p = json.loads(str(data[_PROVENANCE_KEY]))
            for key in data.files:
                data[key]  # reads (and CRC-checks) every array
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        return f"damaged ({exc})"
    if p.get("job") != job_fingerprint or (p.get("start"), p.get("stop")) != (start, stop):
        return "computed for other inputs or settings"
    return None


def finished_chunk(folder: PathLike, start: int, stop: int, job_fingerprint: str,
                   done: str = "computed") -> Chunk:
    """The chunk file of rows ``[start, stop)`` computed for the job ``job_fingerprint``
    (ValueError saying to Continue when it is missing, damaged, or from another job).
    done: what a chunk's rows are once computed ("aligned", "predicted"), for the message."""
    path = chunk_path(folder, start, stop)
    chunk = read_chunk(path)
    if chunk is None:
        raise ValueError(f"Rows {start}-{stop} are not {done} ({path} missing or damaged; see the log of "
                         f"the step or of its cluster job): Continue the run, which computes them again.")
    p = chunk.provenance
    if p.get("job") != job_fingerprint or (p.get("start"), p.get("stop")) != (start, stop):
        raise ValueError(f"{path} was computed for other inputs or settings: Continue the run to compute "
                         f"these rows again.")
    return chunk


class ChunkedJob:
    """Base of a job over M particle images that a folder holds and any process computes in chunks.

    A subclass has ``ids`` ((M,) particle ids), ``stacks`` (M stack paths), ``indices`` ((M,)
    0-based indices in the stacks) and ``invert`` (read the images with the opposite sign),
    and defines :meth:`fingerprint` (a digest of everything that changes the results),
    :meth:`load` (the job saved in a folder) and :meth:`compute`. ``WHAT`` names the job,
    ``DONE`` its finished rows and ``USE`` what it does with images, in messages. A chunk
    file is reused only when it was computed from the same job fingerprint, the same rows
    and the same image bytes.
    """
    WHAT, DONE, USE = "job", "computed", "using them"
    ids: np.ndarray
    stacks: List[str]
    indices: np.ndarray
    invert: bool

    def fingerprint(self) -> str:
        raise NotImplementedError

    @classmethod
    def load(cls, folder: PathLike) -> "ChunkedJob":
        raise NotImplementedError

    def verified(self, folder: PathLike, recorded: str) -> "ChunkedJob":
        """This job, loaded from ``folder``, when its fingerprint is the ``recorded`` one; else
        ValueError (the folder's files were damaged or edited)."""
        if self.fingerprint() != recorded:
            raise ValueError(f"The {self.WHAT} in {folder} does not match its recorded fingerprint "
                             f"(damaged or edited): run the protocol's conversion step again.")
        return self

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Images of the 0-based ``rows`` (B,) of the job (B, box, box) float32; ValueError naming
        the particle ids of images with NaN or infinite pixels or constant images
        (:func:`dataset.check_images`), or saying which stack is damaged."""
        from .imaging.dataset import MrcsImageSource, check_images
        rows = np.asarray(rows, dtype=int)
        source = MrcsImageSource([(self.stacks[i], int(self.indices[i])) for i in rows], invert=self.invert)
        try:
            images = source.read(np.arange(len(rows)))
        finally:
            source.close()
        check_images(images, self.ids[rows], self.USE)
        return images

    def read_images(self, start: int, stop: int) -> np.ndarray:
        """Images of rows ``[start, stop)`` (B, box, box) float32 (see :meth:`read_rows`)."""
        return self.read_rows(np.arange(start, stop))

    def compute(self, images: np.ndarray, start: int, stop: int, device: str = "cpu",
                progress: Optional[Progress] = None) -> Dict[str, np.ndarray]:
        """The results {name: (B, ...)} of rows ``[start, stop)`` from their images."""
        raise NotImplementedError

    @classmethod
    def load_checked(cls, folder: PathLike, expected_fingerprint: Optional[str]) -> "ChunkedJob":
        """The job in ``folder``, refused (ValueError) when it was prepared for another fingerprint."""
        job = cls.load(folder)
        if expected_fingerprint is not None and job.fingerprint() != expected_fingerprint:
            raise ValueError(f"The {cls.WHAT} in {folder} was prepared for other inputs or settings "
                             f"(fingerprint {job.fingerprint()[:12]}, expected {expected_fingerprint[:12]}): "
                             f"run the protocol's conversion step again (Continue does it).")
        return job

    @classmethod
    def run_folder_chunk(cls, folder: PathLike, start: int, stop: int, expected_fingerprint: Optional[str] = None,
                         device: str = "cpu", progress: Optional[Progress] = None
                         ) -> Tuple[Path, bool]:
        """Compute rows ``[start, stop)`` of the job in ``folder`` unless an up-to-date chunk file
        exists (what a chunk process does). expected_fingerprint: the job fingerprint the caller
        planned with; a job folder written for other inputs or settings is refused (ValueError)
        instead of being mixed in. Returns ``(chunk file, computed)`` (``computed`` False when a
        matching file was reused)."""
        job = cls.load_checked(folder, expected_fingerprint)
        return job.run_chunk(folder, start, stop, device=device, progress=progress)

    def run_chunk(self, folder: PathLike, start: int, stop: int, device: str = "cpu",
                  progress: Optional[Progress] = None) -> Tuple[Path, bool]:
        """Compute rows ``[start, stop)`` into their chunk file (written atomically) unless an
        up-to-date one exists. Returns ``(chunk file, computed)``."""
        if not 0 <= start < stop <= len(self.ids):
            raise ValueError(f"Rows {start}-{stop} are outside the {len(self.ids)} particles of the job.")
        images = self.read_images(start, stop)
        provenance = {"job": self.fingerprint(), "start": int(start), "stop": int(stop),
                      "images": fingerprint(np.ascontiguousarray(images, dtype=np.float32))}
        out = chunk_path(folder, start, stop)
        if read_chunk(out, provenance) is not None:
            logger.info("rows %d-%d: up to date in %s", start, stop, out.name)
            return out, False
        if out.exists():
            logger.info("rows %d-%d: %s is not a result of these inputs; computing them again", start, stop,
                        out.name)
        write_chunk(out, provenance, self.ids[start:stop],
                    self.compute(images, start, stop, device=device, progress=progress))
        logger.info("rows %d-%d: %d particles %s", start, stop, stop - start, self.DONE)
        return out, True

    def gather(self, folder: PathLike, chunk_size: int) -> Dict[str, np.ndarray]:
        """The results {name: (M, ...)} in the order of ``ids``, each chunk's rows placed by
        particle id. chunk_size: the chunking they were computed with (:func:`chunk_bounds`).
        Raises ValueError when a chunk is missing or was computed for another job or other rows."""
        job_fp = self.fingerprint()
        pieces = [finished_chunk(folder, start, stop, job_fp, self.DONE)
                  for start, stop in chunk_bounds(len(self.ids), chunk_size)]
        return gather_by_id(self.ids, [(c.ids, c.arrays) for c in pieces])
