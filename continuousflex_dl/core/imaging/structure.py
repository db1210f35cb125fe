"""Atomic structures: reading with an atom selection, centring, and multi-model PDB output.

Coordinates are float64 arrays of shape (N, 3) in Å. Pseudoatomic structures
(Gaussian pseudoatoms of a density map) carry a per-atom width ``sigma`` (Å)
and ``weight``; atomic structures use a default width and unit weights.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["Atoms", "SELECTIONS", "load_atoms", "read_coordinates", "diameter", "centre",
           "write_multimodel_pdb", "example_structure_path", "ATOM_SIGMA", "read_atoms_plain",
           "write_coordinates_pdb", "residue_blocks"]

#: Named atom selections (ProDy syntax). The default leaves out hydrogens,
#: waters, ions and ligands.
SELECTIONS = {
    "heavy": "(protein or nucleic) and not hydrogen",
    "ca": "(protein and name CA) or (nucleic and name P)",
    "all": "all",
}

#: Default Gaussian width (standard deviation, Å) of an atom in projections and maps.
ATOM_SIGMA = 1.0


@dataclass
class Atoms:
    """A selected set of atoms.

    coords: (N, 3) float64, Å, in the file's frame.
    sigma: (N,) Gaussian widths in Å (``ATOM_SIGMA`` for atoms).
    weights: (N,) relative scattering weights (1 for atoms).
    group: the ProDy AtomGroup (names, residues, chains) used to write PDB files.
    blocks: (N,) int64 the residue of every atom (:func:`residue_blocks`), the rigid blocks of
    the rigid-block deformation; None for pseudoatoms and files read without residues (mmCIF
    by :func:`read_atoms_plain`).
    """
    coords: np.ndarray
    sigma: np.ndarray
    weights: np.ndarray
    group: object = field(repr=False, default=None)
    blocks: Optional[np.ndarray] = field(repr=False, default=None)

    @property
    def n_atoms(self) -> int:
        return int(self.coords.shape[0])


def load_atoms(path: str | os.PathLike, selection: str = "heavy") -> Atoms:
    """Read a PDB/mmCIF file and keep the atoms of ``selection``.

    selection: a key of :data:`SELECTIONS` or any ProDy selection string.
    Raises ValueError if the file cannot be read or the selection is empty.
    """
    import prody
    prody.LOGGER.verbosity = "warning"
    path = Path(path)
    if not path.exists():
        raise ValueError(f"Structure file not found: {path}")
    try:
        if path.suffix.lower() in (".cif", ".mmcif"):
            group = prody.parseMMCIF(str(path))
        else:
            group = prody.parsePDB(str(path))
    except Exception as exc:  # ProDy raises many kinds of errors
        raise ValueError(f"Cannot read atomic structure {path}: {exc}") from exc
    if group is None or group.numAtoms() == 0:
        raise ValueError(f"{path} contains no atoms. Give a PDB or mmCIF file with ATOM records.")
    query = SELECTIONS.get(selection, selection)
    try:
        selected = group.select(query)
    except Exception as exc:
        raise ValueError(f"Invalid atom selection {query!r}: {exc}") from exc
    if selected is None or selected.numAtoms() == 0:
        raise ValueError(f"No atoms of {path} match the selection {query!r}. "
                         "Choose another selection (for example 'all').")
    sub = selected.copy()
    coords = np.asarray(sub.getCoords(), dtype=np.float64)
    sigma, weights = _pseudoatom_parameters(sub)
    logger.info("Read %d atoms of %s (selection %r)", len(coords), path.name, query)
    blocks = _structure_blocks(sub.getResnames(), sub.getResnums(), sub.getChids(), sub.getIcodes())
    return Atoms(coords=coords, sigma=sigma, weights=weights, group=sub, blocks=blocks)


def read_coordinates(path: str | os.PathLike, records: Sequence[str] = ("ATOM", "HETATM")) -> np.ndarray:
    """Coordinates (N, 3) Å of the first model of a PDB or mmCIF file, read without ProDy
    (fast, and usable where ProDy cannot be imported, e.g. in the Scipion GUI under
    ``python -O``), for quick checks such as :func:`diameter`. Only atoms whose record
    (group_PDB in mmCIF) is in ``records`` are kept; no other selection is applied.
    Raises ValueError if the file has no such atoms.
    """
    path = Path(path)
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise ValueError(f"Cannot read the structure {path}: {exc.strerror}.") from None
    wanted = tuple(r.upper() for r in records)
    coords = []
    if path.suffix.lower() in (".cif", ".mmcif"):
        columns, in_loop = [], False
        for line in lines:
            if line.startswith("loop_"):
                columns, in_loop = [], True
            elif in_loop and line.startswith("_atom_site."):
                columns.append(line.split()[0][len("_atom_site."):])
            elif columns and line.strip() and not line.startswith(("_", "#", "loop_")):
                words = line.split()
                if len(words) != len(columns):
                    continue
                row = dict(zip(columns, words))
                if row.get("pdbx_PDB_model_num", "1") != "1" and coords:
                    break
                if row.get("group_PDB", "ATOM").upper() in wanted:
                    coords.append([float(row["Cartn_x"]), float(row["Cartn_y"]), float(row["Cartn_z"])])
            elif columns and coords:
                break  # the end of the atom_site loop
            elif line.startswith("_"):
                in_loop = False  # a header of another category's loop
    else:
        for line in lines:
            if line.startswith("ENDMDL") and coords:
                break
            if line[:6].strip().upper() in wanted:
                try:
                    coords.append([float(line[30:38]), float(line[38:46]), float(line[46:54])])
                except ValueError:
                    continue
    if not coords:
        raise ValueError(f"{path} has no {' or '.join(records)} records with coordinates.")
    return np.asarray(coords, dtype=np.float64)


def diameter(coords: np.ndarray) -> float:
    """The largest distance (Å) between two of the atoms (N, 3) Å: the size a box must
    have, at least, to hold the structure in every orientation along its longest axis."""
    from scipy.spatial import ConvexHull, QhullError
    from scipy.spatial.distance import pdist
    coords = np.asarray(coords, dtype=np.float64)
    if len(coords) < 2:
        return 0.0
    points = coords
    if len(coords) > 4:
        try:
            points = coords[ConvexHull(coords).vertices]  # the farthest pair lies on the hull
        except QhullError:  # flat or collinear: every atom counts
            points = coords
    return float(pdist(points).max())


def _pseudoatom_parameters(group) -> tuple[np.ndarray, np.ndarray]:
    """Widths and weights: pseudoatoms keep them in the B-factor (sigma) and occupancy
    (weight) columns with residue name ``PSE``; real atoms get ATOM_SIGMA and 1."""
    n = group.numAtoms()
    resnames = group.getResnames()
    if resnames is not None and n and np.all(resnames == "PSE"):
        return (np.asarray(group.getBetas(), dtype=np.float64),
                np.asarray(group.getOccupancies(), dtype=np.float64))
    return np.full(n, ATOM_SIGMA), np.ones(n)


def centre(coords: np.ndarray) -> np.ndarray:
    """The reference frame convention: coordinates (N, 3) Å minus their mean.

    Projections, maps, synthesis and alignment all place the mean of the
    *reference* (undeformed) coordinates at the box centre.
    """
    coords = np.asarray(coords, dtype=np.float64)
    return coords - coords.mean(axis=0)


def write_multimodel_pdb(path: str | os.PathLike, atoms: Atoms, frames: np.ndarray) -> Path:
    """Write frames (F, N, 3) Å of ``atoms`` as one PDB with F models (ChimeraX/VMD play it)."""
    import prody
    frames = np.asarray(frames, dtype=np.float64)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.shape[1:] != atoms.coords.shape:
        raise ValueError(f"Frames of shape {frames.shape[1:]} do not match the {atoms.n_atoms} atoms.")
    group = atoms.group.copy()
    group.setCoords(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prody.writePDB(str(path), group)
    return path


def example_structure_path(name: str = "4ake") -> Path:
    """Adenylate kinase shipped with ProDy's tests: '4ake' (open, chain A, with
    hydrogens) or '1ake' (closed). Nothing is downloaded."""
    import importlib.util
    files = {"4ake": "4akeA_alg_fixed.pdb", "1ake": "pdb1ake.pdb"}
    if name not in files:
        raise ValueError(f"Unknown example {name!r}; choose one of {sorted(files)}")
    # Locate the folder without importing it (its __init__ asserts on files some wheels lack).
    spec = importlib.util.find_spec("prody")
    return Path(spec.origin).parent / "tests" / "datafiles" / files[name]


def atoms_from_coords(coords: np.ndarray, sigma: Optional[Sequence[float]] = None,
                      weights: Optional[Sequence[float]] = None) -> Atoms:
    """Atoms without a file (tests, pseudoatoms): defaults to unit weights and ATOM_SIGMA."""
    coords = np.asarray(coords, dtype=np.float64)
    n = len(coords)
    return Atoms(coords=coords,
                 sigma=np.full(n, ATOM_SIGMA) if sigma is None else np.asarray(sigma, float),
                 weights=np.ones(n) if weights is None else np.asarray(weights, float))


def _pdb_atom_lines(lines: Sequence[str]) -> List[int]:
    """Indices of the ATOM/HETATM lines of the first model of a PDB file."""
    rows = []
    for i, line in enumerate(lines):
        if line.startswith("ENDMDL") and rows:
            break
        if line[:6].strip().upper() in ("ATOM", "HETATM"):
            rows.append(i)
    return rows


def residue_blocks(residue_numbers: Sequence, chain_ids: Optional[Sequence] = None,
                   insertion_codes: Optional[Sequence] = None) -> np.ndarray:
    """(N,) int64 block labels 0..P-1: one block per residue, the atoms that share a chain id,
    a residue number (and an insertion code), numbered in order of first appearance."""
    keys = [np.asarray(residue_numbers).astype(str)]
    for extra in (chain_ids, insertion_codes):
        if extra is not None:
            if len(extra) != len(keys[0]):
                raise ValueError(f"Need one chain id / insertion code per atom ({len(keys[0])}), got {len(extra)}.")
            keys.append(np.asarray(extra).astype(str))
    joined = np.array(["|".join(k) for k in zip(*keys)]) if len(keys) > 1 else keys[0]
    _, first, inverse = np.unique(joined, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))            # label blocks by first appearance
    return order[inverse.reshape(-1)].astype(np.int64)


def _structure_blocks(resnames, resnums, chains, icodes) -> Optional[np.ndarray]:
    """The residues of a structure's atoms as blocks, None for pseudoatoms (residue PSE)."""
    if len(resnames) and all(str(r).strip() == "PSE" for r in resnames):
        return None
    return residue_blocks(resnums, chains, icodes)


