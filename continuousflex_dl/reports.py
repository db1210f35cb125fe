"""Sets of particles with amplitudes as arrays, their lineage in a project, and their error
reports against a ground truth.

Used by the landscape viewer and by protocols' summaries (no GUI code here). Nothing here
parses a structure, so it all runs in the GUI process (``python -O``, where ProDy cannot be
imported): RMSDs come from the mode files alone.
"""
import csv
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import convert
from .core.landscape import analysis
from .convert import flex_source

logger = logging.getLogger(__name__)

__all__ = ["flex_source", "set_label", "run_label", "read_attribute", "flex_arrays", "matched_amplitudes",
           "find_ground_truth", "Related", "related_sets", "error_reports", "error_table",
           "ERROR_TABLE_NOTE", "write_error_reports_csv", "error_summary_lines"]

#: The protocol attribute through which a set of particles derives from another.
INPUT_PARTICLES = "inputParticles"


# ----------------------------------------------------------------------------- lineage

def _key(obj):
    """Identity of a Scipion object across loads: its id and file."""
    return obj.getObjId(), getattr(obj, "getFileName", lambda: None)()


def producer(obj, project):
    """The protocol of ``project`` that produced ``obj`` (one of its outputs), or None."""
    parent = obj.getObjParentId() if project is not None else None
    if not parent:
        return None
    try:
        prot = project.getProtocol(parent)
    except Exception:  # noqa: BLE001 - an object outside this project has no producer here
        return None
    return prot if prot is not None and hasattr(prot, "iterOutputAttributes") else None


def output_name(prot, obj) -> Optional[str]:
    """The name of the output of ``prot`` that is ``obj`` (e.g. 'outputParticles'), or None."""
    for name, out in prot.iterOutputAttributes():
        if _key(out) == _key(obj):
            return name
    return None


def run_label(prot) -> str:
    """A protocol's run label without the 'package - ' prefix of default labels."""
    label = prot.getRunName() or prot.getClassLabel()
    package = prot.getClassPackageName() if hasattr(prot, "getClassPackageName") else ""
    prefix = f"{package} - "
    return label[len(prefix):] if package and label.startswith(prefix) else label


def set_label(particles, default: str = "particles", project=None) -> str:
    """A short name for a set in legends and tables: the run label of the protocol that made
    it (with the amplitude source when the label does not say it), else its source, else its
    object label, else ``default``."""
    source = flex_source(particles)
    prot = producer(particles, project)
    if prot is not None:
        label = run_label(prot)
        return label if not source or source.lower() in label.lower() else f"{label} ({source})"
    return source or particles.getObjLabel() or default


def _lineage(particles, project) -> List[tuple]:
    """``[(set, producing protocol or None), ...]``: ``particles``, then the set its protocol
    read as ``inputParticles``, and so on up to the first set no protocol of the project made."""
    chain, seen = [], set()
    current = particles
    while current is not None and _key(current) not in seen:
        seen.add(_key(current))
        prot = producer(current, project)
        chain.append((current, prot))
        pointer = getattr(prot, INPUT_PARTICLES, None) if prot is not None else None
        current = pointer.get() if pointer is not None and hasattr(pointer, "get") else None
    return chain


def _modes_of(prots, project):
    """The first normal modes (``inputModes``) of these protocols or of what they read."""
    queue, seen = list(prots), set()
    while queue:
        prot = queue.pop(0)
        if prot is None or prot.getObjId() in seen:
            continue
        seen.add(prot.getObjId())
        modes = getattr(prot, "inputModes", None)
        if modes is not None and modes.get() is not None:
            return modes.get()
        for name in (INPUT_PARTICLES, "inputModel"):
            pointer = getattr(prot, name, None)
            obj = pointer.get() if pointer is not None and hasattr(pointer, "get") else None
            if obj is not None:
                queue.append(producer(obj, project))
    return None


def lineage_modes(particles, project):
    """The normal modes (a SetOfNormalModes) the amplitudes of ``particles`` refer to, found
    through the project: the first ``inputModes`` of the protocols that made them, or of what
    those read (as ``related_sets`` finds them for the viewers); None when there are none."""
    if project is None:
        return None
    return _modes_of([prot for _, prot in _lineage(particles, project)], project)


