"""HEMNMA alignment: building blocks and recovery of known amplitudes, poses and shifts."""
import numpy as np
import pytest
import torch

from continuousflex_dl.core.hemnma import alignment as al
from continuousflex_dl.core.hemnma.alignment import aligner as ag
from continuousflex_dl.core.hemnma.alignment import least_squares as ls
from continuousflex_dl.core.hemnma.alignment import model as dm
from continuousflex_dl.core.hemnma.alignment import search as se
from continuousflex_dl.core.hemnma.alignment import sizes as sz
from continuousflex_dl.core.hemnma.alignment import uncertainty as un
from continuousflex_dl.core.imaging.ctf import CTFParams, apply_ctf, ctf_image
from continuousflex_dl.core.imaging.geometry import angular_distance_deg, euler_to_matrix, matrix_to_euler, random_rotations
from continuousflex_dl.core.modes.nma import compute_modes
from continuousflex_dl.core.modes.reference import Reference
from continuousflex_dl.core.imaging.projection import fourier_crop, project_gaussians
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms

BOX, PIXEL = 32, 3.0          # 96 Å box around adenylate kinase (~50 Å)


@pytest.fixture(scope="module")
def ake():
    """4AKE C-alpha atoms (214), centred, and ANM modes 7-9 (cutoff 15 Å)."""
    coords = centre(load_atoms(example_structure_path("4ake"), "ca").coords)
    modes = compute_modes(coords, n_modes=9, cutoff=15.0).vectors[6:9]
    return coords, modes


def _particles(coords, modes, n, seed, ctf=None, snr=None, max_shift=2.0):
    """Paper-like amplitudes scaled to the same RMS displacement (~5 Å) for 214 atoms."""
    rng = np.random.default_rng(seed)
    r = rng.random(n)
    scale = 200.0 * np.sqrt(len(coords) / 1656.0)
    q = scale * np.stack([-r, np.sin(np.pi * r), np.cos(np.pi * r)], -1)
    rot = random_rotations(n, rng)
    shifts = rng.uniform(-max_shift, max_shift, size=(n, 2))
    x = torch.tensor(coords + np.einsum("bk,knd->bnd", q, modes), dtype=torch.float32)
    img = project_gaussians(x, rot, shifts, BOX, PIXEL)
    if ctf is not None:
        img = apply_ctf(img, ctf_image(ctf, BOX, PIXEL))
    img = img.numpy()
    if snr is not None:
        img = img + rng.normal(size=img.shape) * np.sqrt(img.var(axis=(1, 2)) / snr)[:, None, None]
    return img, q, rot, shifts, scale


def test_fourier_crop_matches_projection_at_coarser_pixel():
    rng = np.random.default_rng(0)
    coords = rng.normal(scale=6.0, size=(30, 3)) + [4.0, -3.0, 0.0]
    rot = random_rotations(2, rng)
    shifts = np.array([[1.3, -0.4], [0.0, 2.0]])
    for n, m in [(64, 32), (45, 21)]:
        fine = project_gaussians(coords, rot, shifts, n, 1.0, sigma=1.5)
        direct = project_gaussians(coords, rot, shifts * m / n, m, n / m, sigma=1.5)
        cropped = fourier_crop(fine, m, preserve="sum", correct_pixel_blur=True)
        assert cropped.shape == (2, m, m)
        np.testing.assert_allclose(cropped.sum(dim=(1, 2)).numpy(), fine.sum(dim=(1, 2)).numpy(), rtol=1e-4)
        corr = al.normalised_cross_correlation(cropped, direct).numpy()
        assert np.all(corr > 0.995), corr


def test_rotation_grid_covers_so3():
    rots, n_psi = al.rotation_grid(20.0, return_n_psi=True)
    assert n_psi == 18 and len(rots) == n_psi * round(4 * np.pi / np.radians(20.0) ** 2)
    probe = random_rotations(300, np.random.default_rng(1))
    nearest = np.array([angular_distance_deg(rots, p).min() for p in probe])
    # a cell of a 20-degree grid: no rotation is farther than about one step from the grid
    assert nearest.max() < 20.0 and np.median(nearest) < 12.0


def test_candidates_are_distinct_and_more_where_the_ranking_is_flat():
    """The global search's candidates: rotations more than the step apart, best first; with
    ``adaptive``, at least n_keep, and more for an image whose scores have several near-equal
    peaks far apart (a D4 pseudo-symmetric structure: 8 peaks), one near each peak."""
    rots = al.rotation_grid(30.0)
    index = np.tile(np.arange(len(rots)), 2)                   # two amplitude seeds per rotation
    rng = np.random.default_rng(4)
    d4 = euler_to_matrix(np.array([[a, t, 0.0] for t in (0.0, 180.0) for a in (0.0, 90.0, 180.0, 270.0)]))
    mates = random_rotations(1, rng)[0] @ d4

    def scores(peaks):   # (2R,) a Gaussian bump of 20 degrees about each peak rotation
        d = np.stack([angular_distance_deg(rots[index], p) for p in peaks])
        return np.exp(-0.5 * (d / 20.0) ** 2).max(0) + rng.uniform(0, 1e-3, len(index))

    one = scores(mates[:1])
    pick = se.distinct_candidates(one, index, rots, 4, 30.0)
    chosen = rots[index[pick]]
    assert len(pick) == 4 and pick[0] == np.argmax(one)
    assert all(angular_distance_deg(chosen[i], chosen[j]) > 30.0 for i in range(4) for j in range(i))
    np.testing.assert_array_equal(se.distinct_candidates(one, index, rots, 4, 30.0, adaptive=True), pick)
    flat = scores(mates)
    assert len(se.distinct_candidates(flat, index, rots, 4, 30.0)) == 4
    pick = se.distinct_candidates(flat, index, rots, 4, 30.0, adaptive=True)
    assert 8 <= len(pick) <= 4 * se.CANDIDATE_MOST
    nearest = np.array([angular_distance_deg(rots[index[pick]], m).min() for m in mates])
    assert np.all(nearest < 25.0), nearest       # measured: at most 21 degrees over 8 seeds


