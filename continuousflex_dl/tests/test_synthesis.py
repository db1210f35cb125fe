"""Synthesis: orientation/shift/amplitude/defocus sampling, noise at a given SNR, the streamed
.mrcs stack against an independent recomputation, reproducibility, and STAR round trip."""
import math
import time

import mrcfile
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from continuousflex_dl.core.imaging.ctf import CTFParams, apply_ctf, ctf_image
from continuousflex_dl.core.imaging.geometry import euler_to_matrix
from continuousflex_dl.core.imaging.projection import project_gaussians
from continuousflex_dl.core.modes import synthesis
from continuousflex_dl.core.imaging.star import read_particles_star, read_star, write_star
from continuousflex_dl.core.modes.synthesis import (
    CTFSampler, add_noise, measured_snr, sample_amplitudes, sample_defocus, sample_orientations,
    sample_shifts, synthesize,
)


def directions(angles):
    """Projection directions (n, 3): third row of A (independent of the sampler)."""
    return euler_to_matrix(angles)[:, 2, :]


def uniform_sphere_pvalues(angles):
    d = directions(angles)
    p_cos = chisquare(np.histogram(d[:, 2], bins=10, range=(-1, 1))[0]).pvalue
    az = np.arctan2(d[:, 1], d[:, 0])
    p_az = chisquare(np.histogram(az, bins=12, range=(-np.pi, np.pi))[0]).pvalue
    return p_cos, p_az, np.linalg.norm(d.mean(0))


@pytest.mark.parametrize("in_plane", [True, False])
def test_orientations_uniform_on_sphere(in_plane):
    angles = sample_orientations(4000, np.random.default_rng(1), in_plane=in_plane)
    assert angles.shape == (4000, 3)
    p_cos, p_az, mean_norm = uniform_sphere_pvalues(angles)
    assert p_cos > 1e-3 and p_az > 1e-3
    assert mean_norm < 0.05  # expected ~0.016 for 4000 uniform unit vectors
    if in_plane:
        assert chisquare(np.histogram(angles[:, 2], bins=12, range=(-180, 180))[0]).pvalue > 1e-3
    else:
        assert np.all(angles[:, 2] == 0)
    # The same statistics reject a naive sampler (tilt uniform in degrees).
    rng = np.random.default_rng(1)
    naive = np.stack([rng.uniform(-180, 180, 4000), rng.uniform(0, 180, 4000), np.zeros(4000)], -1)
    assert uniform_sphere_pvalues(naive)[0] < 1e-6


def test_shifts_and_defocus():
    rng = np.random.default_rng(2)
    s = sample_shifts(2000, 3.0, rng)
    assert s.shape == (2000, 2) and np.abs(s).max() <= 3.0 and np.abs(s).max() > 2.9
    assert abs(s.mean()) < 0.1
    assert np.all(sample_shifts(5, 0.0, rng) == 0)
    with pytest.raises(ValueError):
        sample_shifts(5, -1.0, rng)
    u, v, a = sample_defocus(1000, rng, 10000.0, 20000.0, astigmatism=500.0)
    assert np.allclose(u - v, 500.0) and (0.5 * (u + v)).min() >= 10000 and (0.5 * (u + v)).max() <= 20000
    assert a.min() >= 0 and a.max() < 180 and a.std() > 40
    with pytest.raises(ValueError):
        sample_defocus(3, rng, 20000.0, 10000.0)


def test_paper_relation_exact():
    q = sample_amplitudes("paper", 500, 4, np.random.default_rng(3))
    assert q.shape == (500, 4)
    assert np.allclose(q[:, 1] ** 2 + q[:, 2] ** 2, 200.0 ** 2, rtol=0, atol=1e-8)
    assert q[:, 0].min() >= -200 and q[:, 0].max() <= 0 and q[:, 0].min() < -190 and q[:, 0].max() > -10
    r = -q[:, 0] / 200.0
    assert np.allclose(q[:, 2], 200 * np.cos(np.pi * r), atol=1e-9)
    assert np.allclose(q[:, 1], 200 * np.sin(np.pi * r), atol=1e-9)
    assert np.all(q[:, 3] == 0)
    q50 = sample_amplitudes("paper", 10, 3, np.random.default_rng(3), scale=50.0)
    assert np.allclose(q50[:, 1] ** 2 + q50[:, 2] ** 2, 2500.0)
    with pytest.raises(ValueError):
        sample_amplitudes("paper", 10, 2, np.random.default_rng(3))