@dataclass
class Related:
    """What a landscape is compared with, found through the project's lineage.

    truth: the ground-truth set of the same particles, or None. overlays: sets of the
    same particles to draw with the main one (the truth first, then one set of each other
    amplitude source, HEMNMA and DeepHEMNMA), each as ``(set, protocol, output name)``.
    modes: the SetOfNormalModes of the amplitudes, or None.
    """
    truth: Optional[object] = None
    overlays: List[tuple] = field(default_factory=list)
    modes: Optional[object] = None


def related_sets(main, project, target_protocol=None, max_overlays: int = 5) -> Related:
    """Find, in ``project``, what to overlay on the SetOfParticlesFlex ``main`` and compare it with.

    Sets of the same particles are those derived (through ``inputParticles``) from the
    same first set as ``main``. The truth is the nearest one upstream marked 'ground
    truth', else one made from it. For every other amplitude source (HEMNMA, DeepHEMNMA)
    than main's, the set where that source first appears (an alignment or prediction
    output, not a subset of one) is overlaid: upstream of main first, else the earliest
    run. ``target_protocol``: the protocol being analysed, searched first for the modes.
    """
    related = Related()
    if project is None:
        return related
    chain = _lineage(main, project)
    root = _key(chain[-1][0])
    main_source = flex_source(main)
    candidates = [(s, p) for s, p in chain[1:]]  # upstream first
    seen = {_key(s) for s, _ in chain}
    for prot in project.getRuns():
        for name, out in prot.iterOutputAttributes():
            if _key(out) in seen or not flex_source(out):
                continue
            seen.add(_key(out))
            lineage = _lineage(out, project)
            if _key(lineage[-1][0]) == root:
                candidates.append((out, prot))
    by_source: Dict[str, tuple] = OrderedDict()
    for s, prot in candidates:
        source = flex_source(s)
        if not source or source == main_source or source in by_source or prot is None:
            continue
        upstream = getattr(prot, INPUT_PARTICLES, None)
        upstream = upstream.get() if upstream is not None else None
        if source != convert.SOURCE_GROUND_TRUTH and upstream is not None and flex_source(upstream) == source:
            continue  # a subset of a set of this source (outliers removed, a cluster): use the original
        by_source[source] = (s, prot, output_name(prot, s))
    truth = by_source.pop(convert.SOURCE_GROUND_TRUTH, None)
    if truth is not None:
        related.truth = truth[0]
        related.overlays.append(truth)
    elif main_source == convert.SOURCE_GROUND_TRUTH:
        related.truth = main
    related.overlays += list(by_source.values())
    related.overlays = related.overlays[:max_overlays]
    related.modes = _modes_of([target_protocol] + [p for _, p in chain], project)
    return related


# ----------------------------------------------------------------------------- arrays

def read_attribute(particles, name: str) -> np.ndarray:
    """Per-particle values (M,) of a Float attribute (e.g. '_cfdlScore'), in id order.
    Raises ValueError naming the attribute when a particle lacks it."""
    values = []
    for p in particles.iterItems(orderBy="id"):
        attr = getattr(p, name, None)
        value = attr.get() if hasattr(attr, "get") else attr
        if value is None:
            raise ValueError(f"The particles have no attribute {name!r}: try '_cfdlScore' (HEMNMA "
                             f"alignment score) or '_cfdlMahalanobis' (outlier distance).")
        values.append(float(value))
    return np.asarray(values)


def errors_to_truth(arrays: "convert.ParticleArrays", truth) -> np.ndarray:
    """Amplitude error (M,) Å of each particle of ``arrays`` (Euclidean norm over the modes)
    against the ground-truth set ``truth`` (a SetOfParticlesFlex), matched by id. Raises
    ValueError when the truth lacks some of the particles."""
    t = convert.read_particles(truth, need_amplitudes=True)
    ids, pred, true = analysis.match_by_id(arrays.ids, arrays.amplitudes, t.ids, t.amplitudes)
    if len(ids) != len(arrays.ids):
        raise ValueError(f"The ground truth lacks {len(arrays.ids) - len(ids)} of these {len(arrays.ids)} "
                         f"particles: choose the ground truth of this set.")
    return np.linalg.norm(pred - true, axis=1)