def test_best_of_each_image():
    score = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7])
    owner = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(ag._best_of_each(score, owner, 3, 2).numpy(), [1, 2, 4, 3, 6, 5])


@pytest.mark.parametrize("by", ["product", "fft"])
def test_global_search_scores_are_real_space_ncc_over_the_shift_window(by, monkeypatch):
    """Scores, best shifts and anti-correlation of score_references against a direct real-space
    computation: NCC of the centred image with the filtered reference circularly displaced by
    every integer d within the radius, the best d reported as the pose shift -d (RELION)."""
    if by == "fft":
        monkeypatch.setattr(se, "SEARCH_GEMM_SHIFTS", -1)
    rng = np.random.default_rng(4)
    n, m, p, radius = 16, 5, 70, 2.0
    images = rng.normal(size=(m, n, n))
    refs = rng.normal(size=(p, n, n))
    k = np.hypot(np.fft.fftfreq(n)[:, None], np.fft.rfftfreq(n)[None, :])
    filt = np.stack([np.cos(20 * k * (i + 1)) for i in range(m)])     # CTF-like, signed, symmetric
    scores, best, anti = se.score_references(torch.fft.rfft2(torch.tensor(refs, dtype=torch.float32)),
                                           torch.tensor(images, dtype=torch.float32),
                                           torch.tensor(filt, dtype=torch.float32), radius)
    window = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if dx * dx + dy * dy <= (radius + 0.5) ** 2]
    for i in range(m):
        img = images[i] - images[i].mean()
        worst = -np.inf
        for j in range(p):
            ref_f = np.fft.irfft2(np.fft.rfft2(refs[j]) * filt[i], s=(n, n))
            ncc = np.array([np.sum(img * np.roll(ref_f, d, axis=(0, 1))) for d in window])
            ncc /= np.linalg.norm(img) * np.linalg.norm(ref_f)
            assert scores[i, j].item() == pytest.approx(ncc.max(), abs=1e-5)
            dy, dx = window[int(np.argmax(ncc))]
            assert best[i, j].tolist() == [-dx, -dy]
            worst = max(worst, -ncc.min())
        assert anti[i].item() == pytest.approx(worst, abs=1e-5)


def test_levenberg_marquardt_step_does_not_depend_on_the_units_of_the_parameters():
    """Amplitudes in units 1e5 times smaller (as a mode of a 100k-atom assembly moves each atom
    1/300 of what it moves 4AKE's) scale the damped and the undamped step by 1e5 exactly."""
    rng = np.random.default_rng(0)
    j = torch.tensor(rng.normal(size=(2, 50, 9)))
    r = torch.tensor(rng.normal(size=(2, 50)))
    unit = torch.tensor([1e-5] * 3 + [1.0] * 6, dtype=torch.float64)
    for lam in (0.0, torch.tensor([1e-3, 1.0], dtype=torch.float64)):
        steps = []
        for jac in (j, j * unit):
            jtj, jtr = jac.transpose(1, 2) @ jac, (jac.transpose(1, 2) @ r[..., None])[..., 0]
            steps.append(ls.scaled_solve(jtj, jtr, lam))
        torch.testing.assert_close(steps[1] * unit, steps[0], rtol=1e-7, atol=0)
    # undamped, it is the least-squares step
    jtj, jtr = j.transpose(1, 2) @ j, (j.transpose(1, 2) @ r[..., None])[..., 0]
    torch.testing.assert_close(ls.scaled_solve(jtj, jtr, 0.0),
                               torch.linalg.lstsq(j, r[..., None]).solution[..., 0], rtol=1e-6, atol=1e-9)


def test_in_plane_rotation_of_references_matches_psi():
    rng = np.random.default_rng(2)
    coords = rng.normal(scale=5.0, size=(40, 3)) + [5.0, 0.0, 0.0]
    base = np.array([[30.0, 60.0, 0.0]])
    psi = torch.tensor([0.0, 40.0, 143.0])                                               # degrees
    rotated = se.in_plane_rotations(project_gaussians(coords, euler_to_matrix(base), np.zeros((1, 2)), 33,
                                                      1.0, sigma=2.0), psi)
    angles = np.repeat(base, 3, 0)
    angles[:, 2] = psi.numpy()
    direct = project_gaussians(coords, euler_to_matrix(angles), np.zeros((3, 2)), 33, 1.0, sigma=2.0)
    assert np.all(al.normalised_cross_correlation(rotated, direct).numpy() > 0.99)


@pytest.mark.parametrize("box, pixel_size, edge, deformation", [
    (11, 2.5, 0.0, "linear"), (48, 1.0, 0.0, "linear"), (40, 1.0, 19.0, "linear"), (48, 1.0, 0.0, "rigid-blocks")])
def test_model_jacobian_matches_autograd(box, pixel_size, edge, deformation):
    # 48 px: the profiles are windowed and the atoms reach about half of each axis (the
    # products are formed there only); 40 px: one atom reaches the edge of the box.
    rng = np.random.default_rng(0)
    c = rng.normal(scale=5, size=(20, 3))
    c[0] *= 1 + edge / np.linalg.norm(c[0])
    modes = rng.normal(size=(2, 20, 3))
    modes /= np.linalg.norm(modes.reshape(2, -1), axis=1)[:, None, None]
    # rigid-blocks: 5 blocks of 4 atoms, turned by up to about 1 rad at these amplitudes.
    model = dm.DeformableModel(c, modes, np.full(20, 1.3), np.ones(20), box, pixel_size, "cpu", torch.float64,
                               deformation=deformation, blocks=np.repeat(np.arange(5), 4))
    rot = torch.tensor(random_rotations(3, rng))
    q = torch.tensor(rng.normal(size=(3, 2)) * 3)
    s = torch.tensor(rng.normal(size=(3, 2)))
    image, jac = model.project_with_jacobian(rot, q, s)

    def f(t):
        return model.project(dm.rodrigues(t[:, 2:5]) @ rot, q + t[:, :2], s + t[:, 5:7])

    num = torch.autograd.functional.jacobian(f, torch.zeros(3, 7, dtype=torch.float64), vectorize=True)
    num = torch.stack([num[b, :, :, b, :] for b in range(3)]).permute(0, 3, 1, 2)
    assert torch.allclose(image, f(torch.zeros(3, 7, dtype=torch.float64)))
    assert (jac - num).abs().max() < 1e-9 * num.abs().max()


