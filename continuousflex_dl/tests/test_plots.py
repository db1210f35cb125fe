"""Plot functions: the figures hold the right points, labels and legends."""
import numpy as np
import pytest
from matplotlib.figure import Figure

from continuousflex_dl.core.landscape.analysis import amplitude_errors
from continuousflex_dl.viewers import plots


def _save(fig, tmp_path, name):
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=40)
    assert path.stat().st_size > 1000
    return path


def _legend(ax):
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg else []


def test_point_cloud_3d_overlaid_sets(tmp_path):
    rng = np.random.default_rng(0)
    sets = {"ground truth": rng.normal(size=(30, 4)), "HEMNMA": rng.normal(size=(25, 4)),
            "predicted": rng.normal(size=(20, 4))}
    fig = plots.plot_point_cloud(sets, [7, 8, 9, 10], dims=(0, 1, 3), title="cloud")
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.name == "3d"
    counts = [len(c._offsets3d[0]) for c in ax.collections]
    assert counts == [30, 25, 20]
    np.testing.assert_allclose(ax.collections[1]._offsets3d[2], sets["HEMNMA"][:, 3])
    assert ax.get_xlabel() == "Mode 7 amplitude (Å)" and ax.get_zlabel() == "Mode 10 amplitude (Å)"
    assert _legend(ax) == ["ground truth", "HEMNMA", "predicted"]
    _save(fig, tmp_path, "cloud3d")


def test_point_cloud_colours_and_order_follow_the_amplitude_source(tmp_path):
    from matplotlib.colors import to_rgba

    from continuousflex_dl import convert
    assert set(plots.SOURCE_STYLES) == {convert.SOURCE_GROUND_TRUTH, convert.SOURCE_HEMNMA,
                                        convert.SOURCE_NETWORK}
    rng = np.random.default_rng(6)
    sets = {"my run": rng.normal(size=(10, 3)), "HEMNMA alignment": rng.normal(size=(12, 3)),
            "synthesis": rng.normal(size=(14, 3)), "DeepHEMNMA prediction": rng.normal(size=(16, 3))}
    sources = {"HEMNMA alignment": "HEMNMA", "synthesis": "ground truth", "DeepHEMNMA prediction": "DeepHEMNMA"}
    for dims in ((0, 1, 2), (0, 2)):  # 3-D and 2-D: the same colours and order
        ax = plots.plot_point_cloud(sets, [7, 8, 9], dims=dims, sources=sources).axes[0]
        colours = [tuple(np.round(c.get_facecolor()[0][:3], 3)) for c in ax.collections]
        expected = ["tab:green", "tab:blue", "black", "tab:red"]  # given order, coloured by source
        assert colours == [tuple(np.round(to_rgba(c)[:3], 3)) for c in expected]
        zorders = [c.get_zorder() for c in ax.collections]
        assert zorders[2] > max(zorders[:2] + zorders[3:])  # the truth drawn on top
        assert [len(c.get_offsets()) for c in ax.collections] == [10, 12, 14, 16]
        if len(dims) == 3:
            assert ax.computed_zorder is False  # mplot3d would otherwise reorder by depth
    # Without sources, labels naming a source are styled by it.
    ax = plots.plot_point_cloud({"HEMNMA": sets["my run"], "ground truth": sets["synthesis"]}, [7, 8, 9],
                                dims=(0, 1)).axes[0]
    assert [tuple(c.get_facecolor()[0][:3]) for c in ax.collections] == [to_rgba("tab:blue")[:3],
                                                                          to_rgba("black")[:3]]
    _save(ax.figure, tmp_path, "sources")


def test_point_cloud_2d_coloured_and_1d_histogram(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 2))
    fig = plots.plot_point_cloud({"predicted": x}, [7, 8], color_by=x[:, 0], colorbar_label="cost")
    assert len(fig.axes) == 2  # scatter + colorbar
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.collections[0].get_offsets(), x)
    np.testing.assert_allclose(ax.collections[0].get_array(), x[:, 0])
    assert ax.get_ylabel() == "Mode 8 amplitude (Å)"
    assert fig.axes[1].get_ylabel() == "cost"
    assert _legend(ax) == []
    _save(fig, tmp_path, "cloud2d")
    centres = np.array([[1.0, 2.0], [-1.0, 0.5]])
    fig = plots.plot_point_cloud({"predicted": x}, [7, 8], path=centres, path_label="centres")
    np.testing.assert_allclose(fig.axes[0].lines[0].get_xydata(), centres)
    assert _legend(fig.axes[0]) == ["predicted", "centres"]

    one = {"GT": rng.normal(size=(50, 1)), "pred": rng.normal(size=(60, 1))}
    fig = plots.plot_point_cloud(one, [7], bins=10)
    ax = fig.axes[0]
    heights = [sum(p.get_height() for p in c) for c in ax.containers]
    assert heights == [50, 60]
    assert ax.get_xlabel() == "Mode 7 amplitude (Å)" and ax.get_ylabel() == "Particles"
    assert _legend(ax) == ["GT", "pred"]
    _save(fig, tmp_path, "hist")


