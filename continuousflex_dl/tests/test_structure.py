"""Light structure reading for form checks: coordinates without ProDy and the diameter."""
import numpy as np
import prody
from scipy.spatial.distance import pdist

from continuousflex_dl.core.imaging.structure import diameter, example_structure_path, load_atoms, read_coordinates


def test_coordinates_match_prody_for_pdb_and_mmcif(tmp_path):
    path = example_structure_path("4ake")
    reference = load_atoms(path, "all").coords
    coords = read_coordinates(path)
    np.testing.assert_array_equal(coords, reference)
    prody.LOGGER.verbosity = "warning"
    cif = tmp_path / "4ake.cif"
    prody.writeMMCIF(str(cif), prody.parsePDB(str(path)))
    np.testing.assert_allclose(read_coordinates(cif), reference, atol=1e-3)


def test_diameter_is_the_largest_distance_between_two_atoms():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(400, 3)) * [30.0, 10.0, 5.0]
    assert abs(diameter(points) - pdist(points).max()) < 1e-9
    flat = np.column_stack([rng.normal(size=(50, 2)), np.zeros(50)])  # coplanar: no 3-D hull
    assert abs(diameter(flat) - pdist(flat).max()) < 1e-9
    assert diameter(np.array([[0.0, 0, 0], [3.0, 4.0, 0]])) == 5.0
    assert diameter(np.zeros((1, 3))) == 0.0


def test_atoms_carry_their_residues_as_blocks_and_pseudoatoms_none(tmp_path):
    """Atoms.blocks (the rigid blocks of the rigid-block deformation): one per residue, the same
    read with and without ProDy; None for pseudoatoms (residue PSE), which stay linear."""
    from continuousflex_dl.core.imaging.structure import read_atoms_plain
    path = example_structure_path("4ake")
    heavy, every = load_atoms(path, "heavy"), load_atoms(path, "all")
    assert heavy.blocks.max() + 1 == 214 and len(heavy.blocks) == 1656
    np.testing.assert_array_equal(read_atoms_plain(path).blocks, every.blocks)
    resnums = every.group.getResnums()
    assert all(len(set(resnums[every.blocks == b])) == 1 for b in range(0, 214, 20))
    pdb = tmp_path / "pseudo.pdb"
    pdb.write_text("".join("ATOM  %5d DENS PSE A%4d    %8.3f%8.3f%8.3f%6.2f%6.2f           C\n"
                           % (i + 1, i + 1, i, 0.0, 0.0, 1.0, 2.0) for i in range(3)))
    assert load_atoms(pdb, "all").blocks is None and read_atoms_plain(pdb).blocks is None