def test_other_relations(tmp_path):
    rng = np.random.default_rng(4)
    u = sample_amplitudes("uniform", 3000, 2, rng, range=[50.0, 10.0])
    assert np.abs(u[:, 0]).max() <= 50 and np.abs(u[:, 0]).max() > 49
    assert np.abs(u[:, 1]).max() <= 10 and abs(u[:, 0].std() - 50 / math.sqrt(3)) < 1.5
    g = sample_amplitudes("gaussian", 4000, 3, rng, mean=[10.0, 0.0, -10.0], std=20.0)
    assert np.allclose(g.mean(0), [10, 0, -10], atol=1.5) and np.allclose(g.std(0), 20, atol=1.0)
    lin = sample_amplitudes("linear", 300, 3, rng, start=[0, 0, 0], end=[30, -60, 90])
    assert np.allclose(np.cross(lin, [30, -60, 90]), 0, atol=1e-9)  # on the segment's line
    t = lin[:, 0] / 30
    assert t.min() >= 0 and t.max() <= 1
    centers = np.array([[100.0, 0.0], [-100.0, 50.0]])
    c = sample_amplitudes("clusters", 2000, 2, rng, centers=centers, spread=5.0)
    dist = np.linalg.norm(c[:, None, :] - centers[None], axis=-1)
    label = dist.argmin(1)
    assert dist.min(1).max() < 30  # 6 sigma
    for j in range(2):
        assert np.allclose(c[label == j].mean(0), centers[j], atol=1.0)
        assert 0.4 < (label == j).mean() < 0.6
    grid = sample_amplitudes("grid", 50, 2, rng, range=20.0, points=5)
    nodes = {tuple(r) for r in grid}
    assert len(nodes) == 25 and set(np.unique(grid)) == set(np.linspace(-20, 20, 5))
    table = tmp_path / "amps.csv"
    table.write_text("# my amplitudes\nq7,q8\n1.5,2\n-3,4.25\n5,6\n")
    tq = sample_amplitudes("table", 5, 2, rng, path=table)
    assert np.array_equal(tq, [[1.5, 2], [-3, 4.25], [5, 6], [1.5, 2], [-3, 4.25]])
    with pytest.raises(ValueError, match="columns"):
        sample_amplitudes("table", 5, 3, rng, path=table)
    with pytest.raises(ValueError, match="Unknown amplitude relation"):
        sample_amplitudes("spiral", 5, 3, rng)
    with pytest.raises(ValueError, match="Unknown parameter"):
        sample_amplitudes("uniform", 5, 3, rng, scale=3.0)


def _blobs(n, box, rng):
    """Smooth random clean images (n, box, box): sums of Gaussian blobs."""
    y, x = np.mgrid[:box, :box]
    out = np.zeros((n, box, box))
    for i in range(n):
        for cx, cy, w in rng.uniform([8, 8, 2], [box - 8, box - 8, 5], (6, 3)):
            out[i] += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * w * w))
    return torch.from_numpy(out.astype(np.float32))


@pytest.mark.parametrize("snr", [0.1, 1.0])
def test_noise_snr(snr):
    clean = _blobs(40, 64, np.random.default_rng(5))
    for gen in (np.random.default_rng(6), torch.Generator().manual_seed(6)):
        noisy = add_noise(clean, snr, gen)
        measured = measured_snr(clean, noisy).numpy()
        assert abs(measured.mean() / snr - 1) < 0.05
        assert np.all(np.abs(measured / snr - 1) < 0.12)  # per image: 4096 px -> ~2 % sd
    with pytest.raises(ValueError):
        add_noise(clean, 0.0, np.random.default_rng(0))


