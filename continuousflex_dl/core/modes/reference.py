"""The flexible reference that HEMNMA aligns against and the network's simulator draws from:
a Gaussian-atom structure and its normal modes, validated once here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

__all__ = ["Reference"]


@dataclass
class Reference:
    """A structure and the normal modes of the amplitude columns.

    coords: (N, 3) Å, centred (``structure.centre``); modes: (K, N, 3) unit-norm mode vectors
    in the order of the amplitude columns (K may be 0; an empty (0, 0) array is read as (0, N,
    3)); sigma: Å, a number or (N,) Gaussian widths of the atoms; weights: (N,) or None (ones).
    Raises ValueError, saying what to fix, for arrays of other shapes or widths that are not
    positive and finite. :attr:`atom_sigma` and :attr:`atom_weights` give both as (N,) arrays.
    blocks: (N,) int, the rigid block (residue) of every atom
    (:func:`~continuousflex_dl.core.modes.deformation.residue_blocks`), what the ``'rigid-blocks'``
    deformation moves rigidly; None for a reference without residues (pseudoatoms), which is
    displaced linearly whatever deformation is asked.
    """
    coords: np.ndarray
    modes: np.ndarray
    sigma: Union[float, np.ndarray] = 1.0
    weights: Optional[np.ndarray] = None
    blocks: Optional[np.ndarray] = None

    def __post_init__(self):
        self.coords = np.asarray(self.coords, dtype=np.float64)
        if self.coords.ndim != 2 or self.coords.shape[1] != 3 or not len(self.coords):
            raise ValueError(f"Reference coordinates must be (N, 3) Å, got shape {self.coords.shape}.")
        n = len(self.coords)
        self.modes = np.asarray(self.modes, dtype=np.float64)
        if self.modes.size == 0 and self.modes.ndim == 2:
            self.modes = self.modes.reshape(0, n, 3)
        if self.modes.ndim != 3 or self.modes.shape[1:] != self.coords.shape:
            raise ValueError(f"Reference modes must be (K, {n}, 3) to match the {n} atoms, got shape "
                             f"{self.modes.shape}: compute the modes on this structure.")
        try:
            sigma = np.broadcast_to(np.asarray(self.sigma, dtype=np.float64), (n,))
        except ValueError:
            raise ValueError(f"Atom widths (sigma) must be one number or one per atom ({n}), got shape "
                             f"{np.shape(self.sigma)}.") from None
        if not np.all(np.isfinite(sigma) & (sigma > 0)):
            raise ValueError("Atom widths (sigma) must be positive and finite (Å).")
        if self.weights is not None and np.size(self.weights) != n:
            raise ValueError(f"Atom weights must have one value per atom ({n}), got {np.size(self.weights)}.")
        if self.blocks is not None:
            self.blocks = np.asarray(self.blocks).reshape(-1).astype(np.int64)
            if len(self.blocks) != n:
                raise ValueError(f"Atom blocks (residues) must have one label per atom ({n}), got {len(self.blocks)}.")

    @property
    def n_modes(self) -> int:
        return int(self.modes.shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self.coords.shape[0])

    @property
    def atom_sigma(self) -> np.ndarray:
        """(N,) Å, the width of every atom."""
        return np.broadcast_to(np.asarray(self.sigma, dtype=np.float64), (self.n_atoms,)).copy()

    @property
    def atom_weights(self) -> np.ndarray:
        """(N,) the weight of every atom (ones when :attr:`weights` is None)."""
        if self.weights is None:
            return np.ones(self.n_atoms)
        return np.asarray(self.weights, dtype=np.float64).reshape(-1).copy()