def test_coarse_grain_keeps_centre_of_mass_motion():
    rng = np.random.default_rng(3)
    coords = rng.normal(scale=8.0, size=(200, 3))
    modes = rng.normal(size=(2, 200, 3))
    w = rng.uniform(1, 2, size=200)
    bead, bmodes, bsig, bw = al.coarse_grain(coords, modes, np.ones(200), w, cell=5.0)
    assert len(bead) < 200 and bw.sum() == pytest.approx(w.sum())
    q = np.array([3.0, -2.0])
    moved = coords + np.einsum("k,knd->nd", q, modes)
    np.testing.assert_allclose((bw[:, None] * (bead + np.einsum("k,knd->nd", q, bmodes))).sum(0),
                               (w[:, None] * moved).sum(0), rtol=1e-9, atol=1e-9)
    assert np.all(bsig >= 1.0)


def _errors(res, q, rot, shifts):
    return (np.abs(res.amplitudes - q).mean(0), angular_distance_deg(res.rotations, rot),
            np.linalg.norm(res.shifts - shifts, axis=1))


def test_align_noise_free(ake):
    coords, modes = ake
    img, q, rot, shifts, scale = _particles(coords, modes, 4, seed=10)
    res = al.align_particles(img, coords, modes, PIXEL, max_shift_px=2.0,
                             amplitude_range=np.tile([-1.25 * scale, 1.25 * scale], (3, 1)),
                             angular_step_deg=20.0)
    mae, ang, sh = _errors(res, q, rot, shifts)
    assert res.amplitudes.shape == (4, 3) and res.angles.shape == (4, 3) and res.shifts.shape == (4, 2)
    assert np.all(mae < 0.5), mae            # Å, amplitudes up to ~72 Å
    assert np.all(ang < 0.5), ang            # degrees
    assert np.all(sh < 0.05), sh             # px
    assert np.all(res.score > 0.9999)


def test_align_with_ctf_and_noise(ake):
    coords, modes = ake
    ctf = CTFParams(defocus_u=np.array([5000.0, 8000.0, 6000.0, 7000.0, 5500.0, 9000.0]),
                    defocus_v=np.array([5000.0, 7600.0, 6000.0, 7000.0, 5500.0, 9000.0]))
    img, q, rot, shifts, scale = _particles(coords, modes, 6, seed=12, ctf=ctf, snr=1.0)
    res = al.align_particles(torch.tensor(img), coords, modes, PIXEL, ctf=ctf, max_shift_px=2.0,
                             amplitude_range=np.tile([-1.25 * scale, 1.25 * scale], (3, 1)),
                             angular_step_deg=15.0)
    mae, ang, sh = _errors(res, q, rot, shifts)
    # Measured: MAE per mode (1.6, 1.9, 1.3) Å, angles <= 1.1 deg, shifts <= 0.07 px. Over seeds
    # 11-18 every set has MAE < 3.2 Å and angles < 2.7 deg (a 20 deg step loses 1-2 particles
    # of 6 to a wrong orientation on some seeds).
    assert np.all(mae < 4.0), mae
    assert np.all(ang < 3.0) and np.all(sh < 0.2), (ang, sh)
    assert res.amplitude_std.shape == (6, 3) and np.all(res.amplitude_std > 0)
    assert np.all(np.abs(res.amplitudes - q) < 4 * res.amplitude_std), (res.amplitudes - q, res.amplitude_std)
    assert np.all((res.angle_std > 0) & (res.angle_std < 3.0)) and np.all(res.shift_std > 0)
    # The search reaches the optimum: no worse a fit than the true parameters.
    model = dm.DeformableModel(coords, modes, np.ones(len(coords)), np.ones(len(coords)), BOX, PIXEL, "cpu")
    truth = model.project(torch.tensor(rot, dtype=torch.float32), torch.tensor(q, dtype=torch.float32),
                          torch.tensor(shifts, dtype=torch.float32))
    filt = sz.projection_filters(ctf, 6, BOX, PIXEL, "cpu", torch.float32)
    truth_ncc = al.normalised_cross_correlation(dm.apply_filter(truth, filt),
                                                fourier_crop(torch.tensor(img, dtype=torch.float32), BOX, preserve="sum",
                                                             correct_pixel_blur=True))
    assert np.all(res.score >= truth_ncc.numpy() - 1e-3), (res.score, truth_ncc)


def test_bad_inputs(ake):
    coords, modes = ake
    img = np.zeros((2, BOX, BOX), dtype=np.float32)
    with pytest.raises(ValueError, match="square"):
        al.align_particles(np.zeros((2, 32, 30)), coords, modes, PIXEL)
    with pytest.raises(ValueError, match="modes"):
        al.align_particles(img, coords, modes[:, :10], PIXEL)
    with pytest.raises(ValueError, match="lowest"):
        al.align_particles(img, coords, modes, PIXEL, amplitude_range=np.tile([5.0, -5.0], (3, 1)))
    with pytest.raises(ValueError, match="CTF"):
        al.align_particles(img, coords, modes, PIXEL,
                           ctf=CTFParams(defocus_u=np.ones(3) * 5e3, defocus_v=np.ones(3) * 5e3))
    with pytest.raises(ValueError, match="seed_finish_chi2"):
        al.align_particles(img, coords, modes, PIXEL, seed_finish_chi2=-1.0)
    with pytest.raises(ValueError, match="finish_chi2"):
        al.align_particles(img, coords, modes, PIXEL, finish_chi2=-0.5)
    # the reference (modes.reference.Reference) is validated in one place, also for the aligner
    with pytest.raises(ValueError, match="one per atom"):
        al.align_particles(img, coords, modes, PIXEL, sigma=np.ones(5))
    with pytest.raises(ValueError, match="positive"):
        al.align_particles(img, coords, modes, PIXEL, sigma=-1.0)
    with pytest.raises(ValueError, match="weights"):
        al.align_particles(img, coords, modes, PIXEL, weights=np.ones(5))
    with pytest.raises(ValueError, match="Reference"):
        al.Aligner(coords, PIXEL, BOX)


