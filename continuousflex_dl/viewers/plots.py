"""Pure plotting functions: arrays in, :class:`matplotlib.figure.Figure` out.

No pyplot state, no Scipion: the Scipion viewers wire form parameters to
these functions and show the figures; tests call them headless and save PNGs
with ``fig.savefig`` (Agg). Amplitudes are in Å, mode numbers 1-based.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mpl_toolkits.mplot3d import Axes3D  # noqa: F401  (registers the '3d' projection)

from ..core.landscape.analysis import AmplitudeErrorReport
from ..core.landscape.trajectory import principal_components
from ..core.modes.nma import first_flexible_modes

__all__ = [
    "mode_label", "plot_point_cloud", "plot_error_histograms", "plot_mode_profile",
    "plot_eigenvalues", "plot_training_curves", "plot_images",
]

#: Colour and drawing order (zorder) of a set by the source of its amplitudes (the values of
#: convert.SOURCE_*): the ground truth dark and on top, as in the DeepHEMNMA paper's Figure 3a.
SOURCE_STYLES = {"ground truth": ("black", 3.0), "HEMNMA": ("tab:blue", 2.0), "DeepHEMNMA": ("tab:red", 2.0)}
#: Colours of sets of any other source, in order.
OTHER_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
#: Colour of a path (trajectory, cluster centres) over the clouds.
PATH_COLOUR = "tab:orange"


def mode_label(number: int) -> str:
    """Axis label of a mode amplitude, e.g. ``'Mode 7 amplitude (Å)'``."""
    return f"Mode {int(number)} amplitude (Å)"


def set_styles(labels: Sequence[str], sources: Optional[Mapping[str, str]] = None) -> dict:
    """``{label: (colour, zorder)}``: by :data:`SOURCE_STYLES` for a label whose source (in
    ``sources``, else the label itself) is known, else the next of :data:`OTHER_COLOURS`."""
    sources = sources or {}
    styles, others = {}, iter(OTHER_COLOURS * (1 + len(labels) // len(OTHER_COLOURS)))
    for label in labels:
        source = sources.get(label, label)
        styles[label] = SOURCE_STYLES.get(source) or (next(others), 1.5)
    return styles


def _points(name, x) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"The points of '{name}' must be a (particles, modes) array; got shape {a.shape}.")
    return a


def plot_point_cloud(sets: Mapping[str, np.ndarray], mode_numbers: Sequence[int],
                     dims: Union[Sequence[int], str] = (0, 1, 2),
                     color_by: Union[None, np.ndarray, Mapping[str, np.ndarray]] = None,
                     colorbar_label: str = "", title: str = "", marker_size: float = 6.0,
                     bins: int = 40, path: Optional[np.ndarray] = None,
                     path_label: str = "trajectory", figsize=(6.4, 5.2),
                     sources: Optional[Mapping[str, str]] = None) -> Figure:
    """Amplitude point clouds, several sets overlaid (e.g. ground truth,
    HEMNMA, predicted as in the DeepHEMNMA paper's Figure 3a).

    sets: ``{label: (M, K) amplitudes in Å}``, all with the same K.
    mode_numbers: the K mode numbers (labels only).
    dims: column indices to show (at most 3, truncated to K), or ``'pca'``
    for the first min(3, K) principal components of all sets together.
    One shown dimension -> overlaid histograms, two -> scatter, three -> 3-D scatter.
    color_by: per-point values (M,) for a single set, or ``{label: (M,)}``;
    points are then coloured on one scale with a colorbar named
    ``colorbar_label`` (ignored for histograms); a scale that a few extreme values would
    swamp is clipped to percentiles (:func:`robust_range`) and the colorbar says so.
    path: optional (F, K) amplitudes (Å), e.g. a trajectory or cluster centres,
    drawn as an orange line with markers over the clouds (projected like them;
    vertical lines at its values for histograms), named ``path_label`` in the legend.
    A legend names the sets when there are several, or when a path is drawn.
    sources: ``{label: amplitude source}`` ('ground truth', 'HEMNMA', 'DeepHEMNMA'), which
    fix each set's colour and drawing order (:func:`set_styles`; default: the labels);
    the truth is drawn black, smaller and on top.
    """
    if not sets:
        raise ValueError("No point sets to plot.")
    data = {str(label): _points(label, x) for label, x in sets.items()}
    k = {x.shape[1] for x in data.values()}
    if len(k) != 1:
        raise ValueError(f"All sets must have the same number of modes; got {sorted(k)}.")
    k = k.pop()
    mode_numbers = list(mode_numbers)
    if len(mode_numbers) != k:
        raise ValueError(f"Expected {k} mode numbers; got {mode_numbers}.")
    if isinstance(dims, str):
        if dims != "pca":
            raise ValueError(f"dims must be column indices or 'pca'; got {dims!r}.")
        n = min(3, k)
        mean, comps, _ = principal_components(np.concatenate(list(data.values())))
        axes = comps[:n].T

        def project(a):
            return (a - mean) @ axes
        labels = [f"PC {i + 1} (Å)" for i in range(n)]
    else:
        dims = [int(d) for d in dims][:k]
        if (not 1 <= len(dims) <= 3 or len(set(dims)) != len(dims)
                or any(not 0 <= d < k for d in dims)):
            raise ValueError(f"dims must be 1 to 3 distinct column indices within 0..{k - 1}; got {dims}.")

        def project(a):
            return a[:, dims]
        labels = [mode_label(mode_numbers[d]) for d in dims]
    data = {label: project(x) for label, x in data.items()}
    if path is not None:
        path = _points("path", path)
        if path.shape[1] != k:
            raise ValueError(f"The path has {path.shape[1]} amplitudes per point; the sets have {k}.")
        path = project(path)
    if color_by is not None and not isinstance(color_by, Mapping):
        if len(data) != 1:
            raise ValueError("With several sets, give color_by as {set label: values}.")
        color_by = {next(iter(data)): color_by}
    colours = {}
    if color_by is not None:
        for label, values in color_by.items():
            values = np.asarray(values, dtype=float).ravel()
            if label not in data or len(values) != len(data[label]):
                raise ValueError(f"color_by for '{label}' must have one value per point of that set.")
            colours[label] = values
        allv = np.concatenate(list(colours.values()))
        vmin, vmax, clipped = robust_range(allv)
        extend = ("both" if allv.min() < vmin else "max") if allv.max() > vmax else \
            ("min" if allv.min() < vmin else "neither")
        if clipped:
            colorbar_label = f"{colorbar_label}\n(scale clipped to percentiles {ROBUST_PERCENTILES[0]:g}-" \
                             f"{ROBUST_PERCENTILES[1]:g})".lstrip()

    fig = Figure(figsize=figsize)
    ndim = len(labels)
    ax = fig.add_subplot(projection="3d" if ndim == 3 else None)
    if ndim == 3:
        ax.computed_zorder = False  # draw by zorder (truth on top), not by depth
    styles = set_styles(list(data), sources)
    mappable = None
    for i, (label, x) in enumerate(data.items()):
        colour, zorder = styles[label]
        if ndim == 1:
            ax.hist(x[:, 0], bins=bins, alpha=0.5, color=colour, label=label, zorder=zorder)
            continue
        truth = zorder == SOURCE_STYLES["ground truth"][1]
        kw = dict(s=marker_size * (0.6 if truth else 1.0), label=label, alpha=0.9 if truth else 0.7,
                  zorder=zorder, linewidths=0)
        if label in colours:
            kw.update(c=colours[label], cmap="viridis", vmin=vmin, vmax=vmax,
                      marker="o" if i == 0 else "^")
        else:
            kw.update(color=colour)
        sc = ax.scatter(*x.T, **kw)
        if label in colours:
            mappable = sc
    if path is not None:
        if ndim == 1:
            for i, v in enumerate(path[:, 0]):
                ax.axvline(v, color=PATH_COLOUR, lw=1, label=path_label if i == 0 else None, zorder=4)
        else:
            ax.plot(*path.T, "o-", color=PATH_COLOUR, ms=4, lw=1.5, label=path_label, zorder=4)
    ax.set_xlabel(labels[0])
    if ndim == 1:
        ax.set_ylabel("Particles")
    else:
        ax.set_ylabel(labels[1])
    if ndim == 3:
        ax.set_zlabel(labels[2])
    if len(data) > 1 or path is not None:
        ax.legend()
    if mappable is not None:
        # 3-D axes draw their z label beyond the axes box: leave it room before the colour bar
        fig.colorbar(mappable, ax=ax, label=colorbar_label, shrink=0.7, extend=extend,
                     pad=0.12 if ndim == 3 else 0.03)
    if title:
        ax.set_title(title)
    return fig


#: Percentiles of a robust colour scale (:func:`robust_range`).
ROBUST_PERCENTILES = (1.0, 99.0)


def robust_range(values: np.ndarray) -> tuple:
    """``(vmin, vmax, clipped)`` of a colour scale for ``values``: their full range, unless a few
    extreme values (e.g. a handful of 160 Å errors among 2 Å ones) would swamp it, i.e. the full
    range is more than twice the range between :data:`ROBUST_PERCENTILES`; then those
    percentiles, and ``clipped`` True (say so on the colour bar)."""
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if not len(v):
        return 0.0, 1.0, False
    lo, hi = (float(x) for x in np.percentile(v, ROBUST_PERCENTILES))
    full_lo, full_hi = float(v.min()), float(v.max())
    if hi > lo and full_hi - full_lo > 2.0 * (hi - lo):
        return lo, hi, True
    return full_lo, full_hi, False


def plot_error_histograms(errors: Union[AmplitudeErrorReport, np.ndarray],
                          mode_numbers: Optional[Sequence[int]] = None, bins: int = 30,
                          title: str = "") -> Figure:
    """Histograms of absolute amplitude errors, one panel per mode.

    errors: an :class:`AmplitudeErrorReport` or (M, K) errors in Å (absolute
    values are taken). mode_numbers: K numbers (default: the report's, else 7..).
    Each panel's title gives the mean ± std of that mode.
    """
    if isinstance(errors, AmplitudeErrorReport):
        err = errors.abs_errors
        if mode_numbers is None:
            mode_numbers = list(errors.mode_numbers)
    else:
        err = np.abs(_points("errors", errors))
    k = err.shape[1]
    if mode_numbers is None:
        mode_numbers = first_flexible_modes(k)
    if len(mode_numbers) != k:
        raise ValueError(f"Expected {k} mode numbers; got {list(mode_numbers)}.")
    ncols = min(k, 3)
    nrows = math.ceil(k / ncols)
    fig = Figure(figsize=(4.0 * ncols, 3.2 * nrows), layout="constrained")
    for j, m in enumerate(mode_numbers):
        ax = fig.add_subplot(nrows, ncols, j + 1)
        ax.hist(err[:, j], bins=bins, color="tab:blue")
        ax.set_xlabel(f"Mode {int(m)} absolute error (Å)")
        ax.set_ylabel("Particles")
        ax.set_title(f"Mode {int(m)}: {err[:, j].mean():.2f} ± {err[:, j].std():.2f} Å")
    if title:
        fig.suptitle(title)
    return fig


def plot_mode_profile(displacement: np.ndarray, index: Optional[Sequence[float]] = None,
                      mode_number: Optional[int] = None, xlabel: str = "Residue number",
                      ylabel: str = "Displacement (Å)") -> Figure:
    """Per-atom displacement magnitude along a mode.

    displacement: (N,) magnitudes (Å) or a mode / displacement field (N, 3)
    whose per-atom norms are plotted. index: (N,) residue numbers or atom
    indices for the x axis (default 1..N, labelled 'Atom').
    """
    d = np.asarray(displacement, dtype=float)
    if d.ndim == 2 and d.shape[1] == 3:
        d = np.linalg.norm(d, axis=1)
    if d.ndim != 1:
        raise ValueError(f"displacement must have shape (N,) or (N, 3); got {d.shape}.")
    if index is None:
        index = np.arange(1, len(d) + 1)
        xlabel = "Atom"
    index = np.asarray(index, dtype=float)
    if index.shape != d.shape:
        raise ValueError(f"Expected {len(d)} residue numbers / atom indices; got {len(index)}.")
    fig = Figure(figsize=(7.0, 3.6), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(index, d, color="tab:blue", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if mode_number is not None:
        ax.set_title(f"Mode {int(mode_number)}")
    return fig


def plot_eigenvalues(eigenvalues: np.ndarray, collectivity: np.ndarray,
                     enabled: Optional[np.ndarray] = None,
                     mode_numbers: Optional[Sequence[int]] = None) -> Figure:
    """Two panels of bars over mode numbers: eigenvalues and collectivity.

    eigenvalues (K,) in units of the spring constant, collectivity (K,) 0-1; enabled: (K,)
    bool, the modes used (default all), the others (rigid-body or disabled) drawn grey;
    mode_numbers default 1..K.
    """
    ev = np.asarray(eigenvalues, dtype=float).ravel()
    col = np.asarray(collectivity, dtype=float).ravel()
    k = len(ev)
    enabled = np.ones(k, bool) if enabled is None else np.asarray(enabled, dtype=bool).ravel()
    numbers = np.arange(1, k + 1) if mode_numbers is None else np.asarray(mode_numbers, dtype=int)
    if not (len(col) == len(enabled) == len(numbers) == k):
        raise ValueError("eigenvalues, collectivity, enabled and mode_numbers must have the same length.")
    fig = Figure(figsize=(7.0, 5.0), layout="constrained")
    for row, (values, name) in enumerate(((ev, "Eigenvalue (× spring constant)"), (col, "Collectivity (0-1)"))):
        ax = fig.add_subplot(2, 1, row + 1)
        for mask, colour, label in ((enabled, "tab:blue", "used"), (~enabled, "0.7", "not used")):
            if mask.any():
                ax.bar(numbers[mask], values[mask], color=colour, label=label)
        ax.set_xlabel("Mode number")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        if row == 0 and (~enabled).any():
            ax.legend()
    return fig


def _column(rows, key) -> np.ndarray:
    out = []
    for r in rows:
        v = r.get(key)
        try:
            out.append(float(v) if v not in (None, "") else np.nan)
        except (TypeError, ValueError):
            out.append(np.nan)
    return np.asarray(out)


def plot_training_curves(rows: Sequence[Mapping[str, object]], phases: Optional[Sequence[str]] = None,
                         kept_epoch: Optional[int] = None) -> Figure:
    """Training curves from metrics rows (e.g. ``csv.DictReader`` of metrics.csv).

    rows: dicts with ``epoch`` and any of ``train_loss``, ``val_loss``,
    ``val_mae`` (Å), ``lr``; values may be numbers or strings, missing or
    empty -> not drawn. Left panel: losses (log scale when positive); right
    panel: validation MAE, with the learning rate on a second axis.
    phases: one name per row (e.g. 'simulated', 'fine-tuning'): each phase change is
    marked by a dotted line in both panels and the phases are named at the top.
    kept_epoch: the epoch whose weights the model keeps, ringed on the validation MAE.
    """
    if not rows:
        raise ValueError("No training metrics to plot.")
    epoch = _column(rows, "epoch")
    if np.isnan(epoch).any():
        raise ValueError("Every metrics row needs an epoch number.")
    if phases is not None and len(phases) != len(rows):
        raise ValueError(f"Got {len(phases)} phase names for {len(rows)} metrics rows: give one per row.")
    fig = Figure(figsize=(10.0, 4.2), layout="constrained")
    ax_loss = fig.add_subplot(1, 2, 1)
    drawn = []
    for key, label, colour in (("train_loss", "training loss", "tab:blue"),
                               ("val_loss", "validation loss", "tab:orange")):
        y = _column(rows, key)
        ok = np.isfinite(y)
        if ok.any():
            ax_loss.plot(epoch[ok], y[ok], "o-", ms=3, color=colour, label=label)
            drawn.append(y[ok])
    if drawn and all((y > 0).all() for y in drawn):
        ax_loss.set_yscale("log")
    ax_loss.set_xlabel("Epoch")
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_ylabel("Loss (standardised amplitudes)")
    if drawn:
        ax_loss.legend()
    ax_mae = fig.add_subplot(1, 2, 2)
    mae = _column(rows, "val_mae")
    ok = np.isfinite(mae)
    handles = []
    if ok.any():
        handles += ax_mae.plot(epoch[ok], mae[ok], "o-", ms=3, color="tab:green", label="validation MAE")
    if kept_epoch is not None and (epoch == kept_epoch).any():
        i = int(np.flatnonzero(epoch == kept_epoch)[0])
        handles += ax_mae.plot([epoch[i]], [mae[i]], "o", ms=11, mfc="none", mec="black", mew=1.5,
                               label=f"weights kept (epoch {int(kept_epoch)})", zorder=5)
    ax_mae.set_xlabel("Epoch")
    ax_mae.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_mae.set_ylabel("Validation MAE (Å)")
    lr = _column(rows, "lr")
    okl = np.isfinite(lr)
    if okl.any():
        ax_lr = ax_mae.twinx()
        handles += ax_lr.plot(epoch[okl], lr[okl], "--", color="0.4", label="learning rate")
        ax_lr.set_ylabel("Learning rate")
        if (lr[okl] > 0).all():
            ax_lr.set_yscale("log")
    if phases is not None:
        _mark_phases((ax_loss, ax_mae), epoch, list(phases))
    if handles:
        ax_mae.legend(handles=handles, labels=[h.get_label() for h in handles])
    return fig


def _mark_phases(axes, epoch: np.ndarray, phases: list) -> None:
    """Dotted lines between phases and each phase's name at the top of ``axes``."""
    starts = [0] + [i for i in range(1, len(phases)) if phases[i] != phases[i - 1]]
    bounds = starts + [len(phases)]
    for ax in axes:
        for j, i in enumerate(starts):
            if i > 0:
                ax.axvline((epoch[i - 1] + epoch[i]) / 2, color="0.3", ls=":", lw=1.2)
            if len(starts) > 1:
                centre = (epoch[i] + epoch[bounds[j + 1] - 1]) / 2
                ax.text(centre, 1.01, phases[i], transform=ax.get_xaxis_transform(), ha="center",
                        va="bottom", fontsize=9, color="0.2")


def plot_images(images: np.ndarray, titles: Optional[Sequence[str]] = None,
                ncols: Optional[int] = None, cmap: str = "gray", panel_size: float = 2.0) -> Figure:
    """Gallery of 2-D images (B, h, w), indexed ``[y, x]`` and shown with y
    increasing downwards as stored (origin 'upper'); one axes per image."""
    imgs = np.asarray(images, dtype=float)
    if imgs.ndim == 2:
        imgs = imgs[None]
    if imgs.ndim != 3 or len(imgs) == 0:
        raise ValueError(f"images must have shape (B, h, w); got {np.shape(images)}.")
    b = len(imgs)
    if titles is not None and len(titles) != b:
        raise ValueError(f"Got {len(titles)} titles for {b} images.")
    ncols = ncols or min(b, int(math.ceil(math.sqrt(b))))
    nrows = math.ceil(b / ncols)
    fig = Figure(figsize=(panel_size * ncols, panel_size * nrows + (0.3 * nrows if titles else 0)),
                 layout="constrained")
    for i in range(b):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(imgs[i], cmap=cmap)
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=8)
    return fig
