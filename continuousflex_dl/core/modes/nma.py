"""Elastic network (ANM) normal modes, and displacement of structures along them.

Conventions (see DESIGN.md): a mode is a 3N vector of unit Euclidean norm,
stored as an array (N, 3); modes are numbered from 1 and modes 1-6 are the
rigid-body motions (eigenvalue 0). A structure is displaced by
``x + sum_k q_k v_k`` with amplitudes ``q_k`` in Å.

Two solvers share one Hessian (Atilgan et al. 2001):

* ``exact``: sparse shift-invert Lanczos on the full Hessian (up to a few
  tens of thousands of atoms);
* ``coarse``: for large structures, modes of a coarse network (atoms grouped
  into grid cells) mapped back onto every atom, then refined on the full
  atomic Hessian by Rayleigh-Ritz and block-preconditioned LOBPCG. Memory is
  linear in the number of atoms.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # annotations only
    import scipy.sparse

# scipy is imported where it is used: the alignment and training chunks import this module
# for its small helpers (displace, default_amplitude_range), not for the Hessian.

logger = logging.getLogger(__name__)

__all__ = [
    "NormalModes", "compute_modes", "anm_hessian", "contact_pairs", "relative_cutoff",
    "rigid_body_modes", "collectivity", "fix_signs", "displace", "animation_frames",
    "subspace_overlap", "write_mode_files", "read_mode_files", "mode_file_name", "residue_profiles",
    "default_amplitude_range", "N_RIGID", "first_flexible_modes",
]

N_RIGID = 6
EXACT_MAX_ATOMS = 12000


def first_flexible_modes(k: int) -> List[int]:
    """The mode numbers of K amplitude columns that do not name their modes: the first K
    non-rigid modes, ``N_RIGID + 1 ... N_RIGID + K`` (7, 8, ...; modes are numbered from 1)."""
    if k < 0:
        raise ValueError(f"The number of modes must not be negative, got {k}.")
    return list(range(N_RIGID + 1, N_RIGID + 1 + int(k)))


@dataclass
class NormalModes:
    """Normal modes 1..K of a structure of N atoms.

    vectors: (K, N, 3) unit-norm (as 3N vectors), mutually orthogonal.
    eigenvalues: (K,) in units of the spring constant ``gamma`` (modes 1-6 ~ 0).
    collectivity: (K,) Brüschweiler's collectivity in [1/N, 1].
    cutoff: the interaction cutoff used (Å).
    """
    vectors: np.ndarray
    eigenvalues: np.ndarray
    collectivity: np.ndarray
    cutoff: float

    @property
    def n_modes(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def numbers(self) -> np.ndarray:
        return np.arange(1, self.n_modes + 1)


def contact_pairs(coords: np.ndarray, cutoff: float) -> np.ndarray:
    """Index pairs (P, 2), i < j, of atoms closer than ``cutoff`` Å."""
    from scipy.spatial import cKDTree
    return cKDTree(coords).query_pairs(cutoff, output_type="ndarray").astype(np.int64)


def relative_cutoff(coords: np.ndarray, percentile: float, n_nearest: int = 5) -> float:
    """Cutoff (Å) at a percentile of the nearest-neighbour distance distribution.

    The distribution is that of the distances from every atom to its
    ``n_nearest`` nearest neighbours (as for ContinuousFlex's pseudoatom
    networks). percentile in (0, 100].
    """
    from scipy.spatial import cKDTree
    if not 0 < percentile <= 100:
        raise ValueError(f"The relative cutoff is a percentile in (0, 100], not {percentile}.")
    k = min(n_nearest, len(coords) - 1)
    if k < 1:
        raise ValueError("A relative cutoff needs at least two atoms.")
    dist, _ = cKDTree(coords).query(coords, k=k + 1)
    return float(np.percentile(dist[:, 1:], percentile))


def anm_hessian(coords: np.ndarray, cutoff: float, gamma: float = 1.0,
                pairs: Optional[np.ndarray] = None) -> "scipy.sparse.csr_matrix":
    """Sparse ANM Hessian (3N, 3N): springs of constant ``gamma`` between atoms closer than ``cutoff`` Å."""
    import scipy.sparse as sp
    coords = np.asarray(coords, dtype=np.float64)
    n = len(coords)
    if pairs is None:
        pairs = contact_pairs(coords, cutoff)
    i, j = pairs[:, 0], pairs[:, 1]
    d = coords[j] - coords[i]
    if len(d) and np.einsum("pi,pi->p", d, d).min() < 1e-12:
        raise ValueError("Two atoms have identical coordinates: remove duplicated atoms "
                         "(alternate locations) before computing modes.")
    blocks = -gamma * d[:, :, None] * d[:, None, :] / np.einsum("pi,pi->p", d, d)[:, None, None]
    # Off-diagonal blocks (i, j) and (j, i); diagonal blocks are minus the row sums.
    diag = np.zeros((n, 3, 3))
    np.add.at(diag, i, -blocks)
    np.add.at(diag, j, -blocks)
    a, b = np.meshgrid(np.arange(3), np.arange(3), indexing="ij")
    rows = np.concatenate([(3 * i[:, None, None] + a).ravel(), (3 * j[:, None, None] + a).ravel(),
                           (3 * np.arange(n)[:, None, None] + a).ravel()])
    cols = np.concatenate([(3 * j[:, None, None] + b).ravel(), (3 * i[:, None, None] + b).ravel(),
                           (3 * np.arange(n)[:, None, None] + b).ravel()])
    vals = np.concatenate([blocks.ravel(), blocks.ravel(), diag.ravel()])
    return sp.csr_matrix((vals, (rows, cols)), shape=(3 * n, 3 * n))


def rigid_body_modes(coords: np.ndarray) -> np.ndarray:
    """Orthonormal basis (6, N, 3) of rigid translations and rotations about the centroid.

    Deterministic: translations along x, y, z, then rotations about x, y, z,
    orthonormalised in that order (Gram-Schmidt)."""
    c = np.asarray(coords, dtype=np.float64) - np.mean(coords, axis=0)
    n = len(c)
    basis = np.zeros((6, n, 3))
    for k in range(3):
        basis[k, :, k] = 1.0
        axis = np.zeros(3)
        axis[k] = 1.0
        basis[3 + k] = np.cross(axis, c)
    flat = basis.reshape(6, -1)
    q, _ = np.linalg.qr(flat.T)
    q = q * np.sign(np.sum(q * flat.T, axis=0))  # keep the direction of each generator
    return q.T.reshape(6, n, 3)


def collectivity(vectors: np.ndarray) -> np.ndarray:
    """Brüschweiler (1995) collectivity of each mode (K, N, 3) -> (K,), equal masses."""
    u2 = np.sum(vectors ** 2, axis=-1)
    u2 = u2 / u2.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.sum(np.where(u2 > 0, u2 * np.log(u2), 0.0), axis=1)
    return np.exp(ent) / vectors.shape[1]


def fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Deterministic signs: the largest-magnitude component of every mode is positive."""
    flat = vectors.reshape(len(vectors), -1)
    idx = np.argmax(np.abs(flat), axis=1)
    signs = np.sign(flat[np.arange(len(flat)), idx])
    signs[signs == 0] = 1.0
    return vectors * signs[:, None, None]