def test_point_cloud_pca_projects_on_principal_axes(tmp_path):
    rng = np.random.default_rng(2)
    t = rng.normal(scale=50, size=60)
    x = np.column_stack([t, -t, 0.5 * t, np.zeros(60), np.zeros(60)]) + rng.normal(scale=0.5, size=(60, 5))
    fig = plots.plot_point_cloud({"a": x}, [7, 8, 9, 10, 11], dims="pca")
    ax = fig.axes[0]
    pc1, pc2, pc3 = (np.asarray(v) for v in ax.collections[0]._offsets3d)
    assert np.var(pc1) > 100 * (np.var(pc2) + np.var(pc3))
    # PC 1 is the planted line: |projection| equals the distance along it (norm 1.5)
    assert abs(np.corrcoef(pc1, t)[0, 1]) > 0.999
    assert ax.get_xlabel() == "PC 1 (Å)"
    # a path along the line projects onto PC 1 only, as far as its length
    path = np.outer([-1.0, 0.0, 1.0], [40.0, -40.0, 20.0, 0.0, 0.0]) + x.mean(axis=0)
    fig = plots.plot_point_cloud({"a": x}, [7, 8, 9, 10, 11], dims="pca", path=path, path_label="PC 1 path")
    ax = fig.axes[0]
    line = ax.lines[0]
    px, py, pz = line.get_data_3d()
    np.testing.assert_allclose(np.abs(px), [60.0, 0.0, 60.0], atol=1.0)  # |(40, -40, 20)| = 60
    np.testing.assert_allclose(py, 0.0, atol=1.0)
    assert _legend(ax) == ["a", "PC 1 path"]
    _save(fig, tmp_path, "pca_path")
    with pytest.raises(ValueError):
        plots.plot_point_cloud({"a": x}, [7, 8])
    with pytest.raises(ValueError):
        plots.plot_point_cloud({"a": x, "b": x[:, :3]}, [7, 8, 9, 10, 11])


def test_error_histograms_from_report(tmp_path):
    rng = np.random.default_rng(3)
    truth = rng.normal(size=(80, 3))
    report = amplitude_errors(truth + rng.normal(size=(80, 3)), truth, mode_numbers=[7, 8, 12])
    fig = plots.plot_error_histograms(report, bins=12)
    assert len(fig.axes) == 3
    for ax, m, j in zip(fig.axes, [7, 8, 12], range(3)):
        assert sum(p.get_height() for p in ax.containers[0]) == 80
        assert ax.get_xlabel() == f"Mode {m} absolute error (Å)"
        assert f"{report.per_mode_mean[j]:.2f} ± {report.per_mode_std[j]:.2f}" in ax.get_title()
    _save(fig, tmp_path, "errors")


def test_mode_profile_and_eigenvalues(tmp_path):
    rng = np.random.default_rng(4)
    mode = rng.normal(size=(25, 3))
    fig = plots.plot_mode_profile(mode, index=np.arange(101, 126), mode_number=7)
    line = fig.axes[0].lines[0]
    np.testing.assert_allclose(line.get_ydata(), np.linalg.norm(mode, axis=1))
    np.testing.assert_allclose(line.get_xdata(), np.arange(101, 126))
    assert fig.axes[0].get_title() == "Mode 7"
    _save(fig, tmp_path, "profile")

    ev = np.concatenate([np.zeros(6), np.arange(1.0, 5.0)])
    col = np.linspace(0.1, 0.9, 10)
    enabled = np.arange(10) >= 6
    fig = plots.plot_eigenvalues(ev, col, enabled)
    assert len(fig.axes) == 2
    top, bottom = fig.axes
    assert [len(c) for c in top.containers] == [4, 6]
    np.testing.assert_allclose([p.get_height() for p in top.containers[0]], [1, 2, 3, 4])
    np.testing.assert_allclose([p.get_x() + p.get_width() / 2 for p in top.containers[0]], [7, 8, 9, 10])
    np.testing.assert_allclose([p.get_height() for p in bottom.containers[1]], col[:6])
    assert _legend(top) == ["used", "not used"]
    assert top.get_ylabel() == "Eigenvalue (× spring constant)" and bottom.get_ylabel() == "Collectivity (0-1)"
    _save(fig, tmp_path, "eigen")


def _renderer(fig):
    """The Agg renderer of ``fig``, drawn (layout done), for the artists' window extents."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _inside(fig, *artists):
    """Whether every artist's drawn box lies within the figure (a label cut at the edge does not)."""
    renderer = _renderer(fig)
    box = fig.bbox
    for a in artists:
        b = a.get_window_extent(renderer)
        if not (b.x0 >= box.x0 - 0.5 and b.y0 >= box.y0 - 0.5 and b.x1 <= box.x1 + 0.5 and b.y1 <= box.y1 + 0.5):
            return False
    return True


