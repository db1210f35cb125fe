"""Training on particles simulated on the fly and matched to the data set (core/network/simulator.py).

Particles: adenylate kinase (4AKE chain A, 214 CA atoms, Gaussian width 2 Å)
moved along ANM mode 7, synthesized by ``synthesis.synthesize`` (an independent
code path: per-image SNR noise, its own random streams) with CTFs of defocus
8000-20000 Å, 32 px boxes of 4 Å.
"""

import numpy as np
import pytest
import torch

from continuousflex_dl.core.network import simulator as sm
from continuousflex_dl.core.network import training as tr
from continuousflex_dl.core.imaging.ctf import CTFParams
from continuousflex_dl.core.imaging.dataset import MrcsImageSource
from continuousflex_dl.core.modes.nma import compute_modes
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms
from continuousflex_dl.core.modes.synthesis import CTFSampler, synthesize

torch.set_num_threads(2)

BOX, PIXEL, SIGMA = 32, 4.0, 2.0


@pytest.fixture(scope="module")
def ake():
    coords = centre(load_atoms(example_structure_path("4ake"), "ca").coords)
    modes = compute_modes(coords, n_modes=7, cutoff=15.0).vectors[6:7]
    return sm.Reference(coords, modes, SIGMA)


def _particles(ake, folder, n, seed, snr, amplitude_range=250.0, ctf=CTFSampler(8000.0, 20000.0),
               in_plane=False, max_shift=0.0):
    res = synthesize(folder / f"p{seed}.mrcs", ake.coords, ake.modes, n, BOX, PIXEL, relation="uniform",
                     relation_params={"range": amplitude_range}, ctf=ctf, snr=snr, sigma=SIGMA, seed=seed,
                     in_plane=in_plane, max_shift_px=max_shift)
    return res, MrcsImageSource([(res.stack_path, i) for i in range(n)]).read(np.arange(n))


def _prior(res):
    return sm.AmplitudePrior.from_estimates(res.amplitudes)


