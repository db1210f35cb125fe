"""Gaussian pseudoatoms of a density map (core.modes.pseudoatoms), against synthetic truth."""
import numpy as np
import pytest
import torch

from continuousflex_dl.core.modes import nma
from continuousflex_dl.core.modes import pseudoatoms as pa
from continuousflex_dl.core.imaging.geometry import random_rotations
from continuousflex_dl.core.imaging.projection import density_map, project_gaussians
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms

BOX, PIXEL, MAP_SIGMA = 48, 2.0, 2.0  # 4AKE map at 2 Å/px, atoms blurred to sigma 2 Å (~6 Å resolution)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small tensors: threads only contend on a shared machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def atoms():
    return centre(load_atoms(example_structure_path("4ake"), "heavy").coords)


@pytest.fixture(scope="module")
def ake_map(atoms):
    return density_map(atoms, BOX, PIXEL, sigma=MAP_SIGMA).numpy()


@pytest.fixture(scope="module")
def fitted(ake_map):
    return pa.volume_to_pseudoatoms(ake_map, PIXEL, 2.0, target_error=0.05)


def test_render_matches_density_map():
    rng = np.random.default_rng(3)
    coords = rng.uniform(-20, 20, (40, 3))
    weights = rng.uniform(0.5, 2.0, 40)
    mine = pa.render_pseudoatoms(coords, weights, 2.5, 32, 1.5).numpy()
    ref = density_map(torch.as_tensor(coords), 32, 1.5, sigma=2.5, weights=torch.as_tensor(weights)).numpy()
    assert np.abs(mine - ref).max() < 1e-4 * ref.max()


def test_single_gaussian_is_recovered():
    # One Gaussian off the voxel grid: position, weight and width come back.
    true = np.array([[3.3, -5.1, 7.7]])
    vol = density_map(torch.as_tensor(true), 32, 2.0, sigma=3.0, weights=torch.tensor([4.2],
                      dtype=torch.float64)).numpy()
    res = pa.volume_to_pseudoatoms(vol, 2.0, 3.0, target_error=0.01)
    assert res.reached and res.error < 0.01
    heaviest = int(np.argmax(res.weights))
    assert np.linalg.norm(res.coords[heaviest] - true[0]) < 0.1
    assert abs(res.weights.sum() - 4.2) < 0.02 * 4.2


def test_4ake_map_within_target(fitted, ake_map, atoms):
    assert fitted.reached and fitted.error <= 0.05
    # Independent check with the projector's density map (not the fitting code's renderer).
    rebuilt = density_map(torch.as_tensor(fitted.coords), BOX, PIXEL, sigma=fitted.sigma,
                          weights=torch.as_tensor(fitted.weights)).numpy()
    err = np.linalg.norm(rebuilt - ake_map) / np.linalg.norm(ake_map)
    assert err <= 0.05 and abs(err - fitted.error) < 1e-3
    assert fitted.n_atoms < len(atoms)          # a coarser representation than the atoms
    assert np.all(fitted.weights > 0)
    # Pseudoatoms sit on the molecule: every one within 4 Å of some atom.
    from scipy.spatial import cKDTree
    dist, _ = cKDTree(atoms).query(fitted.coords)
    assert dist.max() < 4.0
    # The approximation conserves the mass of the map within 2 %.
    assert abs(fitted.weights.sum() - ake_map.sum()) < 0.02 * ake_map.sum()


def test_max_atoms_is_honest(ake_map):
    res = pa.volume_to_pseudoatoms(ake_map, PIXEL, 2.0, target_error=0.05, max_atoms=40,
                                   final_iterations=5)
    assert res.n_atoms <= 40 and not res.reached
    rebuilt = pa.render_pseudoatoms(res.coords, res.weights, res.sigma, BOX, PIXEL).numpy()
    err = pa.relative_error(ake_map, rebuilt)
    assert abs(err - res.error) < 1e-6 and err > 0.05


def test_pdb_round_trip(fitted, tmp_path):
    path = pa.write_pseudoatoms_pdb(tmp_path / "pseudo.pdb", fitted)
    loaded = load_atoms(path, "all")
    assert loaded.n_atoms == fitted.n_atoms
    assert np.abs(loaded.coords - fitted.coords).max() <= 0.0006
    np.testing.assert_allclose(loaded.sigma, fitted.sigma)
    remarks = pa.read_pdb_remarks(path)
    scale = float(remarks["WEIGHT_SCALE"])
    assert np.abs(loaded.weights * scale - fitted.weights).max() <= 0.0051 * scale
    assert loaded.weights.max() == pytest.approx(pa.OCCUPANCY_MAX)
    assert float(remarks["RELATIVE_ERROR"]) == pytest.approx(fitted.error, rel=1e-5)
    assert float(remarks["PIXEL_SIZE"]) == PIXEL and int(remarks["BOX"]) == BOX


def test_map_file_round_trip(ake_map, tmp_path):
    path = pa.write_map(tmp_path / "map.mrc", ake_map, PIXEL)
    vol, voxel = pa.read_map(str(path) + ":mrc")
    assert voxel == pytest.approx(PIXEL) and np.array_equal(vol, ake_map)
    with pytest.raises(ValueError, match="not found"):
        pa.read_map(tmp_path / "missing.mrc")


