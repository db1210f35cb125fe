"""The landscape for other tools: Xmipp metadata (ContinuousFlex), RELION 3.1 star, cryoDRGN z.

Plain files from arrays (no Scipion). Conventions shared by all three:

* poses are this package's (:mod:`..imaging.geometry`): Euler ZYZ ``(rot, tilt, psi)`` in
  degrees and shifts ``(shiftX, shiftY)`` in pixels, which are Xmipp's ``_angleRot/_angleTilt/
  _anglePsi/_shiftX/_shiftY`` and RELION's angles and origin (``rlnOriginX/YAngst`` = shift
  times the pixel size) as they stand, with no sign change;
* amplitudes (M, K) are in Å, in the order of the modes;
* rows are particles, in the same order in every file written from one set.

Numbers are written with ``repr`` so they read back exactly.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np

from ..imaging.ctf import CTFParams
from ..imaging.star import AMPLITUDE_LABEL, write_star

__all__ = ["write_xmipp_images", "write_relion31_star", "write_latent", "OPTICS_LABELS",
           "XMIPP_HEADER"]

PathLike = Union[str, os.PathLike]

#: The first lines of an Xmipp metadata file (``XMIPP_STAR_1``), exactly as ContinuousFlex's
#: DeepHEMNMA scripts write and read them: its reader takes the labels from the 5th line on and
#: counts as header every line shorter than 20 characters, so nothing else may be that short
#: (no blank line, not even at the end).
XMIPP_HEADER = ["# XMIPP_STAR_1 * ", "# ", "data_noname", "loop_"]

#: The optics columns every RELION 3.1 optics group has (RELION's ``data_optics``).
OPTICS_LABELS = ("rlnOpticsGroupName", "rlnOpticsGroup", "rlnVoltage", "rlnSphericalAberration",
                 "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality")


def _rows(name: str, values, shape) -> np.ndarray:
    out = np.asarray(values, dtype=float)
    if out.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {out.shape}.")
    return out


def _check_pose(n: int, angles, shifts):
    if (angles is None) != (shifts is None):
        raise ValueError("Give both the angles and the shifts of the particles, or neither.")
    if angles is None:
        return None, None
    return _rows("Angles (deg)", angles, (n, 3)), _rows("Shifts (px)", shifts, (n, 2))


def _number(value) -> str:
    return repr(float(value))


def write_xmipp_images(path: PathLike, image_names: Sequence[str], amplitudes: np.ndarray,
                       item_ids: Sequence[int], angles: Optional[np.ndarray] = None,
                       shifts: Optional[np.ndarray] = None, cost: Optional[np.ndarray] = None) -> None:
    """Write the ``images.xmd`` of a ContinuousFlex HEMNMA run: Xmipp metadata, one row per
    particle with ``_image`` (``index@stack``, 1-based), ``_enabled`` (1), ``_angleRot``,
    ``_angleTilt``, ``_anglePsi`` (deg) and ``_shiftX``, ``_shiftY`` (px) when ``angles``
    (M, 3) and ``shifts`` (M, 2) are given, ``_nmaDisplacements`` (the K amplitudes (M, K) in Å,
    a quoted vector), ``_cost`` (M,) when given and ``_itemId`` (the Scipion id). The columns
    are those of ContinuousFlex's alignment and DeepHEMNMA outputs, in their order."""
    n = len(image_names)
    amplitudes = np.asarray(amplitudes, dtype=float)
    if amplitudes.ndim != 2 or amplitudes.shape[0] != n or not amplitudes.shape[1]:
        raise ValueError(f"Amplitudes must have shape ({n}, K) Å with K >= 1, got {amplitudes.shape}.")
    angles, shifts = _check_pose(n, angles, shifts)
    ids = np.asarray(item_ids, dtype=int)
    if ids.shape != (n,):
        raise ValueError(f"{len(ids)} item ids given for {n} images.")
    cost = None if cost is None else _rows("Cost", cost, (n,))
    for name in image_names:
        if any(c.isspace() or c == "'" for c in name):
            raise ValueError(f"The image name {name!r} has a space or a quote, which ContinuousFlex's "
                             "metadata reader splits: move or link the stack to a path without them.")
    labels = ["_image", "_enabled"]
    labels += ["_angleRot", "_angleTilt", "_anglePsi", "_shiftX", "_shiftY"] if angles is not None else []
    labels += ["_nmaDisplacements"] + (["_cost"] if cost is not None else []) + ["_itemId"]
    lines = XMIPP_HEADER + [" " + label for label in labels]
    for i in range(n):
        row = [image_names[i], "1"]
        if angles is not None:
            row += [_number(v) for v in (*angles[i], *shifts[i])]
        row.append("' " + " ".join(_number(v) for v in amplitudes[i]) + " '")
        if cost is not None:
            row.append(_number(cost[i]))
        row.append(str(int(ids[i])))
        lines.append(" ".join(row))
    Path(path).write_text("\n".join(lines) + "\n")