def test_profile_label_is_not_clipped():
    """The NMA viewer's two-line y-label fits the figure (one line of this length did not)."""
    from continuousflex_dl.viewers.viewer_nma import PROFILE_YLABEL
    d = np.random.default_rng(1).random(214)
    for label, fits in ((PROFILE_YLABEL, True),
                        ("Largest atom displacement (Å per Å of amplitude)", False)):
        fig = plots.plot_mode_profile(d, np.arange(1, 215), mode_number=7, ylabel=label)
        ax = fig.axes[0]
        assert _inside(fig, ax.yaxis.label, ax.xaxis.label, ax.title) == fits, label


@pytest.mark.parametrize("dims", [(0, 1, 2), "pca", (0, 1)])
def test_colour_bar_leaves_the_axis_labels_visible_and_clips_outliers(tmp_path, dims):
    rng = np.random.default_rng(2)
    amplitudes = rng.normal(0, 50, (400, 3))
    error = np.abs(rng.normal(2.0, 1.0, 400))
    error[:4] = 160.0  # a few far outliers would leave every other point the same colour
    fig = plots.plot_point_cloud({"HEMNMA": amplitudes}, [7, 8, 9], dims=dims, color_by=error,
                                 colorbar_label="Amplitude error (Å)")
    ax, cbar = fig.axes
    labels = [ax.xaxis.label, ax.yaxis.label] + ([ax.zaxis.label] if dims != (0, 1) else [])
    assert _inside(fig, *labels, cbar.yaxis.label)
    renderer = _renderer(fig)
    bar = cbar.get_window_extent(renderer)
    for label in labels:  # the colour bar covers no axis label (the third one sits close to it)
        assert not label.get_window_extent(renderer).overlaps(bar), label.get_text()
    norm = ax.collections[0].norm
    assert norm.vmax == pytest.approx(np.percentile(error, 99)) and norm.vmax < 10
    assert "clipped to percentiles 1-99" in cbar.get_ylabel()
    _save(fig, tmp_path, f"clipped_{dims}")
    # without the outliers the scale is the full range
    lo, hi, clipped = plots.robust_range(error[4:])
    assert not clipped and (lo, hi) == (error[4:].min(), error[4:].max())


def test_training_curves_from_csv_like_rows(tmp_path):
    rows = [dict(epoch=str(e), train_loss=str(1.0 / e), val_loss=str(1.2 / e) if e != 3 else "",
                 val_mae=str(5.0 - e), lr="0.001") for e in range(1, 6)]
    fig = plots.plot_training_curves(rows)
    ax_loss, ax_mae, ax_lr = fig.axes
    assert [len(l.get_xdata()) for l in ax_loss.lines] == [5, 4]  # the empty val_loss is skipped
    assert ax_loss.get_yscale() == "log"
    assert _legend(ax_loss) == ["training loss", "validation loss"]
    np.testing.assert_allclose(ax_mae.lines[0].get_ydata(), [4, 3, 2, 1, 0])
    assert ax_mae.get_ylabel() == "Validation MAE (Å)" and ax_lr.get_ylabel() == "Learning rate"
    assert _legend(ax_mae) == ["validation MAE", "learning rate"]
    _save(fig, tmp_path, "training")
    with pytest.raises(ValueError):
        plots.plot_training_curves([])


def test_training_curves_mark_the_phases_and_the_kept_epoch(tmp_path):
    rows = [dict(epoch=e, train_loss=1.0 / e, val_loss=0.3 + abs(e - 4) / 10, val_mae=30 + abs(e - 4), lr=1e-3)
            for e in range(1, 9)]
    phases = ["simulated"] * 6 + ["fine-tuning"] * 2
    fig = plots.plot_training_curves(rows, phases, kept_epoch=4)
    ax_loss, ax_mae, _ = fig.axes
    for ax in (ax_loss, ax_mae):
        dividers = [l for l in ax.lines if l.get_linestyle() == ":"]
        assert [l.get_xdata()[0] for l in dividers] == [6.5]  # between epochs 6 and 7
        assert [t.get_text() for t in ax.texts] == ["simulated", "fine-tuning"]
    ring = [l for l in ax_mae.lines if l.get_label().startswith("weights kept")]
    assert ring[0].get_label() == "weights kept (epoch 4)" and list(ring[0].get_ydata()) == [30.0]
    assert _inside(fig, *ax_loss.texts, *ax_mae.texts, ax_loss.yaxis.label)
    _save(fig, tmp_path, "training_phases")
    with pytest.raises(ValueError, match="one per row"):
        plots.plot_training_curves(rows, phases[:3])


def test_image_gallery(tmp_path):
    imgs = np.random.default_rng(5).normal(size=(5, 16, 16))
    fig = plots.plot_images(imgs, titles=[f"#{i}" for i in range(5)])
    assert len(fig.axes) == 5
    assert [ax.get_title() for ax in fig.axes] == [f"#{i}" for i in range(5)]
    np.testing.assert_allclose(fig.axes[2].images[0].get_array(), imgs[2])
    _save(fig, tmp_path, "gallery")
    with pytest.raises(ValueError):
        plots.plot_images(imgs, titles=["a"])
