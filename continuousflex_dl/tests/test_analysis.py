"""Error reports, outlier removal, paths and clusters in amplitude space."""
import csv

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis

from continuousflex_dl.core.landscape import analysis as an
from continuousflex_dl.core.landscape import trajectory as tr
from continuousflex_dl.core.imaging.geometry import euler_to_matrix, matrix_to_euler


def _orthonormal_modes(k, n, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3 * n, k)))
    return q.T.reshape(k, n, 3)


# ----------------------------------------------------------------------------- error reports


def test_amplitude_errors_match_hand_computed_values():
    truth = np.zeros((4, 2))
    pred = np.array([[1.0, -2.0], [-3.0, 2.0], [1.0, 6.0], [3.0, -2.0]])
    r = an.amplitude_errors(pred, truth, mode_numbers=[7, 9])
    # |errors| mode 7: 1, 3, 1, 3 -> mean 2, std 1; mode 9: 2, 2, 6, 2 -> mean 3, std sqrt(3)
    np.testing.assert_allclose(r.per_mode_mean, [2.0, 3.0])
    np.testing.assert_allclose(r.per_mode_std, [1.0, np.sqrt(3.0)])
    np.testing.assert_allclose(r.per_mode_median, [2.0, 2.0])
    assert r.mean_abs_error == pytest.approx(2.5)
    assert r.rmsd_mean is None
    assert list(r.mode_numbers) == [7, 9]


def test_rmsd_of_amplitude_errors_equals_displace_then_rms():
    rng = np.random.default_rng(1)
    n = 50
    coords = rng.normal(scale=10, size=(n, 3))
    modes = rng.normal(size=(3, n, 3))  # not orthonormal: no shortcut applies
    errors = np.array([2.0, -1.0, 0.5])
    moved = coords + sum(e * m for e, m in zip(errors, modes))
    expected = np.sqrt(np.mean(np.sum((moved - coords) ** 2, axis=1)))
    assert an.rmsd_of_amplitude_errors(modes, errors) == pytest.approx(expected, rel=1e-12)
    # orthonormal modes: |e| / sqrt(N)
    ortho = _orthonormal_modes(3, n)
    assert an.rmsd_of_amplitude_errors(ortho, errors) == pytest.approx(
        np.linalg.norm(errors) / np.sqrt(n), rel=1e-12)
    batch = an.rmsd_of_amplitude_errors(ortho, np.stack([errors, 2 * errors]))
    np.testing.assert_allclose(batch, np.array([1, 2]) * np.linalg.norm(errors) / np.sqrt(n))
    # A report's per-particle RMSD (from the modes' Gram matrix) is the same displacement RMSD.
    pred = rng.normal(scale=5, size=(6, 3))
    report = an.amplitude_errors(pred, np.zeros((6, 3)), modes=modes)
    np.testing.assert_allclose(report.rmsd_per_particle, an.rmsd_of_amplitude_errors(modes, pred), rtol=1e-10)