def test_candidates_carry_shifts_in_input_pixels(ake):
    """The stages hand on Candidates whose shifts are in pixels of the input images, whatever
    size a stage works at: from the global search at 16 px of 32 px images, the particles'
    true shifts (pose convention, RELION's origin) come back within a search pixel (2 input px),
    and the final refinement's within 0.05 px."""
    coords, modes = ake
    rng = np.random.default_rng(8)
    rot, shifts = random_rotations(4, rng), np.array([[3.0, -2.0], [-4.0, 1.0], [0.5, 4.0], [-2.5, -3.5]])
    img = project_gaussians(coords, rot, shifts, BOX, PIXEL)
    aligner = al.Aligner(Reference(coords, modes[:0]), PIXEL, BOX,
                         al.AlignConfig(max_shift_px=5.0, search_size=16, angular_step_deg=20.0, n_candidates=1))
    at_search = ag.ScaledBatch(aligner.search.images(img), aligner.search.filters(None, 4))
    found = aligner.global_search(at_search)
    first = found.select(torch.searchsorted(found.owner, torch.arange(4)))       # each image's best rotation
    assert np.all(np.abs(first.shifts.numpy() - shifts) <= 2.0 + 1e-6), first.shifts
    at_work = ag.ScaledBatch(aligner.work.images(img), aligner.work.filters(None, 4))
    best, _ = aligner.refine_final(at_work, aligner.refine_candidates(at_search, found, keep=1, iters=10),
                                   finish=0.0)
    np.testing.assert_allclose(best.shifts.numpy(), shifts, atol=0.05)


def test_rigid_alignment_without_modes(ake):
    coords, _ = ake
    rng = np.random.default_rng(5)
    rot, shifts = random_rotations(3, rng), rng.uniform(-2, 2, size=(3, 2))
    img = project_gaussians(coords, rot, shifts, BOX, PIXEL)
    calls = []
    res = al.align_particles(img, coords, np.zeros((0, len(coords), 3)), PIXEL, max_shift_px=2.0,
                             angular_step_deg=20.0, batch_size=2,
                             progress=lambda done, total, message: calls.append((done, total, message)))
    assert [c[:2] for c in calls] == [(2, 3), (3, 3)] and all(isinstance(c[2], str) for c in calls)
    assert res.amplitudes.shape == (3, 0)
    assert np.all(angular_distance_deg(res.rotations, rot) < 0.1)     # measured < 1e-4 deg
    assert np.all(np.abs(res.shifts - shifts) < 0.01)
    back = al.AlignmentResult(**res.to_dict())
    np.testing.assert_array_equal(back.angles, res.angles)


def test_inverted_contrast_is_refused(ake):
    """Dark-on-bright particles (SNR 0.1, CTF) are refused with the fix; the same particles
    with the right contrast, and pure noise, are not."""
    coords, modes = ake
    n = 12
    ctf = CTFParams(defocus_u=np.full(n, 6000.0), defocus_v=np.full(n, 6000.0))
    img, q, rot, shifts, scale = _particles(coords, modes, n, seed=5, ctf=ctf, snr=0.1)
    kw = dict(ctf=ctf, max_shift_px=2.0, angular_step_deg=20.0, n_candidates=2, search_iters=3,
              refine_iters=3, amplitude_range=np.tile([-1.25 * scale, 1.25 * scale], (3, 1)))
    with pytest.raises(ValueError, match="contrast-inverted.*Invert contrast"):
        al.align_particles(-img, coords, modes, PIXEL, **kw)
    res = al.align_particles(img, coords, modes, PIXEL, **kw)
    assert np.median(angular_distance_deg(res.rotations, rot)) < 10.0
    noise = np.random.default_rng(0).normal(size=img.shape).astype(np.float32)
    al.align_particles(noise, coords, modes, PIXEL, **kw)   # no signal either way: not refused


def test_check_contrast_needs_a_clear_majority():
    best = np.full(20, 0.2)
    al.check_contrast(best, best - 0.01)
    al.check_contrast(best[:9], best[:9] + 0.1)              # too few images to judge
    anti = best.copy()
    anti[:14] += 0.1                                         # 70 %: not a clear majority
    al.check_contrast(best, anti)
    anti[:16] = 0.3
    with pytest.raises(ValueError, match="16 of 20"):
        al.check_contrast(best, anti)


def _refinement_problem(ake, n, seed, snr):
    """n particles at the test's box with a 0.6 um CTF and noise at ``snr``, and the model and
    CTF filters the refinement sees: (images, amplitudes, rotations, shifts, model, filters)."""
    coords, modes = ake
    ctf = CTFParams(defocus_u=np.full(n, 6000.0), defocus_v=np.full(n, 6000.0))
    img, q, rot, shifts, _ = _particles(coords, modes, n, seed=seed, ctf=ctf, snr=snr)
    model = dm.DeformableModel(coords, modes, np.ones(len(coords)), np.ones(len(coords)), BOX, PIXEL, "cpu")
    return img, q, rot, shifts, model, sz.projection_filters(ctf, n, BOX, PIXEL, "cpu", torch.float32)


