"""DeepHEMNMA network core: preprocessing, geometry of augmentation, training, reload, resume.

Synthetic particles: three Gaussian blobs whose positions move linearly with
the amplitudes (Å), plus white noise, so a network can learn the amplitudes.
"""
import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

from continuousflex_dl import __version__
from continuousflex_dl.core.imaging import dataset as ds
from continuousflex_dl.core.network import training as tr
from continuousflex_dl.core.imaging.ctf import CTFParams, ctf_image
from continuousflex_dl.core.imaging.geometry import euler_to_matrix, random_rotations
from continuousflex_dl.core.imaging.projection import fourier_crop
from continuousflex_dl.core.network.resnet import build_model, matrix_to_rotation_6d, rotation_6d_to_matrix

torch.set_num_threads(2)

AMP_SCALE = 50.0  # Å, standard deviation of the synthetic amplitudes


def synthetic(n_particles, copies, k, n=32, noise=0.2, seed=0, move_px=3.0):
    """Images (M, n, n), amplitudes (M, k) in Å and particle ids (M,), M = n_particles * copies."""
    rng = np.random.default_rng(seed)
    geo = np.random.default_rng(1234)
    base = geo.uniform(-6, 6, (3, 2))
    mix = geo.normal(0, 1, (3, 2, k))
    mix *= move_px * np.sqrt(k / 2) / np.linalg.norm(mix, axis=(1, 2), keepdims=True)
    q = rng.normal(0, 1, (n_particles, k)) * AMP_SCALE
    y, x = np.mgrid[:n, :n] - n // 2
    clean = np.zeros((n_particles, n, n))
    for j in range(3):
        pos = base[j] + np.einsum("ik,pk->pi", mix[j], q / AMP_SCALE)
        clean += np.exp(-((x - pos[:, :1, None]) ** 2 + (y - pos[:, 1:, None]) ** 2) / (2 * 2.0 ** 2))
    images = np.repeat(clean, copies, 0) + rng.normal(0, noise, (n_particles * copies, n, n))
    return images.astype(np.float32), np.repeat(q, copies, 0), np.repeat(np.arange(n_particles), copies)


# ---------------------------------------------------------------- preprocessing

def test_fourier_crop_keeps_band_limited_content():
    n, w = 32, 16
    x = np.arange(n) - n // 2
    img = 3.0 + np.cos(2 * np.pi * 3 * x / n)[None, :] * np.sin(2 * np.pi * 2 * x / n)[:, None]
    out = fourier_crop(torch.tensor(img[None]), w, preserve="mean", correct_pixel_blur=False)[0].numpy()
    xs = np.arange(w) - w // 2  # working pixel j sits at original coordinate 2 j
    expected = 3.0 + np.cos(2 * np.pi * 3 * xs / w)[None, :] * np.sin(2 * np.pi * 2 * xs / w)[:, None]
    assert out.shape == (w, w)
    np.testing.assert_allclose(out, expected, atol=1e-10)
    with pytest.raises(ValueError):
        fourier_crop(torch.zeros(1, 16, 16), 32, preserve="mean", correct_pixel_blur=False)


def test_normalizations():
    rng = np.random.default_rng(0)
    img = torch.tensor(rng.normal(5.0, 3.0, (4, 32, 32)))
    z = ds.normalize_images(img, "zscore")
    np.testing.assert_allclose(z.mean(dim=(1, 2)).numpy(), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(dim=(1, 2), unbiased=False).numpy(), 1, atol=1e-12)
    # background: pixels outside 0.45 * 32 = 14.4 px from the centre get mean 0, std 1
    img[:, 12:20, 12:20] += 100.0
    b = ds.normalize_images(img, "background")
    y, x = np.mgrid[:32, :32] - 16
    outside = torch.tensor(x ** 2 + y ** 2 > 14.4 ** 2)
    np.testing.assert_allclose(b[:, outside].mean(1).numpy(), 0, atol=1e-12)
    np.testing.assert_allclose(b[:, outside].std(1, unbiased=False).numpy(), 1, atol=1e-12)
    assert float(b[:, 16, 16].min()) > 20  # the particle stands out of the background
    with pytest.raises(ValueError):
        ds.normalize_images(img, "divide-by-255")