def flex_arrays(sets: Sequence, labels: Optional[Sequence[str]] = None
                ) -> "OrderedDict[str, convert.ParticleArrays]":
    """Read several SetOfParticlesFlex of the same modes: ``{unique label: ParticleArrays}``
    in the given order. labels: one per set (default :func:`set_label`); repeated labels get
    ' (2)', ' (3)'. Raises ValueError when a set has no amplitudes or other modes."""
    out = OrderedDict()
    numbers = None
    for i, s in enumerate(sets):
        arrays = convert.read_particles(s, need_amplitudes=True)
        modes = arrays.amplitude_modes()
        base = labels[i] if labels is not None else set_label(s, f"set {i + 1}")
        if numbers is None:
            numbers = modes
        elif list(modes) != list(numbers):
            raise ValueError(f"'{base}' has amplitudes of modes {modes}, the first set of "
                             f"modes {numbers}: overlay sets of the same modes only.")
        label, n = base, 2
        while label in out:
            label = f"{base} ({n})"
            n += 1
        out[label] = arrays
    return out


def matched_amplitudes(arrays: Dict[str, "convert.ParticleArrays"]) -> Dict[str, np.ndarray]:
    """Amplitudes of every set restricted to the particles of the first set (matched by id).
    Returns ``{label: (M_i, K)}``; the first set is kept whole."""
    items = list(arrays.items())
    first_label, first = items[0]
    out = {first_label: first.amplitudes}
    for label, a in items[1:]:
        _, _, values = analysis.match_by_id(first.ids, first.amplitudes, a.ids, a.amplitudes)
        out[label] = values
    return out


def find_ground_truth(sets: Sequence):
    """Index of the first set whose FlexInfo says 'ground truth', or None."""
    for i, s in enumerate(sets):
        if flex_source(s) == convert.SOURCE_GROUND_TRUTH:
            return i
    return None


# ----------------------------------------------------------------------------- error reports

def error_reports(truth, others: Sequence, modes_set=None, labels: Optional[Sequence[str]] = None
                  ) -> "OrderedDict[str, tuple]":
    """Error reports of SetOfParticlesFlex ``others`` against ``truth`` (matched by id).

    modes_set: optional SetOfNormalModes holding the particles' modes, to fill the RMSDs
    (Å; read from the mode files only). labels: one per set of ``others``.
    Returns ``{label: (AmplitudeErrorReport, PoseErrorReport or None)}``; poses are
    compared when both sets carry them (angles in degrees, shifts in px) and differ: poses
    equal to the truth's for every particle were copied (e.g. by a prediction of amplitudes
    only), not estimated, and get None.
    """
    if not others:
        raise ValueError("No set to compare with the ground truth.")
    t = convert.read_particles(truth, need_amplitudes=True)
    numbers = t.amplitude_modes()
    modes = convert.read_mode_vectors(modes_set, numbers) if modes_set is not None else None
    out = OrderedDict()
    for label, a in flex_arrays(others, labels).items():
        if a.mode_numbers is not None and list(a.mode_numbers) != list(numbers):
            raise ValueError(f"'{label}' has amplitudes of modes {a.mode_numbers}, the ground truth "
                             f"of modes {numbers}.")
        rows = np.arange(len(a.ids))
        ids, rows_a, rows_t = analysis.match_by_id(a.ids, rows, t.ids, np.arange(len(t.ids)))
        amp = analysis.amplitude_errors(a.amplitudes[rows_a], t.amplitudes[rows_t], numbers, modes)
        pose = None
        if a.angles is not None and t.angles is not None and not _copied_poses(a, rows_a, t, rows_t):
            shifts = a.shifts is not None and t.shifts is not None
            pose = analysis.pose_errors(a.angles[rows_a], t.angles[rows_t],
                                        a.shifts[rows_a] if shifts else None,
                                        t.shifts[rows_t] if shifts else None)
        out[label] = (amp, pose)
    return out