def t(a) -> torch.Tensor:
    """float32 tensor of ``a``."""
    return torch.tensor(a, dtype=torch.float32)


def test_laplace_uncertainty_is_calibrated(ake):
    """At the optimum of the refinement, the amplitude errors of 60 noisy particles (SNR 1, CTF)
    fall within +-1.96 sigma for 95 % of them (Gauss-Newton: measured 0.95-0.98 over seeds
    1-3, median |error| / sigma 0.64-0.70 against 0.674 for a Gaussian). The bench_alignment run
    at 128 px, SNR 0.1 checks the same on the whole pipeline."""
    img, q, rot, shifts, model, filt = _refinement_problem(ake, 60, seed=1, snr=1.0)
    r_fit, q_fit, s_fit, fit = ls.refine(model, t(img), filt, t(rot), t(q), t(shifts), t([-1e4] * 3),
                                        t([1e4] * 3), 3.0, 30, 16)
    std = un.laplace_std(fit, model.n_params, BOX)
    z = np.abs(q_fit.numpy() - q) / std[:, :3].numpy()
    assert 0.90 <= np.mean(z < 1.96) <= 0.99, np.mean(z < 1.96)
    assert 0.55 < np.median(z) < 0.85, np.median(z)


def test_finishing_step_lands_on_the_converged_optimum(ake, monkeypatch):
    """The final refinement's unevaluated last Gauss-Newton step (finish_chi2, FINISH_CONTRACTION)
    ends within a small fraction of a standard deviation of the refinement run to convergence,
    with a first-order state that matches a fresh evaluation there, in fewer evaluations."""
    n = 32
    img, q, rot, shifts, model, filt = _refinement_problem(ake, n, seed=4, snr=0.3)
    start = (t(np.einsum("bij,bjk->bik", random_small_rotations(n, 4.0, np.random.default_rng(1)), rot)),
             t(q + 4.0), t(shifts + 0.3))
    calls = []
    system = ls.least_squares_state

    def counting(model_, images, *args):
        calls.append(images.shape[0])
        return system(model_, images, *args)

    monkeypatch.setattr(ls, "least_squares_state", counting)
    runs = {}
    for finish in (0.0, al.AlignConfig().finish_chi2):
        calls.clear()
        runs[finish] = ls.refine(model, t(img), filt, *start, t([-1e4] * 3), t([1e4] * 3), 3.0, 30, 16,
                                  finish=finish) + (sum(calls),)
    monkeypatch.undo()
    (_, q0, _, _, evals0), (r1, q1, s1, fit1, evals1) = runs[0.0], runs[al.AlignConfig().finish_chi2]
    std = un.laplace_std(fit1, model.n_params, BOX)[:, :3]
    z = ((q1 - q0) / std).numpy()
    assert np.sqrt(np.mean(z ** 2)) < 0.1 and np.abs(z).max() < 0.5, z
    assert evals1 < evals0, (evals1, evals0)
    fresh = ls.least_squares_state(model, t(img), filt, r1, q1, s1)
    np.testing.assert_allclose(fit1.cost.numpy(), fresh.cost.numpy(), rtol=1e-3)
    np.testing.assert_allclose(fit1.ncc.numpy(), fresh.ncc.numpy(), atol=1e-3)


def test_seeded_alignment_keeps_good_seeds_and_replaces_poor_ones(ake):
    """A perfect first answer (the truth, slightly off) skips the global search for all but
    the reference particles at no loss of accuracy; random first answers (a poor network) fall
    back to the global path and still end right."""
    coords, modes = ake
    n = 24
    ctf = CTFParams(defocus_u=np.full(n, 6000.0), defocus_v=np.full(n, 6000.0))
    img, q, rot, shifts, scale = _particles(coords, modes, n, seed=3, ctf=ctf, snr=1.0)
    kw = dict(ctf=ctf, max_shift_px=2.0, angular_step_deg=15.0,
              amplitude_range=np.tile([-1.25 * scale, 1.25 * scale], (3, 1)))
    rng = np.random.default_rng(0)
    near = al.AlignmentResult(amplitudes=q + rng.normal(0, 5, q.shape),
                              angles=matrix_to_euler(np.einsum("bij,bjk->bik", random_small_rotations(n, 5.0, rng), rot)),
                              shifts=shifts + rng.normal(0, 0.5, shifts.shape), score=np.zeros(n))
    good = al.align_particles(img, coords, modes, PIXEL, seeds=near, **kw)
    assert np.sum(good.path == al.PATH_GLOBAL) == al.reference_count(n, 16) == 8
    assert np.sum(good.path == al.PATH_SEEDED) >= 12
    mae, ang, _ = _errors(good, q, rot, shifts)
    assert np.all(mae < 4.0) and np.median(ang) < 2.0, (mae, ang)
    poor = al.AlignmentResult(amplitudes=rng.uniform(-scale, scale, q.shape),
                              angles=matrix_to_euler(random_rotations(n, rng)),
                              shifts=rng.uniform(-2, 2, shifts.shape), score=np.zeros(n))
    bad = al.align_particles(img, coords, modes, PIXEL, seeds=poor, **kw)
    assert np.sum(bad.path == al.PATH_FALLBACK) >= 10, bad.path
    mae, ang, _ = _errors(bad, q, rot, shifts)
    assert np.median(ang) < 2.0 and np.median(np.abs(bad.amplitudes - q)) < 4.0, (mae, ang)