def test_phase_flip_in_preprocessing_matches_numpy():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(3, 32, 32))
    params = CTFParams(defocus_u=[8000.0, 12000.0, 15000.0], defocus_v=[7000.0, 12000.0, 14000.0],
                       defocus_angle=[10.0, 0.0, 70.0])
    ctf = ctf_image(params, 32, 2.0, dtype=torch.float64).numpy()
    assert (ctf < 0).any() and (ctf > 0).any()
    flipped = np.fft.irfft2(np.fft.rfft2(img) * np.where(ctf < 0, -1.0, 1.0), s=(32, 32))
    expected = ds.normalize_images(torch.tensor(flipped), "zscore")[:, None].numpy()
    src = ds.ArrayImageSource(img)
    # CTF parameters (evaluated at the pixel size) and precomputed CTF images give the same batch
    for given in (params, ctf):
        (idx, x), = ds.iterate_batches(src, np.arange(3), 8, ds.Preprocessing(pixel_size=2.0), given)
        np.testing.assert_allclose(x.numpy(), expected, atol=1e-5)
    (idx, x), = ds.iterate_batches(src, np.array([2, 0]), 8, ds.Preprocessing(pixel_size=2.0), params)
    np.testing.assert_allclose(x.numpy(), expected[[2, 0]], atol=1e-5)
    with pytest.raises(ValueError, match="pixel size"):
        list(ds.iterate_batches(src, np.arange(3), 8, ds.Preprocessing(pixel_size=0.0), params))


def test_window_keeps_the_centre_of_the_box():
    img = torch.zeros(2, 32, 32)
    img[0, 16, 16] = 1.0      # the box centre
    img[1, 16 + 3, 16 - 5] = 1.0  # 3 px below, 5 px left of it
    for size in (20, 21):
        out = ds.window_images(img, size)
        c = size // 2
        assert out.shape == (2, size, size)
        assert out[0, c, c] == 1.0 and out[1, c + 3, c - 5] == 1.0 and out.sum() == 2.0
    assert ds.window_images(img, 32) is img
    with pytest.raises(ValueError, match="does not fit"):
        ds.window_images(img, 33)


def test_mrcs_source_reads_lazily(tmp_path):
    import mrcfile
    rng = np.random.default_rng(2)
    stack = rng.normal(size=(5, 16, 16)).astype(np.float32)
    single = rng.normal(size=(16, 16)).astype(np.float32)
    with mrcfile.new(tmp_path / "a.mrcs") as m:
        m.set_data(stack)
    with mrcfile.new(tmp_path / "b.mrc") as m:
        m.set_data(single)
    src = ds.as_image_source([(str(tmp_path / "a.mrcs"), 3), (tmp_path / "b.mrc", 0),
                              (str(tmp_path / "a.mrcs"), 0)])
    assert len(src) == 3 and src.image_size == 16
    np.testing.assert_array_equal(src.read([0, 1, 2]), np.stack([stack[3], single, stack[0]]))
    inverted = ds.MrcsImageSource([(str(tmp_path / "a.mrcs"), 3)], invert=True)
    np.testing.assert_array_equal(inverted.read([0]), -stack[3:4])
    bad = ds.as_image_source([(str(tmp_path / "a.mrcs"), 7)])
    with pytest.raises(ValueError, match="out of range"):
        bad.read([0])
    src.close()


# ---------------------------------------------------------- augmentation geometry

def _blob_image(p_xy, n=64, sigma=1.5):
    y, x = np.mgrid[:n, :n] - n // 2
    return np.exp(-((x - p_xy[0]) ** 2 + (y - p_xy[1]) ** 2) / (2 * sigma ** 2))


def _centroid(img):
    n = img.shape[-1]
    y, x = np.mgrid[:n, :n] - n // 2
    return np.array([(img * x).sum(), (img * y).sum()]) / img.sum()


def test_inplane_rotation_moves_image_and_pose_consistently():
    """Rotated image of a projected point == projection of the point with the rotated pose."""
    angles = np.array([[30.0, 70.0, -20.0], [-100.0, 120.0, 45.0]])
    shifts = np.array([[3.0, -2.0], [-4.0, 1.5]])
    inplane = np.array([35.0, -110.0])
    r = np.array([9.0, -5.0, 7.0])  # a model point, Å, pixel size 1
    p = np.einsum("bij,j->bi", euler_to_matrix(angles), r)[:, :2] - shifts
    images = torch.tensor(np.stack([_blob_image(pp) for pp in p])[:, None])
    rotated = ds.rotate_images(images, torch.tensor(inplane)).numpy()[:, 0]
    new_angles, new_shifts = ds.rotate_pose(angles, shifts, inplane)
    p_new = np.einsum("bij,j->bi", euler_to_matrix(new_angles), r)[:, :2] - new_shifts
    for b in range(2):
        np.testing.assert_allclose(_centroid(rotated[b]), p_new[b], atol=0.05)
    # independent statement of the convention: psi decreases by the in-plane angle, rot/tilt stay
    np.testing.assert_allclose(new_angles[:, :2], angles[:, :2], atol=1e-9)
    np.testing.assert_allclose(((new_angles[:, 2] - angles[:, 2] + inplane + 180) % 360) - 180, 0, atol=1e-9)


