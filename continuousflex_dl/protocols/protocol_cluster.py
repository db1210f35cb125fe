"""Clusters of particles in the space of normal-mode amplitudes, for 3-D reconstruction."""
import re

import numpy as np
from pwem.objects import SetOfAtomStructs, SetOfParticlesFlex, SetOfVolumes
from pyworkflow.protocol import params

from .. import convert
from ..core.imaging.structure import write_multimodel_pdb
from ..core.landscape.trajectory import kmeans, select_by_ranges, trajectory_frames, write_points
from .base import FlexDLProtBase
from .group_maps import GroupMapsMixin

METHOD_KMEANS, METHOD_RANGES = 0, 1
OPEN_BOUNDS = ("*", "none", "")


def parse_ranges(text: str, mode_numbers) -> list:
    """Amplitude selections from text: one selection (cluster) per line, terms separated by
    ';' or ',', each term ``MODE LOW HIGH`` (mode number, bounds in Å; ``*`` or ``none``
    leaves a side open), e.g. ``7 -100 0; 8 * 50``.

    mode_numbers: the K mode numbers of the amplitude columns. Returns a list of
    ``{column index: (low, high)}`` for :func:`core.landscape.trajectory.select_by_ranges`.
    Raises ValueError naming the faulty line.
    """
    columns = {int(m): j for j, m in enumerate(mode_numbers)}
    selections = []
    for number, line in enumerate(str(text or "").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        ranges = {}
        for term in re.split(r"[;,]", line):
            words = term.split()
            if not words:
                continue
            if len(words) != 3:
                raise ValueError(f"Line {number}: '{term.strip()}' should read 'MODE LOW HIGH', e.g. "
                                 f"'7 -100 0' ('*' for an open side).")
            try:
                mode = int(words[0])
                lo, hi = (None if w.lower() in OPEN_BOUNDS else float(w) for w in words[1:])
            except ValueError:
                raise ValueError(f"Line {number}: cannot read '{term.strip()}' as 'MODE LOW HIGH'.")
            if mode not in columns:
                raise ValueError(f"Line {number}: mode {mode} is not among the particles' modes "
                                 f"{sorted(columns)}.")
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"Line {number}: empty range {lo:g} to {hi:g} for mode {mode}.")
            ranges[columns[mode]] = (lo, hi)
        selections.append(ranges)
    if not selections:
        raise ValueError("No amplitude ranges given: write one selection per line, e.g. '7 -100 0; 8 * 50'.")
    return selections


