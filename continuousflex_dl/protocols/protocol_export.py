"""Results for other tools: ContinuousFlex (Xmipp metadata), RELION 3.1, cryoDRGN."""
import json
import os

from pwem.objects import SetOfParticlesFlex
from pyworkflow.protocol import params

from .. import convert, reports
from ..convert import export as convert_export
from .base import FlexDLProtBase

#: What the run wrote, for its summary (extra/).
MANIFEST = "exported.json"
XMIPP_FILE, STAR_FILE, LATENT_FILE, IDS_FILE, STACK_FOLDER = (  # for the help texts
    convert_export.XMIPP_FILE, convert_export.STAR_FILE, convert_export.LATENT_FILE, convert_export.IDS_FILE,
    convert_export.STACK_FOLDER)


class FlexDLProtExport(FlexDLProtBase):
    """Write a set of particles with amplitudes (HEMNMA, DeepHEMNMA, a cluster, an outlier-free
    set, a selection) for other tools: Xmipp metadata with _nmaDisplacements as ContinuousFlex's
    analysis reads it, a RELION 3.1 star to re-refine the particles elsewhere, and cryoDRGN's
    latent file z.pkl. All files list the particles in the same order."""
    _label = "export for other tools"
    _possibleOutputs = {"outputParticles": SetOfParticlesFlex}

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticlesFlex",
                      label="Particles with amplitudes", important=True,
                      help="Any set of this plugin with normal-mode amplitudes: HEMNMA or DeepHEMNMA "
                           "output, a cluster, the particles kept by outlier removal, a selection.")
        form.addParam("writeXmipp", params.BooleanParam, default=True,
                      label="Xmipp metadata for ContinuousFlex?",
                      help=f"extra/{XMIPP_FILE}: the images.xmd of a ContinuousFlex HEMNMA run (_image, "
                           f"angles, shifts, _nmaDisplacements, _cost, _itemId); the output particles "
                           f"carry {convert_export.XMIPP_DISPLACEMENTS_ATTR}, which ContinuousFlex's "
                           f"dimension reduction and viewers read.")
        form.addParam("writeRelion", params.BooleanParam, default=True, label="RELION 3.1 star?",
                      help=f"extra/{STAR_FILE}: optics groups, poses, CTFs and one _cfdlAmplitudeMode<k> "
                           f"column (Å) per mode; the stacks are linked (MRC) or converted into "
                           f"extra/{STACK_FOLDER}/ and named relative to extra/: run RELION there, or "
                           f"copy both into the RELION project folder. Scipion's RELION import reads "
                           f"the star back.")
        form.addParam("writeLatent", params.BooleanParam, default=True, label="cryoDRGN latent file?",
                      help=f"extra/{LATENT_FILE}: the amplitudes as cryoDRGN's z (a pickled float32 "
                           f"array N x K, then the log-variance when HEMNMA gave uncertainties), for "
                           f"its analysis tools; extra/{IDS_FILE}: the Scipion id of each row.")

    def _insertAllSteps(self):
        self._insertFunctionStep(self.exportStep, needsGPU=False)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def exportStep(self):
        particles = self.inputParticles.get()
        written = convert_export.export_particles(particles, self._getExtraPath(), self.writeXmipp.get(),
                                                  self.writeRelion.get(), self.writeLatent.get(),
                                                  self._cost(particles))
        with open(self._getExtraPath(MANIFEST), "w") as f:
            json.dump({"particles": particles.getSize(), "files": written}, f, indent=1)
        self.info(f"Exported {particles.getSize()} particles: "
                  + "; ".join(f"{name} ({what})" for name, what in written.items()))

    def _cost(self, particles):
        """HEMNMA's cost (1 - score, :mod:`..core.hemnma.alignment`) of each particle, or None."""
        try:
            return 1.0 - reports.read_attribute(particles, convert.SCORE_ATTR)
        except ValueError:
            return None

    def createOutputStep(self):
        particles = self.inputParticles.get()
        parts = convert.read_particles(particles, need_amplitudes=True)
        out = SetOfParticlesFlex(filename=self._getPath("particles_flex.sqlite"), progName=convert.FLEX_PROG_NAME)
        convert_export.copy_with_xmipp_attributes(out, particles, parts.amplitudes, self._cost(particles))
        self._defineOutputs(outputParticles=out)
        self._defineSourceRelation(self.inputParticles, out)

    def _validate(self):
        if not (self.writeXmipp.get() or self.writeRelion.get() or self.writeLatent.get()):
            return ["Choose at least one format to write."]
        return []

    def _summary(self):
        path = self._getExtraPath(MANIFEST)
        if not os.path.exists(path):
            return []
        with open(path) as f:
            manifest = json.load(f)
        return ([f"{manifest['particles']} particles written in {self._getExtraPath()}:"]
                + [f"- {name}: {what}" for name, what in manifest["files"].items()])

    def _methods(self):
        return ["The normal-mode amplitudes and poses were exported for ContinuousFlex (Xmipp metadata), "
                "RELION 3.1 and cryoDRGN."]