def compute_modes(coords: np.ndarray, n_modes: int = 20, cutoff: float = 8.0, gamma: float = 1.0,
                  method: str = "auto", refine_iterations: int = 40,
                  coarse_beads: int = 4000) -> NormalModes:
    """ANM normal modes 1..``n_modes`` of atoms ``coords`` (N, 3) Å.

    method: 'exact' (shift-invert Lanczos on the full sparse Hessian),
    'coarse' (coarse network + Rayleigh-Ritz/LOBPCG refinement on the full
    Hessian), or 'auto' (exact up to EXACT_MAX_ATOMS atoms).
    Raises ValueError if the structure is too small for the modes asked or the
    elastic network falls apart into disconnected pieces at this cutoff.
    """
    from scipy.sparse.csgraph import connected_components
    import scipy.sparse as sp
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"Coordinates must have shape (N, 3), not {coords.shape}.")
    if not np.all(np.isfinite(coords)):
        raise ValueError("The structure has non-finite coordinates.")
    n = len(coords)
    if n_modes <= N_RIGID:
        raise ValueError(f"Ask for more than {N_RIGID} modes: modes 1-6 are rigid-body motions.")
    if 3 * n - N_RIGID < n_modes:
        raise ValueError(f"{n} atoms have only {3 * n} modes; ask for at most {3 * n - N_RIGID} "
                         f"modes or select more atoms.")
    if cutoff <= 0:
        raise ValueError(f"The cutoff must be positive, not {cutoff} Å.")
    pairs = contact_pairs(coords, cutoff)
    n_parts, labels = connected_components(
        sp.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n)), directed=False)
    if n_parts > 1:
        sizes = np.bincount(labels)
        raise ValueError(f"At a cutoff of {cutoff:.1f} Å the elastic network has {n_parts} disconnected "
                         f"pieces (the smallest has {sizes.min()} atoms): each would move freely. "
                         f"Increase the cutoff or remove isolated atoms.")
    if method == "auto":
        method = "exact" if n <= EXACT_MAX_ATOMS else "coarse"
    logger.info("ANM of %d atoms, cutoff %.2f Å, %d contacts, %d modes (%s solver)",
                n, cutoff, len(pairs), n_modes, method)
    hessian = anm_hessian(coords, cutoff, gamma, pairs)
    rigid = rigid_body_modes(coords).reshape(N_RIGID, -1).T
    k_flex = n_modes - N_RIGID
    if method == "exact":
        values, vecs = _exact_flexible_modes(hessian, rigid, k_flex)
    elif method == "coarse":
        values, vecs = _coarse_flexible_modes(coords, hessian, rigid, k_flex, cutoff, gamma,
                                              refine_iterations, coarse_beads)
    else:
        raise ValueError(f"Unknown NMA method {method!r}: use 'auto', 'exact' or 'coarse'.")
    scale = float(abs(hessian.diagonal()).mean())
    if values[0] < 1e-7 * scale:
        raise ValueError(f"Mode 7 has a zero frequency: at a cutoff of {cutoff:.2f} Å the elastic network "
                         f"is floppy (some atoms have too few springs). Increase the cutoff.")
    vectors = np.concatenate([rigid.T, vecs.T]).reshape(n_modes, n, 3)
    vectors[N_RIGID:] = fix_signs(vectors[N_RIGID:])
    eigenvalues = np.concatenate([np.zeros(N_RIGID), values])
    return NormalModes(vectors=vectors, eigenvalues=eigenvalues,
                       collectivity=collectivity(vectors), cutoff=float(cutoff))


