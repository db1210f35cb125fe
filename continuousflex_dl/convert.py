"""The one place that translates between Scipion objects and core arrays/files."""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pyworkflow.object as pwobj
from pwem.objects import NormalMode, SetOfNormalModes

from .core.nma import NormalModes, read_mode_files
from .core.structure import Atoms, load_atoms

logger = logging.getLogger(__name__)

#: Extra attributes this plugin stores on Scipion objects (one place for their names).
ATTR_EIGENVALUE = "_cfdlEigenvalue"
ATTR_ANIMATION = "_cfdlAnimation"


def mode_score(modes: NormalModes) -> np.ndarray:
    """ContinuousFlex-style score in [0, 1] (lower is better): the mean of a mode's rank
    by frequency and its rank by decreasing collectivity, divided by the mode count."""
    k = modes.n_modes
    rank_freq = np.argsort(np.argsort(modes.eigenvalues))
    rank_coll = np.argsort(np.argsort(-modes.collectivity))
    return (rank_freq + rank_coll + 2) / (2.0 * k)


def fill_normal_modes(out: SetOfNormalModes, modes: NormalModes, mode_files: Sequence[str],
                      enabled: np.ndarray, animations: Optional[Sequence[str]] = None) -> None:
    """Append one NormalMode per mode (id = mode number) to ``out``."""
    scores = mode_score(modes)
    for k in range(modes.n_modes):
        item = NormalMode(modeFile=str(mode_files[k]), collectivity=float(modes.collectivity[k]),
                          score=float(scores[k]))
        item.setObjId(k + 1)
        item.setEnabled(bool(enabled[k]))
        setattr(item, ATTR_EIGENVALUE, pwobj.Float(float(modes.eigenvalues[k])))
        setattr(item, ATTR_ANIMATION, pwobj.String(animations[k] if animations else ""))
        out.append(item)


def modes_table(modes_set: SetOfNormalModes) -> List[dict]:
    """Rows (number, eigenvalue, collectivity, score, enabled, file, animation) of a SetOfNormalModes."""
    rows = []
    for item in modes_set.iterItems(orderBy="id"):
        eig = getattr(item, ATTR_EIGENVALUE, None)
        anim = getattr(item, ATTR_ANIMATION, None)
        rows.append(dict(number=item.getObjId(), eigenvalue=eig.get() if eig is not None else None,
                         collectivity=item.getCollectivity(), score=item.getScore(),
                         enabled=item.isEnabled(), file=item.getModeFile(),
                         animation=anim.get() if anim is not None else ""))
    return rows


def enabled_mode_numbers(modes_set: SetOfNormalModes, first: int = 7) -> List[int]:
    """Numbers of the enabled modes from ``first`` on (the default mode list of later protocols)."""
    return [r["number"] for r in modes_table(modes_set) if r["enabled"] and r["number"] >= first]


def read_modes(modes_set: SetOfNormalModes, mode_numbers: Sequence[int]) -> Tuple[Atoms, np.ndarray]:
    """The structure and the chosen modes (K, N, 3) of a SetOfNormalModes.

    Raises ValueError with the fix if the set has no structure, a mode number
    does not exist, or the mode files do not match the structure.
    """
    structure = modes_set.getPdb()
    if structure is None:
        raise ValueError("The normal modes have no atomic structure attached; "
                         "compute them with the NMA protocol of this plugin.")
    atoms = load_atoms(structure.getFileName(), "all")
    files = {r["number"]: r["file"] for r in modes_table(modes_set)}
    missing = [n for n in mode_numbers if n not in files]
    if missing:
        raise ValueError(f"Modes {missing} are not in the set (it has modes 1-{max(files)}).")
    return atoms, read_mode_files([files[n] for n in mode_numbers], n_atoms=atoms.n_atoms)


def parse_mode_list(text: str) -> List[int]:
    """'7-9, 12' -> [7, 8, 9, 12]. Raises ValueError on malformed text."""
    numbers: List[int] = []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                numbers.extend(range(lo, hi + 1))
            else:
                numbers.append(int(part))
        except ValueError:
            raise ValueError(f"Cannot read the mode list {text!r}: use numbers and ranges like '7-9, 12'.")
    if not numbers:
        raise ValueError("The mode list is empty: give mode numbers like '7-9'.")
    return numbers