@pytest.fixture(scope="module")
def toy():
    """100 atoms in a 12 Å ball and 3 orthonormal random modes (unit 3N-vectors)."""
    rng = np.random.default_rng(7)
    coords = rng.normal(0, 6.0, (100, 3))
    q, _ = np.linalg.qr(rng.normal(size=(300, 3)))
    return coords, q.T.reshape(3, 100, 3)


def _expected(coords, modes, res, i, ctf=True):
    """Clean image i recomputed from the ground truth, independently of synthesize's loop."""
    xyz = coords + np.tensordot(res.amplitudes[i], modes, axes=1)
    img = project_gaussians(torch.tensor(xyz, dtype=torch.float32),
                            torch.tensor(euler_to_matrix(res.angles[i:i + 1]), dtype=torch.float32),
                            torch.tensor(res.shifts[i:i + 1], dtype=torch.float32), res.box, res.pixel_size)
    if ctf:
        c = res.ctf
        img = apply_ctf(img, ctf_image(CTFParams(c.defocus_u[i], c.defocus_v[i], c.defocus_angle[i],
                                                 c.voltage[i], c.cs[i], c.amplitude_contrast[i]),
                                       res.box, res.pixel_size))
    return img[0].numpy()


def test_synthesize_stack_matches_ground_truth(tmp_path, toy, monkeypatch):
    coords, modes = toy
    # Project 3 images per projector call, so chunks of 5 are split 3 + 2.
    monkeypatch.setattr(synthesis, "_PROJECTION_ELEMENTS", 3 * 100 * 33)
    calls = []
    res = synthesize(tmp_path / "a.mrcs", coords, modes, 12, 32, 2.0, max_shift_px=2.0,
                     ctf=CTFSampler(defocus_min=8000.0, defocus_max=15000.0, astigmatism=300.0),
                     seed=11, chunk_size=5,
                     progress=lambda done, total, message: calls.append((done, total)))
    assert calls == [(5, 12), (10, 12), (12, 12)]
    with mrcfile.mmap(res.stack_path, mode="r") as mrc:
        assert mrc.is_image_stack() and mrc.data.shape == (12, 32, 32) and mrc.data.dtype == np.float32
        assert np.isclose(float(mrc.voxel_size.x), 2.0) and np.isclose(float(mrc.voxel_size.y), 2.0)
        data = np.array(mrc.data)
        assert np.isclose(mrc.header.dmean, data.mean(), atol=1e-6)
        assert np.isclose(mrc.header.dmax, data.max()) and np.isclose(mrc.header.rms, data.std(), rtol=1e-4)
    assert res.amplitudes.shape == (12, 3) and np.allclose(res.amplitudes[:, 1] ** 2 + res.amplitudes[:, 2] ** 2,
                                                           200.0 ** 2)
    assert res.mode_numbers == [7, 8, 9] and np.abs(res.shifts).max() <= 2.0
    assert np.allclose(res.ctf.defocus_u - res.ctf.defocus_v, 300.0) and res.ctf.batch_size == 12
    for i in (0, 6, 11):
        exp = _expected(coords, modes, res, i)
        assert np.abs(data[i] - exp).max() < 1e-4 * np.abs(exp).max()
    # The amplitudes matter: the rigid reference gives a clearly different image.
    rigid = project_gaussians(torch.tensor(coords, dtype=torch.float32),
                              torch.tensor(euler_to_matrix(res.angles[:1]), dtype=torch.float32),
                              torch.tensor(res.shifts[:1], dtype=torch.float32), 32, 2.0)
    rigid = apply_ctf(rigid, ctf_image(res.ctf.select(slice(0, 1)), 32, 2.0))[0].numpy()
    assert np.abs(data[0] - rigid).max() > 0.1 * np.abs(rigid).max()