def test_seeded_path_finishes_on_its_own_threshold(ake, monkeypatch):
    """The seeded particles' final refinement ends on seed_finish_chi2 (fewer evaluations than
    run to convergence, its answers within a fraction of a standard deviation of the converged
    ones), the reference particles' on the global path's finish_chi2 (their answers unchanged)."""
    coords, modes = ake
    n = 16
    ctf = CTFParams(defocus_u=np.full(n, 6000.0), defocus_v=np.full(n, 6000.0))
    img, q, rot, shifts, scale = _particles(coords, modes, n, seed=5, ctf=ctf, snr=1.0)
    rng = np.random.default_rng(1)
    seeds = al.AlignmentResult(amplitudes=q + rng.normal(0, 5, q.shape),
                               angles=matrix_to_euler(np.einsum("bij,bjk->bik", random_small_rotations(n, 5.0, rng), rot)),
                               shifts=shifts + rng.normal(0, 0.5, shifts.shape), score=np.zeros(n))
    kw = dict(ctf=ctf, max_shift_px=2.0, seeds=seeds, seed_reference=8,
              amplitude_range=np.tile([-1.25 * scale, 1.25 * scale], (3, 1)))
    state, calls = {"final": False}, []
    refine_final, system = al.Aligner.refine_final, ls.least_squares_state

    def final(*args, **kwargs):            # counts the evaluations of the final refinement
        state["final"] = True
        try:
            return refine_final(*args, **kwargs)
        finally:
            state["final"] = False

    def counting(model_, images, *args):
        if state["final"]:
            calls.append(images.shape[0])
        return system(model_, images, *args)

    monkeypatch.setattr(al.Aligner, "refine_final", final)
    monkeypatch.setattr(ls, "least_squares_state", counting)
    runs, evals = {}, {}
    for finish in (0.0, al.AlignConfig().seed_finish_chi2):
        calls.clear()
        runs[finish] = al.align_particles(img, coords, modes, PIXEL, seed_finish_chi2=finish, **kw)
        evals[finish] = sum(calls)
    (conv, fast) = runs.values()
    ref, seeded = conv.path == al.PATH_GLOBAL, conv.path == al.PATH_SEEDED
    assert np.sum(ref) == 8 and np.all(fast.path == conv.path)
    np.testing.assert_array_equal(fast.amplitudes[ref], conv.amplitudes[ref])
    assert evals[al.AlignConfig().seed_finish_chi2] < evals[0.0], evals
    z = (fast.amplitudes - conv.amplitudes)[seeded] / conv.amplitude_std[seeded]
    assert np.sqrt(np.mean(z ** 2)) < 0.3, z


def random_small_rotations(n, degrees, rng):
    """(n, 3, 3) rotations by ``degrees`` about random axes."""
    axes = rng.normal(size=(n, 3))
    w = torch.tensor(axes / np.linalg.norm(axes, axis=1, keepdims=True) * np.radians(degrees))
    return dm.rodrigues(w).numpy()


