"""Normal mode analysis of an atomic (or pseudoatomic) structure with an elastic network."""
import os

import numpy as np
from pwem.objects import AtomStruct, SetOfNormalModes
from pyworkflow.protocol import params

from .. import convert
from ..core.modes import nma
from ..core.imaging.structure import load_atoms, write_multimodel_pdb
from .base import FlexDLProtBase

SELECTION_KEYS = ["heavy", "ca", "all", "custom"]
SELECTION_LABELS = ["heavy atoms", "CA / P only", "all atoms", "custom"]
CUTOFF_AUTO, CUTOFF_ABSOLUTE, CUTOFF_RELATIVE = 0, 1, 2
AUTO_CUTOFF = {"ca": 15.0}  # Å; 8 Å for every other atomic selection
METHODS = ["auto", "exact", "coarse"]
#: Per-residue displacement profiles of every mode (extra folder), read by the viewer
#: so that the GUI never parses the structure (ProDy fails under ``python -O``).
PROFILES_FILE = "mode_profiles.npz"


class FlexDLProtNMA(FlexDLProtBase):
    """Elastic network (ANM) normal modes of an atomic structure.

    Low-frequency modes 7, 8, 9... describe the collective motions used by
    HEMNMA and DeepHEMNMA. Modes whose collectivity is below a threshold are
    disabled (kept, but not proposed to later protocols)."""
    _label = "normal modes (NMA)"
    _possibleOutputs = {"outputStructure": AtomStruct, "outputModes": SetOfNormalModes}

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputStructure", params.PointerParam, pointerClass="AtomStruct",
                      label="Atomic structure", important=True,
                      help="PDB or mmCIF structure (or pseudoatoms of a map) whose normal modes to compute.")
        form.addParam("atomSelection", params.EnumParam, choices=SELECTION_LABELS, default=0,
                      label="Atoms",
                      help="heavy atoms: protein and nucleic-acid atoms without hydrogens, waters, "
                           "ions or ligands (the default). CA / P: one bead per residue (faster, "
                           "use cutoff ~15 Å). all atoms: everything in the file. custom: a ProDy "
                           "selection string. Pseudoatomic structures always use all pseudoatoms.")
        form.addParam("customSelection", params.StringParam, default="protein and not hydrogen",
                      condition="atomSelection == 3", label="Selection (ProDy syntax)",
                      help="For example: 'chain A and not hydrogen' or 'protein and name CA'.")
        form.addSection(label="Elastic network")
        form.addParam("numberOfModes", params.IntParam, default=20, label="Number of modes",
                      validators=[params.GT(6)],
                      help="Modes 1-6 are rigid-body motions, so ask for more than 6. 20 is plenty "
                           "for HEMNMA, which usually uses a few of modes 7-20.")
        form.addParam("cutoffMode", params.EnumParam, choices=["auto", "absolute", "relative"],
                      default=CUTOFF_AUTO, display=params.EnumParam.DISPLAY_HLIST,
                      label="Cutoff mode",
                      help="auto: 8 Å for atoms, 15 Å for CA/P-only networks, relative (percentile below) "
                           "for pseudoatoms. absolute: a distance in Å. relative: a percentile of the "
                           "distances from each atom to its 5 nearest neighbours.")
        form.addParam("cutoff", params.FloatParam, default=8.0, condition="cutoffMode == 1",
                      label="Cutoff (Å)", validators=[params.Positive],
                      help="Atoms closer than this are joined by springs. 8 Å for heavy atoms, "
                           "about 15 Å for CA-only networks.")
        form.addParam("rcPercentage", params.FloatParam, default=100.0, condition="cutoffMode != 1",
                      label="Cutoff percentile (%)", validators=[params.Range(1, 100)],
                      help="Percentile of the distribution of distances from each atom to its 5 nearest "
                           "neighbours used as cutoff. 100 (the largest) keeps pseudoatomic networks rigid "
                           "enough; lower values can leave atoms with too few springs.")
        form.addParam("springConstant", params.FloatParam, default=1.0, label="Spring constant",
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.Positive],
                      help="The stiffness of every spring of the network. It scales the eigenvalues only (they are "
                           "in its units); the modes do not depend on it.")
        form.addParam("collectivityThreshold", params.FloatParam, default=0.15,
                      label="Collectivity threshold", validators=[params.Range(0, 1)],
                      help="Non-rigid modes whose collectivity (Brüschweiler 1995, 0-1) is below this "
                           "are disabled: they move few atoms and are rarely useful.")
        form.addParam("method", params.EnumParam, choices=METHODS, default=0,
                      expertLevel=params.LEVEL_ADVANCED, label="Eigensolver",
                      help="auto: exact sparse solver up to 12,000 atoms, then 'coarse' (a coarse "
                           "network refined on the full atomic network), which handles hundreds of "
                           "thousands of atoms in linear memory.")
        form.addParam("animationRms", params.FloatParam, default=3.0, label="Animation RMS (Å)",
                      expertLevel=params.LEVEL_ADVANCED, validators=[params.Positive],
                      help="Largest RMS displacement of the atoms in each mode's animation.")

    # --------------------------- STEPS -----------------------------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.computeModesStep, needsGPU=False)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def _selection(self) -> str:
        if self.inputStructure.get().getPseudoAtoms():
            return "all"
        key = SELECTION_KEYS[self.atomSelection.get()]
        return self.customSelection.get() if key == "custom" else key

    def computeModesStep(self):
        self._logToRunLog()
        atoms = load_atoms(self.inputStructure.get().getFileName(), self._selection())
        errors = self._checkAtoms(atoms)
        if errors:
            raise ValueError(errors[0])
        write_multimodel_pdb(self._getExtraPath("atoms.pdb"), atoms, atoms.coords)
        cutoff = self._cutoff(atoms)
        modes = nma.compute_modes(atoms.coords, self.numberOfModes.get(), cutoff,
                                  self.springConstant.get(), METHODS[self.method.get()])
        nma.write_mode_files(self._getExtraPath("modes"), modes.vectors)
        np.savez(self._getExtraPath("modes_info.npz"), eigenvalues=modes.eigenvalues,
                 collectivity=modes.collectivity, cutoff=modes.cutoff)
        residues, profiles = nma.residue_profiles(modes.vectors, atoms.group.getResnums())
        np.savez(self._getExtraPath(PROFILES_FILE), residues=residues, profiles=profiles)
        amplitude = nma.default_animation_amplitude(atoms.n_atoms, self.animationRms.get())
        for k in range(nma.N_RIGID, modes.n_modes):
            frames = nma.animation_frames(atoms.coords, modes.vectors[k], amplitude)
            write_multimodel_pdb(self._animationFile(k + 1), atoms, frames)
        self.info("Cutoff %.2f Å; eigenvalues of modes 7-9: %s" %
                  (cutoff, np.array2string(modes.eigenvalues[6:9], precision=4)))

    def _cutoff(self, atoms) -> float:
        mode = self.cutoffMode.get()
        pseudo = bool(self.inputStructure.get().getPseudoAtoms())
        if mode == CUTOFF_RELATIVE or (mode == CUTOFF_AUTO and pseudo):
            return nma.relative_cutoff(atoms.coords, self.rcPercentage.get())
        if mode == CUTOFF_ABSOLUTE:
            return self.cutoff.get()
        return AUTO_CUTOFF.get(self._selection(), 8.0)

    def modeProfile(self, number: int):
        """``(residue numbers (R,), largest displacement (R,) per Å of amplitude)`` of mode
        ``number`` (1-based), precomputed by the run. Raises ValueError with the fix."""
        path = self._getExtraPath(PROFILES_FILE)
        if not os.path.exists(path):
            raise ValueError("This NMA run has no displacement profiles (it ran with an older version of "
                             "the plugin): run it again to see them.")
        data = np.load(path)
        if not 1 <= number <= len(data["profiles"]):
            raise ValueError(f"Mode {number} does not exist: choose 1-{len(data['profiles'])}.")
        return data["residues"], data["profiles"][number - 1]

    def _animationFile(self, number):
        return self._getExtraPath("animations", "animated_mode_%03d.pdb" % number)

    def createOutputStep(self):
        info = np.load(self._getExtraPath("modes_info.npz"))
        n_modes = len(info["eigenvalues"])
        files = [self._getExtraPath("modes", nma.mode_file_name(k)) for k in range(1, n_modes + 1)]
        vectors = nma.read_mode_files(files)
        modes = nma.NormalModes(vectors=vectors, eigenvalues=info["eigenvalues"],
                                collectivity=info["collectivity"], cutoff=float(info["cutoff"]))
        enabled = np.arange(1, n_modes + 1) > nma.N_RIGID
        enabled &= modes.collectivity >= self.collectivityThreshold.get()
        enabled[:nma.N_RIGID] = True  # rigid modes stay enabled: they are part of the basis
        animations = ["" if k <= nma.N_RIGID else self._animationFile(k) for k in range(1, n_modes + 1)]

        structure = AtomStruct(filename=self._getExtraPath("atoms.pdb"),
                               pseudoatoms=bool(self.inputStructure.get().getPseudoAtoms()))
        self._defineOutputs(outputStructure=structure)
        self._defineSourceRelation(self.inputStructure, structure)

        modes_set = SetOfNormalModes(filename=self._getPath("modes.sqlite"))
        modes_set.setPdb(structure)
        convert.fill_normal_modes(modes_set, modes, files, enabled, animations)
        self._defineOutputs(outputModes=modes_set)
        self._defineSourceRelation(self.inputStructure, modes_set)

    # --------------------------- INFO ------------------------------------------
    def _validate(self):
        errors = []
        struct = self.inputStructure.get()
        if struct is None:
            return ["Choose an input atomic structure."]
        path = struct.getFileName()
        if not path or not os.path.exists(path):
            return [f"The structure file {path} does not exist."]
        if not __debug__:
            # The Scipion GUI runs optimised (python -O), where ProDy cannot be imported
            # (biopython 1.81, pinned by scipion-em, relies on asserts): the selection is
            # checked when the run starts (computeModesStep) instead.
            return errors
        try:
            atoms = load_atoms(path, self._selection())
        except ValueError as exc:
            return [str(exc)]
        return self._checkAtoms(atoms)

    def _checkAtoms(self, atoms) -> list:
        """Errors of a selection too small for the number of modes asked."""
        if 3 * atoms.n_atoms - nma.N_RIGID < self.numberOfModes.get():
            return [f"The selection has {atoms.n_atoms} atoms, which have at most "
                    f"{3 * atoms.n_atoms - nma.N_RIGID} modes: ask for fewer modes or select more atoms."]
        return []

    def _summary(self):
        if not hasattr(self, "outputModes"):
            return ["Normal modes not computed yet."]
        rows = convert.modes_table(self.outputModes)
        info = np.load(self._getExtraPath("modes_info.npz"))
        n_enabled = sum(r["enabled"] for r in rows if r["number"] > nma.N_RIGID)
        return [f"{len(rows)} modes of {self._countAtoms()} atoms (cutoff {float(info['cutoff']):.2f} Å).",
                f"{n_enabled} of {len(rows) - nma.N_RIGID} non-rigid modes enabled "
                f"(collectivity >= {self.collectivityThreshold.get():.2f}).",
                "Mode animations (multi-model PDB, play in ChimeraX/VMD): "
                + self._getExtraPath("animations")]

    def _countAtoms(self):
        return sum(1 for line in open(self._getExtraPath("atoms.pdb"))
                   if line.startswith(("ATOM", "HETATM")) and not line.startswith("ENDMDL"))

    def _methods(self):
        if not hasattr(self, "outputModes"):
            return []
        info = np.load(self._getExtraPath("modes_info.npz"))
        return [f"Normal modes of {self.getObjectTag('inputStructure')} were computed with an anisotropic "
                f"elastic network model [Atilgan2001] (cutoff {float(info['cutoff']):.2f} Å, "
                f"{len(info['eigenvalues'])} modes); modes with collectivity [Bruschweiler1995] below "
                f"{self.collectivityThreshold.get():.2f} were disabled."]

    def _citations(self):
        return ["Atilgan2001", "Bruschweiler1995", "Jin2014"]