def test_amplitude_report_rmsd_fields_and_csv(tmp_path):
    n = 40
    modes = _orthonormal_modes(2, n, seed=3)
    truth = np.zeros((4, 2))
    pred = np.array([[1.0, -2.0], [-3.0, 2.0], [1.0, 6.0], [3.0, -2.0]])
    r = an.amplitude_errors(pred, truth, mode_numbers=[7, 8], modes=modes)
    mean, std = np.array([2.0, 3.0]), np.array([1.0, np.sqrt(3)])
    assert r.rmsd_mean == pytest.approx(np.linalg.norm(mean) / np.sqrt(n))
    assert r.rmsd_mean_minus_std == pytest.approx(np.linalg.norm(mean - std) / np.sqrt(n))
    assert r.rmsd_mean_plus_std == pytest.approx(np.linalg.norm(mean + std) / np.sqrt(n))
    # Per particle: |pred - truth| / sqrt(N) for orthonormal modes.
    np.testing.assert_allclose(r.rmsd_per_particle, np.linalg.norm(pred, axis=1) / np.sqrt(n))
    # A spread wider than the mean: the lower value is clipped at 0 per mode, never above the mean.
    wide = an.amplitude_errors(np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 10.0]]), np.zeros((3, 2)),
                               modes=modes)
    lower = np.maximum(wide.per_mode_mean - wide.per_mode_std, 0.0)
    assert lower[1] == 0.0  # mode 8: mean 4, std 4.24
    assert wide.rmsd_mean_minus_std == pytest.approx(np.linalg.norm(lower) / np.sqrt(n))
    assert wide.rmsd_mean_minus_std <= wide.rmsd_mean <= wide.rmsd_mean_plus_std
    pose = an.pose_errors(np.zeros((4, 3)), np.zeros((4, 3)), np.zeros((4, 2)), np.ones((4, 2)))
    path = an.write_error_csv(tmp_path / "errors.csv", [r, pose])
    rows = list(csv.DictReader(open(path)))
    by = {(row["quantity"], row["mode"]): row for row in rows}
    assert float(by[("amplitude_abs_error", "8")]["mean"]) == pytest.approx(3.0)
    assert float(by[("amplitude_abs_error", "8")]["std"]) == pytest.approx(np.sqrt(3))
    assert float(by[("amplitude_abs_error", "all")]["mean"]) == pytest.approx(2.5)
    assert float(by[("rmsd_mean", "all")]["mean"]) == pytest.approx(r.rmsd_mean)
    assert float(by[("rmsd_per_particle", "all")]["std"]) == pytest.approx(r.rmsd_per_particle.std())
    assert float(by[("shift_error", "")]["median"]) == pytest.approx(np.sqrt(2))
    table = an.format_error_table(r, paper_row={7: (1.5, 0.5), "all": 1.9})
    lines = table.splitlines()
    assert len(lines) == 4
    assert "Mode 7 (Å)" in lines[0] and "2.00 ± 1.00" in lines[2] and "3.00 ± 1.73" in lines[2]
    assert "1.50 ± 0.50" in lines[3] and "1.90" in lines[3]
    assert "Angle mean" in an.format_error_table(pose)
    both = an.format_error_table({"HEMNMA vs GT": r, "DeepHEMNMA vs GT": r}).splitlines()
    assert len(both) == 4 and both[3].startswith("| DeepHEMNMA vs GT | 2.00 ± 1.00")
    assert "0.57 [" in both[2]  # RMSD of the mean errors: |(2, 3)| / sqrt(40) = 0.570 Å