def _stack(path):
    with mrcfile.open(path, permissive=True) as mrc:
        return np.array(mrc.data)


def test_synthesize_noise_and_reproducibility(tmp_path, toy):
    """Same seed and chunk size: the same bytes. Another chunk size: the same poses, amplitudes,
    CTFs and noise, images equal to float32 rounding (the CPU's matrix kernels may sum in
    another order for another batch shape, e.g. on AMD EPYC), never bit-exactness."""
    coords, modes = toy
    kw = dict(amplitudes=None, relation="uniform", relation_params={"range": 20.0}, snr=0.5,
              ctf=CTFParams(12000.0, 12000.0), in_plane=False)
    a = synthesize(tmp_path / "a.mrcs", coords, modes, 30, 48, 1.5, seed=3, chunk_size=256, **kw)
    time.sleep(1.1)  # the file must not record the time
    synthesize(tmp_path / "a2.mrcs", coords, modes, 30, 48, 1.5, seed=3, chunk_size=256, **kw)
    b = synthesize(tmp_path / "b.mrcs", coords, modes, 30, 48, 1.5, seed=3, chunk_size=7, **kw)
    synthesize(tmp_path / "c.mrcs", coords, modes, 30, 48, 1.5, seed=4, **kw)
    bytes_a = (tmp_path / "a.mrcs").read_bytes()
    assert bytes_a == (tmp_path / "a2.mrcs").read_bytes()  # same seed and chunk size
    for name in ("angles", "shifts", "amplitudes"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    data_a, data_b = _stack(a.stack_path), _stack(b.stack_path)
    assert np.abs(data_a - data_b).max() <= 1e-5 * np.abs(data_a).max()
    assert np.abs(data_a - _stack(tmp_path / "c.mrcs")).max() > 0.1 * np.abs(data_a).max()
    assert np.all(a.angles[:, 2] == 0) and np.all(a.ctf.defocus_u == 12000.0)
    assert np.abs(a.amplitudes).max() <= 20.0
    with mrcfile.mmap(a.stack_path, mode="r") as mrc:
        data = np.array(mrc.data)
    clean = np.stack([_expected(coords, modes, a, i) for i in range(30)])
    snr = clean.var(axis=(1, 2)) / (data - clean).var(axis=(1, 2))
    assert abs(snr.mean() / 0.5 - 1) < 0.05


def test_synthesize_without_modes_or_ctf(tmp_path, toy):
    coords, _ = toy
    res = synthesize(tmp_path / "r.mrcs", coords, None, 4, 32, 2.0, ctf=None, seed=1)
    assert res.amplitudes.shape == (4, 0) and res.ctf is None
    with mrcfile.mmap(res.stack_path, mode="r") as mrc:
        img = np.array(mrc.data[2])
    # Without CTF the projection of 100 unit-weight atoms inside the box sums to ~100.
    assert abs(img.sum() - 100.0) < 0.5
    assert np.abs(img - _expected(coords, np.zeros((0, 100, 3)), res, 2, ctf=False)).max() < 1e-5


@pytest.mark.parametrize("bad", [dict(box=4), dict(n_images=0), dict(snr=0.0), dict(snr=-1.0),
                                 dict(modes=np.zeros((3, 99, 3))), dict(amplitudes=np.zeros((5, 2))),
                                 dict(pixel_size=0.0)])
def test_synthesize_validation(tmp_path, toy, bad):
    coords, modes = toy
    args = dict(coords=coords, modes=modes, n_images=5, box=32, pixel_size=2.0)
    args.update(bad)
    with pytest.raises(ValueError):
        synthesize(tmp_path / "x.mrcs", **args)


def test_star_round_trip(tmp_path, toy):
    coords, modes = toy
    res = synthesize(tmp_path / "s.mrcs", coords, modes, 6, 32, 2.0, max_shift_px=3.0, seed=5,
                     ctf=CTFSampler(defocus_min=9000.0, defocus_max=14000.0, astigmatism=200.0),
                     mode_numbers=[7, 9, 12])
    star = res.write_star(tmp_path / "gt.star")
    raw = read_star(star)["particles"]
    assert raw["_rlnImageName"][0] == "000001@s.mrcs" and raw["_rlnImageName"][5] == "000006@s.mrcs"
    assert np.allclose(np.asarray(raw["_rlnOriginXAngst"], float), res.shifts[:, 0] * 2.0)
    back = read_particles_star(star)
    assert back.stacks == ["s.mrcs"] * 6 and np.array_equal(back.indices, np.arange(6))
    assert np.array_equal(back.angles, res.angles) and np.array_equal(back.shifts, res.shifts)
    assert np.array_equal(back.amplitudes, res.amplitudes) and back.mode_numbers == [7, 9, 12]
    for name in ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast",
                 "phase_shift"):
        assert np.array_equal(back.ctf.column(name), res.ctf.column(name)), name
    assert back.pixel_size == 2.0 and np.all(back.ctf.voltage == 300.0) and np.all(back.ctf.cs == 2.7)
    # RELION 3.1 style (shifts in Å only, pixel size from detector/magnification).
    write_star(tmp_path / "r31.star", {"particles": {
        "rlnImageName": ["000003@x.mrcs"], "rlnOriginXAngst": [3.0], "rlnOriginYAngst": [-1.5],
        "rlnDetectorPixelSize": [5.0], "rlnMagnification": [25000.0]}})
    r31 = read_particles_star(tmp_path / "r31.star")
    assert r31.pixel_size == 2.0 and np.allclose(r31.shifts, [[1.5, -0.75]]) and r31.indices[0] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_synthesize_cuda_matches_cpu(tmp_path, toy):
    coords, modes = toy
    kw = dict(snr=1.0, max_shift_px=2.0, seed=9)
    cpu = synthesize(tmp_path / "cpu.mrcs", coords, modes, 8, 32, 2.0, device="cpu", **kw)
    gpu = synthesize(tmp_path / "gpu.mrcs", coords, modes, 8, 32, 2.0, device="cuda", **kw)
    assert np.array_equal(cpu.angles, gpu.angles)
    with mrcfile.mmap(cpu.stack_path, mode="r") as a, mrcfile.mmap(gpu.stack_path, mode="r") as b:
        assert np.abs(np.asarray(a.data) - np.asarray(b.data)).max() < 1e-3 * np.abs(np.asarray(a.data)).max()


