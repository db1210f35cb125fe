"""The Scipion side of the exports for other tools (see :mod:`.core.landscape.export`).

What a SetOfParticlesFlex holds beyond :func:`.convert.read_particles`: RELION optics groups,
image names as Xmipp and RELION read them, and ContinuousFlex's particle attributes
``_xmipp_nmaDisplacements`` and ``_xmipp_cost``. Every function lists particles in id order, the order of
:func:`.convert.read_particles`.
"""
from __future__ import annotations

import io
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyworkflow.object as pwobj

from .. import convert
from ..core.landscape.export import write_latent, write_relion31_star, write_xmipp_images

#: ContinuousFlex's particle attributes (``setXmippAttributes`` of its HEMNMA alignment:
#: ``_xmipp_`` + the Xmipp label), read by its dimension reduction and landscape viewers.
XMIPP_DISPLACEMENTS_ATTR = "_xmipp_nmaDisplacements"
XMIPP_COST_ATTR = "_xmipp_cost"
#: The particle attribute of the optics group of particles imported from RELION 3.1 (what
#: scipion-em-relion's writer reads; default 1).
OPTICS_GROUP_ATTR = "_rlnOpticsGroup"
#: Stack extensions RELION reads as MRC stacks once linked as ``.mrcs``; other formats are
#: converted.
MRC_EXTENSIONS = (".mrc", ".mrcs")
#: The files :func:`export_particles` writes into its folder (one place for their names).
XMIPP_FILE, STAR_FILE, LATENT_FILE, IDS_FILE = "images.xmd", "particles.star", "z.pkl", "particle_ids.txt"
STACK_FOLDER = "Particles"


def export_particles(particles, folder: str, xmipp: bool = True, relion: bool = True, latent: bool = True,
                     cost: Optional[np.ndarray] = None) -> Dict[str, str]:
    """Write a SetOfParticlesFlex into ``folder`` for other tools, its particles in id order in
    every file: :data:`XMIPP_FILE` (ContinuousFlex's images.xmd, with ``cost`` (M,) as its
    ``_cost`` when given), :data:`STAR_FILE` (RELION 3.1, stacks in :data:`STACK_FOLDER`),
    :data:`LATENT_FILE` (cryoDRGN's z) with :data:`IDS_FILE` (the Scipion id of each row).
    Returns ``{file name: what it holds}``. Raises ValueError for a set without amplitudes."""
    parts = convert.read_particles(particles, need_amplitudes=True)
    numbers = parts.amplitude_modes()
    written = {}
    if xmipp:
        write_xmipp_images(os.path.join(folder, XMIPP_FILE), xmipp_image_names(parts.stacks, parts.indices),
                           parts.amplitudes, parts.ids, parts.angles, parts.shifts, cost)
        written[XMIPP_FILE] = (f"Xmipp metadata for ContinuousFlex, _nmaDisplacements of modes {numbers}"
                               + ("" if parts.angles is not None else ", no poses"))
    if relion:
        optics, groups = optics_groups(particles)
        names = relion_image_names(parts.stacks, parts.indices, folder, STACK_FOLDER)
        write_relion31_star(os.path.join(folder, STAR_FILE), names, parts.ids, optics, groups, parts.pixel_size,
                            parts.angles, parts.shifts, parts.ctf, parts.amplitudes, numbers)
        written[STAR_FILE] = (f"RELION 3.1, {len(optics['rlnOpticsGroup'])} optics group(s), "
                              f"{'poses' if parts.angles is not None else 'no poses'}, "
                              f"{'CTF' if parts.ctf is not None else 'no CTF'}, amplitudes of modes {numbers} "
                              f"(_cfdlAmplitudeMode<k>); stacks in {STACK_FOLDER}/")
    if latent:
        logvar = write_latent(os.path.join(folder, LATENT_FILE), parts.amplitudes, parts.amplitude_std)
        np.savetxt(os.path.join(folder, IDS_FILE), parts.ids, fmt="%d")
        written[LATENT_FILE] = (f"cryoDRGN z, {len(parts.ids)} x {len(numbers)} float32 (modes {numbers})"
                                + (" and its log-variance" if logvar else "") + f"; Scipion ids in {IDS_FILE}")
    return written