@pytest.mark.parametrize("snr", [0.1, 1.0])
def test_noise_estimate_is_within_20_percent_of_the_truth(ake, tmp_path, snr):
    """Particles of known SNR, on an arbitrary intensity scale and offset (x 37 + 5)."""
    res, images = _particles(ake, tmp_path, 300, 1, snr, amplitude_range=150.0, max_shift=2.0)
    images = images * 37.0 + 5.0
    sim = sm.match_simulator(ake, images, BOX, PIXEL, res.ctf, _prior(res), in_plane=True, max_shift_px=2.0)
    assert sim.noise.snr == pytest.approx(snr, rel=0.2)
    # add_noise gives image i noise of variance var(clean_i) / snr: their mean is the truth
    clean = synthesize(tmp_path / "clean.mrcs", ake.coords, ake.modes, 300, BOX, PIXEL, relation="uniform",
                       relation_params={"range": 150.0}, ctf=CTFSampler(8000.0, 20000.0), sigma=SIGMA,
                       seed=1, in_plane=False, max_shift_px=2.0)
    clean_images = MrcsImageSource([(clean.stack_path, i) for i in range(300)]).read(np.arange(300))
    true_noise_var = float(np.mean(clean_images.var(axis=(1, 2)))) / snr * 37.0 ** 2
    estimated = sim.noise.variance(BOX) * sim.noise.scale ** 2  # back in particle units
    assert estimated == pytest.approx(true_noise_var, rel=0.2)
    assert sim.noise.scale == pytest.approx(37.0, rel=0.2)
    # white noise: the fitted spectrum is flat
    power = sim.noise.power[1:BOX // 2 + 1]
    assert power.max() < 1.3 * power.min()


def test_coloured_noise_spectrum_is_followed(ake, tmp_path):
    """Noise low-pass filtered to 4x less power at Nyquist than at low frequency: the
    estimate follows the slope, and the simulator's noise has the estimated spectrum."""
    res, clean = _particles(ake, tmp_path, 300, 3, None, amplitude_range=150.0)
    rng = np.random.default_rng(5)
    f = np.sqrt(np.fft.fftfreq(BOX)[:, None] ** 2 + np.fft.rfftfreq(BOX)[None, :] ** 2)
    shape = np.sqrt(1.0 - 1.5 * np.minimum(f, 0.5))  # power 1 at 0 falling to 0.25 at Nyquist
    white = rng.standard_normal((300, BOX, BOX))
    noise = np.fft.irfft2(np.fft.rfft2(white) * shape, s=(BOX, BOX))
    sigma2 = float(np.mean(clean.var(axis=(1, 2)))) / 0.3  # SNR 0.3 if it were white
    images = clean + noise * np.sqrt(sigma2)
    sim = sm.match_simulator(ake, images, BOX, PIXEL, res.ctf, _prior(res), in_plane=False)
    power = sim.noise.power * sim.noise.scale ** 2 / sigma2   # relative to the white level
    r = np.arange(len(power)) / BOX                          # shell -> frequency (1/px)
    truth = 1.0 - 1.5 * np.minimum(r, 0.5)
    np.testing.assert_allclose(power[1:BOX // 2 + 1], truth[1:BOX // 2 + 1], rtol=0.2)
    true_snr = float(np.mean(clean.var(axis=(1, 2))) / np.mean((noise * np.sqrt(sigma2)).var(axis=(1, 2))))
    assert sim.noise.snr == pytest.approx(true_snr, rel=0.2)
    # the simulator's noise has that spectrum
    drawn = sim.noise.sample((200, BOX, BOX), np.random.default_rng(0))
    measured = sm.radial_power_spectrum(drawn).numpy()
    np.testing.assert_allclose(measured[1:BOX // 2 + 1], sim.noise.power[1:BOX // 2 + 1], rtol=0.1)


def test_simulated_ctfs_come_from_the_particles(ake):
    """Half the particles at 8000 Å, a quarter at 15000 Å, a quarter at 25000 Å."""
    defocus = np.repeat([8000.0, 15000.0, 25000.0], [200, 100, 100])
    ctf = CTFParams(defocus, defocus - 300.0, np.full(400, 30.0), voltage=200.0, cs=2.0)
    sim = sm.ParticleSimulator(ake, BOX, PIXEL, ctf, sm.AmplitudePrior.symmetric(100.0, 1),
                               noise=sm.NoiseModel.white(1.0, BOX), seed=3)
    drawn = np.concatenate([sim.batch(1, b, 100).ctf.column("defocus_u") for b in range(8)])
    assert set(np.unique(drawn)) <= {8000.0, 15000.0, 25000.0}
    fractions = [np.mean(drawn == d) for d in (8000.0, 15000.0, 25000.0)]
    np.testing.assert_allclose(fractions, [0.5, 0.25, 0.25], atol=0.06)
    batch = sim.batch(1, 0, 10)
    np.testing.assert_array_equal(batch.ctf.column("defocus_v"), batch.ctf.column("defocus_u") - 300.0)
    assert np.all(batch.ctf.column("voltage") == 200.0)
    # the images carry those CTFs: noise-free, their power vanishes at the CTF's zeros
    from continuousflex_dl.core.imaging.ctf import ctf_image
    clean = sim.with_noise(None).batch(1, 0, 10)
    expected = ctf_image(clean.ctf, BOX, PIXEL)
    torch.testing.assert_close(clean.ctf_images, expected)
    spectrum = torch.fft.rfft2(clean.images).abs()
    zeros = expected.abs() < 0.02
    assert float(spectrum[zeros].mean()) < 0.05 * float(spectrum[~zeros].mean())


def test_stream_is_seeded_and_resumable(ake):
    ctf = CTFParams(np.linspace(8000, 20000, 50), np.linspace(8000, 20000, 50))
    kwargs = dict(in_plane=True, max_shift_px=3.0, noise=sm.NoiseModel.white(1e-3, BOX))

    def simulator(seed):
        return sm.ParticleSimulator(ake, BOX, PIXEL, ctf, sm.AmplitudePrior(np.array([-50.0]), np.array([80.0])),
                                    seed=seed, **kwargs)
    a, b = simulator(1), simulator(1)
    first = a.batch(4, 2, 16)
    again = b.batch(4, 2, 16)   # another simulator, straight to epoch 4 batch 2: the same images
    torch.testing.assert_close(first.images, again.images)
    np.testing.assert_array_equal(first.amplitudes, again.amplitudes)
    other = [a.batch(4, 3, 16), a.batch(5, 2, 16), simulator(2).batch(4, 2, 16)]
    for o in other:  # every other batch is new
        assert not np.allclose(o.amplitudes, first.amplitudes)
        assert not torch.allclose(o.images, first.images)
    # the noise scale multiplies the noise only: the same particles, half the noise
    clean, half = a.batch(4, 2, 16, noise_scale=0.0), a.batch(4, 2, 16, noise_scale=0.5)
    torch.testing.assert_close(half.images - clean.images, 0.5 * (first.images - clean.images), rtol=1e-4, atol=1e-7)
    many = np.concatenate([a.batch(1, k, 64).amplitudes for k in range(8)])
    assert many.min() >= -50.0 and many.max() <= 80.0
    assert np.mean(many) == pytest.approx(15.0, abs=6.0)
    shifts = np.concatenate([a.batch(1, k, 64).shifts for k in range(4)])
    assert np.abs(shifts).max() <= 3.0 and np.abs(shifts).max() > 2.5
    with pytest.raises(ValueError, match="modes"):
        sm.ParticleSimulator(ake, BOX, PIXEL, None, sm.AmplitudePrior.symmetric(10.0, 2))


def test_estimates_prior_follows_the_estimates_not_their_box():
    # Estimates on the paper's curve (q7 = -200 r, q8 = 200 sin(pi r), q9 = 200 cos(pi r)) plus
    # 10 Å of estimation noise: draws stay near the curve (a uniform box would not) with the
    # kernel density's moments, and the kernel widths follow Scott's rule.
    rng = np.random.default_rng(3)
    r = rng.random(2000)
    curve = lambda t: np.stack([-200 * t, 200 * np.sin(np.pi * t), 200 * np.cos(np.pi * t)], axis=1)  # noqa: E731
    estimates = curve(r) + 10.0 * rng.standard_normal((2000, 3))
    prior = sm.EstimatesPrior.from_estimates(estimates)
    scott = 2000 ** (-1 / 7)
    np.testing.assert_allclose(prior.bandwidth, estimates.std(0) * scott, rtol=0.15)
    draws = prior.sample(20000, np.random.default_rng(4))
    np.testing.assert_allclose(draws.mean(0), prior.mean, atol=4.0)
    np.testing.assert_allclose(draws.std(0), prior.std, rtol=0.03)
    grid = curve(np.linspace(0, 1, 2001))
    off_curve = lambda q: np.sqrt(((q[:, None, :] - grid[None]) ** 2).sum(-1)).min(1)  # noqa: E731
    box = sm.AmplitudePrior.from_estimates(estimates).sample(2000, np.random.default_rng(5))
    near, far = np.median(off_curve(draws[:2000])), np.median(off_curve(box))
    assert near < 0.5 * far, f"median distance to the curve {near:.0f} Å (kernel) vs {far:.0f} Å (box)"
    assert near < 3 * np.sqrt((prior.bandwidth ** 2).sum() + 3 * 10.0 ** 2)
    with pytest.raises(ValueError, match="finite"):
        sm.EstimatesPrior.from_estimates(np.full((5, 3), np.nan))


# -------------------------------------------------------------- training on the stream

SIM_EPOCHS = 3


@pytest.fixture(scope="module")
def trained(ake, tmp_path_factory):
    """Simulated stream then fine-tuning, on the particles' ground-truth amplitudes.

    The setting is chosen to learn in a few CPU seconds and still be a real task:
    one mode over ±250 Å (17 Å RMS of motion, ~4 px at 4 Å/px), random projection
    directions without in-plane rotation (``sim_in_plane=False``), no shifts, SNR 1,
    CTFs with phase flipping; 3 epochs of 512 new simulated images (1,536 in all,
    ResNet18 at 16 px), then 2 epochs on 210 labelled particles.
    """
    folder = tmp_path_factory.mktemp("sim")
    part, images = _particles(ake, folder, 300, 11, 1.0)
    test, test_images = _particles(ake, folder, 200, 12, 1.0)
    out = folder / "model"
    cfg = tr.TrainConfig.build(modes=[7], working_size=16, pixel_size=PIXEL, epochs=SIM_EPOCHS, batch_size=32,
                               architecture="resnet18", source="simulated+finetune", sim_images=512,
                               sim_in_plane=False, sim_max_shift_px=0.0, sim_prior="range", finetune_epochs=2,
                               val_fraction=0.3)
    snapshot = {}

    def at_the_end_of_the_simulated_phase(done, total, message):
        if done == SIM_EPOCHS:
            sim_only = folder / "sim_only"
            sim_only.mkdir()
            for name in ("config.json", "best.pt"):
                (sim_only / name).write_bytes((out / name).read_bytes())
            snapshot["weights"] = torch.load(out / "last.pt", weights_only=True)["model"]
            snapshot["dir"] = sim_only
    rows = tr.train(images, part.amplitudes, np.arange(300), out, cfg, seed=0, ctf=part.ctf, reference=ake,
                    progress=at_the_end_of_the_simulated_phase)
    return dict(part=part, test=test, test_images=test_images, out=out, rows=rows, **snapshot)


def test_network_trained_on_the_simulated_stream_predicts_held_out_particles(trained):
    test = trained["test"]
    pred = tr.predict(trained["dir"], trained["test_images"], ctf=test.ctf)
    baseline = np.abs(test.amplitudes - trained["part"].amplitudes.mean(0)).mean()
    mae = np.abs(pred - test.amplitudes).mean()
    assert mae <= 0.6 * baseline, f"test MAE {mae:.1f} Å vs mean predictor {baseline:.1f} Å"
    saved = tr.TrainConfig.load(trained["out"] / "config.json")
    assert saved.fitted.simulation["snr"] == pytest.approx(1.0, rel=0.2)
    assert saved.fitted.simulation["max_shift_px"] == 0.0
    lo, hi = saved.fitted.simulation["amplitude_low"][0], saved.fitted.simulation["amplitude_high"][0]
    assert -300.0 < lo < -250.0 and 250.0 < hi < 300.0  # the labels' range (±250 Å) widened by 10 %
    np.testing.assert_allclose(saved.fitted.target_mean, [(lo + hi) / 2])
    np.testing.assert_allclose(saved.fitted.target_std, [(hi - lo) / np.sqrt(12)])


def test_finetuning_changes_the_weights_and_lowers_the_validation_error(trained):
    rows = trained["rows"]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    final = torch.load(trained["out"] / "last.pt", weights_only=True)
    assert final["phase"] == 1 and final["phase_start"] == SIM_EPOCHS + 1
    changed = [k for k, v in final["model"].items()
               if v.is_floating_point() and not torch.allclose(v, trained["weights"][k])]
    assert len(changed) > 0.9 * sum(v.is_floating_point() for v in final["model"].values())
    simulated, finetuned = rows[SIM_EPOCHS - 1]["val_mae"], rows[-1]["val_mae"]
    assert finetuned < simulated, f"validation MAE {simulated:.1f} Å after simulation, {finetuned:.1f} Å after"
    assert rows[SIM_EPOCHS]["lr"] < 0.2 * tr.TrainConfig.build(modes=[7]).optimiser.learning_rate  # fine-tuning at lr / 10
    best = tr.best_epoch(trained["out"])  # the row of best.pt, and what that epoch trained on
    lowest = min(rows, key=lambda r: r["val_loss"])
    assert best["epoch"] == lowest["epoch"] == torch.load(trained["out"] / "best.pt", weights_only=True)["epoch"]
    assert best["source"] == ("particles" if lowest["epoch"] > SIM_EPOCHS else "simulated")
    assert tr.best_epoch(trained["dir"]) is None  # a folder without metrics


def test_simulated_training_resumes_across_the_phase_change(ake, tmp_path):
    """Killed after the last simulated epoch and continued: the same run as an uninterrupted one;
    without amplitudes, validation is on a fixed simulated set."""
    part, images = _particles(ake, tmp_path, 24, 21, 1.0)
    cfg = tr.TrainConfig.build(modes=[7], working_size=16, pixel_size=PIXEL, epochs=1, batch_size=16,
                               architecture="resnet18", source="simulated+finetune", sim_images=48,
                               finetune_epochs=1, val_fraction=0.25, lr_schedule="plateau")
    full = tr.train(images, part.amplitudes, np.arange(24), tmp_path / "full", cfg, seed=2, ctf=part.ctf,
                    reference=ake)

    def crash(done, total, message):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        tr.train(images, part.amplitudes, np.arange(24), tmp_path / "part", cfg, seed=2, ctf=part.ctf,
                 reference=ake, progress=crash)
    with pytest.raises(ValueError, match="reference"):  # another structure: refused
        moved = sm.Reference(ake.coords + 1.0, ake.modes, SIGMA)
        tr.train(images, part.amplitudes, np.arange(24), tmp_path / "part", cfg, seed=2, ctf=part.ctf,
                 reference=moved, resume=True)
    resumed = tr.train(images, part.amplitudes, np.arange(24), tmp_path / "part", cfg, seed=2, ctf=part.ctf,
                       reference=ake, resume=True)
    assert [r["epoch"] for r in resumed] == [1, 2]
    np.testing.assert_allclose([r["val_loss"] for r in resumed], [r["val_loss"] for r in full], rtol=1e-4)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)["model"]
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-4, atol=1e-5)



def test_simulated_training_without_amplitudes_validates_on_simulated_particles(ake, tmp_path, caplog,
                                                                                 monkeypatch):
    part, images = _particles(ake, tmp_path, 24, 22, 1.0)
    cfg = tr.TrainConfig.build(modes=[7], working_size=16, pixel_size=PIXEL, epochs=2, batch_size=16,
                               architecture="resnet18", source="simulated", sim_images=32, val_fraction=0.5,
                               sim_noise_ramp=2)
    scales = []
    real_batch = sm.ParticleSimulator.batch

    def recording(self, epoch, index, size, noise_scale=1.0):
        scales.append((epoch, noise_scale))
        return real_batch(self, epoch, index, size, noise_scale)
    monkeypatch.setattr(sm.ParticleSimulator, "batch", recording)
    with caplog.at_level("INFO", logger="continuousflex_dl"):
        rows = tr.train(images, None, np.arange(24), tmp_path / "m", cfg, ctf=part.ctf, reference=ake)
    assert "validating on 16 simulated images" in caplog.text  # val_fraction of an epoch's 32
    assert "epoch 2/2 (simulated)" in caplog.text
    # the validation set has the particles' noise; the noise ramps up over the first 2 epochs
    assert sorted(set(scales)) == [(0, 1.0), (1, 0.5), (2, 1.0)]
    assert all(np.isfinite(r["val_mae"]) and r["val_mae"] > 0 for r in rows)
    saved = tr.TrainConfig.load(tmp_path / "m" / "config.json")
    half = sm.default_amplitude_range(len(ake.coords))  # no amplitudes: 5 sqrt(N) Å
    assert saved.fitted.simulation["amplitude_low"] == [-half] and saved.fitted.simulation["amplitude_high"] == [half]
    for data in ("particles", "simulated+finetune"):
        with pytest.raises(ValueError, match="amplitudes"):
            tr.train(images, None, np.arange(24), tmp_path / data, tr.TrainConfig.build(modes=[7], source=data),
                     reference=ake)
    with pytest.raises(ValueError, match="reference structure"):
        tr.train(images, part.amplitudes, np.arange(24), tmp_path / "x", cfg)


def test_simulated_training_draws_around_the_training_split_estimates(ake, tmp_path):
    # With amplitudes, the default prior is the kernel density of the training split's
    # (never the validation particles'), and the targets are standardised by its moments.
    part, images = _particles(ake, tmp_path, 40, 23, 1.0)
    cfg = tr.TrainConfig.build(modes=[7], working_size=16, pixel_size=PIXEL, epochs=1, batch_size=16,
                               architecture="resnet18", source="simulated", sim_images=16, val_fraction=0.25)
    tr.train(images, part.amplitudes, np.arange(40), tmp_path / "m", cfg, seed=5, ctf=part.ctf, reference=ake)
    saved = tr.TrainConfig.load(tmp_path / "m" / "config.json")
    train_idx, _ = tr.split_by_particle(np.arange(40), 0.25, 5)
    expected = sm.EstimatesPrior.from_estimates(part.amplitudes[train_idx])
    np.testing.assert_allclose(saved.fitted.simulation["amplitude_bandwidth"], expected.bandwidth)
    np.testing.assert_allclose(saved.fitted.target_mean, expected.mean)
    np.testing.assert_allclose(saved.fitted.target_std, expected.std)
    q = part.amplitudes[train_idx, 0]
    assert expected.std[0] > q.std() and expected.bandwidth[0] < 0.7 * q.std()
    with pytest.raises(ValueError, match="prior"):
        tr.train(images, part.amplitudes, np.arange(40), tmp_path / "x", cfg.replace(sim_prior="box"),
                 reference=ake)