def read_atoms_plain(path: str | os.PathLike) -> Atoms:
    """The atoms (all ATOM and HETATM records of the first model) of a PDB or mmCIF file read
    without ProDy (usable in the Scipion GUI under ``python -O``): coords (N, 3) Å, and widths
    and weights as :func:`load_atoms` gives them (pseudoatoms, residue ``PSE`` in a PDB file:
    B-factor column = sigma Å, occupancy = weight; other atoms: ATOM_SIGMA and 1). No group."""
    coords = read_coordinates(path)
    n = len(coords)
    sigma, weights, blocks = np.full(n, ATOM_SIGMA), np.ones(n), None
    if Path(path).suffix.lower() not in (".cif", ".mmcif"):
        lines = Path(path).read_text(errors="replace").splitlines()
        rows = [lines[i] for i in _pdb_atom_lines(lines)]
        if len(rows) == n and n:
            blocks = _structure_blocks([r[17:20] for r in rows], [r[22:26].strip() for r in rows],
                                       [r[21:22] for r in rows], [r[26:27] for r in rows])
        if len(rows) == n and n and all(r[17:20].strip() == "PSE" for r in rows):
            try:
                sigma = np.array([float(r[60:66]) for r in rows])
                weights = np.array([float(r[54:60]) for r in rows])
            except ValueError:
                raise ValueError(f"The pseudoatoms of {path} lack widths (B-factor column) or weights "
                                 f"(occupancy column): make them again with the pseudoatom protocol.")
    return Atoms(coords=coords, sigma=sigma, weights=weights, blocks=blocks)


