"""Synthetic particle images of a flexible structure, with their ground truth."""
from pwem.objects import SetOfParticlesFlex
from pyworkflow.protocol import params

from .. import convert
from ..core.imaging.structure import centre, load_atoms
from ..core.modes.synthesis import AMPLITUDE_RELATIONS, CTFSampler, SynthesisResult, synthesize
from .base import FlexDLProtBase

INPUT_MODES, INPUT_STRUCTURE = 0, 1


class FlexDLProtSynthesize(FlexDLProtBase):
    """Particle images of a structure displaced along its normal modes, with known truth.

    Each image is a projection of the displaced structure (3-D Gaussian atoms) in
    a random orientation (uniform on SO(3)), with a random shift, CTF and white
    noise at a given SNR. The ground truth (amplitudes, poses, CTF) is stored in
    the particles and as a RELION .star file beside the stack."""
    _label = "synthesize particles"
    _possibleOutputs = {"outputParticles": SetOfParticlesFlex}

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputType", params.EnumParam, choices=["normal modes", "rigid structure"],
                      default=INPUT_MODES, display=params.EnumParam.DISPLAY_HLIST, label="Reference",
                      help="normal modes: flexible particles (the modes' structure is the reference). "
                           "rigid structure: every particle has the same conformation.")
        form.addParam("inputModes", params.PointerParam, pointerClass="SetOfNormalModes",
                      condition="inputType == 0", label="Normal modes", important=True,
                      help="Output of the normal mode analysis protocol of this plugin.")
        form.addParam("inputStructure", params.PointerParam, pointerClass="AtomStruct",
                      condition="inputType == 1", label="Atomic structure",
                      help="All heavy atoms of the structure (or all pseudoatoms) are projected.")
        form.addParam("modeList", params.StringParam, default="7-9", condition="inputType == 0",
                      label="Modes", help="Mode numbers, e.g. '7-9' or '7, 8, 12'. The relation 'paper' "
                                          "uses the first three.")
        form.addParam("amplitudeRelation", params.EnumParam, choices=list(AMPLITUDE_RELATIONS),
                      default=0, condition="inputType == 0", label="Amplitude relation",
                      help="paper: r ~ U[0,1], q1 = -A r, q2 = A sin(pi r), q3 = A cos(pi r) on the first "
                           "three modes (the synthetic data of Hamitouche & Jonic 2022). uniform: U[-A, A] per mode. "
                           "gaussian: N(0, (A/4)^2). linear: a segment from -A to +A. clusters: three "
                           "clusters in [-A, A]. grid: 5 points per mode over [-A, A]. table: rows of a file.")
        form.addParam("amplitudeScale", params.FloatParam, default=200.0, condition="inputType == 0",
                      label="Amplitude scale A (Å)",
                      help="Largest amplitude, in Å; Hamitouche & Jonic (2022) used 200 Å for adenylate kinase.")
        form.addParam("amplitudeTable", params.PathParam, condition="inputType == 0 and amplitudeRelation == 6",
                      label="Amplitude table", help="Text/CSV file: one row per image, one column per mode.")
        form.addSection(label="Images")
        form.addParam("numberOfImages", params.IntParam, default=1000, validators=[params.GT(0)],
                      label="Number of images",
                      help="The paper used 6,000 training and 2,000 test images per data set.")
        form.addParam("boxSize", params.IntParam, default=128, validators=[params.GE(8)],
                      label="Box size (px)", help="Any size, odd or even.")
        form.addParam("samplingRate", params.FloatParam, default=1.0, validators=[params.Positive],
                      label="Pixel size (Å/px)",
                      help="Sampling of the images; the box covers box size x pixel size Å.")
        form.addParam("inPlaneRotation", params.BooleanParam, default=True, label="Random in-plane rotation?",
                      help="Yes: orientations uniform on SO(3). No: uniform projection directions, psi = 0.")
        form.addParam("maxShift", params.FloatParam, default=5.0, validators=[params.GE(0)],
                      label="Maximum shift (px)", help="Shifts uniform in [-S, S] along x and y; 0 for none.")
        form.addParam("applyCTF", params.BooleanParam, default=True, label="Apply CTF?",
                      help="Modulate the projections by a CTF (RELION's formula); each particle stores its CTF.")
        form.addParam("defocusMin", params.FloatParam, default=5000.0, condition="applyCTF",
                      label="Minimum defocus (Å)", help="Underfocus, in Å; Hamitouche & Jonic (2022) used 0.5 µm = 5000 Å.")
        form.addParam("defocusMax", params.FloatParam, default=5000.0, condition="applyCTF",
                      label="Maximum defocus (Å)", help="Equal to the minimum for a fixed defocus.")
        form.addParam("voltage", params.FloatParam, default=300.0, condition="applyCTF", label="Voltage (kV)",
                      help="Acceleration voltage, for the electron wavelength.")
        form.addParam("sphericalAberration", params.FloatParam, default=2.7, condition="applyCTF",
                      label="Spherical aberration (mm)", help="Cs of the objective lens.")
        form.addParam("amplitudeContrast", params.FloatParam, default=0.1, condition="applyCTF",
                      label="Amplitude contrast", help="Fraction of amplitude contrast (0.07-0.1 for cryo-EM).")
        form.addParam("addNoise", params.BooleanParam, default=True, label="Add noise?",
                      help="Add white Gaussian noise at the SNR below (after the CTF).")
        form.addParam("snr", params.FloatParam, default=0.1, condition="addNoise", validators=[params.Positive],
                      label="SNR", help="var(clean CTF-modulated projection) / var(noise), per image, "
                                        "over the whole box (0.1 in Hamitouche & Jonic 2022); lower is noisier.")
        form.addParam("seed", params.IntParam, default=0, label="Random seed",
                      help="Same inputs and seed give identical images.")
        self._addDeviceParam(form)

    # --------------------------- STEPS -----------------------------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.synthesizeStep, needsGPU=False)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def _reference(self):
        """(atoms, modes (K,N,3) or None, mode numbers)."""
        if self.inputType == INPUT_MODES:
            numbers = convert.parse_mode_list(self.modeList.get())
            atoms, modes = convert.read_modes(self.inputModes.get(), numbers)
            return atoms, modes, numbers
        structure = self.inputStructure.get()
        selection = "all" if structure.getPseudoAtoms() else "heavy"
        return load_atoms(structure.getFileName(), selection), None, []

    def _relation(self):
        name = AMPLITUDE_RELATIONS[self.amplitudeRelation.get()]
        scale = self.amplitudeScale.get()
        relation_params = {"paper": {"scale": scale}, "uniform": {"range": scale},
                           "gaussian": {"std": scale / 4}, "linear": {"range": scale},
                           "clusters": {"range": scale}, "grid": {"range": scale},
                           "table": {"path": self.amplitudeTable.get()}}[name]
        return name, relation_params

    def _ctfSampler(self):
        """The CTF of the form as a core CTFSampler (None without CTF)."""
        if not self.applyCTF.get():
            return None
        return CTFSampler(defocus_min=self.defocusMin.get(), defocus_max=self.defocusMax.get(),
                          voltage=self.voltage.get(), cs=self.sphericalAberration.get(),
                          amplitude_contrast=self.amplitudeContrast.get())

    def synthesizeStep(self):
        self._logToRunLog()
        atoms, modes, numbers = self._reference()
        relation, relation_params = self._relation()
        n = self.numberOfImages.get()

        def progress(done, total, message):
            self.info("Synthesized %d / %d images" % (done, total))

        result = synthesize(
            self._getExtraPath("particles.mrcs"), centre(atoms.coords), modes, n,
            self.boxSize.get(), self.samplingRate.get(),
            relation=relation, relation_params=relation_params, mode_numbers=numbers or None,
            in_plane=self.inPlaneRotation.get(), max_shift_px=self.maxShift.get(),
            ctf=self._ctfSampler(),
            snr=self.snr.get() if self.addNoise.get() else None, sigma=atoms.sigma, weights=atoms.weights,
            seed=self.seed.get(), device=self._getDevice(), progress=progress)
        result.save(self._getExtraPath("ground_truth.npz"))
        result.write_star(self._getExtraPath("ground_truth.star"))

    def createOutputStep(self):
        result = SynthesisResult.load(self._getExtraPath("ground_truth.npz"))
        out = self._createSetOfParticlesFlex()
        convert.fill_synthetic_particles(out, result)
        self._defineOutputs(outputParticles=out)
        source = self.inputModes if self.inputType == INPUT_MODES else self.inputStructure
        self._defineSourceRelation(source, out)

    def _createSetOfParticlesFlex(self):
        return SetOfParticlesFlex(filename=self._getPath("particles_flex.sqlite"),
                                  progName=convert.FLEX_PROG_NAME)

    # --------------------------- INFO ------------------------------------------
    def _validate(self):
        errors = []
        if self.inputType == INPUT_MODES:
            if self.inputModes.get() is None:
                return ["Choose the normal modes."]
            try:
                numbers = convert.parse_mode_list(self.modeList.get())
            except ValueError as exc:
                return [str(exc)]
            errors += self._modeListErrors(numbers, self.inputModes.get())
            if AMPLITUDE_RELATIONS[self.amplitudeRelation.get()] == "paper" and len(numbers) < 3:
                errors.append("The paper's amplitude relation needs three modes (e.g. '7-9').")
            structure = self.inputModes.get().getPdb()
            if structure is not None:
                errors += self._boxErrors(self.boxSize.get(), self.samplingRate.get(), structure.getFileName())
        elif self.inputStructure.get() is None:
            errors.append("Choose an atomic structure.")
        else:
            structure = self.inputStructure.get()  # atoms: ATOM records (no waters or ligands)
            records = ("ATOM", "HETATM") if structure.getPseudoAtoms() else ("ATOM",)
            errors += self._boxErrors(self.boxSize.get(), self.samplingRate.get(), structure.getFileName(),
                                      records)
        if self.applyCTF and self.defocusMax.get() < self.defocusMin.get():
            errors.append("The maximum defocus is smaller than the minimum.")
        return errors

    def _summary(self):
        if not hasattr(self, "outputParticles"):
            return ["Particles not synthesized yet."]
        lines = [f"{self.outputParticles.getSize()} particles of {self.boxSize.get()} px at "
                 f"{self.samplingRate.get():g} Å/px."]
        if self.inputType == INPUT_MODES:
            lines.append(f"Modes {self.modeList.get()}, amplitude relation "
                         f"'{AMPLITUDE_RELATIONS[self.amplitudeRelation.get()]}' (scale "
                         f"{self.amplitudeScale.get():g} Å).")
        lines.append("CTF: " + (f"defocus {self.defocusMin.get():g}-{self.defocusMax.get():g} Å" if self.applyCTF
                                else "none") + "; noise: " + (f"SNR {self.snr.get():g}" if self.addNoise else "none")
                     + f"; seed {self.seed.get()}.")
        lines.append("Ground truth as RELION star: " + self._getExtraPath("ground_truth.star"))
        return lines

    def _methods(self):
        if not hasattr(self, "outputParticles"):
            return []
        return [f"{self.outputParticles.getSize()} synthetic particle images were computed as projections "
                f"of the reference in random orientations uniform on SO(3), displaced along normal modes "
                f"{self.modeList.get()}, with CTF and white noise as in DeepHEMNMA [Hamitouche2022]."]
