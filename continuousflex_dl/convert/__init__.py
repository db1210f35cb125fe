"""The one place that translates between Scipion objects and core arrays/files."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pyworkflow.object as pwobj
from pwem.objects import (AtomStruct, CTFModel, FlexInfo, NormalMode, ParticleFlex, SetOfAtomStructs,
                          SetOfNormalModes, Transform)

from ..core.imaging.ctf import CTFParams
from ..core.imaging.stacks import check_stack, stack_format
from ..core.imaging.geometry import pose_to_scipion_matrix, scipion_matrix_to_pose
from ..core.modes.nma import NormalModes, first_flexible_modes, read_mode_files
from ..core.imaging.structure import Atoms, load_atoms, read_atoms_plain

logger = logging.getLogger(__name__)

#: Extra attributes this plugin stores on Scipion objects (one place for their names).
ATTR_EIGENVALUE = "_cfdlEigenvalue"
ATTR_ANIMATION = "_cfdlAnimation"


def mode_score(modes: NormalModes) -> np.ndarray:
    """ContinuousFlex-style score in [0, 1] (lower is better): the mean of a mode's rank
    by frequency and its rank by decreasing collectivity, divided by the mode count."""
    k = modes.n_modes
    rank_freq = np.argsort(np.argsort(modes.eigenvalues))
    rank_coll = np.argsort(np.argsort(-modes.collectivity))
    return (rank_freq + rank_coll + 2) / (2.0 * k)


def fill_normal_modes(out: SetOfNormalModes, modes: NormalModes, mode_files: Sequence[str],
                      enabled: np.ndarray, animations: Optional[Sequence[str]] = None) -> None:
    """Append one NormalMode per mode (id = mode number) to ``out``."""
    scores = mode_score(modes)
    for k in range(modes.n_modes):
        item = NormalMode(modeFile=str(mode_files[k]), collectivity=float(modes.collectivity[k]),
                          score=float(scores[k]))
        item.setObjId(k + 1)
        item.setEnabled(bool(enabled[k]))
        setattr(item, ATTR_EIGENVALUE, pwobj.Float(float(modes.eigenvalues[k])))
        setattr(item, ATTR_ANIMATION, pwobj.String(animations[k] if animations else ""))
        out.append(item)


def modes_table(modes_set: SetOfNormalModes) -> List[dict]:
    """Rows (number, eigenvalue, collectivity, score, enabled, file, animation) of a SetOfNormalModes."""
    rows = []
    for item in modes_set.iterItems(orderBy="id"):
        eig = getattr(item, ATTR_EIGENVALUE, None)
        anim = getattr(item, ATTR_ANIMATION, None)
        rows.append(dict(number=item.getObjId(), eigenvalue=eig.get() if eig is not None else None,
                         collectivity=item.getCollectivity(), score=item.getScore(),
                         enabled=item.isEnabled(), file=item.getModeFile(),
                         animation=anim.get() if anim is not None else ""))
    return rows


def enabled_mode_numbers(modes_set: SetOfNormalModes, first: int = 7) -> List[int]:
    """Numbers of the enabled modes from ``first`` on."""
    return [r["number"] for r in modes_table(modes_set) if r["enabled"] and r["number"] >= first]


#: How many modes a protocol uses when its mode list is left empty.
DEFAULT_MODE_COUNT = 3
DEFAULT_MODES_HELP = (f"Empty: the first {DEFAULT_MODE_COUNT} enabled non-rigid modes of the input "
                      f"(usually 7-9); the summary says which.")


def default_mode_numbers(modes_set: SetOfNormalModes) -> List[int]:
    """The mode list of a protocol whose mode field is empty: the first
    :data:`DEFAULT_MODE_COUNT` enabled non-rigid modes (e.g. [7, 8, 9])."""
    return enabled_mode_numbers(modes_set)[:DEFAULT_MODE_COUNT]


def read_mode_vectors(modes_set: SetOfNormalModes, mode_numbers: Sequence[int]) -> np.ndarray:
    """The chosen modes (K, N, 3) of a SetOfNormalModes, from their files only (the
    structure is not parsed, so this works where ProDy cannot be imported, as in the
    GUI under ``python -O``). Raises ValueError with the fix if a mode does not exist."""
    files = {r["number"]: r["file"] for r in modes_table(modes_set)}
    missing = [n for n in mode_numbers if n not in files]
    if missing:
        raise ValueError(f"Modes {missing} are not in the set (it has modes 1-{max(files)}).")
    vectors = [read_mode_files([files[n]])[0] for n in mode_numbers]
    if len({v.shape for v in vectors}) > 1:
        raise ValueError("The mode files have different numbers of atoms: recompute the normal modes.")
    return np.stack(vectors)


def read_modes(modes_set: SetOfNormalModes, mode_numbers: Sequence[int]) -> Tuple[Atoms, np.ndarray]:
    """The structure and the chosen modes (K, N, 3) of a SetOfNormalModes.

    Raises ValueError with the fix if the set has no structure, a mode number
    does not exist, or the mode files do not match the structure.
    """
    structure = modes_set.getPdb()
    if structure is None:
        raise ValueError("The normal modes have no atomic structure attached; "
                         "compute them with the NMA protocol of this plugin.")
    atoms = load_atoms(structure.getFileName(), "all")
    vectors = read_mode_vectors(modes_set, mode_numbers)
    if vectors.shape[1] != atoms.n_atoms:
        raise ValueError(f"The mode files have {vectors.shape[1]} atoms, the structure {atoms.n_atoms}. "
                         "The modes do not match the structure: recompute them on this structure.")
    return atoms, vectors


def read_modes_plain(modes_set: SetOfNormalModes, mode_numbers: Sequence[int]) -> Tuple[Atoms, np.ndarray]:
    """:func:`read_modes` without ProDy (for viewers in the Scipion GUI, which runs under
    ``python -O`` where ProDy cannot be imported): all ATOM/HETATM records of the structure
    (:func:`structure.read_atoms_plain`, no atom group) and the modes (K, N, 3)."""
    structure = modes_set.getPdb()
    if structure is None:
        raise ValueError("The normal modes have no atomic structure attached; "
                         "compute them with the NMA protocol of this plugin.")
    atoms = read_atoms_plain(structure.getFileName())
    vectors = read_mode_vectors(modes_set, mode_numbers)
    if vectors.shape[1] != atoms.n_atoms:
        raise ValueError(f"The mode files have {vectors.shape[1]} atoms, the structure {atoms.n_atoms} "
                         f"ATOM/HETATM records. The modes do not match the structure: recompute them on it.")
    return atoms, vectors


def parse_mode_list(text: str) -> List[int]:
    """'7-9, 12' -> [7, 8, 9, 12]. Raises ValueError on malformed text."""
    numbers: List[int] = []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                numbers.extend(range(lo, hi + 1))
            else:
                numbers.append(int(part))
        except ValueError:
            raise ValueError(f"Cannot read the mode list {text!r}: use numbers and ranges like '7-9, 12'.")
    if not numbers:
        raise ValueError("The mode list is empty: give mode numbers like '7-9'.")
    return numbers


# ----------------------------- particles -----------------------------------------
FLEX_PROG_NAME = "continuousflex_dl"
#: Particle attribute of the standard deviation (Å) of each amplitude, a list in the order of
#: zFlex (HEMNMA's Laplace uncertainty), for other tools to read.
ZFLEX_STD_ATTR = "_flexdl_zFlexStd"
#: Particle attribute of the pose reliability: the calibrated probability (0-1) that HEMNMA's
#: pose is within 10° of the truth (core.hemnma.reliability).
RELIABILITY_ATTR = "_flexdl_poseReliability"
#: Particle attribute of HEMNMA's score (normalised cross-correlation of the fitted model).
SCORE_ATTR = "_cfdlScore"
#: Where zFlex amplitudes came from (FlexInfo attribute ``amplitudeSource``).
SOURCE_GROUND_TRUTH, SOURCE_HEMNMA, SOURCE_NETWORK = "ground truth", "HEMNMA", "DeepHEMNMA"


@dataclass
class ParticleArrays:
    """Core-side view of a SetOfParticles (arrays in the set's iteration order).

    ids: (M,) Scipion ids; stacks: M stack paths; indices: (M,) 0-based stack indices;
    pixel_size Å/px; box px; amplitudes (M, K) Å or None; mode_numbers of the amplitudes;
    angles (M, 3) deg and shifts (M, 2) px or None; ctf: CTFParams (M) or None;
    amplitude_std: (M, K) Å, the uncertainty of the amplitudes (:data:`ZFLEX_STD_ATTR`) or None;
    reliability: (M,) the pose reliability (:data:`RELIABILITY_ATTR`) or None.
    """
    ids: np.ndarray
    stacks: List[str]
    indices: np.ndarray
    pixel_size: float
    box: int
    amplitudes: Optional[np.ndarray] = None
    mode_numbers: Optional[List[int]] = None
    angles: Optional[np.ndarray] = None
    shifts: Optional[np.ndarray] = None
    ctf: Optional[CTFParams] = None
    amplitude_std: Optional[np.ndarray] = None
    reliability: Optional[np.ndarray] = None

    def amplitude_modes(self) -> List[int]:
        """The mode numbers of the K amplitude columns: the set's (FlexInfo), else the first
        K non-rigid modes (core.modes.nma.first_flexible_modes: 7, 8, ...)."""
        if self.amplitudes is None:
            raise ValueError("The particles carry no normal-mode amplitudes.")
        return self.mode_numbers or first_flexible_modes(self.amplitudes.shape[1])


def flex_info(mode_numbers: Sequence[int], source: str) -> FlexInfo:
    """FlexInfo naming the modes of zFlex and where the amplitudes came from."""
    info = FlexInfo(FLEX_PROG_NAME)
    info.setAttr("modes", [int(m) for m in mode_numbers])
    info.setAttr("amplitudeSource", source)
    return info


def flex_mode_numbers(particles) -> Optional[List[int]]:
    """Mode numbers named by a SetOfParticlesFlex's FlexInfo, or None."""
    info = particles.getFlexInfo() if hasattr(particles, "getFlexInfo") else None
    if info is None or not hasattr(info, "modes"):
        return None
    value = info.getAttr("modes")  # a CsvList stores "7,8,9"
    return [int(m) for m in str(value).split(",") if m.strip()]


def particles_mode_numbers(particles) -> List[int]:
    """Mode numbers of a SetOfParticlesFlex of this plugin (ValueError if it names none)."""
    numbers = flex_mode_numbers(particles)
    if not numbers:
        raise ValueError("The particles do not name their normal modes (FlexInfo 'modes'): use "
                         "the output of a protocol of this plugin.")
    return numbers


def flex_source(particles) -> str:
    """Where a set's amplitudes came from (FlexInfo ``amplitudeSource``), or ''."""
    info = particles.getFlexInfo() if hasattr(particles, "getFlexInfo") else None
    if info is None or not hasattr(info, "amplitudeSource"):
        return ""
    return str(info.getAttr("amplitudeSource") or "")


def read_particles(particles, need_amplitudes: bool = False) -> ParticleArrays:
    """Arrays of a SetOfParticles (or SetOfParticlesFlex). Raises ValueError with the fix
    for an empty set, or missing amplitudes when ``need_amplitudes``."""
    n = particles.getSize()
    if not n:
        raise ValueError("The input set of particles is empty.")
    acq = particles.getAcquisition()
    has_ctf = particles.hasCTF()
    has_pose = particles.hasAlignmentProj()
    ids, stacks, indices, zflex, mats, ctf, zstd, rel = [], [], [], [], [], [], [], []
    for p in particles.iterItems(orderBy="id"):
        ids.append(p.getObjId())
        index, path = p.getLocation()
        stacks.append(path)
        indices.append((index or 1) - 1)
        if hasattr(p, "getZFlex"):
            zflex.append(p.getZFlex())
        if hasattr(p, ZFLEX_STD_ATTR):
            zstd.append([float(v) for v in getattr(p, ZFLEX_STD_ATTR)])
        if hasattr(p, RELIABILITY_ATTR):
            rel.append(float(getattr(p, RELIABILITY_ATTR)))
        if has_pose and p.hasTransform():
            mats.append(p.getTransform().getMatrix())
        if has_ctf:
            ctf.append(_ctf_row(p.getCTF()))
    out = ParticleArrays(ids=np.array(ids), stacks=stacks, indices=np.array(indices),
                         pixel_size=float(particles.getSamplingRate()), box=int(particles.getXDim()))
    if zflex and len(zflex) == n and all(len(z) for z in zflex):
        out.amplitudes = np.stack(zflex)
        out.mode_numbers = flex_mode_numbers(particles)
    if need_amplitudes and out.amplitudes is None:
        raise ValueError("The particles carry no normal-mode amplitudes: use the output of the "
                         "HEMNMA alignment or of the synthesis protocol of this plugin.")
    if out.amplitudes is not None and len(zstd) == n and all(len(z) == out.amplitudes.shape[1] for z in zstd):
        out.amplitude_std = np.array(zstd, dtype=float)
    if len(rel) == n:
        out.reliability = np.array(rel)
    if len(mats) == n:
        out.angles, out.shifts = scipion_matrix_to_pose(np.stack(mats))
    if len(ctf) == n:
        out.ctf = read_ctf(acq, ctf)
    return out


# ----------------------------- image files ----------------------------------------
def _pwem_reader(path: str):
    """pwem's image reader for ``path`` (by extension; pwem falls back to Xmipp's)."""
    from pwem.emlib.image.image_readers import ImageReadersRegistry
    return ImageReadersRegistry.getReader(path)


def _unreadable(path: str, exc: BaseException) -> ValueError:
    ext = os.path.splitext(path)[1] or "(no extension)"
    reason = f"{type(exc).__name__}: {str(exc).rstrip('.')}" if str(exc) else type(exc).__name__
    return ValueError(f"{path}: Scipion's image library cannot read {ext} files here ({reason}). This plugin "
                      f"reads MRC and SPIDER stacks directly and converts TIFF, EM, DM3/DM4 and the other "
                      f"formats pwem reads without Xmipp; convert the particles to an MRC stack (e.g. with "
                      f"Scipion's 'xmipp3 - crop/resize particles' or EMAN's e2proc2d.py) and import that.")


def stack_error(path: str) -> Optional[str]:
    """Why the particle file ``path`` cannot be read, or None: for MRC and SPIDER stacks the
    checks of core.imaging.stacks.check_stack (missing, damaged header, truncated), for other
    formats whether the file opens through the reader :func:`native_stacks` uses (a pwem reader
    that cannot read one image at a time reads the whole file)."""
    if stack_format(path):
        try:
            check_stack(path)
        except ValueError as exc:
            return str(exc)
        return None
    if not os.path.exists(path):
        return f"Particle stack not found: {path}"
    try:
        close = _image_reader(path)[2]
    except Exception as exc:  # any reader failure is the reason the user needs
        return str(_unreadable(path, exc))
    close()
    return None


def _is_tiff(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in (".tif", ".tiff")


def _read_whole(reader, path: str) -> np.ndarray:
    """All images of a file (M, ny, nx) through a pwem reader that cannot read one image at a time."""
    data = np.asarray(reader.open(path))
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected 2D images, the file holds an array of shape {data.shape}.")
    return data


def _image_reader(path: str):
    """``(read, (images, ny, nx), close)`` of a non-native file: ``read(i)`` gives image ``i``
    (0-based) as (ny, nx). TIFF page by page (tifffile, what pwem's TIFF reader uses; pwem's
    reads only the first page of a stack), formats whose pwem reader opens one image at a
    time image by image, the others one file at a time."""
    if _is_tiff(path):
        import tifffile
        tif = tifffile.TiffFile(path)
        shape = tif.pages[0].shape
        return (lambda i: tif.pages[i].asarray()), (len(tif.pages), int(shape[0]), int(shape[1])), tif.close
    reader = _pwem_reader(path)
    if reader.canOpenSlices():
        first = np.asarray(reader.openSlice(path, 1))
        n = int(reader.getDimensions(path)[3])
        return (lambda i: reader.openSlice(path, i + 1)), (n, first.shape[0], first.shape[1]), lambda: None
    data = _read_whole(reader, path)
    return (lambda i: data[i]), data.shape, lambda: None


def native_stacks(parts: "ParticleArrays", folder: str, log=logger.info) -> List[str]:
    """Make every image of ``parts`` readable by core: images in a format other than MRC or
    SPIDER are copied, once, into MRC stacks in ``folder`` (only the images the set uses, one
    image in memory at a time; a stack written before for the same file and images is reused),
    and ``parts.stacks`` / ``parts.indices`` point to the copies. Returns one line per file
    converted (also sent to ``log``). ValueError with the reason (from pwem's reader) and the
    fix for a file Scipion's image library cannot read here."""
    import hashlib
    import mrcfile
    done: List[str] = []
    paths = np.array(parts.stacks, dtype=object)
    for path in sorted({p for p in parts.stacks if not stack_format(p)}):
        rows = np.flatnonzero(paths == path)
        used = np.unique(parts.indices[rows])
        stat = os.stat(path) if os.path.exists(path) else None
        if stat is None:
            raise ValueError(f"Particle stack not found: {path}")
        key = hashlib.sha1(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{used.tolist()}"
                           .encode()).hexdigest()[:10]
        target = os.path.join(folder, f"{os.path.splitext(os.path.basename(path))[0]}_{key}.mrcs")
        if not os.path.exists(target):
            try:
                read, (n, ny, nx), close = _image_reader(path)
            except Exception as exc:
                raise _unreadable(path, exc) from None
            try:
                if used[-1] >= n:
                    raise ValueError(f"{path} holds {n} images but the set uses image {used[-1] + 1}: import "
                                     f"the particles again.")
                os.makedirs(folder, exist_ok=True)
                tmp = target + ".part"
                with mrcfile.new_mmap(tmp, shape=(len(used), ny, nx), mrc_mode=2, overwrite=True) as mrc:
                    for k, i in enumerate(used):
                        mrc.data[k] = np.asarray(read(int(i)), dtype=np.float32)
                    mrc.voxel_size = parts.pixel_size
                    mrc.header.ispg = 0
                os.replace(tmp, target)
            finally:
                close()
            line = (f"Converted {len(used)} images of {path} ({os.path.splitext(path)[1]}) into the MRC "
                    f"stack {target}.")
        else:
            line = f"Reused {target}: the MRC copy of {len(used)} images of {path}."
        log(line)
        done.append(line)
        new_index = {int(i): k for k, i in enumerate(used)}
        for r in rows:
            parts.stacks[r] = target
            parts.indices[r] = new_index[int(parts.indices[r])]
    return done


# One CTF end to end: Scipion's CTFModel (per particle) + Acquisition (per set) <-> CTFParams.
#: Acquisition values Scipion leaves unset are read as these (a 300 kV microscope).
DEFAULT_ACQUISITION = {"voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1}


def _ctf_row(model: CTFModel) -> Tuple[float, float, float, float]:
    """(defocusU Å, defocusV Å, defocusAngle deg, phaseShift deg) of one CTFModel."""
    return (model.getDefocusU(), model.getDefocusV(), model.getDefocusAngle(),
            model.getPhaseShift() or 0.0)


def read_ctf(acquisition, rows: Sequence[Tuple[float, float, float, float]]) -> CTFParams:
    """CTFParams (B = len(rows)) from a set's Acquisition and its particles' CTF rows."""
    d = np.array(rows, dtype=float).reshape(-1, 4)
    values = (acquisition.getVoltage(), acquisition.getSphericalAberration(),
              acquisition.getAmplitudeContrast())
    # Unset values are None (a voltage of 0 too); a Cs of 0 mm is a Cs-corrected microscope.
    voltage, cs, q = (float(v) if v is not None and (v or k != "voltage") else DEFAULT_ACQUISITION[k]
                      for v, k in zip(values, DEFAULT_ACQUISITION))
    return CTFParams(defocus_u=d[:, 0], defocus_v=d[:, 1], defocus_angle=d[:, 2], voltage=voltage, cs=cs,
                     amplitude_contrast=q, phase_shift=d[:, 3])


def ctf_model(ctf: CTFParams, i: int) -> CTFModel:
    """The CTFModel of image ``i`` of ``ctf`` (the inverse of :func:`read_ctf` per particle)."""
    model = CTFModel(defocusU=float(ctf.column("defocus_u")[i]), defocusV=float(ctf.column("defocus_v")[i]),
                     defocusAngle=float(ctf.column("defocus_angle")[i]))
    model.setPhaseShift(float(ctf.column("phase_shift")[i]))
    return model


def set_acquisition(out, pixel_size: float, ctf: Optional[CTFParams]) -> None:
    """Sampling rate, acquisition (from ``ctf``, or :data:`DEFAULT_ACQUISITION` without one)
    and CTF flag of a new set of particles. A set has one acquisition: its images share voltage,
    Cs and amplitude contrast."""
    values = dict(DEFAULT_ACQUISITION)
    if ctf is not None:
        for name in values:
            column = ctf.column(name)
            if np.ptp(column) > 0:
                raise ValueError(f"The images have different {name} values; a Scipion set has one "
                                 "acquisition: split them into one set per value.")
            values[name] = float(column[0])
    out.setSamplingRate(pixel_size)
    acq = out.getAcquisition()
    acq.setVoltage(values["voltage"])
    acq.setSphericalAberration(values["cs"])
    acq.setAmplitudeContrast(values["amplitude_contrast"])
    acq.setMagnification(50000)
    out.setHasCTF(ctf is not None)


def fill_synthetic_particles(out, result, source: str = SOURCE_GROUND_TRUTH) -> None:
    """Append the particles of a core SynthesisResult to a SetOfParticlesFlex ``out``
    (location, CTF, ALIGN_PROJ Transform, zFlex) and set its FlexInfo."""
    set_acquisition(out, result.pixel_size, result.ctf)
    out.setAlignmentProj()
    out.setFlexInfo(flex_info(result.mode_numbers, source))
    matrices = result.scipion_matrices()
    for i in range(result.n_images):
        p = ParticleFlex(progName=FLEX_PROG_NAME)
        p.setLocation(i + 1, result.stack_path)
        p.setTransform(Transform(matrices[i]))
        p.setZFlex(result.amplitudes[i].tolist())
        if result.ctf is not None:
            p.setCTF(ctf_model(result.ctf, i))
        out.append(p)


def fill_atom_structs(out: SetOfAtomStructs, files: Sequence[str], ids: Optional[Sequence[int]] = None) -> None:
    """Append one AtomStruct per PDB file, with ids ``ids`` (default 1..F, in order)."""
    ids = range(1, len(files) + 1) if ids is None else ids
    for i, path in zip(ids, files):
        item = AtomStruct(filename=str(path))
        item.setObjId(int(i))
        out.append(item)


def fill_flex_particles(out, particles, ids: np.ndarray, amplitudes: np.ndarray,
                        mode_numbers: Sequence[int], source: str, angles: Optional[np.ndarray] = None,
                        shifts: Optional[np.ndarray] = None, extra: Optional[dict] = None) -> None:
    """Copy the particles ``ids`` of ``particles`` into the SetOfParticlesFlex ``out`` with
    new amplitudes (M, K) Å, optionally new poses (angles (M, 3) deg, shifts (M, 2) px), and
    per-particle extra attributes ``{name: (M,) values}`` (Float: scores, distances) or
    ``{name: (M, K) values}`` (a list of K floats: e.g. :data:`ZFLEX_STD_ATTR`)."""
    out.copyInfo(particles)
    # pwem's SetOfParticlesFlex.copyInfo skips SetOfParticles.copyInfo, which copies the CTF flag:
    # without this line a flex copy of particles with CTFs says it has none.
    out.setHasCTF(particles.hasCTF())
    out.setFlexInfo(flex_info(mode_numbers, source))
    if angles is not None:
        out.setAlignmentProj()
        matrices = pose_to_scipion_matrix(angles, shifts)
    row = {int(i): k for k, i in enumerate(ids)}
    for p in particles.iterItems(orderBy="id"):
        k = row.get(p.getObjId())
        if k is None:
            continue
        q = ParticleFlex(progName=FLEX_PROG_NAME)
        q.copyInfo(p)
        q.setObjId(p.getObjId())
        if angles is not None:
            q.setTransform(Transform(matrices[k]))
        q.setZFlex(np.asarray(amplitudes[k], dtype=float).tolist())
        for name, values in (extra or {}).items():
            value = np.asarray(values[k], dtype=float)
            if value.ndim:
                attr = pwobj.CsvList(pType=float)
                attr.set(value.tolist())
            else:
                attr = pwobj.Float(float(value))
            setattr(q, name, attr)
        out.append(q)