def _copied_poses(a, rows_a, t, rows_t) -> bool:
    """Whether the poses of ``a`` are those of ``t`` to the last bit (copied, not estimated)."""
    same = np.array_equal(a.angles[rows_a], t.angles[rows_t])
    if a.shifts is not None and t.shifts is not None:
        same = same and np.array_equal(a.shifts[rows_a], t.shifts[rows_t])
    return bool(same)


ERROR_TABLE_NOTE = ("Every cell: mean ± standard deviation over the particles of the absolute amplitude "
                    "error (Å), of each particle's atomic RMSD between its conformation and the true one "
                    "(Å), and of the angular (°) and shift (px) errors.")


def _spread(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.2f} ± {values.std():.2f}"


def error_table(reports) -> tuple:
    """``(header, rows)`` of error reports for a table: one row per set; every value is
    mean ± std over the particles (see :data:`ERROR_TABLE_NOTE`): per mode and over all
    modes (Å), atomic RMSD per particle (Å), angular (°) and shift (px) errors."""
    first = next(iter(reports.values()))[0]
    header = (["Set", "Particles"] + [f"Mode {m} (Å)" for m in first.mode_numbers]
              + ["All modes (Å)", "RMSD (Å)", "Angle (°)", "Shift (px)"])
    rows = []
    for label, (amp, pose) in reports.items():
        rows.append([label, amp.n_particles]
                    + [_spread(amp.abs_errors[:, j]) for j in range(amp.abs_errors.shape[1])]
                    + [_spread(amp.abs_errors),
                       "–" if amp.rmsd_per_particle is None else _spread(amp.rmsd_per_particle),
                       "–" if pose is None else _spread(pose.angular),
                       "–" if pose is None or pose.shift is None else _spread(pose.shift)])
    return header, rows