def test_pose_errors_known_rotation_angle():
    rng = np.random.default_rng(2)
    m = 20
    base = np.column_stack([rng.uniform(-180, 180, m), rng.uniform(5, 175, m), rng.uniform(-180, 180, m)])
    angles = rng.uniform(1, 170, m)
    axes = rng.normal(size=(m, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    # Rodrigues rotation by a known angle about a known axis, composed with the base pose
    th = np.radians(angles)[:, None, None]
    kx = np.zeros((m, 3, 3))
    kx[:, 0, 1], kx[:, 0, 2], kx[:, 1, 2] = -axes[:, 2], axes[:, 1], -axes[:, 0]
    kx -= np.swapaxes(kx, 1, 2)
    rot = np.eye(3) + np.sin(th) * kx + (1 - np.cos(th)) * kx @ kx
    other = matrix_to_euler(rot @ euler_to_matrix(base))
    shifts_true = rng.normal(size=(m, 2))
    shifts_pred = shifts_true + np.column_stack([np.full(m, 3.0), np.full(m, 4.0)])
    r = an.pose_errors(other, base, shifts_pred, shifts_true)
    np.testing.assert_allclose(r.angular, angles, atol=1e-6)
    assert r.angular_mean == pytest.approx(angles.mean(), abs=1e-6)
    assert r.angular_median == pytest.approx(np.median(angles), abs=1e-6)
    assert r.shift_mean == pytest.approx(5.0) and r.shift_median == pytest.approx(5.0)
    with pytest.raises(ValueError):
        an.pose_errors(base, base, shifts_pred, None)


def test_match_by_id_pairs_rows():
    ids, a, b = an.match_by_id([5, 3, 9, 1], np.array([[50], [30], [90], [10]]),
                               [1, 9, 4], np.array([[1.5], [9.5], [4.5]]))
    assert list(ids) == [9, 1]
    np.testing.assert_array_equal(a[:, 0], [90, 10])
    np.testing.assert_array_equal(b[:, 0], [9.5, 1.5])
    with pytest.raises(ValueError):
        an.match_by_id([1, 1], np.zeros(2), [1], np.zeros(1))
    with pytest.raises(ValueError):
        an.match_by_id([1, 2], np.zeros(2), [3], np.zeros(1))


def test_error_input_checks():
    with pytest.raises(ValueError):
        an.amplitude_errors(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError):
        an.rmsd_of_amplitude_errors(np.zeros((2, 5, 3)), np.zeros(3))


# ----------------------------------------------------------------------------- outliers


def test_mahalanobis_matches_scipy():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(30, 3)) @ np.array([[3.0, 0, 0], [1.0, 2.0, 0], [0.5, -1.0, 1.0]])
    d = an.mahalanobis_distances(x)
    vi = np.linalg.inv(np.cov(x, rowvar=False))
    mu = x.mean(axis=0)
    for i in (0, 7, 29):
        assert d[i] == pytest.approx(mahalanobis(x[i], mu, vi), rel=1e-10)
    with pytest.raises(ValueError):
        an.mahalanobis_distances(np.zeros((3, 3)))


def test_mahalanobis_singular_cloud_uses_pseudo_inverse():
    rng = np.random.default_rng(5)
    t = rng.normal(size=40)
    x = np.column_stack([t, 2 * t, np.zeros(40)])  # rank-1 cloud
    d = an.mahalanobis_distances(x)
    # along the line the distance is |t - mean| / std(t)
    np.testing.assert_allclose(d, np.abs(t - t.mean()) / t.std(ddof=1), rtol=1e-8)


@pytest.mark.parametrize("robust", [False, True])
def test_outlier_fraction_removes_planted_outliers(robust):
    rng = np.random.default_rng(6)
    cloud = rng.normal(scale=[30.0, 10.0, 5.0], size=(90, 3))
    direction = rng.normal(size=(10, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    outliers = direction * 150.0
    x = np.concatenate([cloud, outliers])
    keep = an.outlier_mask(an.mahalanobis_distances(x, robust=robust), fraction=0.1)
    assert keep.sum() == 90
    assert not keep[90:].any() and keep[:90].all()


def test_robust_distances_resist_masking_by_clustered_outliers():
    # 20 % of the points in one far clump inflate the plain covariance along its
    # direction: the clump then sits at about sqrt(0.8 / 0.2) = 2 plain units, less
    # than many inliers in 5-D (chi with 4 dof); the robust estimate is not fooled.
    rng = np.random.default_rng(11)
    cloud = rng.normal(size=(80, 5))
    clump = np.array([10.0, 0, 0, 0, 0]) + rng.normal(scale=0.1, size=(20, 5))
    x = np.concatenate([cloud, clump])
    plain = an.outlier_mask(an.mahalanobis_distances(x), fraction=0.2)
    robust = an.outlier_mask(an.mahalanobis_distances(x, robust=True), fraction=0.2)
    assert plain[80:].sum() >= 15  # masked: most of the clump is kept
    assert not robust[80:].any() and robust[:80].all()


def test_outlier_mask_threshold_and_checks():
    d = np.array([0.5, 3.0, 1.0, 2.5])
    np.testing.assert_array_equal(an.outlier_mask(d, threshold=2.5), [True, False, True, True])
    np.testing.assert_array_equal(an.outlier_mask(d, fraction=0.5), [True, False, True, False])
    np.testing.assert_array_equal(an.outlier_mask(d, fraction=0.0), [True] * 4)
    with pytest.raises(ValueError):
        an.outlier_mask(d)
    with pytest.raises(ValueError):
        an.outlier_mask(d, threshold=1.0, fraction=0.1)
    with pytest.raises(ValueError):
        an.outlier_mask(d, fraction=1.0)


# ----------------------------------------------------------------------------- trajectories


def test_principal_path_follows_planted_line():
    rng = np.random.default_rng(7)
    direction = np.array([1.0, -2.0, 0.5])
    direction /= np.linalg.norm(direction)
    t = rng.uniform(-100, 100, 300)
    x = np.array([10.0, 5.0, -3.0]) + t[:, None] * direction + rng.normal(scale=2.0, size=(300, 3))
    path = tr.principal_path(x, 11)
    assert path.shape == (11, 3)
    step = path[-1] - path[0]
    assert abs(step @ direction) / np.linalg.norm(step) > 0.99
    # 2-98 % of a uniform(-100, 100) spread: about 192 Å long
    assert np.linalg.norm(step) == pytest.approx(np.ptp(np.percentile(t, [2, 98])), rel=0.05)
    assert np.linalg.norm(path.mean(axis=0) - x.mean(axis=0)) < 10.0  # centred on the cloud
    full = tr.principal_path(x, 5, extent="range")
    assert np.linalg.norm(full[-1] - full[0]) > np.linalg.norm(step)
    d = np.diff(path, axis=0)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), np.linalg.norm(d[0]))  # equal spacing


def test_principal_components_match_covariance():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(500, 3)) @ np.array([[4.0, 1.0, 0.0], [0.0, 2.0, 0.5], [0.0, 0.0, 1.0]])
    mean, comps, var = tr.principal_components(x)
    np.testing.assert_allclose(var, np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1], rtol=1e-10)
    np.testing.assert_allclose(comps @ comps.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.var((x - mean) @ comps.T, axis=0, ddof=1), var, rtol=1e-10)
    assert (comps[np.arange(3), np.argmax(np.abs(comps), axis=1)] > 0).all()  # sign convention


