"""Direct Fourier reconstruction against the documented image model (RELION's), not our projector's
shift handling: particles are centred projections moved by -shift with an independent Fourier
shift (scipy), CTF-modulated, mildly noisy; the map must match the density of the atoms, and
wrong conventions (mirrored shifts, transposed rotations, no CTF correction) must not."""
import mrcfile
import numpy as np
import pytest
import torch
from scipy import ndimage

from continuousflex_dl.core.landscape import reconstruction as rec
from continuousflex_dl.core.imaging.ctf import CTFParams, apply_ctf, ctf_image
from continuousflex_dl.core.imaging.geometry import euler_to_matrix, matrix_to_euler
from continuousflex_dl.core.imaging.projection import density_map, project_gaussians
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms
from continuousflex_dl.core.modes.synthesis import add_noise, sample_orientations

BOX, PIXEL, N = 32, 3.0, 400


@pytest.fixture(scope="module")
def particles():
    """400 particles of adenylate kinase (32 px, 3 Å/px): shifts up to 3 px, CTF, SNR 1."""
    atoms = load_atoms(example_structure_path(), "heavy")
    xyz = torch.tensor(centre(atoms.coords), dtype=torch.float32)
    truth = density_map(xyz, BOX, PIXEL, sigma=atoms.sigma, weights=atoms.weights).numpy()
    rng = np.random.default_rng(0)
    angles = sample_orientations(N, rng)
    shifts = rng.uniform(-3.0, 3.0, (N, 2))
    rot = torch.tensor(euler_to_matrix(angles), dtype=torch.float32)
    centred = project_gaussians(xyz, rot, torch.zeros(N, 2), BOX, PIXEL, sigma=atoms.sigma,
                                weights=atoms.weights).numpy()
    # RELION: the particle centre sits at box centre - shift (ndimage shifts are (y, x)).
    moved = np.stack([np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(im), (-s[1], -s[0]))).real
                      for im, s in zip(centred, shifts)])
    defocus = rng.uniform(8000.0, 20000.0, N)
    ctf = CTFParams(defocus, defocus - 300.0, rng.uniform(0, 180, N))
    images = apply_ctf(torch.tensor(moved, dtype=torch.float32), ctf_image(ctf, BOX, PIXEL))
    images = add_noise(images, 1.0, np.random.default_rng(1)).numpy()
    return dict(images=images, angles=angles, shifts=shifts, ctf=ctf, truth=truth)


def _score(result, truth):
    mask = result.mask()
    return rec.map_correlation(result.volume, truth, mask), float((result.volume * mask).sum() / (truth * mask).sum())