def _exact_flexible_modes(hessian, rigid, k):
    import scipy.sparse.linalg as spla
    n3 = hessian.shape[0]
    scale = float(abs(hessian.diagonal()).mean())
    n_ask = min(k + N_RIGID, n3 - 1)
    v0 = np.ones(n3) / np.sqrt(n3)  # deterministic start
    try:
        values, vecs = spla.eigsh(hessian.tocsc(), k=n_ask, sigma=-1e-6 * scale, which="LM", v0=v0)
    except spla.ArpackNoConvergence as exc:
        raise ValueError("The eigensolver did not converge: the elastic network is probably floppy. "
                         "Increase the cutoff.") from exc
    order = np.argsort(values)
    values, vecs = values[order], vecs[:, order]
    # Remove the rigid-body null space exactly, then re-orthonormalise within the rest.
    vecs = vecs[:, N_RIGID:]
    vecs -= rigid @ (rigid.T @ vecs)
    return _rayleigh_ritz(hessian, vecs, k)


def _rayleigh_ritz(hessian, basis, k):
    q, _ = np.linalg.qr(basis)
    g = q.T @ (hessian @ q)
    values, rot = np.linalg.eigh((g + g.T) / 2)
    return values[:k], (q @ rot)[:, :k]


def _coarse_flexible_modes(coords, hessian, rigid, k, cutoff, gamma, iterations, n_beads):
    from scipy.spatial import cKDTree
    import scipy.sparse.linalg as spla
    n = len(coords)
    labels, beads = _grid_beads(coords, n_beads)
    spacing = np.median(cKDTree(beads).query(beads, k=2)[0][:, 1])
    bead_cutoff = max(cutoff, 2.5 * spacing)
    m = min(2 * k + 10, 3 * len(beads) - N_RIGID)
    logger.info("Coarse network: %d beads (spacing %.1f Å, cutoff %.1f Å), %d modes", len(beads),
                spacing, bead_cutoff, m)
    coarse = compute_modes(beads, m + N_RIGID, bead_cutoff, gamma, method="exact")
    # Each atom moves with its bead; the rigid modes are added exactly.
    mapped = coarse.vectors[N_RIGID:][:, labels, :].reshape(m, 3 * n).T
    mapped -= rigid @ (rigid.T @ mapped)
    values, vecs = _rayleigh_ritz(hessian, mapped, mapped.shape[1])
    if iterations > 0:
        precond = _block_jacobi(hessian, n)
        with warnings.catch_warnings():  # stopping at maxiter is expected, not an error
            warnings.simplefilter("ignore", UserWarning)
            values, vecs = spla.lobpcg(hessian, vecs, M=precond, Y=rigid, largest=False, tol=1e-6,
                                       maxiter=iterations, verbosityLevel=0)
        order = np.argsort(values)
        values, vecs = _rayleigh_ritz(hessian, vecs[:, order], len(values))
    return values[:k], vecs[:, :k]


