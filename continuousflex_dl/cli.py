"""Script-level commands over the core (no Scipion needed): for clusters and pipelines."""
import argparse
import logging
from pathlib import Path

import numpy as np


def nma_main(argv=None) -> int:
    from .core import nma
    from .core.structure import load_atoms, write_multimodel_pdb
    parser = argparse.ArgumentParser(prog="continuousflex_dl nma",
                                     description="ANM normal modes of a structure -> vec.N mode files.")
    parser.add_argument("structure", type=Path, help="PDB or mmCIF file")
    parser.add_argument("output", type=Path, help="output folder")
    parser.add_argument("--selection", default="heavy", help="heavy, ca, all or a ProDy selection")
    parser.add_argument("--modes", type=int, default=20)
    parser.add_argument("--cutoff", type=float, default=8.0, help="Å")
    parser.add_argument("--method", default="auto", choices=["auto", "exact", "coarse"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    atoms = load_atoms(args.structure, args.selection)
    modes = nma.compute_modes(atoms.coords, args.modes, args.cutoff, method=args.method)
    args.output.mkdir(parents=True, exist_ok=True)
    write_multimodel_pdb(args.output / "atoms.pdb", atoms, atoms.coords)
    nma.write_mode_files(args.output / "modes", modes.vectors)
    np.savetxt(args.output / "modes.txt",
               np.column_stack([modes.numbers, modes.eigenvalues, modes.collectivity]),
               fmt=["%d", "%.6e", "%.4f"], header="mode eigenvalue collectivity")
    print(f"{modes.n_modes} modes of {atoms.n_atoms} atoms written to {args.output}")
    return 0