def test_synthesis_result_save_load_round_trip(tmp_path):
    from continuousflex_dl.core.modes.synthesis import SynthesisResult
    rng = np.random.default_rng(0)
    n = 5
    result = SynthesisResult(stack_path="s.mrcs", box=32, pixel_size=2.0, angles=rng.normal(size=(n, 3)),
                             shifts=rng.normal(size=(n, 2)), amplitudes=rng.normal(size=(n, 3)),
                             ctf=CTFParams(rng.uniform(5e3, 1e4, n), rng.uniform(5e3, 1e4, n),
                                           rng.uniform(0, 180, n), 200.0, 2.0, 0.07).expand(n),
                             snr=None, seed=4, mode_numbers=[7, 8, 9])
    result.save(tmp_path / "gt.npz")
    back = SynthesisResult.load(tmp_path / "gt.npz")
    for name in ("angles", "shifts", "amplitudes"):
        np.testing.assert_array_equal(getattr(back, name), getattr(result, name))
    for name in ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast"):
        np.testing.assert_array_equal(back.ctf.column(name), result.ctf.column(name))
    assert (back.box, back.pixel_size, back.snr, back.seed, back.mode_numbers) == (32, 2.0, None, 4, [7, 8, 9])
    result.ctf = None
    result.save(tmp_path / "none.npz")
    assert SynthesisResult.load(tmp_path / "none.npz").ctf is None