def write_coordinates_pdb(path: str | os.PathLike, template: str | os.PathLike, coords: np.ndarray) -> Path:
    """Write ``coords`` (N, 3) Å as a PDB file, without ProDy: the atom records of the PDB
    ``template`` (its N ATOM/HETATM lines of the first model) with new coordinates; for an mmCIF
    template, plain ``ATOM`` records of carbon atoms. Returns the path."""
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"Coordinates must be (N, 3) Å; got shape {coords.shape}.")
    if np.abs(coords).max(initial=0.0) >= 1e4:
        raise ValueError("Coordinates of 10000 Å or more do not fit the PDB format's columns.")
    xyz = [f"{x:8.3f}{y:8.3f}{z:8.3f}" for x, y, z in coords]
    out = []
    if Path(template).suffix.lower() in (".cif", ".mmcif"):
        out = [f"ATOM  {(i + 1) % 100000:5d}  C   UNK A{(i + 1) % 10000:4d}    {c}  1.00  0.00           C"
               for i, c in enumerate(xyz)]
    else:
        lines = Path(template).read_text(errors="replace").splitlines()
        rows = _pdb_atom_lines(lines)
        if len(rows) != len(coords):
            raise ValueError(f"{template} has {len(rows)} atoms, the coordinates {len(coords)}: give the "
                             f"structure the coordinates come from.")
        out = [lines[i][:30].ljust(30) + c + lines[i][54:] for i, c in zip(rows, xyz)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(out + ["END"]) + "\n")
    os.replace(tmp, path)
    return path
