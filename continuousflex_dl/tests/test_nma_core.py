"""Normal mode analysis against an independent ANM (ProDy) and a known physical result."""
import numpy as np
import pytest

from continuousflex_dl.core.modes.nma import (
    animation_frames, compute_modes, displace, read_mode_files, relative_cutoff, subspace_overlap,
    write_mode_files)
from continuousflex_dl.core.imaging.structure import (
    centre, example_structure_path, load_atoms, write_multimodel_pdb)


@pytest.fixture(scope="module")
def adk_heavy():
    return load_atoms(example_structure_path("4ake"), "heavy")


@pytest.fixture(scope="module")
def adk_modes(adk_heavy):
    return compute_modes(centre(adk_heavy.coords), n_modes=20, cutoff=8.0)


def test_heavy_atom_selection_drops_hydrogens(adk_heavy):
    # 4akeA_alg_fixed.pdb: 3341 atoms with hydrogens, 1656 heavy atoms of chain A.
    assert adk_heavy.n_atoms == 1656
    assert not any(name.startswith("H") for name in adk_heavy.group.getElements())


def test_modes_match_independent_prody_anm(adk_heavy, adk_modes):
    import prody
    coords = centre(adk_heavy.coords)
    anm = prody.ANM()
    anm.buildHessian(coords, cutoff=8.0, gamma=1.0)
    anm.calcModes(n_modes=14, zeros=True)
    theirs = anm.getArray().T.reshape(-1, adk_heavy.n_atoms, 3)
    assert subspace_overlap(adk_modes.vectors[6:9], theirs[6:9]) >= 0.99
    np.testing.assert_allclose(adk_modes.eigenvalues[6:14], anm.getEigvals()[6:14], rtol=1e-6)


def test_modes_are_orthonormal_with_six_rigid_modes(adk_modes):
    v = adk_modes.vectors.reshape(adk_modes.n_modes, -1)
    np.testing.assert_allclose(v @ v.T, np.eye(adk_modes.n_modes), atol=1e-8)
    ev = adk_modes.eigenvalues
    assert np.all(np.abs(ev[:6]) < 1e-8 * ev[6])
    assert ev[6] > 1e-3 and np.all(np.diff(ev[6:]) > 0)
    assert np.all((adk_modes.collectivity > 1 / 1656) & (adk_modes.collectivity <= 1 + 1e-12))
    # Translations move every atom equally: collectivity exactly 1.
    np.testing.assert_allclose(adk_modes.collectivity[:3], 1.0)


def test_signs_are_deterministic(adk_heavy, adk_modes):
    again = compute_modes(centre(adk_heavy.coords)[::-1].copy()[::-1], n_modes=20, cutoff=8.0)
    np.testing.assert_allclose(again.vectors, adk_modes.vectors, atol=1e-8)
    flat = adk_modes.vectors[6:].reshape(14, -1)
    assert np.all(flat[np.arange(14), np.argmax(np.abs(flat), axis=1)] > 0)


def test_coarse_solver_recovers_exact_modes(adk_heavy, adk_modes):
    coarse = compute_modes(centre(adk_heavy.coords), n_modes=12, cutoff=8.0, method="coarse",
                           coarse_beads=300)
    assert subspace_overlap(coarse.vectors[6:9], adk_modes.vectors[6:9]) >= 0.99
    np.testing.assert_allclose(coarse.eigenvalues[6:9], adk_modes.eigenvalues[6:9], rtol=1e-3)


def test_open_to_closed_motion_is_mode_7():
    """4AKE -> 1AKE (Cα, after superposition) is mostly the first non-rigid mode."""
    open_ = load_atoms(example_structure_path("4ake"), "ca")
    closed = load_atoms(example_structure_path("1ake"), "chain A and protein and name CA")
    assert np.array_equal(open_.group.getResnums(), closed.group.getResnums())
    x, y = centre(open_.coords), centre(closed.coords)
    u, _, vt = np.linalg.svd(y.T @ x)
    r = u @ np.diag([1, 1, np.sign(np.linalg.det(u @ vt))]) @ vt
    motion = (y @ r - x).ravel()
    motion /= np.linalg.norm(motion)
    modes = compute_modes(x, n_modes=12, cutoff=15.0)
    first = abs(motion @ modes.vectors[6].ravel())
    assert 0.75 <= first <= 0.9
    assert subspace_overlap(motion[None], modes.vectors[6:9]) > 0.8


def test_relative_cutoff_is_a_percentile_of_neighbour_distances():
    # A cubic lattice of spacing 3 Å: 5 nearest neighbours at 3 Å (6 at 3 Å), so any percentile is 3 Å.
    grid = 3.0 * np.stack(np.meshgrid(*[np.arange(6)] * 3, indexing="ij"), -1).reshape(-1, 3)
    interior = relative_cutoff(grid, 50)
    assert interior == pytest.approx(3.0)
    assert relative_cutoff(grid, 100) == pytest.approx(np.sqrt(2) * 3.0)


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="disconnected"):
        compute_modes(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [30, 0, 0], [31, 0, 0], [30, 1, 0.]]),
                      n_modes=7, cutoff=5)
    with pytest.raises(ValueError, match="at most"):
        compute_modes(np.random.default_rng(0).normal(size=(3, 3)), n_modes=20)
    with pytest.raises(ValueError, match="identical"):
        compute_modes(np.array([[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1.]]), n_modes=7, cutoff=5)


def test_pdb_without_atoms_is_refused(tmp_path):
    empty = tmp_path / "empty.pdb"
    empty.write_text("HEADER    NOTHING\nEND\n")
    with pytest.raises(ValueError):
        load_atoms(empty)
    with pytest.raises(ValueError, match="not found"):
        load_atoms(tmp_path / "missing.pdb")


def test_displacement_and_multimodel_pdb(tmp_path, adk_heavy, adk_modes):
    coords = adk_heavy.coords
    q = np.array([100.0, -50.0])
    moved = displace(coords, adk_modes.vectors[6:8], q)
    # Unit-norm orthogonal modes: the displacement norm is the norm of the amplitudes.
    assert np.linalg.norm(moved - coords) == pytest.approx(np.linalg.norm(q))
    frames = animation_frames(coords, adk_modes.vectors[6], 120.0, n_frames=8)
    path = write_multimodel_pdb(tmp_path / "mode7.pdb", adk_heavy, frames)
    import prody
    back = prody.parsePDB(str(path))
    assert back.numCoordsets() == 8 and back.numAtoms() == 1656
    np.testing.assert_allclose(back.getCoordsets(), frames, atol=1e-3)


def test_mode_files_round_trip_and_mismatch(tmp_path, adk_modes):
    paths = write_mode_files(tmp_path, adk_modes.vectors[:9])
    assert [p.name for p in paths] == [f"vec.{k}" for k in range(1, 10)]
    back = read_mode_files(paths, n_atoms=1656)
    np.testing.assert_allclose(back, adk_modes.vectors[:9], rtol=1e-7, atol=1e-12)
    with pytest.raises(ValueError, match="do not match"):
        read_mode_files(paths[:1], n_atoms=214)


def test_floppy_network_is_refused():
    # A chain of atoms 3 Å apart with a 3.5 Å cutoff is connected but floppy (hinges at every atom).
    chain = np.column_stack([3.0 * np.arange(12), 0.3 * np.sin(np.arange(12)), 0.2 * np.cos(np.arange(12))])
    with pytest.raises(ValueError, match="[Ff]loppy|cutoff"):
        compute_modes(chain, n_modes=8, cutoff=3.5)