def test_path_through_points_equal_arc_length():
    p = np.array([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0]])  # length 3 + 4 = 7
    path = tr.path_through_points(p, 8)
    np.testing.assert_allclose(path[0], p[0])
    np.testing.assert_allclose(path[-1], p[-1])
    np.testing.assert_allclose(np.linalg.norm(np.diff(path, axis=0), axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(path[3], [3.0, 0.0])


def test_kmeans_recovers_planted_clusters_deterministically():
    rng = np.random.default_rng(8)
    centres = np.array([[0.0, 0.0, 0.0], [50.0, 0.0, 0.0], [0.0, 50.0, 20.0]])
    sizes = [40, 30, 20]
    truth = np.repeat(np.arange(3), sizes)
    x = centres[truth] + rng.normal(scale=3.0, size=(90, 3))
    labels, found = tr.kmeans(x, 3, seed=1)
    # labels agree up to permutation: a one-to-one contingency table
    table = np.zeros((3, 3), int)
    np.add.at(table, (truth, labels), 1)
    assert sorted(table.max(axis=1)) == sorted(sizes) and (np.count_nonzero(table, axis=1) == 1).all()
    # clusters are numbered by decreasing size, so here labels equal the truth
    np.testing.assert_array_equal(labels, truth)
    np.testing.assert_allclose(found, centres, atol=2.0)
    again, _ = tr.kmeans(x, 3, seed=1)
    np.testing.assert_array_equal(again, labels)
    with pytest.raises(ValueError):
        tr.kmeans(x, 0, seed=1)


def test_select_by_ranges_and_trajectory_frames():
    x = np.array([[0.0, 5.0], [2.0, -1.0], [4.0, 3.0], [6.0, 0.0]])
    np.testing.assert_array_equal(tr.select_by_ranges(x, {0: (1.0, 5.0)}), [False, True, True, False])
    np.testing.assert_array_equal(tr.select_by_ranges(x, {0: (1.0, None), 1: (None, 0.0)}),
                                  [False, True, False, True])
    with pytest.raises(ValueError):
        tr.select_by_ranges(x, {2: (0, 1)})
    np.testing.assert_array_equal(tr.nearest_particles(x, [[5.5, 0.2], [0.1, 4.0]]), [3, 0])
    np.testing.assert_array_equal(tr.nearest_points(x, [[5.5, 0.2], [0.1, 4.0]]), [1, 0, 0, 0])
    with pytest.raises(ValueError, match="amplitudes"):
        tr.nearest_points(x, [[1.0, 2.0, 3.0]])
    coords = np.arange(12.0).reshape(4, 3)
    modes = _orthonormal_modes(2, 4, seed=9)
    path = np.array([[0.0, 0.0], [1.0, -2.0]])
    frames = tr.trajectory_frames(coords, modes, path)
    assert frames.shape == (2, 4, 3)
    np.testing.assert_allclose(frames[0], coords)
    np.testing.assert_allclose(frames[1], coords + modes[0] - 2 * modes[1])
    with pytest.raises(ValueError):
        tr.trajectory_frames(coords, modes, np.zeros((2, 3)))
