"""3-D reconstruction of particles with known poses: a map, its half maps and their FSC."""
from pwem.objects import Transform, Volume
from pyworkflow.protocol import params

from ..core.landscape.reconstruction import FSC_THRESHOLD, centred_origin, read_fsc_csv, reconstruct, resolution_at
from .base import FlexDLProtBase

MAP_PREFIX = "map"
#: Boxes larger than this (px) are Fourier-cropped to it unless the form says otherwise.
DEFAULT_WORKING_BOX = 128


class FlexDLProtReconstruct(FlexDLProtBase):
    """A 3-D map from particles with 3-D poses (ALIGN_PROJ) and CTFs, by direct Fourier inversion.

    The particles are split at random into two halves, each reconstructed on its own:
    every image, its shift undone, is inserted as a central slice of the 3-D Fourier
    transform with CTF weighting (CTF x image, CTF^2), then divided by the summed CTF^2
    plus a Wiener term from the FSC of the halves; gridding correction and a soft spherical
    mask follow. The map's resolution is where the gold-standard FSC between the half maps
    falls below 0.143. Poses and CTFs may come from this plugin or from RELION, cryoSPARC
    or Xmipp through Scipion."""
    _label = "reconstruct maps"
    _possibleOutputs = {"outputVolume": Volume}

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles",
                      label="Particles", important=True,
                      help="Particles with 3-D poses (ALIGN_PROJ): the output of the HEMNMA alignment, "
                           "of the synthesis or of a cluster of this plugin, or of a RELION/cryoSPARC "
                           "refinement imported into Scipion.")
        form.addParam("correctCTF", params.BooleanParam, default=True, label="Correct the CTF?",
                      help="Yes: weight each image by its CTF (the particles must carry CTFs). No: "
                           "images are inserted as they are, right only for images without CTF "
                           "(e.g. synthetic particles made without it).")
        form.addSection(label="Reconstruction")
        form.addParam("maskDiameter", params.FloatParam, default=-1.0, label="Mask diameter (Å, -1 = automatic)",
                      help="Diameter in Å of the soft spherical mask applied to the map and to the half maps "
                           "before their FSC; a little larger than the particle. -1 (the default) means "
                           "automatic: the box minus twice the soft edge and 1 px.")
        form.addParam("workingBox", params.IntParam, default=DEFAULT_WORKING_BOX, validators=[params.GE(0)],
                      label="Largest box (px, 0 = the particles' box)",
                      help="Particles in a larger box are Fourier-cropped to this box as they are read, so the "
                           "map has this box and a pixel size larger by box / this (the summary says which). "
                           "Memory and time grow with the cube of the box (a 256 px box with padding 2 needs "
                           "several GB). 0: the particles' own box.")
        form.addParam("maskEdge", params.FloatParam, default=3.0, validators=[params.GE(0)],
                      label="Mask soft edge (px)", expertLevel=params.LEVEL_ADVANCED,
                      help="Width of the raised-cosine edge of the mask, outside its diameter.")
        form.addParam("padFactor", params.FloatParam, default=2.0, validators=[params.Range(1, 4)],
                      label="Padding factor", expertLevel=params.LEVEL_ADVANCED,
                      help="Images are zero-padded by this factor before insertion (2 as RELION). "
                           "More reduces interpolation error at the cube of the memory.")
        form.addParam("wienerFudge", params.FloatParam, default=1.0, validators=[params.Positive],
                      label="Regularisation T", expertLevel=params.LEVEL_ADVANCED,
                      help="The Wiener term is <CTF^2> / (T SNR(k)), SNR from the FSC of the half maps "
                           "(RELION's tau2_fudge). T > 1 trusts the data more (sharper, noisier).")
        form.addParam("seed", params.IntParam, default=0, label="Random seed",
                      help="Seed of the random split into half sets: the same seed gives the same halves.")
        self._addDeviceParam(form)

    # --------------------------- STEPS -----------------------------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.reconstructStep, needsGPU=self._usesGPU())
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def _workingBox(self):
        """(box px, pixel size Å/px) of the map: the particles' box, or 'Largest box' when
        smaller (the particles are then Fourier-cropped, the pixel size grows with them)."""
        particles = self.inputParticles.get()
        box, pixel = int(particles.getXDim()), float(particles.getSamplingRate())
        largest = self.workingBox.get()
        if not largest or box <= largest:
            return box, pixel
        return largest, pixel * box / largest

    def reconstructStep(self):
        self._logToRunLog()
        particles = self._readParticles(self.inputParticles.get())
        box, pixel = self._workingBox()
        images = self._imageSource(particles, box)
        if box != particles.box:
            self.info(self._croppingLine(particles.box, particles.pixel_size, box, "'Largest box'"))
        if particles.angles is None:
            raise ValueError("The particles have no 3-D poses: align them first.")
        if self.correctCTF and particles.ctf is None:
            raise ValueError("The particles have no CTF: set 'Correct the CTF?' to No or assign CTFs.")
        diameter = self.maskDiameter.get()
        radius = None if diameter <= 0 else diameter / 2.0 / pixel

        def progress(done, total, message):
            self.info("Inserted %d / %d particles" % (done, total))

        result = reconstruct(images, particles.angles, particles.shifts * box / particles.box, pixel,
                             particles.ctf if self.correctCTF else None, seed=self.seed.get(),
                             pad_factor=self.padFactor.get(), mask_radius_px=radius,
                             mask_edge_px=self.maskEdge.get(), wiener_fudge=self.wienerFudge.get(),
                             device=self._getDevice(), progress=progress)
        result.write(self._getExtraPath(), MAP_PREFIX)
        self.info("Resolution at FSC %g: %.2f Å (%d + %d particles)" %
                  (FSC_THRESHOLD, result.resolution, *result.particles))

    def _mapFile(self, suffix: str = "") -> str:
        return self._getExtraPath(f"{MAP_PREFIX}{suffix}.mrc")

    def fscFile(self) -> str:
        """The FSC of the half maps (csv: shell, frequency 1/Å, resolution Å, fsc)."""
        return self._getExtraPath(f"{MAP_PREFIX}_fsc.csv")

    def createOutputStep(self):
        box, pixel = self._workingBox()
        volume = Volume(location=self._mapFile())
        volume.setSamplingRate(pixel)
        origin = Transform()
        origin.setShifts(*centred_origin(box, pixel))
        volume.setOrigin(origin)
        volume.setHalfMaps([self._mapFile("_half1"), self._mapFile("_half2")])
        self._defineOutputs(outputVolume=volume)
        self._defineSourceRelation(self.inputParticles, volume)

    # --------------------------- INFO ------------------------------------------
    def _validate(self):
        particles = self.inputParticles.get()
        if particles is None:
            return ["Choose the particles."]
        errors = []
        if particles.getSize() < 2:
            errors.append("Two half sets need at least 2 particles.")
        if not particles.hasAlignmentProj():
            errors.append("The particles have no 3-D poses (ALIGN_PROJ): align them first (HEMNMA "
                          "alignment of this plugin, or a RELION/cryoSPARC refinement).")
        if self.correctCTF and not particles.hasCTF():
            errors.append("The particles have no CTF: set 'Correct the CTF?' to No to reconstruct without "
                          "CTF correction (right only for images without CTF), or estimate/assign CTFs first.")
        box_angstrom = particles.getXDim() * particles.getSamplingRate() if particles.getXDim() else None
        if box_angstrom and self.maskDiameter.get() > box_angstrom:
            errors.append(f"The mask diameter ({self.maskDiameter.get():g} Å) is larger than the box "
                          f"({box_angstrom:g} Å); use at most the box, or -1.")
        return errors

    def resolution(self) -> float:
        """Resolution (Å) at FSC 0.143 of the half maps, from the FSC file."""
        freq, curve = read_fsc_csv(self.fscFile())
        return resolution_at(freq, curve, FSC_THRESHOLD)

    def _summary(self):
        if not hasattr(self, "outputVolume"):
            return ["Map not reconstructed yet."]
        try:
            res = self.resolution()
        except ValueError as exc:
            return [str(exc)]
        volume, particles = self.outputVolume, self.inputParticles.get()
        cropped = self._croppingLine(particles.getXDim(), particles.getSamplingRate(), volume.getXDim(),
                                     "'Largest box'")
        return [f"Map of {particles.getSize()} particles, box {volume.getXDim()} px at "
                f"{volume.getSamplingRate():g} Å/px" + ("" if self.correctCTF else ", without CTF correction")
                + "."] + ([cropped] if cropped else []) + [
                f"Resolution at FSC {FSC_THRESHOLD} between the half maps (masked): {res:.2f} Å "
                f"(Nyquist {2 * volume.getSamplingRate():g} Å).",
                "Half maps: " + ", ".join(volume.getHalfMaps().split(",")),
                "FSC: " + self.fscFile()]

    def _methods(self):
        if not hasattr(self, "outputVolume"):
            return []
        try:
            res = "%.2f Å" % self.resolution()
        except ValueError:
            res = "unknown"
        return [f"A 3-D map was reconstructed from {self.inputParticles.get().getSize()} particles by direct "
                f"Fourier inversion with {'CTF weighting and ' if self.correctCTF else ''}a Wiener filter "
                f"whose signal-to-noise ratio came from the FSC of two independent half maps [Scheres2012]; "
                f"its resolution at the gold-standard FSC threshold of 0.143 [Rosenthal2003] is {res}."]

    def _citations(self):
        return ["Rosenthal2003", "Scheres2012"]
