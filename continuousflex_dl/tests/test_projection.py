"""Gaussian projector: mass, positions, pose convention and gradients."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from continuousflex_dl.core.imaging.geometry import euler_to_matrix, random_rotations
from continuousflex_dl.core.imaging.projection import density_map, project_gaussians


def _centroid(img):
    img = np.asarray(img, dtype=np.float64)
    iy, ix = np.indices(img.shape)
    return (img * ix).sum() / img.sum(), (img * iy).sum() / img.sum()


def test_pixels_sum_to_weights():
    rng = np.random.default_rng(0)
    coords = rng.normal(scale=6.0, size=(40, 3))
    weights = rng.uniform(0.5, 2.0, size=40)
    rot = random_rotations(3, rng)
    img = project_gaussians(coords, rot, np.zeros((3, 2)), 48, 1.5, sigma=1.2, weights=weights)
    assert img.shape == (3, 48, 48) and img.dtype == torch.float32
    np.testing.assert_allclose(img.sum(dim=(1, 2)).numpy(), weights.sum(), rtol=1e-4)


@pytest.mark.parametrize("box", [32, 33])
@pytest.mark.parametrize("shift", [(0.0, 0.0), (2.3, -1.7)])
def test_atom_lands_at_expected_pixel(box, shift):
    pixel_size = 2.0
    r = np.array([[5.0, -3.0, 7.0]])                 # Å
    angles = np.array([[30.0, 50.0, -20.0]])
    a = euler_to_matrix(angles)
    # RELION: the origin (our shift) shifts the observation into the projection, so the atom
    # is seen at its projected position minus the shift.
    expected = (a[0] @ r[0])[:2] / pixel_size - np.array(shift) + box // 2
    img = project_gaussians(torch.tensor(r, dtype=torch.float64), torch.tensor(a),
                            torch.tensor([shift]), box, pixel_size, sigma=3.0)[0]
    cx, cy = _centroid(img.numpy())
    assert abs(cx - expected[0]) < 0.01 and abs(cy - expected[1]) < 0.01
    iy, ix = np.unravel_index(np.argmax(img.numpy()), img.shape)
    assert (ix, iy) == tuple(np.round(expected).astype(int))


def test_sub_pixel_width_puts_mass_in_one_pixel():
    img = project_gaussians(np.array([[1.0, -2.0, 0.0]]), np.eye(3)[None], np.zeros((1, 2)),
                            16, 1.0, sigma=0.02)[0]
    assert img[8 - 2, 8 + 1] == pytest.approx(1.0, abs=1e-5)
    assert img.sum() == pytest.approx(1.0, abs=1e-5)


def test_projection_matches_rotated_map_summed_along_z():
    """The convention test: project(A) == sum_z of the map rotated so that r -> A r."""
    rng = np.random.default_rng(3)
    coords = np.concatenate([rng.normal(scale=5.0, size=(30, 3)) + [6.0, 0.0, 0.0],
                             rng.normal(scale=3.0, size=(15, 3)) + [-6.0, 5.0, -4.0]])
    box, pixel_size, sigma = 40, 1.5, 2.0
    vol = density_map(torch.tensor(coords), box, pixel_size, sigma=sigma).numpy()
    angles = np.array([[40.0, 70.0, 15.0], [-120.0, 25.0, 200.0]])
    mats = euler_to_matrix(angles)
    proj = project_gaussians(torch.tensor(coords), torch.tensor(mats), torch.zeros(2, 2),
                             box, pixel_size, sigma=sigma).numpy()
    c = np.full(3, box // 2, dtype=float)
    for a, p in zip(mats, proj):
        # output[o] = vol[M o + off]: voxel o (zyx) at position r' samples the input at A^T r'.
        m = a.T[::-1, ::-1]
        rotated = ndimage.affine_transform(vol, m, offset=c - m @ c, order=1)
        ref = rotated.sum(axis=0)
        corr = np.corrcoef(ref.ravel(), p.ravel())[0, 1]
        assert corr >= 0.99
        # and a wrong convention (the transpose) is clearly worse
        wrong = ndimage.affine_transform(vol, a[::-1, ::-1], offset=c - a[::-1, ::-1] @ c,
                                         order=1).sum(axis=0)
        assert np.corrcoef(wrong.ravel(), p.ravel())[0, 1] < 0.9


def test_density_map_sums_and_projects_along_z():
    rng = np.random.default_rng(1)
    coords = torch.tensor(rng.normal(scale=2.0, size=(25, 3)))
    w = torch.tensor(rng.uniform(1, 3, size=25))
    vol = density_map(coords, 24, 1.0, sigma=1.0, weights=w, chunk=7)
    assert vol.shape == (24, 24, 24)
    assert float(vol.sum()) == pytest.approx(float(w.sum()), rel=1e-6)
    proj = project_gaussians(coords, torch.eye(3, dtype=torch.float64)[None],
                             torch.zeros(1, 2, dtype=torch.float64), 24, 1.0, sigma=1.0, weights=w)[0]
    np.testing.assert_allclose(vol.sum(0).numpy(), proj.numpy(), atol=1e-9)


def test_gradients_match_finite_differences():
    torch.manual_seed(0)
    coords = (torch.randn(3, 3, dtype=torch.float64) * 2).requires_grad_()
    rot = torch.tensor(random_rotations(2, np.random.default_rng(0))).requires_grad_()
    shifts = (torch.randn(2, 2, dtype=torch.float64) * 0.5).requires_grad_()
    sigma = torch.tensor([1.0, 1.5, 0.7], dtype=torch.float64)

    def f(c, r, s):
        return project_gaussians(c, r, s, 7, 1.3, sigma=sigma)

    assert torch.autograd.gradcheck(f, (coords, rot, shifts), eps=1e-6, atol=1e-6)


def test_batched_coords_and_bad_inputs():
    rng = np.random.default_rng(2)
    coords = rng.normal(size=(2, 5, 3))
    rot = random_rotations(2, rng)
    both = project_gaussians(coords, rot, np.zeros((2, 2)), 9, 1.0)
    one = project_gaussians(coords[1], rot[1:], np.zeros((1, 2)), 9, 1.0)
    np.testing.assert_allclose(both[1].numpy(), one[0].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="shifts"):
        project_gaussians(coords[0], rot, np.zeros((3, 2)), 9, 1.0)
    with pytest.raises(ValueError, match="pixel size"):
        project_gaussians(coords[0], rot, np.zeros((2, 2)), 9, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        project_gaussians(coords[0], rot, np.zeros((2, 2)), 9, 1.0, sigma=np.ones(4))


def test_windowed_profiles_equal_the_full_evaluation():
    """Profiles and their derivatives, evaluated near each centre, equal scipy's erf and the
    Gaussian density on every pixel of the box."""
    from scipy.special import erf
    from continuousflex_dl.core.imaging.projection import pixel_profiles
    gen = torch.Generator().manual_seed(0)
    pos = torch.rand(4, 50, generator=gen, dtype=torch.float64) * 80 - 8  # some atoms off the box
    sigma = torch.rand(50, generator=gen, dtype=torch.float64) * 1.5 + 0.2
    fast = pixel_profiles(pos, 64, sigma)
    g, dg = pixel_profiles(pos, 64, sigma, derivative=True)
    edges = np.arange(65) - 0.5
    t = (edges - pos.numpy()[..., None]) / (sigma.numpy()[:, None] * np.sqrt(2))
    full = 0.5 * np.diff(erf(t), axis=-1)
    pdf = np.exp(-t * t) / (sigma.numpy()[:, None] * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(fast.numpy(), full, atol=1e-9, rtol=0)
    np.testing.assert_allclose(g.numpy(), full, atol=1e-9, rtol=0)
    np.testing.assert_allclose(dg.numpy(), -np.diff(pdf, axis=-1), atol=1e-9, rtol=0)


@pytest.mark.parametrize("spread", [10.0, 80.0])
def test_profiles_on_their_reach_are_the_box_profiles_there(spread):
    """profile_reach bounds the pixels where any profile reaches 1e-9 of scipy's full
    evaluation, and profiles drawn on those pixels alone equal the box's there (atoms in a
    corner of the box, and atoms over all of it and beyond)."""
    from scipy.special import erf
    from continuousflex_dl.core.imaging.projection import pixel_profiles, profile_reach
    gen = torch.Generator().manual_seed(1)
    pos = torch.rand(3, 40, generator=gen, dtype=torch.float64) * spread + 5
    sigma = torch.rand(40, generator=gen, dtype=torch.float64) * 0.8 + 0.4
    reach = profile_reach(pos, 64, sigma)
    t = (np.arange(65) - 0.5 - pos.numpy()[..., None]) / (sigma.numpy()[:, None] * np.sqrt(2))
    full = 0.5 * np.diff(erf(t), axis=-1)
    used = np.flatnonzero(np.abs(full).max(axis=(0, 1)) > 1e-9)
    assert reach.start <= used[0] and used[-1] < reach.stop, (reach, used[[0, -1]])
    assert (reach.stop - reach.start < 64) == (spread < 50), reach
    g, dg = pixel_profiles(pos, 64, sigma, derivative=True, pixels=reach)
    box_g, box_dg = pixel_profiles(pos, 64, sigma, derivative=True)
    np.testing.assert_array_equal(g.numpy(), box_g[..., reach].numpy())
    np.testing.assert_array_equal(dg.numpy(), box_dg[..., reach].numpy())


# ---------------------------------------------------------------- the one Fourier crop

def _numpy_crop(images, m):
    """Independent Fourier crop of (B, n, n) to (B, m, m): the full numpy spectrum of the images
    centred at ``n // 2``, its frequencies ``|k| < m / 2`` kept (the Nyquist row and column of an
    even m dropped), back to real space with the centre at ``m // 2``. Keeps the pixel sum."""
    n = images.shape[-1]
    spec = np.fft.fft2(np.roll(images, (-(n // 2), -(n // 2)), axis=(-2, -1)))
    k = np.fft.fftfreq(m, 1.0 / m).round().astype(int)
    keep = np.abs(k) < m / 2
    small = np.zeros(images.shape[:-2] + (m, m), dtype=complex)
    rows, cols = np.ix_(np.flatnonzero(keep), np.flatnonzero(keep))
    small[..., rows, cols] = spec[..., (k[keep] % n)[:, None], (k[keep] % n)[None, :]]
    out = np.fft.ifft2(small).real
    return np.roll(out, (m // 2, m // 2), axis=(-2, -1))


@pytest.mark.parametrize("n, m", [(32, 16), (45, 21), (33, 32), (40, 40)])
def test_fourier_crop_normalisations_against_numpy(n, m):
    """Both normalisations of the one fourier_crop: 'sum' is the plain crop (pixel sums kept),
    'mean' the same times (m / n)^2 (pixel values kept); at m == n an even size loses its Nyquist
    row and column only."""
    from continuousflex_dl.core.imaging.projection import fourier_crop
    img = np.random.default_rng(n + m).normal(size=(3, n, n))
    want = _numpy_crop(img, m)
    x = torch.tensor(img)
    got_sum = fourier_crop(x, m, preserve="sum", correct_pixel_blur=False).numpy()
    got_mean = fourier_crop(x, m, preserve="mean", correct_pixel_blur=False).numpy()
    np.testing.assert_allclose(got_sum, want, atol=1e-10)
    np.testing.assert_allclose(got_mean, want * (m / n) ** 2, atol=1e-10)
    np.testing.assert_allclose(got_sum.sum(axis=(1, 2)), want.sum(axis=(1, 2)), rtol=1e-10)
    with pytest.raises(TypeError):  # the normalisation is never implicit
        fourier_crop(x, m)


def test_fourier_crop_callers_get_their_numbers():
    """The callers of the one fourier_crop get what they got from their own copies before: the
    network's preprocessing (dataset.prepare_images: pixel values kept, the images unchanged at
    their own size), HEMNMA's image sizes (alignment.sizes.crop_images and ImageScale.images:
    pixel sums kept, spectrum untouched so white noise stays white, the Nyquist row and column
    of an even size dropped even at the input size)."""
    from continuousflex_dl.core.hemnma.alignment.sizes import ImageScale, crop_images
    from continuousflex_dl.core.imaging.dataset import normalize_images, prepare_images
    img = np.random.default_rng(3).normal(size=(4, 48, 48)).astype(np.float32)
    prepared = prepare_images(img, working_size=24)[:, 0].numpy()
    want = normalize_images(torch.tensor(_numpy_crop(img.astype(np.float64), 24) / 4)).numpy()
    np.testing.assert_allclose(prepared, want, atol=1e-4)
    np.testing.assert_array_equal(prepare_images(img, working_size=48)[:, 0].numpy(),
                                  normalize_images(torch.tensor(img)).numpy())
    np.testing.assert_allclose(crop_images(torch.tensor(img), 24).numpy(), _numpy_crop(img.astype(np.float64), 24),
                               atol=1e-5)
    np.testing.assert_allclose(crop_images(torch.tensor(img), 48).numpy(), _numpy_crop(img.astype(np.float64), 48),
                               atol=1e-5)
    coords = np.zeros((1, 3))
    scale = ImageScale(24, 48, 1.0, (coords, np.zeros((0, 1, 3)), np.ones(1), np.ones(1)), "cpu")
    np.testing.assert_array_equal(scale.images(torch.tensor(img)).numpy(), crop_images(torch.tensor(img), 24).numpy())
