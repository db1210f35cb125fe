"""One 3-D map per group of particles (clusters, path points) for the landscape protocols.

:class:`GroupMapsMixin` gives a protocol the form parameters, the step and the output
(a ``SetOfVolumes``, id = group number) and a summary; the protocol says what its groups
are by defining ``_mapGroups()``. Each map comes with the correlation of every group's
NMA-displaced structure with it, so a user sees which conformation the density shows.
"""
import json

import numpy as np
from pwem.objects import SetOfVolumes, Transform, Volume
from pyworkflow.protocol import params

from .. import convert
from ..core.landscape.reconstruction import FSC_THRESHOLD, centred_origin, model_map_correlation, reconstruct
from ..core.imaging.structure import centre
from ..core.landscape.trajectory import trajectory_frames


class GroupMapsMixin:
    """Maps of particle groups for a protocol with ``inputParticles`` and ``inputModes``.

    The protocol defines ``_mapGroups() -> (numbers (G,), names G str, member (G, M) bool
    over ``ids`` (M,), points (G, K) Å, ids (M,))``: group numbers, file names, which
    particles belong to each group, the amplitudes of the group's structure and the
    particle ids the member columns refer to."""

    def _addGroupMapParams(self, form, what: str):
        form.addSection(label="Maps")
        form.addParam("reconstructMaps", params.BooleanParam, default=False,
                      label=f"Reconstruct a map per {what}?",
                      help=f"Yes: one 3-D map per {what} from its particles' poses and CTFs (direct Fourier "
                           "inversion with two half maps, as the reconstruction protocol), as a set of "
                           "volumes, and the correlation of each displaced structure with each map. "
                           "The particles need 3-D poses (ALIGN_PROJ).")
        form.addParam("mapsCorrectCTF", params.BooleanParam, default=True, condition="reconstructMaps",
                      label="Correct the CTF?",
                      help="Yes: weight each image by its CTF (the particles must carry CTFs). No: only for "
                           "images without CTF.")
        form.addParam("mapsMaskDiameter", params.FloatParam, default=-1.0, condition="reconstructMaps",
                      label="Mask diameter (Å, -1 = automatic)",
                      help="Soft spherical mask of the maps and of their half maps' FSC, in Å. -1 (the "
                           "default) means automatic: the box minus 8 px.")
        self._addDeviceParam(form)

    def _groupMapsFile(self) -> str:
        return self._getExtraPath("group_maps.json")

    def groupMapsStep(self):
        """Reconstruct each group with at least 2 particles; write maps and fits (JSON)."""
        self._logToRunLog()
        numbers, names, member, points, ids = self._mapGroups()
        particles = self._readParticles(self.inputParticles.get())
        if particles.angles is None:
            raise ValueError("The particles have no 3-D poses: set 'Reconstruct a map' to No or align them.")
        row = {int(i): k for k, i in enumerate(particles.ids)}
        mode_numbers = convert.flex_mode_numbers(self.inputParticles.get())
        atoms, modes = convert.read_modes(self.inputModes.get(), mode_numbers)
        structures = trajectory_frames(centre(atoms.coords), modes, points)
        diameter = self.mapsMaskDiameter.get()
        radius = None if diameter <= 0 else diameter / 2.0 / particles.pixel_size
        ctf = particles.ctf if self.mapsCorrectCTF else None
        if self.mapsCorrectCTF and ctf is None:
            raise ValueError("The particles have no CTF: set 'Correct the CTF?' to No or assign CTFs.")
        records = []
        for g, (number, name) in enumerate(zip(numbers, names)):
            idx = np.array([row[int(i)] for i in ids[member[g]] if int(i) in row], dtype=int)
            if len(idx) < 2:
                self.info("Group %d has %d particle(s): no map (two half sets need 2)." % (number, len(idx)))
                continue
            result = reconstruct([(particles.stacks[i], particles.indices[i]) for i in idx],
                                 particles.angles[idx], particles.shifts[idx], particles.pixel_size,
                                 None if ctf is None else ctf.select(idx), mask_radius_px=radius,
                                 device=self._getDevice())
            paths = result.write(self._getExtraPath("maps"), name)
            mask = result.mask()
            fits = [model_map_correlation(s, result.volume, result.pixel_size, result.resolution,
                                          atoms.sigma, atoms.weights, mask) for s in structures]
            records.append({"number": int(number), "particles": int(len(idx)), "resolution": result.resolution,
                            "fits": {str(int(n)): float(f) for n, f in zip(numbers, fits)}, **paths})
            self.info("Map of group %d: %d particles, %.2f Å at FSC %g, fit of its structure %.3f" %
                      (number, len(idx), result.resolution, FSC_THRESHOLD, fits[g]))
        with open(self._groupMapsFile(), "w") as f:
            json.dump(records, f, indent=1)

    def _groupMapRecords(self) -> list:
        try:
            with open(self._groupMapsFile()) as f:
                return json.load(f)
        except OSError:
            return []

    def _createGroupMapsOutput(self):
        records = self._groupMapRecords()
        if not records:
            return
        particles = self.inputParticles.get()
        pixel = particles.getSamplingRate()
        maps = SetOfVolumes(filename=self._getPath("group_maps.sqlite"))
        maps.setSamplingRate(pixel)
        for r in records:
            volume = Volume(location=r["map"])
            volume.setObjId(r["number"])
            volume.setSamplingRate(pixel)
            origin = Transform()
            origin.setShifts(*centred_origin(particles.getXDim(), pixel))
            volume.setOrigin(origin)
            volume.setHalfMaps([r["half1"], r["half2"]])
            maps.append(volume)
        self._defineOutputs(outputMaps=maps)
        self._defineSourceRelation(self.inputParticles, maps)

    def _validateGroupMaps(self) -> list:
        particles = self.inputParticles.get()
        if not self.reconstructMaps or particles is None:
            return []
        if not particles.hasAlignmentProj():
            return ["The particles have no 3-D poses (ALIGN_PROJ) for the maps: set 'Reconstruct a map' "
                    "to No, or use particles aligned by HEMNMA or a refinement."]
        if self.mapsCorrectCTF and not particles.hasCTF():
            return ["The particles have no CTF: set 'Correct the CTF?' (Maps) to No, or assign CTFs."]
        return []

    def _groupMapsSummary(self) -> list:
        records = self._groupMapRecords()
        if not records:
            return []
        lines = ["Maps (outputMaps, id = group number; fit = correlation of the displaced structure "
                 "with the map, low-passed at its resolution):"]
        for r in records:
            best = max(r["fits"], key=r["fits"].get)
            lines.append(f"  group {r['number']}: {r['particles']} particles, {r['resolution']:.2f} Å at FSC "
                         f"{FSC_THRESHOLD}, fit of its structure {r['fits'][str(r['number'])]:.3f}"
                         + ("" if best == str(r["number"]) else
                            f" (structure {best} fits better: {r['fits'][best]:.3f})"))
        return lines
