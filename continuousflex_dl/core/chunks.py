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

import hashlib
import json
import logging
import math
import os
import zipfile
from pathlib import Path
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["fingerprint", "chunk_bounds", "auto_chunk_size", "Chunk", "write_chunk", "read_chunk",
           "gather_by_id"]

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


def write_chunk(path: PathLike, provenance: dict, ids: np.ndarray, arrays: Dict[str, np.ndarray]) -> None:
    """Save one chunk's results atomically (a temporary file in the same folder, then
    ``os.replace``): the file exists only when complete.

    provenance: JSON-able dict of what the chunk was computed from. ids: (B,) particle ids.
    arrays: per-particle results, each with B rows (any trailing shape).
    """
    ids = np.asarray(ids)
    for key, value in arrays.items():
        if len(value) != len(ids):
            raise ValueError(f"Chunk result '{key}' has {len(value)} rows for {len(ids)} particles.")
    if "ids" in arrays or _PROVENANCE_KEY in arrays:
        raise ValueError("Chunk result names 'ids' and '__provenance__' are reserved.")
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, ids=ids, **{_PROVENANCE_KEY: np.array(json.dumps(provenance, sort_keys=True))},
             **arrays)
    os.replace(tmp, path)


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
        logger.warning("Ignoring the damaged chunk file %s (%s); it is computed again.", path, exc)
        return None
    if expected is not None and provenance != json.loads(json.dumps(expected, sort_keys=True)):
        logger.info("Chunk file %s was computed from other inputs or settings; it is computed again.", path)
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