def write_error_reports_csv(path, reports) -> str:
    """One CSV of several sets' reports: columns ``set`` + :data:`analysis.CSV_COLUMNS`."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=("set",) + analysis.CSV_COLUMNS)
        writer.writeheader()
        for label, (amp, pose) in reports.items():
            for r in amp.rows() + (pose.rows() if pose is not None else []):
                writer.writerow(dict(r, set=label))
    return str(path)


def error_summary_lines(particles, truth, modes_set=None, require_truth: bool = True) -> List[str]:
    """Lines for a protocol's _summary: the error report of ``particles`` against ``truth``
    (e.g. a HEMNMA output against its synthesized input). With ``require_truth``, returns
    [] unless ``truth`` is marked 'ground truth' (FlexInfo) and carries amplitudes, so a
    protocol can call it on any input. Poses copied from ``truth`` are said to be copied
    (no angular error of 0°)."""
    if require_truth:
        if truth is None or flex_source(truth) != convert.SOURCE_GROUND_TRUTH:
            return []
        try:
            reports = error_reports(truth, [particles], modes_set)
        except ValueError:
            return []
    else:
        reports = error_reports(truth, [particles], modes_set)
    (amp, pose), = reports.values()
    lines = [f"Amplitude errors against the ground truth ({amp.n_particles} particles, mean ± std): "
             f"{_spread(amp.abs_errors)} Å over all modes; per mode "
             + ", ".join(f"{m}: {_spread(amp.abs_errors[:, j])} Å" for j, m in enumerate(amp.mode_numbers))
             + "."]
    if amp.rmsd_per_particle is not None:
        lines.append(f"Atomic RMSD to the true conformations: {_spread(amp.rmsd_per_particle)} Å "
                     f"(median {np.median(amp.rmsd_per_particle):.2f} Å).")
    if pose is None and particles.hasAlignmentProj() and truth.hasAlignmentProj():
        lines.append("Poses: those of the input particles (copied, not estimated).")
    if pose is not None:
        text = f"Angular error {pose.angular_mean:.2f}° (median {pose.angular_median:.2f}°)"
        if pose.shift is not None:
            text += f", shift error {pose.shift_mean:.2f} px (median {pose.shift_median:.2f} px)"
        lines.append(text + ".")
    return lines


# ----------------------------------------------------------------------------- text for Scipion

#: What the per-particle attributes of this plugin's protocols mean, with units (colour-bar labels).
ATTRIBUTE_LABELS = {convert.SCORE_ATTR: "HEMNMA score (normalised cross-correlation)",
                    convert.RELIABILITY_ATTR: "Pose reliability (probability of a pose within 10°)",
                    "_cfdlMahalanobis": "Outlier distance (Mahalanobis, σ)"}


def literal(name: str) -> str:
    """``name`` (e.g. an attribute such as '_flexdl_zFlexStd') as fixed-width text that Scipion's
    summary markup shows as written (its ``_x_`` italic and ``*x*`` bold leave ``'''x'''`` alone)."""
    return f"'''{name}'''"


# ----------------------------------------------------------------------------- training

#: The network is "much worse" than HEMNMA when its error is more than this many times HEMNMA's.
MUCH_WORSE = 3.0

#: How the phases of a training run read for users (TrainConfig.data -> {phase: name}).
PHASE_NAMES = {"particles": {"particles": "particles"},
               "simulated": {"simulated": "simulated"},
               "simulated+finetune": {"simulated": "simulated", "particles": "fine-tuning"}}

#: Columns of the metrics table: (metrics.csv column, header with unit, format).
METRICS_TABLE_COLUMNS = (("epoch", "Epoch", "{:.0f}"), ("phase", "Phase", "{}"),
                         ("train_loss", "Training loss", "{:.4g}"), ("val_loss", "Validation loss", "{:.4g}"),
                         ("val_mae", "Validation MAE (Å)", "{:.2f}"), ("val_angle_deg", "Validation angle (°)",
                                                                        "{:.2f}"),
                         ("val_shift_px", "Validation shift (px)", "{:.2f}"), ("lr", "Learning rate", "{:.2e}"),
                         ("images_per_s", "Images/s", "{:.0f}"), ("seconds", "Time (s)", "{:.1f}"))


def _number(row, key) -> float:
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        return float("nan")


def training_phases(rows: Sequence[dict], data: str, epochs: int) -> List[str]:
    """The phase of every metrics row, as users read it ('simulated', 'fine-tuning' or
    'particles'): the row's ``phase`` column, else (a metrics.csv of 0.2) epochs up to
    ``epochs`` in the first phase. data: the run's ``TrainConfig.data``."""
    names = PHASE_NAMES.get(data, {})
    first = "particles" if data == "particles" else "simulated"
    out = []
    for r in rows:
        source = r.get("phase") or (first if int(_number(r, "epoch")) <= epochs else "particles")
        out.append(names.get(source, source))
    return out


def metrics_table(rows: Sequence[dict], phases: Sequence[str]) -> tuple:
    """``(header, rows)`` of the metrics for a table: the columns of :data:`METRICS_TABLE_COLUMNS`
    that the rows have, with units and a sensible precision, the phase of each row."""
    present = [c for c in METRICS_TABLE_COLUMNS if c[0] == "phase" or any(c[0] in r for r in rows)]
    table = []
    for r, phase in zip(rows, phases):
        cells = []
        for key, _, fmt in present:
            if key == "phase":
                cells.append(phase)
            else:
                v = _number(r, key)
                cells.append("–" if v != v else fmt.format(v))
        table.append(cells)
    return [c[1] for c in present], table