def test_cropped_noise_stays_white_and_the_model_carries_the_pixel_blur():
    """The alignment crops images without the blur correction, so white noise stays white (the
    Laplace uncertainty assumes it: with the correction, the corner frequencies lose 3/4 of
    their noise power and the noise at the frequencies that carry the amplitudes is
    underestimated); the coarse projection times _filters(source_box) equals the crop."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(400, 64, 64, generator=gen)
    power = (torch.fft.rfft2(sz.crop_images(noise, 32)).abs() ** 2).mean(0)
    mask = sz.nyquist_mask(32, "cpu", torch.float32) > 0
    flat = power[mask] / power[mask].mean()
    assert float(flat.min()) > 0.8 and float(flat.max()) < 1.2
    corrected = (torch.fft.rfft2(fourier_crop(noise, 32, preserve="sum", correct_pixel_blur=True)).abs() ** 2).mean(0)
    assert float(corrected[16, 15] / corrected[0, 1]) < 0.3       # what the correction does to noise
    rng = np.random.default_rng(2)
    coords = rng.normal(scale=6.0, size=(40, 3))
    rot, shifts = random_rotations(2, rng), np.array([[1.0, -2.0], [0.5, 0.0]])
    # Atoms of 0.75 coarse pixels (1 Å atoms at 2 Å/px alias a little: NCC 0.995).
    fine = project_gaussians(coords, rot, shifts, 64, 1.0, sigma=1.5)
    coarse = project_gaussians(coords, rot, shifts / 2, 32, 2.0, sigma=1.5)
    filt = sz.projection_filters(None, 2, 32, 2.0, "cpu", torch.float32, source_box=64)
    model = dm.apply_filter(coarse, filt)
    crop = sz.crop_images(fine, 32)
    assert np.all(al.normalised_cross_correlation(model, crop).numpy() > 0.999)
    assert np.all(al.normalised_cross_correlation(coarse, crop).numpy()
                  < al.normalised_cross_correlation(model, crop).numpy())


def test_working_size_model_counts_the_information_of_the_cropped_images():
    """Images at 1 Å/px cropped to 2 Å/px hold no aliases; the working-size model draws its atoms
    ANTI_ALIAS_PX wider and undoes it in its filter, so its projections match the crop and the
    Gauss-Newton standard deviations of its amplitudes equal those of the fine model cropped
    (measured ratio 1.005; the plain 2 Å/px model overstates the information: 1.04)."""
    rng = np.random.default_rng(4)
    n_atoms, n = 300, 6
    coords = rng.normal(scale=9.0, size=(n_atoms, 3))
    modes = rng.normal(size=(3, n_atoms, 3))
    modes /= np.linalg.norm(modes.reshape(3, -1), axis=1)[:, None, None]
    rot, shifts, q = random_rotations(n, rng), rng.uniform(-2, 2, (n, 2)), rng.normal(0, 5, (n, 3))
    ctf = CTFParams(defocus_u=5000.0, defocus_v=5000.0)
    fine = dm.DeformableModel(coords, modes, np.ones(n_atoms), np.ones(n_atoms), 64, 1.0, "cpu")
    p, j = fine.project_with_jacobian(t(rot), t(q), t(shifts))
    c = ctf_image(ctf, 64, 1.0).expand(n, -1, -1)
    p = sz.crop_images(dm.apply_filter(p, c), 32)
    j = sz.crop_images(dm.apply_filter(j.reshape(-1, 64, 64), c.repeat(8, 1, 1)), 32).reshape(n, 8, 32, 32)

    def amplitude_std(p, j):
        pf, jf = p.reshape(n, -1), j.reshape(n, 8, -1)
        full = torch.cat([jf - jf.mean(2, keepdim=True), (pf - pf.mean(1, keepdim=True))[:, None]], 1).double()
        return torch.sqrt(torch.diagonal(torch.linalg.inv(full @ full.transpose(1, 2)), dim1=1, dim2=2)[:, :3])

    truth = amplitude_std(p, j)
    match = {}
    for anti_alias, lo, hi in [(False, 1.02, 1.1), (True, 0.99, 1.015)]:
        scale = sz.ImageScale(32, 64, 1.0, (coords, modes, np.ones(n_atoms), np.ones(n_atoms)), "cpu", anti_alias)
        pc, jc = scale.model.project_with_jacobian(t(rot), t(q), scale.shifts_here(t(shifts)))
        filt = scale.filters(ctf, n)
        pc, jc = dm.apply_filter(pc, filt), dm.apply_filter(jc, filt)
        ratio = float((truth / amplitude_std(pc, jc)).mean())
        assert lo < ratio < hi, (anti_alias, ratio)
        match[anti_alias] = al.normalised_cross_correlation(pc, p).numpy()
    # Measured NCC with the crop: 0.990-0.994 plain, 0.996-0.9993 anti-aliased.
    assert np.all(match[True] > match[False]) and np.all(match[True] > 0.995), match


@pytest.mark.parametrize("box, pixel_size", [(16, 1.5), (40, 1.0)])
def test_laplace_std_is_the_inverse_fisher_information(box, pixel_size):
    """The Laplace standard deviations are those of the Gauss-Newton posterior of the full
    image model ``a F(P(theta)) + c`` under white noise: the diagonal of ``s^2 (J^T J)^-1``'s
    block of the parameters, J autograd's derivatives of that model with respect to the
    parameters, the scale a and the offset c (the nuisances free, not eliminated by hand), s^2
    the residual's variance with the D + 2 fitted values counted. At 40 px the atoms reach part
    of the image, where the Jacobian's products are formed."""
    rng = np.random.default_rng(7)
    c = rng.normal(scale=5, size=(25, 3))
    modes = rng.normal(size=(2, 25, 3))
    modes /= np.linalg.norm(modes.reshape(2, -1), axis=1)[:, None, None]
    model = dm.DeformableModel(c, modes, np.full(25, 1.3), rng.uniform(0.5, 1.5, 25), box, pixel_size, "cpu",
                      torch.float64)
    rot = torch.tensor(random_rotations(3, rng))
    q, s = torch.tensor(rng.normal(size=(3, 2)) * 3), torch.tensor(rng.normal(size=(3, 2)))
    ctf = CTFParams(defocus_u=np.array([8000.0, 12000.0, 9000.0]), defocus_v=np.array([7000.0, 12000.0, 9500.0]),
                    defocus_angle=np.array([30.0, 0.0, 75.0]))
    filt = sz.projection_filters(ctf, 3, box, pixel_size, "cpu", torch.float64)
    img = dm.apply_filter(model.project(rot, q + 0.5, s - 0.2), filt) + torch.tensor(rng.normal(size=(3, box, box))) * 0.02
    fit = ls.least_squares_state(model, img, filt, rot, q, s)
    got = un.laplace_std(fit, model.n_params, box)

    def mean_image(b, theta):  # theta: 7 parameters away from (rot, q, s), then scale and offset
        p = dm.apply_filter(model.project(dm.rodrigues(theta[None, 2:5]) @ rot[b:b + 1], q[b:b + 1] + theta[None, :2],
                                           s[b:b + 1] + theta[None, 5:7]), filt[b:b + 1])
        return (theta[7] * p + theta[8]).reshape(-1)

    for b in range(3):
        at = torch.zeros(9, dtype=torch.float64)
        at[7] = 1.0
        pf = mean_image(b, at)                                            # the filtered projection
        pf = pf - pf.mean()
        im = img[b].reshape(-1)
        at[7] = (pf * (im - im.mean())).sum() / (pf * pf).sum()          # the least-squares scale,
        at[8] = (im - mean_image(b, at)).mean()                          # and offset
        jac = torch.stack([torch.autograd.functional.jvp(lambda th: mean_image(b, th), at, e)[1]
                           for e in torch.eye(9, dtype=torch.float64)], 1)               # (n * n, 9)
        resid = im - mean_image(b, at)
        var = (resid * resid).sum() / (sz.noise_dof(box) - 7 - 2)
        want = torch.sqrt(torch.diagonal(torch.linalg.inv(jac.T @ jac))[:7] * var)
        assert torch.allclose(got[b], want, rtol=1e-6), (b, got[b], want)


def test_amplitude_range_grows_where_answers_reach_it(ake):
    """Particles needing amplitudes up to 1.4 times the range given: a hard clamp (before 0.3.0)
    piled them up at its limit; the range grows where answers reach it and they land on the
    truth. (At half the range two of the six take a wrong pose in the global search, whose
    seeds stay within the range given.)"""
    coords, modes = ake
    img, q, rot, shifts, scale = _particles(coords, modes, 6, seed=10)
    limit = 0.7 * scale
    assert np.all((np.abs(q) > limit).any(1))  # every particle needs more on some mode
    res = al.align_particles(img, coords, modes, PIXEL, max_shift_px=2.0,
                             amplitude_range=np.tile([-limit, limit], (3, 1)), angular_step_deg=20.0)
    mae, ang, _ = _errors(res, q, rot, shifts)
    assert np.all(ang < 1.0), ang
    # Å; clamped at the limit (before 0.3.0) the largest error was ~20 Å.
    assert np.abs(res.amplitudes - q).max() < 1.0, res.amplitudes - q
    assert not res.at_limit.any() and res.fraction_at_limit == 0.0
    assert np.all(res.amplitude_range[:, 1] - res.amplitude_range[:, 0] > 2 * limit)
    # Answers within the range leave it as it was.
    inside = al.align_particles(img[:2], coords, modes, PIXEL, max_shift_px=2.0, angular_step_deg=20.0,
                                amplitude_range=np.tile([-1.25 * scale, 1.25 * scale], (3, 1)))
    assert np.array_equal(inside.amplitude_range, np.tile([-1.25 * scale, 1.25 * scale], (3, 1)))
    assert inside.fraction_at_limit == 0.0