def test_map_matches_the_atoms_and_wrong_conventions_do_not(particles):
    p = particles
    right = rec.reconstruct(p["images"], p["angles"], p["shifts"], PIXEL, p["ctf"], seed=2)
    corr, scale = _score(right, p["truth"])
    # Measured 0.95 (0.97 noise-free); the bench at 64 px, SNR 0.1 reaches 0.9x too.
    assert corr > 0.9
    # CTF correction restores the scale of density_map (voxel integrals): measured 0.98.
    assert 0.85 < scale < 1.15
    assert right.particles.tolist() == [N // 2, N // 2]
    assert right.resolution == pytest.approx(2 * PIXEL, rel=0.15)  # clean enough for Nyquist
    mirrored = rec.reconstruct(p["images"], p["angles"], -p["shifts"], PIXEL, p["ctf"], seed=2)
    transposed = matrix_to_euler(np.swapaxes(euler_to_matrix(p["angles"]), 1, 2))
    inverse = rec.reconstruct(p["images"], transposed, p["shifts"], PIXEL, p["ctf"], seed=2)
    uncorrected = rec.reconstruct(p["images"], p["angles"], p["shifts"], PIXEL, None, seed=2)
    # Measured 0.55, 0.65 and 0.71.
    for wrong in (mirrored, inverse, uncorrected):
        assert _score(wrong, p["truth"])[0] < corr - 0.2


def test_chunks_give_the_same_map(particles):
    p = particles
    sub = slice(0, 120)
    ctf = p["ctf"].select(sub)
    one = rec.reconstruct(p["images"][sub], p["angles"][sub], p["shifts"][sub], PIXEL, ctf, chunk_size=120)
    many = rec.reconstruct(p["images"][sub], p["angles"][sub], p["shifts"][sub], PIXEL, ctf, chunk_size=37)
    scale = np.abs(one.volume).max()
    np.testing.assert_allclose(many.volume, one.volume, atol=1e-4 * scale)
    np.testing.assert_allclose(many.fsc, one.fsc, atol=1e-4)


def test_fsc_and_resolution_known_values():
    rng = np.random.default_rng(4)
    vol = ndimage.gaussian_filter(rng.standard_normal((40, 40, 40)), 1.0)
    freq, curve = rec.fsc(vol, vol, 2.0)
    assert freq.shape == curve.shape == (21,)
    assert freq[-1] == pytest.approx(0.25)  # Nyquist of 2 Å/px
    np.testing.assert_allclose(curve, 1.0, atol=1e-9)
    _, noise = rec.fsc(rng.standard_normal((40, 40, 40)), rng.standard_normal((40, 40, 40)), 2.0)
    assert np.abs(noise[3:]).max() < 0.15 and abs(noise[3:].mean()) < 0.03
    # A map against itself low-passed at 10 Å: FSC 1 below 1/10 Å^-1; beyond the edge only
    # float32 round-off is left, uncorrelated with the map.
    filtered = rec.lowpass(vol, 2.0, 10.0, edge_shells=1.0)
    freq, curve = rec.fsc(vol, filtered, 2.0)
    assert np.all(curve[freq < 0.1 - 1e-9] > 0.999) and np.all(np.abs(curve[freq > 0.1 + 1.0 / 80 + 1e-9]) < 0.1)
    # FSC ignores scale, so the curve stays near 1 over the filter's edge: the crossing lies
    # between the cut (10 Å) and two shells (1/80 Å^-1 each) beyond it (8 Å).
    assert 8.0 <= rec.resolution_at(freq, curve, 0.143) <= 10.0
    # Linear interpolation between shells; Nyquist when the curve never crosses.
    f = np.array([0.0, 0.1, 0.2, 0.3])
    assert rec.resolution_at(f, np.array([1.0, 0.6, 0.2, 0.0]), 0.4) == pytest.approx(1 / 0.15)
    assert rec.resolution_at(f, np.ones(4), 0.143) == pytest.approx(1 / 0.3)


def test_halves_mask_and_correlation():
    a, b = rec.split_halves(101, seed=3), rec.split_halves(101, seed=3)
    np.testing.assert_array_equal(a, b)
    assert sorted(np.bincount(a).tolist()) == [50, 51]
    assert not np.array_equal(a, rec.split_halves(101, seed=4))
    mask = rec.soft_spherical_mask(32, 10.0, 4.0).numpy()
    assert mask[16, 16, 16] == 1.0 and mask[16, 16, 26] == 1.0 and mask[0, 0, 0] == 0.0
    assert mask[16, 16, 28] == pytest.approx(0.5) and mask[16, 16, 30] == 0.0
    x = np.random.default_rng(0).standard_normal((16, 16, 16))
    assert rec.map_correlation(x, 3 * x + 1) == pytest.approx(1.0)
    assert rec.map_correlation(x, -x) == pytest.approx(-1.0)


def test_write_sets_voxel_size_origin_and_fsc(particles, tmp_path):
    p = particles
    result = rec.reconstruct(p["images"][:60], p["angles"][:60], p["shifts"][:60], PIXEL, p["ctf"].select(slice(0, 60)))
    paths = result.write(tmp_path, "cls1")
    for key in ("map", "half1", "half2"):
        with mrcfile.open(paths[key]) as mrc:
            assert mrc.data.shape == (BOX, BOX, BOX)
            assert float(mrc.voxel_size.x) == pytest.approx(PIXEL)
            # ChimeraX places voxel 0 at the origin: voxel box // 2 is then at 0 Å.
            assert float(mrc.header.origin.x) == pytest.approx(-(BOX // 2) * PIXEL)
    with mrcfile.open(paths["map"]) as mrc:
        np.testing.assert_allclose(mrc.data, result.volume)
    freq, curve = rec.read_fsc_csv(paths["fsc"])
    np.testing.assert_allclose(freq, result.frequency, atol=1e-6)
    np.testing.assert_allclose(curve, result.fsc, atol=1e-6)


def test_bad_inputs_say_what_to_do(particles):
    p = particles
    with pytest.raises(ValueError, match="angles"):
        rec.reconstruct(p["images"][:10], p["angles"][:9], p["shifts"][:10], PIXEL)
    with pytest.raises(ValueError, match="CTF"):
        rec.reconstruct(p["images"][:10], p["angles"][:10], p["shifts"][:10], PIXEL, p["ctf"])
    r = rec.Reconstructor(BOX, PIXEL)
    with pytest.raises(ValueError, match="Both half sets"):
        r.finish()
    with pytest.raises(ValueError, match="box"):
        rec.Reconstructor(4, PIXEL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(particles):
    p = particles
    sub = slice(0, 100)
    args = (p["images"][sub], p["angles"][sub], p["shifts"][sub], PIXEL, p["ctf"].select(sub))
    cpu = rec.reconstruct(*args)
    gpu = rec.reconstruct(*args, device="cuda")
    np.testing.assert_allclose(gpu.volume, cpu.volume, atol=1e-4 * np.abs(cpu.volume).max())