class FlexDLProtCluster(GroupMapsMixin, FlexDLProtBase):
    """Groups of particles with similar conformations, ready for 3-D reconstruction.

    Particles are grouped by k-means on their normal-mode amplitudes, or
    selected by ranges of amplitudes. Each group becomes its own set of
    particles (the input particles, with their CTF and pose, so any Scipion 3-D
    reconstruction protocol accepts them), and the reference displaced to the
    group's centre (mean amplitudes) is given as an atomic structure (id = group
    number). Empty groups (possible with ranges) give no output. Optionally, each
    group is reconstructed into a map (id = group number) that its structure is fitted to."""
    _label = "clusters"
    _possibleOutputs = {"outputCluster_01": SetOfParticlesFlex, "outputStructures": SetOfAtomStructs,
                        "outputMaps": SetOfVolumes}

    def _defineParams(self, form):
        form.addSection(label="Input")
        self._addFlexInputParams(form, "The normal modes of the amplitudes: their structure is "
                                       "displaced to each cluster centre.")
        form.addSection(label="Clusters")
        form.addParam("method", params.EnumParam, choices=["k-means", "amplitude ranges"],
                      default=METHOD_KMEANS, display=params.EnumParam.DISPLAY_HLIST, label="Grouping",
                      help="k-means: every particle goes to the nearest of k centres (Euclidean "
                           "distance of the amplitudes, Å). amplitude ranges: one group per line of "
                           "ranges; a particle may fall in several groups or none.")
        form.addParam("numberOfClusters", params.IntParam, default=3, condition="method == 0",
                      validators=[params.GE(1)], label="Number of clusters",
                      help="k in k-means: how many groups of similar conformations to make.")
        form.addParam("seed", params.IntParam, default=0, condition="method == 0", label="Random seed",
                      help="k-means++ starts; the same seed gives the same clusters.")
        form.addParam("ranges", params.TextParam, default="", condition="method == 1", width=60,
                      label="Amplitude ranges (Å)",
                      help="One group per line; terms 'MODE LOW HIGH' separated by ';', '*' for an "
                           "open side. Example with two groups:\n7 * 0; 8 -50 50\n7 0 *")
        self._addGroupMapParams(form, "cluster")

    # --------------------------- STEPS -----------------------------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.clusterStep, needsGPU=False)
        if self.reconstructMaps:
            self._insertFunctionStep(self.groupMapsStep, needsGPU=self._usesGPU())
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def _memberships(self, amplitudes: np.ndarray, numbers) -> np.ndarray:
        """(C, M) bool: which particles belong to each group."""
        if self.method.get() == METHOD_KMEANS:
            labels, _ = kmeans(amplitudes, self.numberOfClusters.get(), seed=self.seed.get())
            return labels[None, :] == np.arange(self.numberOfClusters.get())[:, None]
        return np.stack([select_by_ranges(amplitudes, r)
                         for r in parse_ranges(self.ranges.get(), numbers)])

    def clusterStep(self):
        self._logToRunLog()
        particles = convert.read_particles(self.inputParticles.get(), need_amplitudes=True)
        numbers = convert.particles_mode_numbers(self.inputParticles.get())
        member = self._memberships(particles.amplitudes, numbers)
        sizes = member.sum(axis=1)
        centres = np.stack([particles.amplitudes[m].mean(axis=0) if m.any()
                            else np.full(len(numbers), np.nan) for m in member])
        np.savez(self._getExtraPath("clusters.npz"), ids=particles.ids, member=member,
                 centres=centres, mode_numbers=np.asarray(numbers))
        write_points(self._getExtraPath("centres.txt"), centres, numbers)
        atoms, modes = convert.read_modes(self.inputModes.get(), numbers)
        for c in np.flatnonzero(sizes):
            write_multimodel_pdb(self._centreFile(c + 1), atoms,
                                 trajectory_frames(atoms.coords, modes, centres[c:c + 1])[0])
        for c, size in enumerate(sizes):
            self.info("Cluster %d: %d particles, centre %s Å" %
                      (c + 1, size, np.array2string(centres[c], precision=1)))

    def _centreFile(self, number: int) -> str:
        return self._getExtraPath("centres", "centre_%02d.pdb" % number)

    def createOutputStep(self):
        data = np.load(self._getExtraPath("clusters.npz"))
        ids, member = data["ids"], data["member"]
        inputSet = self.inputParticles.get()
        groups = {}  # group index -> output set, in one pass over the input particles
        for c in range(len(member)):
            if not member[c].any():
                self.info("Group %d is empty: no output for it." % (c + 1))
                continue
            out = SetOfParticlesFlex(filename=self._getPath("particles_cluster_%02d.sqlite" % (c + 1)),
                                     progName=convert.FLEX_PROG_NAME)
            out.copyInfo(inputSet)
            groups[c] = out
        row = {int(i): k for k, i in enumerate(ids)}
        for p in inputSet.iterItems(orderBy="id"):
            k = row.get(p.getObjId())
            if k is None:
                continue
            for c in np.flatnonzero(member[:, k]):
                groups[int(c)].append(p.clone())
        for c, out in groups.items():
            self._defineOutputs(**{self._clusterName(c + 1): out})
            self._defineSourceRelation(self.inputParticles, out)
        structures = SetOfAtomStructs(filename=self._getPath("centre_structures.sqlite"))
        convert.fill_atom_structs(structures, [self._centreFile(c + 1) for c in groups],
                                  [c + 1 for c in groups])  # id = group number
        self._defineOutputs(outputStructures=structures)
        self._defineSourceRelation(self.inputModes, structures)
        self._createGroupMapsOutput()

    def _mapGroups(self):
        """For GroupMapsMixin: the non-empty clusters, their members and centres."""
        data = np.load(self._getExtraPath("clusters.npz"))
        member = data["member"]
        keep = np.flatnonzero(member.any(axis=1))
        return (keep + 1, ["cluster_%02d" % (c + 1) for c in keep], member[keep], data["centres"][keep],
                data["ids"])

    @staticmethod
    def _clusterName(number: int) -> str:
        return "outputCluster_%02d" % number

    # --------------------------- INFO ------------------------------------------
    def _validate(self):
        errors = self._flexInputErrors()
        if errors:
            return errors
        errors = self._validateGroupMaps()
        if self.method.get() == METHOD_KMEANS:
            if self.numberOfClusters.get() > self.inputParticles.get().getSize():
                errors.append(f"Asked for {self.numberOfClusters.get()} clusters of "
                              f"{self.inputParticles.get().getSize()} particles.")
        else:
            try:
                parse_ranges(self.ranges.get(), convert.particles_mode_numbers(self.inputParticles.get()))
            except ValueError as exc:
                errors.append(str(exc))
        return errors

    def _summary(self):
        path = self._getExtraPath("clusters.npz")
        if not hasattr(self, "outputStructures"):
            return ["Clusters not computed yet."]
        try:
            data = np.load(path)
        except OSError:
            return ["The cluster file is missing: " + path]
        numbers = [int(m) for m in data["mode_numbers"]]
        how = (f"k-means (k = {self.numberOfClusters.get()}, seed {self.seed.get()})"
               if self.method.get() == METHOD_KMEANS else "amplitude ranges")
        lines = [f"{len(data['ids'])} particles grouped by {how} over modes {', '.join(map(str, numbers))}:"]
        for c, (m, centre) in enumerate(zip(data["member"], data["centres"])):
            where = " ".join("%.1f" % v for v in centre) + " Å" if m.any() else "-"
            name = self._clusterName(c + 1) if m.any() else "(empty, no output)"
            lines.append(f"  {name}: {int(m.sum())} particles, centre {where}")
        lines.append("Centre structures: " + self._getExtraPath("centres"))
        return lines + self._groupMapsSummary()

    def _methods(self):
        if not hasattr(self, "outputStructures"):
            return []
        return ["The particles were grouped in the space of their normal-mode amplitudes "
                "[Hamitouche2022]; each group can be reconstructed separately."]