def test_conformation_grid_finds_particles_far_along_several_modes(ake):
    """Particles at 0.8 of the default range on all three modes at once (6.9 Å RMS from the
    reference), noise-free, a coarse search (30 degrees, 2 candidates): the star of amplitude
    seeds (one mode at a time, the search before 0.3.0) leaves 2 of 8 more than 5 degrees off;
    references at every combination of the seeds' values (conformation_seeds='grid') find all."""
    coords, modes = ake
    rng = np.random.default_rng(3)
    q = (0.8 * 5 * np.sqrt(len(coords)) * rng.choice([-1.0, 1.0], (16, 3)))[:8]
    rot = random_rotations(16, rng)[:8]
    shifts = np.zeros((8, 2))
    x = torch.tensor(coords + np.einsum("bk,knd->bnd", q, modes), dtype=torch.float32)
    img = project_gaussians(x, rot, shifts, BOX, PIXEL).numpy()
    options = dict(max_shift_px=1.0, angular_step_deg=30.0, n_candidates=2)
    star = al.align_particles(img, coords, modes, PIXEL, **options)
    grid = al.align_particles(img, coords, modes, PIXEL, conformation_seeds="grid", **options)
    assert np.sum(angular_distance_deg(star.rotations, rot) > 5.0) >= 2
    assert np.all(angular_distance_deg(grid.rotations, rot) < 0.5)
    assert np.all(np.abs(grid.amplitudes - q) < 0.5)         # Å, of ~±80 Å
    with pytest.raises(ValueError, match="conformation_seeds"):
        al.align_particles(img, coords, modes, PIXEL, conformation_seeds="cube")


def test_rigid_block_deformation_follows_a_hinge_rotation_beyond_the_linear_span():
    """The LID domain of adenylate kinase (heavy atoms) turned rigidly by 40 degrees about its
    hinge (tests/large_motion.py), noise-free images of HEMNMA's own image model: the rigid-block
    deformation (NOLB, one block per residue) fits a structure nearer the truth than the linear
    one, whose best answer in the span of modes 7-9 stretches the domain; a particle from the
    reference's side of the motion (noise-free, 32 px at 3 Å/px, heavy atoms)."""
    from continuousflex_dl.core.modes.deformation import deformation
    from continuousflex_dl.tests.large_motion import MOTIONS, hinge_motion, kabsch_rmsd
    atoms = load_atoms(example_structure_path("4ake"), "heavy")
    coords = centre(atoms.coords)
    resnums = atoms.group.getResnums()
    blocks = atoms.blocks
    modes = compute_modes(coords, n_modes=9, cutoff=8.0).vectors[6:9]
    name, residues, hinges = MOTIONS[0]
    true = coords + hinge_motion(coords, resnums, atoms.group.getNames(), name, residues, hinges,
                                 40.0).displacement(coords, [1.0, 1.0])
    rng = np.random.default_rng(5)
    rot = random_rotations(2, rng)
    img = project_gaussians(torch.tensor(true, dtype=torch.float32), rot, np.zeros((2, 2)), BOX, PIXEL).numpy()
    rmsd = {}
    for kind in ("linear", "rigid-blocks"):
        res = al.align_particles(img, coords, modes, PIXEL, blocks=blocks, deformation=kind, max_shift_px=1.0,
                                 angular_step_deg=20.0)
        assert np.all(angular_distance_deg(res.rotations, rot) < 8.0), kind    # 4-6 degrees: the pose
        # absorbs part of a motion the modes cannot draw at 32 px, 3 Å/px
        rmsd[kind] = kabsch_rmsd(deformation(coords, modes, kind, blocks)(res.amplitudes), true)
    # Å: 1.61, 1.85 linear; 1.31, 1.48 rigid blocks (their best answers: 1.25 and 0.97 Å)
    assert np.all(rmsd["rigid-blocks"] < 0.9 * rmsd["linear"]), rmsd
    with pytest.raises(ValueError, match="deformation must be one of"):
        al.align_particles(img, coords, modes, PIXEL, deformation="nolb")


def test_alignment_deformation_is_rigid_blocks_only_where_it_can_be(caplog):
    """Rigid blocks where asked and the reference has residues and is refined atom by atom; a
    reference without residues (pseudoatoms) or refined on beads is displaced linearly, logged."""
    import logging
    rng = np.random.default_rng(0)
    coords, modes = rng.normal(size=(12, 3)), rng.normal(size=(2, 12, 3))
    with_blocks = Reference(coords, modes, blocks=np.repeat(np.arange(4), 3))
    assert ag.alignment_deformation(with_blocks, "linear", 5000) == "linear"
    assert ag.alignment_deformation(with_blocks, "rigid-blocks", 5000) == "rigid-blocks"
    with caplog.at_level(logging.WARNING):
        assert ag.alignment_deformation(Reference(coords, modes), "rigid-blocks", 5000) == "linear"
        assert "no residues" in caplog.text
        assert ag.alignment_deformation(with_blocks, "rigid-blocks", 10) == "linear"
        assert "beads above 10 atoms" in caplog.text
    aligner = ag.Aligner(with_blocks, 3.0, 16, al.AlignConfig(deformation="rigid-blocks", working_size=16,
                                                              search_size=8))
    assert aligner.deformation == "rigid-blocks" and aligner.work.model.deformation.kind == "rigid-blocks"
    assert aligner.search.model.deformation.kind == "linear"          # the global search's beads
