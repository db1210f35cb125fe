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
