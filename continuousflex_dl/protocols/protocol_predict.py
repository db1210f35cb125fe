"""DeepHEMNMA prediction: amplitudes (and poses) of new particles in milliseconds each."""
import os

import numpy as np
from pwem.objects import SetOfParticlesFlex
from pyworkflow.protocol import params

from .. import convert
from .base import FlexDLProtBase


class FlexDLProtPredict(FlexDLProtBase):
    """Predict normal-mode amplitudes of particles with a trained DeepHEMNMA model.

    Particles with NaN, infinite or constant images are refused by id."""
    _label = "DeepHEMNMA prediction"
    _possibleOutputs = {"outputParticles": SetOfParticlesFlex}

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputModel", params.PointerParam, pointerClass="FlexDLModel",
                      label="Trained model", important=True, help="Output of the DeepHEMNMA training.")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles",
                      label="Particles", important=True,
                      help="Particles covering the same box in Å as the training particles; a different "
                           "pixel size is handled by Fourier cropping.")
        form.addParam("rotations", params.IntParam, default=1, validators=[params.GE(1)],
                      label="In-plane rotations to average",
                      help="Predict each particle at this many in-plane rotations (0, 360/N, ... degrees) and "
                           "average the amplitudes (test-time augmentation). Worth it for models trained with "
                           "in-plane rotation augmentation; costs N times the time. 1: no averaging.")
        form.addParam("batchSize", params.IntParam, default=128, validators=[params.GT(0)],
                      expertLevel=params.LEVEL_ADVANCED, label="Batch size",
                      help="Images predicted at once; lower it if the GPU runs out of memory.")
        form.addParam("bfloat16", params.BooleanParam, default=False, expertLevel=params.LEVEL_ADVANCED,
                      label="bfloat16 on the CPU?",
                      help="Run the network in bfloat16 on the CPU: several times faster on CPUs with "
                           "bfloat16 support. Amplitudes differ from float32 by about 0.6 Å on average "
                           "(up to 8 Å for single particles, measured on the demo). GPUs always use "
                           "mixed precision.")
        self._addContrastParam(form)
        self._addDeviceParam(form)

    def _insertAllSteps(self):
        self._insertFunctionStep(self.predictStep, needsGPU=False)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def predictStep(self):
        self._logToRunLog()
        model = self.inputModel.get()
        parts = convert.read_particles(self.inputParticles.get())
        pose = model.predictsPose()
        amplitudes, angles, shifts = self._networkPrediction(
            parts, model, pose, batch_size=self.batchSize.get(), bfloat16=self.bfloat16.get(),
            rotations=self.rotations.get())
        np.savez(self._getExtraPath("predicted.npz"), ids=parts.ids, amplitudes=amplitudes,
                 **({"angles": angles, "shifts": shifts} if pose else {}))

    def createOutputStep(self):
        data = np.load(self._getExtraPath("predicted.npz"))
        out = SetOfParticlesFlex(filename=self._getPath("particles_flex.sqlite"), progName=convert.FLEX_PROG_NAME)
        convert.fill_flex_particles(out, self.inputParticles.get(), data["ids"], data["amplitudes"],
                                    self.inputModel.get().getModes(), convert.SOURCE_NETWORK,
                                    data["angles"] if "angles" in data.files else None,
                                    data["shifts"] if "shifts" in data.files else None)
        self._defineOutputs(outputParticles=out)
        self._defineSourceRelation(self.inputParticles, out)
        self._defineSourceRelation(self.inputModel, out)

    def _validate(self):
        model, parts = self.inputModel.get(), self.inputParticles.get()
        if model is None or parts is None:
            return ["Choose a trained model and particles."]
        if parts.getSize() == 0:
            return ["The input set of particles is empty."]
        extent_model = model.getImageSize() * model.getPixelSize()
        extent = parts.getXDim() * parts.getSamplingRate()
        if abs(extent - extent_model) > 0.01 * extent_model:
            return [f"The particles cover {extent:.1f} Å ({parts.getXDim()} px at {parts.getSamplingRate():g} Å/px) "
                    f"but the model was trained on {extent_model:.1f} Å boxes ({model.getImageSize()} px at "
                    f"{model.getPixelSize():g} Å/px). Re-extract or window the particles to the same box in Å."]
        if self._modelPhaseFlips(model) and not parts.hasCTF():
            return ["The model was trained on phase-flipped images: the particles need a CTF."]
        if parts.getXDim() < model.getImageSize():
            return [f"The particles ({parts.getXDim()} px) are smaller than the model's images "
                    f"({model.getImageSize()} px): their pixel size is coarser than the training data's. "
                    f"Use particles at {model.getPixelSize():g} Å/px or finer."]
        return []

    @staticmethod
    def _modelPhaseFlips(model) -> bool:
        from ..core.training import CONFIG_FILE, TrainConfig
        path = os.path.join(model.getModelDir() or "", CONFIG_FILE)
        return os.path.exists(path) and TrainConfig.load(path).phase_flip

    def _summary(self):
        if not hasattr(self, "outputParticles"):
            return []
        data = np.load(self._getExtraPath("predicted.npz"))
        modes = self.inputModel.get().getModes()
        from ..reports import error_summary_lines
        averaged = f", averaged over {self.rotations.get()} in-plane rotations" if self.rotations.get() > 1 else ""
        return [f"Amplitudes of {len(data['ids'])} particles predicted for modes {modes}{averaged}.",
                "Mean ± std (Å): " + ", ".join(f"mode {m}: {a.mean():.1f} ± {a.std():.1f}"
                                               for m, a in zip(modes, data["amplitudes"].T))
                ] + error_summary_lines(self.outputParticles, self.inputParticles.get())

    def _methods(self):
        return ["Normal-mode amplitudes were predicted with a trained DeepHEMNMA network [Hamitouche2022]."]
