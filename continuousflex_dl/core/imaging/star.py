"""RELION-style STAR files of particle ground truth (plain text, no dependency).

:func:`write_particles_star` writes one ``data_particles`` loop (RELION 3.0 style, readable
by RELION 3.0 and by Scipion's RELION importer) with, per image:

* ``_rlnImageName``: ``index@stack`` with a 1-based index (``000001@particles.mrcs``);
* ``_rlnAngleRot/_rlnAngleTilt/_rlnAnglePsi`` (deg, ZYZ, :mod:`.geometry` convention);
* ``_rlnOriginX/_rlnOriginY`` (px, RELION 3.0) and ``_rlnOriginXAngst/_rlnOriginYAngst``
  (Å, RELION 3.1), both equal to the pose shifts ``(shiftX, shiftY)`` of :mod:`.geometry`;
* ``_rlnDefocusU/_rlnDefocusV`` (Å, underfocus > 0), ``_rlnDefocusAngle`` (deg),
  ``_rlnVoltage`` (kV), ``_rlnSphericalAberration`` (mm), ``_rlnAmplitudeContrast``,
  ``_rlnPhaseShift`` (deg) from a :class:`~.ctf.CTFParams` (:data:`CTF_LABELS`);
* ``_rlnImagePixelSize`` (Å/px) and, for RELION 3.0, ``_rlnDetectorPixelSize`` (= pixel size,
  µm) with ``_rlnMagnification`` 10000, so that ``pixel = detector * 1e4 / magnification``;
* one ``_cfdlAmplitudeMode<k>`` column (Å) per normal mode ``k`` (1-based mode number).

Numbers are written with ``repr`` so they read back exactly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from .ctf import CTFParams

__all__ = ["write_star", "read_star", "write_particles_star", "read_particles_star",
           "ParticlesStar", "AMPLITUDE_LABEL", "CTF_LABELS"]

#: RELION's label of each CTFParams field (RELION 3.0 particle columns; 3.1 keeps the
#: acquisition ones in data_optics).
CTF_LABELS = {"defocus_u": "rlnDefocusU", "defocus_v": "rlnDefocusV", "defocus_angle": "rlnDefocusAngle",
              "voltage": "rlnVoltage", "cs": "rlnSphericalAberration",
              "amplitude_contrast": "rlnAmplitudeContrast", "phase_shift": "rlnPhaseShift"}

#: Column label of the amplitude of mode ``k``: ``AMPLITUDE_LABEL.format(k)``.
AMPLITUDE_LABEL = "_cfdlAmplitudeMode{}"

PathLike = Union[str, os.PathLike]


def _format(value) -> str:
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    text = str(value)
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"STAR values cannot be empty or contain spaces: {text!r}")
    return text


def write_star(path: PathLike, blocks: Dict[str, Dict[str, Sequence]]) -> None:
    """Write STAR loop tables: ``blocks[name][label] = column`` (all columns of a block the same
    length; labels with or without the leading ``_``). Block ``name`` becomes ``data_<name>``."""
    lines = ["", "# version 30001", ""]
    for name, table in blocks.items():
        labels = [lab if lab.startswith("_") else "_" + lab for lab in table]
        columns = [list(np.asarray(col).tolist()) if isinstance(col, np.ndarray) else list(col)
                   for col in table.values()]
        lengths = {len(c) for c in columns}
        if len(lengths) > 1:
            raise ValueError(f"Columns of STAR block {name!r} have different lengths {sorted(lengths)}.")
        lines += [f"data_{name}", "", "loop_"]
        lines += [f"{lab} #{i}" for i, lab in enumerate(labels, 1)]
        for row in zip(*columns):
            lines.append(" ".join(_format(v) for v in row))
        lines.append("")
    Path(path).write_text("\n".join(lines) + "\n")


def read_star(path: PathLike) -> Dict[str, Dict[str, List[str]]]:
    """Read a STAR file -> ``{block name: {label: [values as strings]}}``.

    Loops give one value per row; simple ``_label value`` pairs give one-element lists.
    Labels keep their leading ``_``; comments (``#``) are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"STAR file not found: {path}")
    blocks: Dict[str, Dict[str, List[str]]] = {}
    current: Optional[Dict[str, List[str]]] = None
    loop_labels: Optional[List[str]] = None
    in_header = False
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("data_"):
            current = blocks.setdefault(line[5:], {})
            loop_labels, in_header = None, False
            continue
        if current is None:
            raise ValueError(f"{path}, line {number}: data outside a data_ block.")
        if line.startswith("loop_"):
            loop_labels, in_header = [], True
            continue
        if line.startswith("_"):
            parts = line.split()
            if loop_labels is not None and in_header:
                loop_labels.append(parts[0])
                current[parts[0]] = []
            else:
                loop_labels = None
                current[parts[0]] = [parts[1] if len(parts) > 1 else ""]
            continue
        if loop_labels is None:
            raise ValueError(f"{path}, line {number}: value outside a loop: {line!r}")
        in_header = False
        values = line.split()
        if len(values) != len(loop_labels):
            raise ValueError(f"{path}, line {number}: {len(values)} values for "
                             f"{len(loop_labels)} columns.")
        for lab, v in zip(loop_labels, values):
            current[lab].append(v)
    return blocks


@dataclass
class ParticlesStar:
    """Particles read from a STAR file (see :func:`read_particles_star`).

    stacks: (n,) stack path of each image as written; indices: (n,) 0-based index in its stack;
    angles (n, 3) deg; shifts (n, 2) px; pixel_size Å/px (None if absent);
    ctf: CTFParams (B = n) or None when the file has no defocus columns;
    amplitudes (n, K) Å and mode_numbers (K,) from the ``_cfdlAmplitudeMode<k>`` columns.
    """
    stacks: List[str]
    indices: np.ndarray
    angles: np.ndarray
    shifts: np.ndarray
    pixel_size: Optional[float]
    ctf: Optional[CTFParams] = None
    amplitudes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    mode_numbers: List[int] = field(default_factory=list)


def write_particles_star(path: PathLike, stack_name: str, angles: np.ndarray, shifts: np.ndarray,
                         pixel_size: float, *, ctf: Optional[CTFParams] = None,
                         amplitudes: Optional[np.ndarray] = None,
                         mode_numbers: Optional[Sequence[int]] = None,
                         indices: Optional[Sequence[int]] = None) -> None:
    """Write the ground truth of images ``0..n-1`` of ``stack_name`` (or of ``indices``,
    0-based) as ``data_particles``. angles (n, 3) deg; shifts (n, 2) px; pixel_size Å/px;
    ctf: CTFParams (B = 1 or n; None: no CTF columns); amplitudes (n, K) Å
    with their 1-based ``mode_numbers`` (required with amplitudes)."""
    angles = np.asarray(angles, dtype=float)
    shifts = np.asarray(shifts, dtype=float)
    if angles.ndim != 2 or angles.shape[1] != 3:
        raise ValueError(f"Angles must have shape (n, 3) deg, got {angles.shape}.")
    n = len(angles)
    if shifts.shape != (n, 2):
        raise ValueError(f"Shifts must have shape ({n}, 2) px, got {shifts.shape}.")
    if not pixel_size > 0:
        raise ValueError(f"The pixel size must be positive (Å/px), got {pixel_size}.")
    idx = np.arange(n) if indices is None else np.asarray(indices, dtype=int)
    if idx.shape != (n,):
        raise ValueError(f"{len(idx)} indices given for {n} images.")
    table: Dict[str, Sequence] = {
        "rlnImageName": [f"{i + 1:06d}@{stack_name}" for i in idx],
        "rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1], "rlnAnglePsi": angles[:, 2],
        "rlnOriginX": shifts[:, 0], "rlnOriginY": shifts[:, 1],
        "rlnOriginXAngst": shifts[:, 0] * pixel_size, "rlnOriginYAngst": shifts[:, 1] * pixel_size,
    }
    if ctf is not None:
        ctf = ctf.expand(n)
        table.update({label: ctf.column(name) for name, label in CTF_LABELS.items()})
    table.update({"rlnImagePixelSize": [float(pixel_size)] * n,
                  "rlnDetectorPixelSize": [float(pixel_size)] * n,
                  "rlnMagnification": [10000.0] * n})
    if amplitudes is not None:
        amplitudes = np.asarray(amplitudes, dtype=float)
        if amplitudes.ndim != 2 or amplitudes.shape[0] != n:
            raise ValueError(f"Amplitudes must have shape ({n}, K) Å, got {amplitudes.shape}.")
        k = amplitudes.shape[1]
        if mode_numbers is None:
            raise ValueError("Give the mode numbers (from 7 on) of the amplitude columns: they name the "
                             "star file's amplitude columns.")
        numbers = [int(m) for m in mode_numbers]
        if len(numbers) != k:
            raise ValueError(f"{len(numbers)} mode numbers given for {k} amplitude columns.")
        for j, m in enumerate(numbers):
            table[AMPLITUDE_LABEL.format(m)[1:]] = amplitudes[:, j]
    write_star(path, {"particles": table})


def read_particles_star(path: PathLike) -> ParticlesStar:
    """Read ``data_particles`` (RELION 3.0 or 3.1 particle columns and ``_cfdlAmplitudeMode<k>``)."""
    blocks = read_star(path)
    if "particles" not in blocks:
        raise ValueError(f"{path} has no data_particles block.")
    t = blocks["particles"]
    if "_rlnImageName" not in t:
        raise ValueError(f"{path}: data_particles has no _rlnImageName column.")
    n = len(t["_rlnImageName"])

    def num(label):
        return np.asarray(t[label], dtype=float) if label in t else None

    stacks, indices = [], []
    for name in t["_rlnImageName"]:
        if "@" in name:
            i, stack = name.split("@", 1)
            indices.append(int(i) - 1)
        else:
            stack = name
            indices.append(0)
        stacks.append(stack)
    angles = np.stack([num(f"_rlnAngle{a}") if f"_rlnAngle{a}" in t else np.zeros(n)
                       for a in ("Rot", "Tilt", "Psi")], -1)
    pixel_size = None
    for label in ("_rlnImagePixelSize", "_rlnPixelSize"):
        if label in t:
            pixel_size = float(t[label][0])
            break
    if pixel_size is None and "_rlnDetectorPixelSize" in t and "_rlnMagnification" in t:
        pixel_size = float(t["_rlnDetectorPixelSize"][0]) * 1e4 / float(t["_rlnMagnification"][0])
    if "_rlnOriginX" in t:
        shifts = np.stack([num("_rlnOriginX"), num("_rlnOriginY")], -1)
    elif "_rlnOriginXAngst" in t:
        if pixel_size is None:
            raise ValueError(f"{path}: shifts in Å but no pixel size column.")
        shifts = np.stack([num("_rlnOriginXAngst"), num("_rlnOriginYAngst")], -1) / pixel_size
    else:
        shifts = np.zeros((n, 2))
    prefix = AMPLITUDE_LABEL.format("")
    amp_labels = [lab for lab in t if lab.startswith(prefix)]  # file order = order of the modes
    numbers = [int(lab[len(prefix):]) for lab in amp_labels]
    amplitudes = np.stack([num(lab) for lab in amp_labels], -1) if amp_labels else np.zeros((n, 0))
    return ParticlesStar(
        stacks=stacks, indices=np.asarray(indices, dtype=int), angles=angles, shifts=shifts,
        pixel_size=pixel_size, ctf=_read_ctf(t), amplitudes=amplitudes, mode_numbers=numbers)


def _read_ctf(table: Dict[str, List[str]]) -> Optional[CTFParams]:
    """The CTF columns of a particle table (:data:`CTF_LABELS`), or None without defocus."""
    if "_rlnDefocusU" not in table:
        return None
    return CTFParams(**{name: np.asarray(table["_" + label], dtype=float)
                        for name, label in CTF_LABELS.items() if "_" + label in table})