def write_relion31_star(path: PathLike, image_names: Sequence[str], image_ids: Sequence[int],
                        optics: Dict[str, Sequence], optics_group: Sequence[int], pixel_size: float,
                        angles: Optional[np.ndarray] = None, shifts: Optional[np.ndarray] = None,
                        ctf: Optional[CTFParams] = None, amplitudes: Optional[np.ndarray] = None,
                        mode_numbers: Optional[Sequence[int]] = None) -> None:
    """Write a RELION 3.1 particle star: ``data_optics`` (``optics``: ``{label: one value per
    group}`` with at least :data:`OPTICS_LABELS`; its pixel size must be ``pixel_size`` Å/px)
    and ``data_particles`` with ``rlnImageName`` (``index@stack``), ``rlnImageId`` (M,),
    ``rlnOpticsGroup`` (M,) (numbers of the optics table), the angles (M, 3) deg and
    ``rlnOriginXAngst/YAngst`` (shifts (M, 2) px times ``pixel_size``) when given, the
    per-particle CTF columns (``rlnDefocusU/V`` Å, ``rlnDefocusAngle`` deg, ``rlnPhaseShift``
    deg) of ``ctf`` (B = M) when given, and one ``_cfdlAmplitudeMode<k>`` column (Å) per mode
    number ``k`` of ``amplitudes`` (M, K) (:data:`..imaging.star.AMPLITUDE_LABEL`)."""
    n = len(image_names)
    missing = [label for label in OPTICS_LABELS if label not in optics]
    if missing:
        raise ValueError(f"The optics table lacks {missing}: give every column of {list(OPTICS_LABELS)}.")
    sizes = np.asarray(optics["rlnImagePixelSize"], dtype=float)
    if not np.allclose(sizes, pixel_size, rtol=1e-9, atol=0):
        raise ValueError(f"The optics groups have pixel sizes {sorted(set(sizes.tolist()))} Å/px but the "
                         f"particles {pixel_size} Å/px: a Scipion set has one pixel size; split the set or "
                         f"correct the optics table.")
    groups = np.asarray(optics_group, dtype=int)
    unknown = sorted(set(groups.tolist()) - {int(g) for g in optics["rlnOpticsGroup"]})
    if groups.shape != (n,) or unknown:
        raise ValueError(f"Each of the {n} particles needs an optics group of the table "
                         f"{[int(g) for g in optics['rlnOpticsGroup']]}; got {len(groups)} groups "
                         f"{'with the unknown ' + str(unknown) if unknown else ''}.")
    angles, shifts = _check_pose(n, angles, shifts)
    table: Dict[str, Sequence] = {"rlnImageName": list(image_names),
                                  "rlnImageId": np.asarray(image_ids, dtype=int),
                                  "rlnOpticsGroup": groups}
    if angles is not None:
        table.update({"rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1], "rlnAnglePsi": angles[:, 2],
                      "rlnOriginXAngst": shifts[:, 0] * pixel_size, "rlnOriginYAngst": shifts[:, 1] * pixel_size})
    if ctf is not None:
        if ctf.batch_size not in (1, n):
            raise ValueError(f"The CTF describes {ctf.batch_size} images, the particles are {n}.")
        ctf = ctf.expand(n)
        table.update({"rlnDefocusU": ctf.column("defocus_u"), "rlnDefocusV": ctf.column("defocus_v"),
                      "rlnDefocusAngle": ctf.column("defocus_angle"), "rlnPhaseShift": ctf.column("phase_shift")})
    if amplitudes is not None:
        amplitudes = _rows("Amplitudes (Å)", amplitudes, (n, np.shape(amplitudes)[-1]))
        numbers = [int(m) for m in mode_numbers] if mode_numbers is not None else []
        if len(numbers) != amplitudes.shape[1]:
            raise ValueError(f"{len(numbers)} mode numbers given for {amplitudes.shape[1]} amplitude columns.")
        for j, m in enumerate(numbers):
            table[AMPLITUDE_LABEL.format(m)[1:]] = amplitudes[:, j]
    write_star(path, {"optics": {label: list(values) for label, values in optics.items()},
                      "particles": table})


def write_latent(path: PathLike, z: np.ndarray, z_std: Optional[np.ndarray] = None) -> bool:
    """Write cryoDRGN's latent file (``z.<epoch>.pkl`` of ``cryodrgn train_vae``, what its
    analysis tools load with ``cryodrgn.utils.load_pkl``): the pickled float32 array
    ``z`` (N, zdim), in particle order, followed, when ``z_std`` (N, zdim) is given, finite and
    positive, by a second pickle with the log-variance ``log(z_std ** 2)`` (cryoDRGN's
    ``z_logvar``). Returns whether the log-variance was written."""
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2 or not z.shape[1]:
        raise ValueError(f"The latent array must have shape (N, zdim) with zdim >= 1, got {z.shape}.")
    with open(path, "wb") as f:
        pickle.dump(z, f)
        if z_std is not None:
            std = _rows("Latent standard deviation", z_std, z.shape)
            if np.all(np.isfinite(std)) and np.all(std > 0):
                pickle.dump(np.log(std ** 2).astype(np.float32), f)
                return True
    return False