def optics_groups(particles) -> Tuple[Dict[str, list], np.ndarray]:
    """The RELION optics table ``{label: one value per group}`` and the group number of each
    particle (M,) of a set. The table is the set's own (``opticsGroupInfo`` of its acquisition,
    kept by Scipion's RELION import) with its pixel size and box set to the set's, else one
    group built from the acquisition (:data:`.convert.DEFAULT_ACQUISITION` where unset). The
    group of a particle is its ``_rlnOpticsGroup``, else 1."""
    from emtable import Table
    acq = particles.getAcquisition()
    text = acq.opticsGroupInfo.get() if hasattr(acq, "opticsGroupInfo") else None
    table: Dict[str, list] = {}
    if text:
        rows = Table()
        rows.readStar(io.StringIO(text), tableName="optics")
        for label in rows.getColumnNames():
            table[label] = [getattr(row, label) for row in rows]
    if not table.get("rlnOpticsGroup"):
        values = (acq.getVoltage(), acq.getSphericalAberration(), acq.getAmplitudeContrast())
        voltage, cs, q = (float(v) if v else convert.DEFAULT_ACQUISITION[k]
                          for v, k in zip(values, convert.DEFAULT_ACQUISITION))
        table = {"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnVoltage": [voltage],
                 "rlnSphericalAberration": [cs], "rlnAmplitudeContrast": [q]}
    n_groups = len(table["rlnOpticsGroup"])
    table.setdefault("rlnOpticsGroupName", [f"opticsGroup{g}" for g in table["rlnOpticsGroup"]])
    table["rlnImagePixelSize"] = [float(particles.getSamplingRate())] * n_groups
    table["rlnImageSize"] = [int(particles.getXDim())] * n_groups
    table["rlnImageDimensionality"] = [2] * n_groups
    groups = [int(getattr(p, OPTICS_GROUP_ATTR).get()) if hasattr(p, OPTICS_GROUP_ATTR) else 1
              for p in particles.iterItems(orderBy="id")]
    return table, np.array(groups, dtype=int)


def _stack_file(path: str) -> str:
    """The file of a Scipion image location without a ``:format`` suffix, absolute."""
    from pwem.emlib.image import ImageHandler
    return os.path.abspath(ImageHandler.removeFileType(path))


def xmipp_image_names(stacks: Sequence[str], indices: Sequence[int]) -> List[str]:
    """``index@stack`` names (1-based index, absolute path) as Xmipp reads them: a ``.mrc``
    stack gets Xmipp's ``:mrcs`` suffix (without it Xmipp reads the file as one volume)."""
    names = []
    for stack, i in zip(stacks, indices):
        path = _stack_file(stack)
        suffix = ":mrcs" if path.endswith(".mrc") else ""
        names.append(f"{int(i) + 1:06d}@{path}{suffix}")
    return names


def relion_image_names(stacks: Sequence[str], indices: Sequence[int], star_folder: str,
                       subfolder: str = "Particles") -> List[str]:
    """``index@Particles/<stack>.mrcs`` names relative to ``star_folder``, as RELION and
    Scipion's RELION import read them (RELION refuses absolute paths; ``.mrcs`` marks a stack):
    each MRC stack is linked into ``star_folder/subfolder`` under a ``.mrcs`` name, a stack of
    another format is converted there once (pwem's image library)."""
    from pwem.emlib.image import ImageHandler
    folder = os.path.join(star_folder, subfolder)
    os.makedirs(folder, exist_ok=True)
    names: Dict[str, str] = {}
    for stack in dict.fromkeys(stacks):
        source = _stack_file(stack)
        stem = os.path.splitext(os.path.basename(source))[0]
        name, k = f"{stem}.mrcs", 1
        while name in names.values():
            k += 1
            name = f"{stem}_{k:03d}.mrcs"
        names[stack] = name
        target = os.path.join(folder, name)
        if os.path.lexists(target):
            os.remove(target)
        if source.endswith(MRC_EXTENSIONS):
            os.symlink(source, target)
        else:
            ImageHandler().convertStack(source, target)
    return [f"{int(i) + 1:06d}@{subfolder}/{names[stack]}" for stack, i in zip(stacks, indices)]


def copy_with_xmipp_attributes(out, particles, amplitudes: np.ndarray, cost: Optional[np.ndarray]) -> None:
    """Copy the particles of ``particles`` (id order) into ``out`` with ContinuousFlex's
    attributes: :data:`XMIPP_DISPLACEMENTS_ATTR` (the amplitudes (M, K) Å as the list of
    strings its protocols join and parse) and, when given, :data:`XMIPP_COST_ATTR` (M,)."""
    out.copyInfo(particles)
    for k, p in enumerate(particles.iterItems(orderBy="id")):
        q = p.clone()
        displacements = pwobj.CsvList()
        displacements.set([repr(float(v)) for v in amplitudes[k]])
        setattr(q, XMIPP_DISPLACEMENTS_ATTR, displacements)
        if cost is not None:
            setattr(q, XMIPP_COST_ATTR, pwobj.Float(float(cost[k])))
        out.append(q)