def training_summary_lines(rows: Sequence[dict], phases: Sequence[str], kept_epoch: int) -> List[str]:
    """Plain-words lines on a training run: the epochs of each phase, the epoch whose weights
    the model keeps (lowest validation loss, ``kept_epoch``) and its validation MAE (Å), and
    whether fine-tuning improved the validation error. rows: metrics rows (strings or numbers)."""
    if not rows:
        return ["Not trained yet."]
    by_epoch = {int(_number(r, "epoch")): (r, p) for r, p in zip(rows, phases)}
    kept, kept_phase = by_epoch[int(kept_epoch)]
    spans = OrderedDict()
    for r, p in zip(rows, phases):
        spans.setdefault(p, []).append(int(_number(r, "epoch")))
    described = {"simulated": "simulated training", "fine-tuning": "fine-tuning on the particles' amplitudes",
                 "particles": "training on the particles' amplitudes"}
    lines = [f"{len(rows)} epochs: " + ", then ".join(
        f"{described.get(p, p)} (epoch{f's {min(e)}-{max(e)}' if len(e) > 1 else f' {e[0]}'})"
        for p, e in spans.items()) + "."]
    where = {"simulated": "of the simulated training", "fine-tuning": "of the fine-tuning"}.get(kept_phase, "")
    kept_text = f"epoch {int(kept_epoch)}" + (f" {where}" if len(spans) > 1 else "")
    lines.append(f"The model keeps the weights of {kept_text} (lowest validation loss): validation MAE "
                 f"{_number(kept, 'val_mae'):.1f} Å (mean absolute amplitude error on the validation images).")
    if "simulated" in spans and "fine-tuning" in spans:
        def best_of(phase):
            return min((r for r, p in zip(rows, phases) if p == phase), key=lambda r: _number(r, "val_loss"))
        before, after = best_of("simulated"), best_of("fine-tuning")
        if kept_phase == "simulated":
            lines.append(f"Fine-tuning on the particles' amplitudes did not improve the validation error "
                         f"({_number(before, 'val_mae'):.1f} -> {_number(after, 'val_mae'):.1f} Å at best); "
                         f"the weights kept are those of {kept_text}.")
        else:
            lines.append(f"Fine-tuning on the particles' amplitudes lowered the validation error "
                         f"({_number(before, 'val_mae'):.1f} -> {_number(after, 'val_mae'):.1f} Å); the weights "
                         f"kept are those of {kept_text}.")
    return lines


def hemnma_error(particles, project) -> Optional[float]:
    """Mean absolute amplitude error (Å, over particles and modes) of the HEMNMA amplitudes
    ``particles`` against the ground truth found upstream of them in ``project``; None when
    they are not HEMNMA's or no truth is found."""
    if particles is None or project is None or flex_source(particles) != convert.SOURCE_HEMNMA:
        return None
    truth = related_sets(particles, project).truth
    if truth is None:
        return None
    try:
        (amp, _), = error_reports(truth, [particles]).values()
    except ValueError:
        return None
    return float(amp.abs_errors.mean())


def network_warning(network_error: Optional[float], hemnma: Optional[float], what: str) -> List[str]:
    """A summary line warning that the network is much worse than HEMNMA (its error ``network_error``
    Å, described by ``what``, above :data:`MUCH_WORSE` times HEMNMA's error ``hemnma`` Å against the
    ground truth); [] when either is unknown or the network is not much worse."""
    if network_error is None or hemnma is None or not network_error > MUCH_WORSE * hemnma:
        return []
    ratio = f"{network_error / hemnma:.0f}x" if hemnma > 0 else "far above"
    return [f"*Warning*: {what} ({network_error:.1f} Å) is {ratio} HEMNMA's error against the ground truth "
            f"({hemnma:.1f} Å): on these particles the network is much less accurate than HEMNMA. Prefer "
            f"HEMNMA's amplitudes, or use the network only as a first answer for the HEMNMA alignment "
            f"('Network for a first answer')."]


def prediction_warning(predicted, project, training_particles=None) -> List[str]:
    """:func:`network_warning` for a set of amplitudes predicted by the network: its error
    against the ground truth found in ``project``, beside HEMNMA's (a HEMNMA set of the same
    particles in the project, else the network's HEMNMA ``training_particles``); [] when
    either is unknown."""
    if project is None:
        return []
    related = related_sets(predicted, project)
    if related.truth is None:
        return []
    try:
        (amp, _), = error_reports(related.truth, [predicted]).values()
    except ValueError:
        return []
    hemnma = next((s for s, _, _ in related.overlays if flex_source(s) == convert.SOURCE_HEMNMA), None)
    error = hemnma_error(hemnma, project) if hemnma is not None else None
    if error is None:
        error = hemnma_error(training_particles, project)
    return network_warning(float(amp.abs_errors.mean()), error, "DeepHEMNMA's error against the ground truth")
