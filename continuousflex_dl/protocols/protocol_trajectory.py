"""Trajectories in the space of normal-mode amplitudes -> displaced structures."""
import re

import numpy as np
from pwem.objects import SetOfAtomStructs, SetOfVolumes
from pyworkflow.protocol import params

from .. import convert
from ..core.imaging.structure import write_multimodel_pdb
from ..core.landscape.trajectory import (nearest_points, path_through_points, principal_path, trajectory_frames,
                                         write_points)
from .base import FlexDLProtBase
from .group_maps import GroupMapsMixin

PATH_PCA, PATH_THROUGH_POINTS, PATH_POINTS = 0, 1, 2
PATH_LABELS = ["first principal component", "through points", "points as frames"]
EXTENTS = ["percentile", "range", "std"]


def parse_points(text: str, n_modes: int) -> np.ndarray:
    """Amplitude points from text: one point per line, ``n_modes`` numbers (Å) separated by
    spaces, commas or semicolons; blank lines and ``#`` comments are skipped.

    Returns (P, n_modes). Raises ValueError naming the faulty line.
    """
    rows = []
    for number, line in enumerate(str(text or "").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            values = [float(v) for v in re.split(r"[\s,;]+", line) if v]
        except ValueError:
            raise ValueError(f"Line {number} of the points ({line!r}) is not a list of numbers.")
        if len(values) != n_modes:
            raise ValueError(f"Line {number} of the points has {len(values)} amplitudes; the particles "
                             f"have {n_modes} modes, so give {n_modes} numbers per line.")
        rows.append(values)
    if not rows:
        raise ValueError("No points given: write one point per line, one amplitude (Å) per mode.")
    return np.asarray(rows, dtype=float)


class FlexDLProtTrajectory(GroupMapsMixin, FlexDLProtBase):
    """Structures along a path through the amplitude landscape of the particles.

    The path runs along the first principal component of the particles'
    amplitudes, or through points given by the user (resampled evenly in arc
    length, or taken as they are). Each frame is the reference structure
    displaced by the frame's amplitudes, ``x + sum_k q_k v_k``. The frames are
    written as one multi-model PDB (play it in ChimeraX with 'coordset #1' or
    in VMD) and as a set of atomic structures. Optionally, the particles nearest each
    frame are reconstructed into a map (id = frame number) that the frame is fitted to."""
    _label = "trajectory"
    _possibleOutputs = {"outputStructures": SetOfAtomStructs, "outputMaps": SetOfVolumes}

    def _defineParams(self, form):
        form.addSection(label="Input")
        self._addFlexInputParams(form, "The normal modes of the amplitudes: their structure is displaced.")
        form.addSection(label="Path")
        form.addParam("pathType", params.EnumParam, choices=PATH_LABELS, default=PATH_PCA,
                      label="Path",
                      help="first principal component: a straight line through the mean of the "
                           "amplitudes along their direction of largest variance. through points: a "
                           "piecewise-linear path through your points, sampled evenly in arc length. "
                           "points as frames: one frame per point.")
        form.addParam("extent", params.EnumParam, choices=EXTENTS, default=0, condition="pathType == 0",
                      display=params.EnumParam.DISPLAY_HLIST, label="Extent along the component",
                      help="percentile: between two percentiles of the particles' projections on the "
                           "component. range: from the smallest to the largest projection. std: the "
                           "mean -/+ a number of standard deviations.")
        form.addParam("lowPercentile", params.FloatParam, default=2.0, label="Low percentile (%)",
                      condition="pathType == 0 and extent == 0", validators=[params.Range(0, 100)],
                      help="The path starts at this percentile of the particles' projections on the "
                           "principal component (ignores the most extreme particles).")
        form.addParam("highPercentile", params.FloatParam, default=98.0, label="High percentile (%)",
                      condition="pathType == 0 and extent == 0", validators=[params.Range(0, 100)],
                      help="The path ends at this percentile of the projections on the principal component.")
        form.addParam("numberOfStd", params.FloatParam, default=2.0, label="Standard deviations",
                      condition="pathType == 0 and extent == 2", validators=[params.Positive],
                      help="The path spans the mean ± this many standard deviations along the component.")
        form.addParam("points", params.TextParam, default="", condition="pathType != 0",
                      label="Points (Å)", width=60,
                      help="One point per line, one amplitude (Å) per mode of the particles, in the "
                           "order of their modes, e.g. for modes 7-9:\n-150 50 120\n0 0 0\n150 -50 -120")
        form.addParam("numberOfFrames", params.IntParam, default=10, condition="pathType != 2",
                      validators=[params.GE(2)], label="Number of frames",
                      help="Structures along the path (models of the multi-model PDB).")
        self._addGroupMapParams(form, "frame (its nearest particles)")

    # --------------------------- STEPS -----------------------------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.computeTrajectoryStep, needsGPU=False)
        if self.reconstructMaps:
            self._insertFunctionStep(self.groupMapsStep, needsGPU=self._usesGPU())
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def _pathPoints(self, amplitudes: np.ndarray) -> np.ndarray:
        kind = self.pathType.get()
        if kind == PATH_PCA:
            return principal_path(amplitudes, self.numberOfFrames.get(), EXTENTS[self.extent.get()],
                                  (self.lowPercentile.get(), self.highPercentile.get()),
                                  self.numberOfStd.get())
        points = parse_points(self.points.get(), amplitudes.shape[1])
        if kind == PATH_THROUGH_POINTS:
            return path_through_points(points, self.numberOfFrames.get())
        return points

    def computeTrajectoryStep(self):
        self._logToRunLog()
        particles = convert.read_particles(self.inputParticles.get(), need_amplitudes=True)
        numbers = convert.particles_mode_numbers(self.inputParticles.get())
        path = self._pathPoints(particles.amplitudes)
        atoms, modes = convert.read_modes(self.inputModes.get(), numbers)
        frames = trajectory_frames(atoms.coords, modes, path)
        write_points(self._getExtraPath("path_points.txt"), path, numbers)
        write_multimodel_pdb(self._getExtraPath("trajectory.pdb"), atoms, frames)
        for f in range(len(frames)):
            write_multimodel_pdb(self._frameFile(f + 1), atoms, frames[f])
        self.info("Wrote %d frames of %d atoms to %s" % (len(frames), atoms.n_atoms,
                                                          self._getExtraPath("trajectory.pdb")))

    def _mapGroups(self):
        """For GroupMapsMixin: each frame with the particles nearer to it than to other frames."""
        particles = convert.read_particles(self.inputParticles.get(), need_amplitudes=True)
        path = np.loadtxt(self._getExtraPath("path_points.txt")).reshape(-1, particles.amplitudes.shape[1])
        member = nearest_points(particles.amplitudes, path)[None, :] == np.arange(len(path))[:, None]
        return (np.arange(1, len(path) + 1), ["frame_%03d" % (f + 1) for f in range(len(path))], member,
                path, particles.ids)

    def _frameFile(self, number: int) -> str:
        return self._getExtraPath("frames", "frame_%03d.pdb" % number)

    def createOutputStep(self):
        path = np.atleast_2d(np.loadtxt(self._getExtraPath("path_points.txt")))
        out = SetOfAtomStructs(filename=self._getPath("structures.sqlite"))
        convert.fill_atom_structs(out, [self._frameFile(f + 1) for f in range(len(path))])
        self._defineOutputs(outputStructures=out)
        self._defineSourceRelation(self.inputParticles, out)
        self._defineSourceRelation(self.inputModes, out)
        self._createGroupMapsOutput()

    # --------------------------- INFO ------------------------------------------
    def _validate(self):
        errors = self._flexInputErrors()
        if errors:
            return errors
        errors = self._validateGroupMaps()
        if self.pathType.get() == PATH_PCA:
            if self.extent.get() == 0 and not self.lowPercentile.get() < self.highPercentile.get():
                errors.append("The low percentile must be smaller than the high one.")
        else:
            k = len(convert.particles_mode_numbers(self.inputParticles.get()))
            try:
                points = parse_points(self.points.get(), k)
            except ValueError as exc:
                return [str(exc)]
            if self.pathType.get() == PATH_THROUGH_POINTS and len(points) < 2:
                errors.append("A path through points needs at least 2 points.")
        return errors

    def _summary(self):
        if not hasattr(self, "outputStructures"):
            return ["Trajectory not computed yet."]
        try:
            path = np.atleast_2d(np.loadtxt(self._getExtraPath("path_points.txt")))
        except OSError:
            return ["The path points file is missing: " + self._getExtraPath("path_points.txt")]
        numbers = convert.flex_mode_numbers(self.inputParticles.get()) or []
        lines = [f"{len(path)} frames along a path '{PATH_LABELS[self.pathType.get()]}' over modes "
                 f"{', '.join(map(str, numbers))}.",
                 "From " + " ".join("%.1f" % v for v in path[0]) + " Å to "
                 + " ".join("%.1f" % v for v in path[-1]) + " Å.",
                 "Multi-model PDB (ChimeraX: open it, then 'coordset #1'): "
                 + self._getExtraPath("trajectory.pdb"),
                 "Path points: " + self._getExtraPath("path_points.txt")]
        return lines + self._groupMapsSummary()

    def _methods(self):
        if not hasattr(self, "outputStructures"):
            return []
        return [f"Structures along a path in the normal-mode amplitude space of "
                f"{self.inputParticles.get().getSize()} particles were computed by displacing the "
                f"reference along the normal modes [Hamitouche2022]."]