def test_rotation_6d_round_trip():
    mats = random_rotations(20, np.random.default_rng(3))
    d6 = matrix_to_rotation_6d(torch.tensor(mats))
    np.testing.assert_allclose(rotation_6d_to_matrix(d6).numpy(), mats, atol=1e-12)
    noisy = rotation_6d_to_matrix(d6 + 0.3 * torch.randn(20, 6, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(noisy @ np.swapaxes(noisy, 1, 2), np.broadcast_to(np.eye(3), (20, 3, 3)),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(noisy), 1, atol=1e-12)


def test_model_shapes_and_input_checks():
    assert build_model(3)(torch.zeros(2, 1, 32, 32)).shape == (2, 3)
    net = build_model(2, predict_pose=True)
    assert net(torch.zeros(2, 32, 32)).shape == (2, 10)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in net.head)
    assert n_linear == 4 and net.backbone.conv1.in_channels == 1
    with pytest.raises(ValueError):
        net(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError):
        build_model(0)


def test_split_by_particle_is_disjoint_and_seeded():
    ids = np.repeat(np.arange(50), 3)
    a_tr, a_va = tr.split_by_particle(ids, 0.2, seed=5)
    b_tr, b_va = tr.split_by_particle(ids, 0.2, seed=5)
    np.testing.assert_array_equal(a_va, b_va)
    assert set(ids[a_tr]).isdisjoint(ids[a_va])
    assert sorted(np.concatenate([a_tr, a_va])) == list(range(150))
    assert len(set(ids[a_va])) == 10
    with pytest.raises(ValueError):
        tr.split_by_particle(np.zeros(5), 0.2)


# --------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-mode model trained 4 epochs on 320 images (160 particles x 2 noisy copies)."""
    images, q, pid = synthetic(160, 2, 2)
    out = tmp_path_factory.mktemp("model2")
    cfg = tr.TrainConfig.build(modes=[7, 8], working_size=16, pixel_size=2.0, epochs=4, batch_size=16,
                               val_fraction=0.2, learning_rate=3e-4)
    seen = []
    inputs = {}
    real_iterate = ds.iterate_batches

    def recording(source, indices, *args, **kwargs):  # records the network inputs of train and predict
        for idx, x in real_iterate(source, indices, *args, **kwargs):
            for i, xi in zip(idx, x):
                inputs.setdefault(int(i), []).append(xi.clone())
            yield idx, x
    ds.iterate_batches = recording
    try:
        rows = tr.train(images, q, pid, out, cfg, seed=0, progress=lambda done, total, line: seen.append(done))
        train_inputs = {i: v[-1] for i, v in inputs.items()}
        inputs.clear()
        pred = tr.predict(out, images[:8], batch_size=3)
        pred_inputs = {i: v[-1] for i, v in inputs.items()}
    finally:
        ds.iterate_batches = real_iterate
    return dict(images=images, q=q, pid=pid, out=out, rows=rows, seen=seen, cfg=cfg,
                train_inputs=train_inputs, pred_inputs=pred_inputs, pred=pred)


def test_training_learns_amplitudes(trained):
    q, pid = trained["q"], trained["pid"]
    train_idx, val_idx = tr.split_by_particle(pid, 0.2, seed=0)
    assert set(pid[train_idx]).isdisjoint(pid[val_idx])
    baseline = np.abs(q[val_idx] - q[train_idx].mean(0)).mean()
    pred = tr.predict(trained["out"], trained["images"][val_idx], batch_size=32)
    mae = np.abs(pred - q[val_idx]).mean()
    best_row = min(trained["rows"], key=lambda r: r["val_loss"])
    np.testing.assert_allclose(mae, best_row["val_mae"], rtol=1e-4)
    assert mae <= 0.6 * baseline, f"val MAE {mae:.2f} A vs mean-predictor {baseline:.2f} A"


def test_model_directory_contents(trained):
    out, rows = trained["out"], trained["rows"]
    cfg = json.loads((out / "config.json").read_text())
    q, pid = trained["q"], trained["pid"]
    train_idx, _ = tr.split_by_particle(pid, 0.2, seed=0)
    np.testing.assert_allclose(cfg["fitted"]["target_mean"], q[train_idx].mean(0))
    np.testing.assert_allclose(cfg["fitted"]["target_std"], q[train_idx].std(0))
    assert cfg["model"]["modes"] == [7, 8] and cfg["fitted"]["n_outputs"] == 2 and cfg["fitted"]["image_size"] == 32
    assert cfg["preprocessing"]["working_size"] == 16 and cfg["preprocessing"]["normalization"] == "zscore" \
        and cfg["fitted"]["version"] == __version__
    with open(out / "metrics.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in table] == [1, 2, 3, 4] == trained["seen"]
    assert list(table[0]) == tr.METRICS_COLUMNS
    np.testing.assert_allclose([float(r["val_mae"]) for r in table], [r["val_mae"] for r in rows], rtol=1e-6)
    assert all(float(r["images_per_s"]) > 0 for r in table)


def test_reload_predicts_identically(trained):
    loaded = tr.load_model(trained["out"], "cpu")
    images = trained["images"][:8]
    np.testing.assert_allclose(tr.predict(loaded, images, batch_size=5), trained["pred"], rtol=1e-5, atol=1e-5)
    # the same network on the same preprocessed input, by hand
    x = ds.prepare_images(images, 16, "zscore")
    with torch.no_grad():
        out = loaded.model(x).numpy()
    manual = out * np.array(loaded.config.fitted.target_std) + np.array(loaded.config.fitted.target_mean)
    np.testing.assert_allclose(trained["pred"], manual, rtol=1e-5, atol=1e-4)


def test_rotation_averaging_is_the_mean_over_rotated_copies(trained):
    loaded = tr.load_model(trained["out"], "cpu")
    images = trained["images"][:6]
    x = ds.prepare_images(images, 16, "zscore")
    with torch.no_grad():  # by hand: the network on the normalised images rotated by 0, 120, 240 degrees
        outs = [loaded.model(ds.rotate_images(x, torch.full((6,), a))).numpy() for a in (0.0, 120.0, 240.0)]
    manual = np.mean(outs, axis=0) * np.array(loaded.config.fitted.target_std) + np.array(loaded.config.fitted.target_mean)
    averaged = tr.predict(loaded, images, batch_size=4, rotations=3)
    np.testing.assert_allclose(averaged, manual, rtol=1e-4, atol=1e-3)
    assert np.abs(averaged - trained["pred"][:6]).max() > 1e-3  # the rotated copies do count
    np.testing.assert_allclose(tr.predict(loaded, images, rotations=1), trained["pred"][:6], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rotations"):
        tr.predict(loaded, images, rotations=0)


def test_same_preprocessing_in_training_and_prediction(trained):
    train_inputs, pred_inputs = trained["train_inputs"], trained["pred_inputs"]
    common = set(train_inputs) & set(pred_inputs)
    assert len(common) == 8  # validation saw the same images as prediction (index in the set)
    for i in common:  # no augmentation here: the network saw exactly the same tensor
        assert torch.equal(train_inputs[i], pred_inputs[i])
    # the normalisation makes predictions blind to intensity scale/offset (the 1/255 bug)
    images = trained["images"][:8]
    np.testing.assert_allclose(tr.predict(trained["out"], images * 255.0 + 7.0), trained["pred"],
                               rtol=1e-4, atol=1e-3)


def test_window_then_fourier_crop_is_saved_and_applied_at_prediction(tmp_path):
    """A 40 Å window (20 px of 2 Å) of the 32 px images, Fourier-cropped to 16 px: saved in
    config.json, and prediction sees exactly that (pixels outside the window do not count)."""
    images, q, pid = synthetic(8, 1, 2, seed=4)
    cfg = tr.TrainConfig.build(**dict(SMALL, working_size=16), pixel_size=2.0, window=40.0, epochs=1)
    tr.train(images, q, pid, tmp_path, cfg)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["preprocessing"]["window"] == 40.0 and saved["preprocessing"]["working_size"] == 16
    loaded = tr.load_model(tmp_path)
    assert loaded.config.preprocessing.window_px == 20 and loaded.config.preprocessing.input_size(32) == 16
    pred = tr.predict(loaded, images)
    x = ds.normalize_images(fourier_crop(ds.window_images(torch.tensor(images), 20), 16, preserve="mean",
                                         correct_pixel_blur=False))[:, None]
    with torch.no_grad():  # by hand: window, then Fourier crop, then normalisation
        manual = loaded.model(x)
    np.testing.assert_allclose(pred, manual.numpy() * loaded.config.fitted.target_std + loaded.config.fitted.target_mean,
                               rtol=1e-4, atol=1e-3)
    changed = images.copy()
    changed[:, :5, :] = 50.0  # rows 0-4 lie outside the window (rows 6-25)
    np.testing.assert_allclose(tr.predict(loaded, changed), pred, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at most 64 Å"):
        tr.train(images, q, pid, tmp_path / "big", cfg.replace(window=70.0))
    with pytest.raises(ValueError, match="exceeds the window"):
        tr.train(images, q, pid, tmp_path / "small", cfg.replace(window=20.0))


def test_four_modes_resume_and_reproducibility(tmp_path):
    """A run interrupted after epoch 1 and resumed ends exactly like an uninterrupted run."""
    images, q, pid = synthetic(12, 3, 4, seed=7)
    cfg = tr.TrainConfig.build(modes=[7, 8, 9, 10], working_size=16, epochs=2, batch_size=12, val_fraction=0.25,
                               architecture="resnet18", loss="mse")
    assert cfg.optimiser.lr_schedule == "onecycle"  # the default, stepped per batch: resume must restore it exactly
    full = tr.train(images, q, pid, tmp_path / "full", cfg, seed=3)

    def crash(done, total, message):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        tr.train(images, q, pid, tmp_path / "part", cfg, seed=3, progress=crash)
    assert torch.load(tmp_path / "part" / "last.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(ValueError, match="one-cycle"):  # its schedule is fixed by the number of epochs
        tr.train(images, q, pid, tmp_path / "part", cfg.replace(epochs=3), seed=3, resume=True)
    resumed = tr.train(images, q, pid, tmp_path / "part", cfg, seed=3, resume=True)
    assert [r["epoch"] for r in resumed] == [1, 2]
    np.testing.assert_allclose([r["val_loss"] for r in resumed], [r["val_loss"] for r in full], rtol=1e-5)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6)
    pred = tr.predict(tmp_path / "part", images[:5])
    assert pred.shape == (5, 4) and np.all(np.isfinite(pred))
    with pytest.raises(ValueError, match="pose"):
        tr.predict(tmp_path / "part", images[:5], return_pose=True)
    with pytest.raises(ValueError, match="modes"):
        tr.train(images, q[:, :3], pid, tmp_path / "bad", cfg)


def test_pose_prediction_with_rotation_augmentation(tmp_path):
    images, q, pid = synthetic(16, 2, 2, seed=9)
    rng = np.random.default_rng(9)
    mats = random_rotations(16, rng)
    from continuousflex_dl.core.imaging.geometry import matrix_to_euler
    angles = np.repeat(matrix_to_euler(mats), 2, 0)
    shifts = np.repeat(rng.normal(0, 2, (16, 2)), 2, 0)
    cfg = tr.TrainConfig.build(modes=[7, 8], working_size=16, pixel_size=2.0, epochs=1, batch_size=16,
                               val_fraction=0.25, architecture="resnet18", predict_pose=True, augment_rotation=True)
    ctf = CTFParams(defocus_u=rng.uniform(5000, 15000, 32), defocus_v=rng.uniform(5000, 15000, 32))
    with pytest.raises(ValueError, match="poses"):
        tr.train(images, q, pid, tmp_path / "m", cfg)
    rows = tr.train(images, q, pid, tmp_path / "m", cfg, poses=(angles, shifts), ctf=ctf)
    assert 0 <= rows[0]["val_angle_deg"] <= 180 and rows[0]["val_shift_px"] >= 0
    saved = tr.TrainConfig.load(tmp_path / "m" / "config.json")
    assert saved.fitted.n_outputs == 10
    np.testing.assert_allclose(saved.fitted.shift_scale, np.sqrt(np.mean(shifts[tr.split_by_particle(pid, 0.25)[0]] ** 2)))
    assert saved.preprocessing.phase_flip
    with pytest.raises(ValueError, match="CTF"):
        tr.predict(tmp_path / "m", images[:4])
    amps, ang, sh = tr.predict(tmp_path / "m", images[:4], return_pose=True, ctf=ctf.select(slice(0, 4)))
    assert amps.shape == (4, 2) and ang.shape == (4, 3) and sh.shape == (4, 2)
    assert np.all((ang[:, 1] >= 0) & (ang[:, 1] <= 180))
    with pytest.raises(ValueError, match="px"):
        tr.predict(tmp_path / "m", images[:4, :16, :16], ctf=ctf.select(slice(0, 4)))


def test_early_stopping_plateau_schedule_and_best_checkpoint(tmp_path, monkeypatch):
    """Validation loss rising every epoch: LR halves after 2 bad epochs, stop after 3, best = epoch 1."""
    images, q, pid = synthetic(8, 1, 2, seed=4)
    calls = []

    def rising_validation(*args, **kwargs):
        calls.append(1)
        return {"val_loss": float(len(calls)), "val_mae": float(len(calls))}
    monkeypatch.setattr(tr.trainer, "validate", rising_validation)
    cfg = tr.TrainConfig.build(modes=[7, 8], working_size=16, epochs=10, batch_size=8, val_fraction=0.25,
                               architecture="resnet18", learning_rate=1e-3, patience=3, lr_patience=1,
                               lr_schedule="plateau")
    rows = tr.train(images, q, pid, tmp_path, cfg)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["lr"] for r in rows], [1e-3, 1e-3, 1e-3, 5e-4])
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 1
    # one-cycle runs all its epochs (one step each here); the rate peaks at 30 % of the steps
    rows = tr.train(images, q, pid, tmp_path / "onecycle", cfg.replace(lr_schedule="onecycle", epochs=10))
    assert [r["epoch"] for r in rows] == list(range(1, 11))
    lrs = [r["lr"] for r in rows]  # the rate after each epoch's step
    assert int(np.argmax(lrs)) == 1 and max(lrs) == pytest.approx(1e-3, rel=0.05) and lrs[-1] < 0.1 * max(lrs)


def test_data_parallel_ranks_share_the_training_split(tmp_path, monkeypatch):
    images, q, pid = synthetic(10, 2, 2, seed=5)
    seen = {}
    real_iterate = ds.iterate_batches

    def recording(source, indices, *args, **kwargs):
        seen.setdefault(rank, []).append(np.array(indices))
        return real_iterate(source, indices, *args, **kwargs)
    monkeypatch.setattr(ds, "iterate_batches", recording)
    cfg = tr.TrainConfig.build(modes=[7, 8], working_size=16, epochs=1, batch_size=8, val_fraction=0.2,
                               architecture="resnet18")
    for rank in (0, 1):
        tr.train(images, q, pid, tmp_path / f"rank{rank}", cfg, seed=1, world_size=2, rank=rank)
    train_idx, val_idx = tr.split_by_particle(pid, 0.2, seed=1)
    (train0, val0), (train1, val1) = seen[0], seen[1]
    assert len(train0) == len(train1) == len(train_idx) // 2
    assert set(train0).isdisjoint(train1) and set(train0) | set(train1) == set(train_idx)
    np.testing.assert_array_equal(val0, val_idx)
    np.testing.assert_array_equal(val1, val_idx)  # every rank validates on the whole validation split
    assert (tmp_path / "rank0" / "best.pt").exists() and not (tmp_path / "rank1").exists()


# ------------------------------------------------ reliability: checkpoints, resume, bad pixels

SMALL = dict(modes=[7, 8], working_size=16, batch_size=8, val_fraction=0.25, architecture="resnet18")


def _stop_after(epoch):
    """A progress callback that interrupts training after ``epoch`` (as a kill would)."""
    def progress(done, total, message):
        if done == epoch:
            raise KeyboardInterrupt
    return progress


class _RunsCode:
    """Unpickling this object creates ``path`` (stands for any code a crafted checkpoint would run)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_kill_during_a_checkpoint_save_leaves_the_previous_one(tmp_path, monkeypatch):
    images, q, pid = synthetic(8, 1, 2, seed=4)
    cfg = tr.TrainConfig.build(**SMALL, epochs=2)
    real_save = torch.save

    def killed_while_saving(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj and obj.get("epoch") == 2:
            fh = f if hasattr(f, "write") else open(f, "wb")
            fh.write(b"PK\x03\x04 half a checkpoint")
            fh.flush()
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", killed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        tr.train(images, q, pid, tmp_path, cfg)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1  # complete, one epoch old
    rows = tr.train(images, q, pid, tmp_path, cfg, resume=True)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2


def test_damaged_last_checkpoint_falls_back_to_the_previous_epoch(tmp_path, caplog):
    images, q, pid = synthetic(8, 1, 2, seed=4)
    cfg = tr.TrainConfig.build(**SMALL, epochs=3)
    full = tr.train(images, q, pid, tmp_path / "full", cfg)
    with pytest.raises(KeyboardInterrupt):
        tr.train(images, q, pid, tmp_path / "part", cfg, progress=_stop_after(2))
    assert torch.load(tmp_path / "part" / "last.previous.pt", weights_only=True)["epoch"] == 1
    (tmp_path / "part" / "last.pt").write_bytes(b"")  # killed mid-write by a non-atomic copy, disk full...
    with caplog.at_level("WARNING", logger="continuousflex_dl"):
        resumed = tr.train(images, q, pid, tmp_path / "part", cfg, resume=True)
    assert "last.pt is empty" in caplog.text and "epoch 1" in caplog.text
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    # epochs 2 and 3 recomputed from the epoch-1 checkpoint: the same run as the uninterrupted one
    np.testing.assert_allclose([r["val_loss"] for r in resumed], [r["val_loss"] for r in full], rtol=1e-5)


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_damaged_last_checkpoint_without_fallback_says_what_to_do(tmp_path, keep):
    images, q, pid = synthetic(8, 1, 2, seed=4)
    cfg = tr.TrainConfig.build(**SMALL, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        tr.train(images, q, pid, tmp_path, cfg, progress=_stop_after(1))
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:int(keep * last.stat().st_size)])  # 0 bytes, or truncated
    with pytest.raises(ValueError) as err:
        tr.train(images, q, pid, tmp_path, cfg, resume=True)
    message = str(err.value)
    assert str(last) in message and "Restart" in message and "Delete" in message
    assert ("empty" if keep == 0 else "truncated") in message
    assert "Ran out of input" not in message


def test_crafted_checkpoints_are_refused_unread(tmp_path):
    images, q, pid = synthetic(8, 1, 2, seed=4)
    cfg = tr.TrainConfig.build(**SMALL, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        tr.train(images, q, pid, tmp_path / "m", cfg, progress=_stop_after(1))
    marker = tmp_path / "code_ran"
    torch.save({"model": _RunsCode(marker), "epoch": 1}, tmp_path / "m" / "last.pt")
    with pytest.raises(ValueError, match="not loaded"):
        tr.train(images, q, pid, tmp_path / "m", cfg, resume=True)
    assert not marker.exists()
    torch.save({"model": _RunsCode(marker)}, tmp_path / "m" / "best.pt")
    with pytest.raises(ValueError, match="best.pt"):
        tr.load_model(tmp_path / "m")
    assert not marker.exists()
    (tmp_path / "m" / "best.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="best.pt is empty.*Train it again"):
        tr.load_model(tmp_path / "m")


def test_resume_refuses_changed_settings_and_data(tmp_path):
    images, q, pid = synthetic(8, 1, 2, seed=4)
    cfg = tr.TrainConfig.build(**SMALL, epochs=2, lr_schedule="plateau")
    with pytest.raises(KeyboardInterrupt):
        tr.train(images, q, pid, tmp_path, cfg, progress=_stop_after(1))
    for changed, what in [(dict(learning_rate=1e-4), "learning_rate: 0.002 -> 0.0001"),
                          (dict(batch_size=4), "batch_size: 8 -> 4"),
                          (dict(modes=[7, 9]), "modes: [7, 8] -> [7, 9]")]:
        with pytest.raises(ValueError, match="Restart") as err:
            tr.train(images, q, pid, tmp_path, cfg.replace(**changed), resume=True)
        assert what in str(err.value)
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        tr.train(images, q, pid, tmp_path, cfg, seed=1, resume=True)
    with pytest.raises(ValueError, match="particles .* differ"):
        tr.train(images, q + 1.0, pid, tmp_path, cfg, resume=True)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1  # nothing was overwritten
    # more epochs (not a one-cycle schedule) continue the same run
    rows = tr.train(images, q, pid, tmp_path, cfg.replace(epochs=3), resume=True)
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_diverged_training_stops_with_advice(tmp_path, monkeypatch):
    images, q, pid = synthetic(8, 1, 2, seed=4)
    monkeypatch.setattr(tr.trainer, "validate", lambda *a, **k: {"val_loss": float("nan"), "val_mae": float("nan")})
    with pytest.raises(ValueError, match="diverged at epoch 1.*Lower the learning rate"):
        tr.train(images, q, pid, tmp_path, tr.TrainConfig.build(**SMALL, epochs=1))
    assert not (tmp_path / "best.pt").exists()


def test_check_images_finds_nan_infinite_and_constant_images():
    rng = np.random.default_rng(0)
    images = rng.normal(0, 1, (30, 8, 8)).astype(np.float32)
    images[3] = rng.normal(0, 1e-12, (8, 8))  # tiny values but real variation: fine
    images[4] = 1e4 + rng.normal(0, 0.5, (8, 8))  # large offset, some noise: fine
    images[5, 1, 2] = np.nan
    images[7, 0, 0] = -np.inf
    images[9] = 0.0
    images[11] = 7.25
    nonfinite, flat = ds.find_bad_images(images, batch_size=4)
    assert nonfinite.tolist() == [5, 7] and flat.tolist() == [9, 11]
    with pytest.raises(ValueError) as err:
        ds.check_images(images, ids=np.arange(30) + 100, before="training")
    message = str(err.value)
    assert "ids [105, 107] contain NaN or infinite pixels (2 of 30 images)" in message
    assert "ids [109, 111] are constant" in message and "before training" in message
    with pytest.raises(ValueError, match=r"0-based indices \[5, 7\]"):
        ds.check_images(images)
    many = np.zeros((14, 4, 4), np.float32)
    with pytest.raises(ValueError, match=r"\[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\] and 4 more are constant"):
        ds.check_images(many, ids=np.arange(14))
    ds.check_images(np.delete(images, [5, 7, 9, 11], axis=0))  # nothing to refuse


@pytest.mark.parametrize("bad", ["nan", "inf", "zero", "flat"])
def test_training_refuses_bad_images_with_their_ids(tmp_path, bad):
    images, q, pid = synthetic(8, 2, 2, seed=4)  # image i belongs to particle i // 2
    value = {"nan": np.nan, "inf": np.inf, "zero": 0.0, "flat": 3.5}[bad]
    if bad in ("nan", "inf"):
        images[5, 3, 3] = value
    else:
        images[5] = value
    with pytest.raises(ValueError, match=r"ids \[2\] (contain NaN|are constant)"):
        tr.train(images, q, pid, tmp_path, tr.TrainConfig.build(**SMALL, epochs=1))
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize("bad", ["nan", "zero"])
def test_prediction_refuses_bad_images_instead_of_returning_nan(trained, bad):
    images = trained["images"][:6].copy()
    if bad == "nan":
        images[2, 0, 0] = np.nan
    else:
        images[2] = 0.0
    with pytest.raises(ValueError, match=r"ids \[12\] (contain NaN|are constant)"):
        tr.predict(trained["out"], images, ids=np.arange(10, 16))
    with pytest.raises(ValueError, match=r"indices \[2\]"):
        tr.predict(trained["out"], images)


# ------------------------------------------------ layout: config sections, model folder, sources

def test_config_is_saved_in_sections_and_a_flat_0_3_config_still_loads(trained, tmp_path):
    saved = json.loads((trained["out"] / "config.json").read_text())
    assert list(saved) == ["model", "preprocessing", "optimiser", "data", "fitted"]
    assert saved["model"] == {"modes": [7, 8], "architecture": "resnet34", "hidden": [512, 256, 128],
                              "dropout": 0.0, "predict_pose": False}
    assert saved["preprocessing"]["pose_normalise"] is False
    assert saved["optimiser"]["epochs"] == 4 and saved["data"]["source"] == "particles"
    # The same model rebuilt from the folder's files alone predicts what training's model predicted.
    np.testing.assert_allclose(tr.predict(tr.load_model(trained["out"]), trained["images"][:8]), trained["pred"],
                               rtol=1e-5, atol=1e-5)
    # A model folder written by 0.2/0.3: one flat object, the data source under "data".
    flat = {k: v for section in saved.values() for k, v in section.items() if k != "source"}
    flat.update(data="particles", some_future_field=1)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(flat))
    (old / "best.pt").write_bytes((trained["out"] / "best.pt").read_bytes())
    assert tr.TrainConfig.load(old / "config.json") == tr.TrainConfig.load(trained["out"] / "config.json")
    np.testing.assert_allclose(tr.predict(old, trained["images"][:8]), trained["pred"], rtol=1e-5, atol=1e-5)
    (old / "config.json").write_text('{"weights": 1}')
    with pytest.raises(ValueError, match="not a DeepHEMNMA training config"):
        tr.load_model(old)


def test_setting_names_are_unique_over_the_sections():
    names = [f.name for section in tr.config.SECTIONS.values() for f in dataclasses.fields(section)]
    assert len(names) == len(set(names)) == 5 + 6 + 13 + 9 + 7
    cfg = tr.TrainConfig.build(modes=[7], window=30.0, epochs=2, source="simulated", sim_images=5)
    assert (cfg.preprocessing.window, cfg.optimiser.epochs, cfg.data.source, cfg.data.sim_images) == \
        (30.0, 2, "simulated", 5)
    assert cfg.replace(epochs=3).optimiser.epochs == 3 and cfg.optimiser.epochs == 2
    assert tr.changed_settings(cfg, cfg.replace(window=40.0, patience=3)) == ["window: 30.0 -> 40.0"]
    with pytest.raises(ValueError, match="Unknown training settings"):
        tr.TrainConfig.build(modes=[7], windw=30.0)


def test_window_and_working_size_are_checked_once_in_core():
    """The one rule (training and the protocol's form): the window in px, rounded, within the box,
    and the working size within the window."""
    box = 32
    ds.Preprocessing(pixel_size=2.0, window=65.0).check(box)  # 32.5 px rounds to 32: fits
    with pytest.raises(ValueError, match="at most 64 Å"):
        ds.Preprocessing(pixel_size=2.0, window=67.0).check(box)  # 33.5 px -> 34
    with pytest.raises(ValueError, match="exceeds the window .20 px.: make it at most 20"):
        ds.Preprocessing(pixel_size=2.0, window=40.0, working_size=24).check(box)
    with pytest.raises(ValueError, match="exceeds the images .32 px."):
        ds.Preprocessing(working_size=48).check(box)
    with pytest.raises(ValueError, match="normalisation"):
        ds.Preprocessing(normalization="divide-by-255").check(box)


def test_sources_are_looked_up_in_the_registry():
    assert tr.DATA_CHOICES == ("particles", "simulated", "simulated+finetune")
    for name, source in tr.SOURCES.items():
        assert source.name == name and source.label
    cfg = tr.TrainConfig.build(modes=[7], epochs=3, source="simulated+finetune", finetune_epochs=2)
    phases = tr.source_of(cfg).phases(cfg)
    assert [(p.stream, p.epochs, p.lr) for p in phases] == [("simulated", 3, 2e-3), ("particles", 2, 2e-4)]
    with pytest.raises(ValueError, match="Unknown training data 'movies'; choose one of particles, simulated"):
        tr.source_of(cfg.replace(source="movies"))


def test_particles_at_another_pixel_size_are_cropped_to_the_model_box_and_shifts_converted(tmp_path):
    """predict_particles (both prediction paths): 64 px particles of 1 Å/px for a model of 32 px
    of 2 Å/px are Fourier-cropped to 32 px, and the shifts come back in the particles' pixels."""
    images, q, pid = synthetic(8, 2, 2, seed=11)
    rng = np.random.default_rng(11)
    angles, shifts = rng.uniform(0, 90, (16, 3)), rng.normal(0, 2, (16, 2))
    cfg = tr.TrainConfig.build(**SMALL, pixel_size=2.0, epochs=1, predict_pose=True)
    tr.train(images, q, pid, tmp_path, cfg, poses=(angles, shifts))
    model = tr.load_model(tmp_path)
    fine = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)  # the same 64 Å box at 1 Å/px
    cropped = fourier_crop(torch.tensor(fine), 32, preserve="mean", correct_pixel_blur=False).numpy()
    expected = tr.predict(model, cropped, return_pose=True)
    got = tr.predict_particles(model, fine, 1.0, return_pose=True)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got[2], expected[2] * 2.0, rtol=1e-4, atol=1e-3)  # model px (2 Å) -> 1 Å px
    assert tr.images_for_model(images, model).image_size == 32