def _grid_beads(coords, n_beads):
    """Group atoms into cubic cells holding about N / n_beads atoms; beads are cell centroids."""
    lo = coords.min(axis=0)
    extent = np.ptp(coords, axis=0).max() + 1e-6
    # Start from a volume estimate and shrink/grow the cell until the bead count is close.
    cell = extent / max(n_beads ** (1 / 3), 1.0)
    for _ in range(30):
        keys = np.floor((coords - lo) / cell).astype(np.int64)
        _, labels = np.unique(keys, axis=0, return_inverse=True)
        count = labels.max() + 1
        if 0.7 * n_beads <= count <= 1.3 * n_beads:
            break
        cell *= (count / n_beads) ** (1 / 3)
    labels = labels.ravel()
    sums = np.zeros((count, 3))
    np.add.at(sums, labels, coords)
    return labels, sums / np.bincount(labels, minlength=count)[:, None]


def _block_jacobi(hessian, n):
    """Inverse of the 3x3 diagonal blocks of the Hessian, as a LinearOperator."""
    import scipy.sparse.linalg as spla
    blocks = np.zeros((n, 3, 3))
    h = hessian.tocoo()
    keep = (h.row // 3) == (h.col // 3)
    blocks[h.row[keep] // 3, h.row[keep] % 3, h.col[keep] % 3] = h.data[keep]
    inv = np.linalg.inv(blocks + 1e-8 * np.eye(3) * np.trace(blocks, axis1=1, axis2=2)[:, None, None])

    def apply(x):
        x2 = x.reshape(n, 3, -1)
        return np.einsum("nij,njk->nik", inv, x2).reshape(x.shape)

    return spla.LinearOperator(hessian.shape, matvec=apply, matmat=apply, dtype=np.float64)


def displace(coords, modes, amplitudes):
    """Displaced structures ``x + sum_k q_k v_k``.

    coords: (N, 3) Å; modes: (K, N, 3) unit-norm mode vectors (as 3N vectors);
    amplitudes: (..., K) in Å. Returns (..., N, 3). numpy or torch (not mixed). The linear
    member of :mod:`.deformation`, which also displaces by rigid blocks (NOLB).
    """
    if isinstance(amplitudes, torch.Tensor):
        return coords + torch.einsum("...k,knd->...nd", amplitudes, modes)
    return np.asarray(coords) + np.einsum("...k,knd->...nd", np.asarray(amplitudes), np.asarray(modes))


def animation_frames(coords: np.ndarray, mode: np.ndarray, amplitude: float,
                     n_frames: int = 20) -> np.ndarray:
    """A back-and-forth movie along one mode (N, 3): 0 -> +A -> -A -> 0, shape (n_frames, N, 3)."""
    q = amplitude * np.sin(np.linspace(0, 2 * np.pi, n_frames, endpoint=False))
    return displace(coords, mode[None], q[:, None])


def residue_profiles(vectors: np.ndarray, residue_numbers: np.ndarray):
    """How far each residue moves along each mode: the largest atom displacement per residue.

    vectors: (K, N, 3) modes (unit-norm 3N vectors, so values are Å of displacement per
    Å of amplitude); residue_numbers: (N,) residue number of each atom (atoms of one
    number in several chains count as one residue). Returns ``(residues (R,) sorted
    unique numbers, profiles (K, R))``.
    """
    vectors = np.asarray(vectors, dtype=float)
    residue_numbers = np.asarray(residue_numbers)
    if vectors.ndim != 3 or vectors.shape[2] != 3 or residue_numbers.shape != vectors.shape[1:2]:
        raise ValueError(f"Expected modes (K, N, 3) and N residue numbers; got {vectors.shape} and "
                         f"{residue_numbers.shape}.")
    residues, inverse = np.unique(residue_numbers, return_inverse=True)
    profiles = np.zeros((len(vectors), len(residues)))
    for k, v in enumerate(vectors):
        np.maximum.at(profiles[k], inverse, np.linalg.norm(v, axis=1))
    return residues, profiles


def default_amplitude_range(n_atoms: int) -> float:
    """Half-width (Å) of the amplitude range when nothing is known: 5 sqrt(N) Å, which moves
    N atoms by 5 Å RMS along one unit-norm mode (HEMNMA's default search range, and the
    simulator's prior without labels)."""
    return default_animation_amplitude(n_atoms, 5.0)


def default_animation_amplitude(n_atoms: int, rms_displacement: float = 3.0) -> float:
    """Amplitude (Å) that moves the atoms by ``rms_displacement`` Å RMS along a unit-norm mode."""
    return float(rms_displacement * np.sqrt(n_atoms))


def subspace_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """How much of subspace ``a`` lies in subspace ``b``: sqrt(mean squared cosines), in [0, 1].

    a: (Ka, N, 3) or (Ka, 3N); b: (Kb, N, 3) or (Kb, 3N); neither needs to be orthonormal.
    For a single vector it is the absolute cumulative overlap of that vector with ``b``.
    """
    qa, _ = np.linalg.qr(np.reshape(a, (len(a), -1)).T)
    qb, _ = np.linalg.qr(np.reshape(b, (len(b), -1)).T)
    s = np.linalg.svd(qa.T @ qb, compute_uv=False)
    return float(np.sqrt(np.sum(s ** 2) / qa.shape[1]))


def mode_file_name(number: int) -> str:
    """Name of the file of mode ``number`` (1-based), as ContinuousFlex/Xmipp: ``vec.<number>``."""
    return f"vec.{number}"


def write_mode_files(folder: str | os.PathLike, vectors: np.ndarray) -> list:
    """Write each mode (K, N, 3) as a text file of N lines 'dx dy dz' named ``vec.<k>``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, v in enumerate(vectors, start=1):
        path = folder / mode_file_name(k)
        np.savetxt(path, v, fmt="%.8e")
        paths.append(path)
    return paths


def read_mode_files(paths: Sequence[str | os.PathLike], n_atoms: Optional[int] = None) -> np.ndarray:
    """Read mode files (one per mode, N lines of 3 numbers) -> (K, N, 3).

    Raises ValueError if a file is missing, malformed, or does not have ``n_atoms`` rows.
    """
    modes = []
    for path in paths:
        try:
            v = np.loadtxt(path, ndmin=2)
        except (OSError, ValueError) as exc:
            raise ValueError(f"Cannot read mode file {path}: {exc}") from exc
        if v.shape[1] != 3 or (n_atoms is not None and len(v) != n_atoms):
            raise ValueError(f"Mode file {path} has shape {v.shape}; expected ({n_atoms}, 3). "
                             "The modes do not match the structure: recompute them on this structure.")
        modes.append(v)
    return np.stack(modes)