def test_threshold_mask_and_bad_input(ake_map):
    vol = pa.prepare_map(ake_map, threshold=0.5 * ake_map.max())
    assert vol.min() == 0 and np.count_nonzero(vol) == np.count_nonzero(ake_map >= 0.5 * ake_map.max())
    mask = np.zeros_like(ake_map)
    mask[: BOX // 2] = 1
    masked = pa.prepare_map(ake_map, mask=mask)
    assert not masked[BOX // 2:].any() and np.array_equal(masked[: BOX // 2], ake_map[: BOX // 2])
    with pytest.raises(ValueError, match="no positive density"):
        pa.volume_to_pseudoatoms(ake_map, PIXEL, threshold=10 * ake_map.max())
    with pytest.raises(ValueError, match="target error"):
        pa.volume_to_pseudoatoms(ake_map, PIXEL, target_error=5)
    with pytest.raises(ValueError, match="mask"):
        pa.prepare_map(ake_map, mask=np.ones((4, 4, 4)))


def test_interpolate_vectors_reproduces_smooth_fields():
    rng = np.random.default_rng(0)
    # Atoms on a 1 Å grid: the Gaussian-weighted mean of a linear field is the field at the point.
    coords = np.stack(np.meshgrid(*[np.arange(-10.0, 11.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    points = rng.uniform(-5, 5, (30, 3))
    # A uniform translation and a rotation about z (a linear field) come back at the points.
    trans = np.broadcast_to([1.0, -2.0, 0.5], coords.shape)
    rot = np.cross([0, 0, 1.0], coords)
    out = pa.interpolate_vectors(coords, np.stack([trans, rot]), points, 1.5)
    np.testing.assert_allclose(out[0], np.broadcast_to([1.0, -2.0, 0.5], points.shape), atol=1e-12)
    assert np.abs(out[1] - np.cross([0, 0, 1.0], points)).max() < 0.01


def test_pseudoatomic_modes_overlap_atomic_modes(fitted, atoms):
    atomic = nma.compute_modes(atoms, 9, 8.0).vectors[6:9]
    at_pseudo = pa.interpolate_vectors(atoms, atomic, fitted.coords, fitted.sigma)
    cutoff = nma.relative_cutoff(fitted.coords, 100)
    pseudo = nma.compute_modes(fitted.coords, 12, cutoff).vectors
    overlap = nma.subspace_overlap(pseudo[6:9], at_pseudo)
    assert overlap >= 0.8, overlap
    # Control: higher pseudoatomic modes do not span the atomic modes 7-9.
    assert nma.subspace_overlap(pseudo[9:12], at_pseudo) < 0.5


def test_alignment_with_pseudoatomic_reference(fitted, atoms):
    alignment = pytest.importorskip("continuousflex_dl.core.hemnma.alignment")
    rng = np.random.default_rng(1)
    n, box, snr, amp = 12, 48, 0.3, 250.0
    atomic = nma.compute_modes(atoms, 8, 8.0).vectors[6:8]
    pcoords = fitted.coords
    pseudo = nma.compute_modes(pcoords, 8, nma.relative_cutoff(pcoords, 100)).vectors[6:8]
    q = rng.uniform(-150, 150, (n, 2))
    rot = random_rotations(n, rng)
    shifts = rng.uniform(-2, 2, (n, 2))
    moved = torch.as_tensor(atoms + np.einsum("bk,knd->bnd", q, atomic), dtype=torch.float32)
    images = project_gaussians(moved, rot, shifts, box, PIXEL, sigma=1.0).numpy()
    sd = np.sqrt(images.var(axis=(1, 2)) / snr)
    images = images + (rng.normal(size=images.shape) * sd[:, None, None]).astype(np.float32)
    # Truth in the pseudoatomic basis: the atomic displacement at the pseudoatoms, on modes 7-8.
    disp = pa.interpolate_vectors(atoms, np.einsum("bk,knd->bnd", q, atomic), pcoords, fitted.sigma)
    q_pseudo = np.einsum("bpd,kpd->bk", disp, pseudo)
    kw = dict(max_shift_px=3, working_size=box, search_size=24, angular_step_deg=20.0)
    res_a = alignment.align_particles(images, atoms, atomic, PIXEL, sigma=1.0,
                                      amplitude_range=np.tile([-amp, amp], (2, 1)), **kw)
    scale = np.sqrt(len(pcoords) / len(atoms))  # same RMS displacement -> amplitude x sqrt(N ratio)
    res_p = alignment.align_particles(images, centre(pcoords), pseudo, PIXEL, sigma=fitted.sigma,
                                      weights=fitted.weights,
                                      amplitude_range=np.tile([-amp * scale, amp * scale], (2, 1)), **kw)
    # Amplitude errors as RMS displacement (Å): ||dq|| / sqrt(N) for unit-norm modes.
    err_a = np.sqrt(np.mean(np.sum((res_a.amplitudes - q) ** 2, 1)) / len(atoms))
    err_p = np.sqrt(np.mean(np.sum((res_p.amplitudes - q_pseudo) ** 2, 1)) / len(pcoords))
    spread = np.sqrt(np.mean(np.sum(q ** 2, 1)) / len(atoms))
    assert err_a < 0.5 * spread, (err_a, spread)   # the alignment works at all
    assert err_p <= 1.5 * err_a, (err_p, err_a)
