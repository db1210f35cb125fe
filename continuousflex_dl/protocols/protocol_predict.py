"""DeepHEMNMA prediction: amplitudes (and poses) of new particles in milliseconds each, in chunks."""
import os

import numpy as np
from pwem.objects import SetOfParticlesFlex
from pyworkflow.protocol import STEPS_PARALLEL, params

from .. import convert
from ..core.chunks import chunk_bounds
from ..core.network.prediction_job import PredictionJob, prediction_chunk_size
from ..core.imaging.dataset import POSES_NEEDED
from ..core.network.training import ModelFolder
from .base import FlexDLProtBase


class FlexDLProtPredict(FlexDLProtBase):
    """Predict normal-mode amplitudes of particles with a trained DeepHEMNMA model.

    A large set is predicted in chunks, each a step of the run (a process of its own, or a
    cluster job when 'Use a queue engine?' sends every step to the queue); a small set is
    one chunk. Continue reuses a chunk only when it was computed from the
    same model, particles and settings. Particles with NaN, infinite or constant images
    are refused by id."""
    _label = "predict DeepHEMNMA"
    _possibleOutputs = {"outputParticles": SetOfParticlesFlex}
    stepsExecutionMode = STEPS_PARALLEL

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
                      help="Images predicted at once; lower it if the GPU runs out of memory (the results do not "
                           "depend on it).")
        form.addParam("bfloat16", params.BooleanParam, default=False, expertLevel=params.LEVEL_ADVANCED,
                      label="bfloat16 on the CPU?",
                      help="Run the network in bfloat16 on the CPU: several times faster on CPUs with "
                           "bfloat16 support. Amplitudes differ from float32 by about 0.6 Å on average "
                           "(up to 8 Å for single particles, measured on the demo). GPUs always use "
                           "mixed precision.")
        form.addParam("chunkSize", params.IntParam, default=0, validators=[params.GE(0)],
                      expertLevel=params.LEVEL_ADVANCED, label="Particles per chunk (0 = automatic)",
                      help="The particles are predicted in chunks, each a step of the run (a process of its "
                           "own, or a cluster job when 'Use a queue engine?' sends every step to the queue). "
                           "0 means automatic: one "
                           "chunk below 5000 particles per parallel chunk (a process start and a model load "
                           "cost a few seconds), else about 2 chunks per parallel chunk, of at most 20000 "
                           "particles (their images are held in memory). Continue skips the chunks already "
                           "done with the same model, particles and settings.")
        self._addContrastParam(form)
        self._addDeviceParam(form)
        self._addChunkParallelSection(form, parallel=1)

    # --------------------------- STEPS -----------------------------------------
    def _insertAllSteps(self):
        # Every step carries the job fingerprint (model, particles, settings): Continue after a
        # change reruns the steps it changes, and chunk files are placed by particle id.
        job = self._buildJob()
        job_fp = job.fingerprint()
        size = self.chunkSize.get() or prediction_chunk_size(len(job.ids), self._parallelChunks())
        bounds = chunk_bounds(len(job.ids), size)
        self._plan = (size, len(bounds))  # read by the steps, which run in this process
        self._resetDamagedChunks(self._jobFolder(), bounds, job_fp)
        convert_step = self._insertFunctionStep(self.convertInputStep, job_fp, size, needsGPU=False)
        chunk_steps = [self._insertFunctionStep(self.predictChunkStep, start, stop, job_fp,
                                                prerequisites=[convert_step], needsGPU=self._usesGPU())
                       for start, stop in bounds]
        self._insertFunctionStep(self.createOutputStep, job_fp, size, prerequisites=chunk_steps, needsGPU=False)

    def _buildJob(self) -> PredictionJob:
        model = self.inputModel.get()
        parts = self._readParticles(self.inputParticles.get())
        normalised = self._modelPoseNormalises(model)
        if normalised and parts.angles is None:
            raise ValueError(POSES_NEEDED)
        return PredictionJob(model_dir=model.getModelDir(), stamp=ModelFolder(model.getModelDir()).stamp(), ids=parts.ids,
                             stacks=parts.stacks, indices=parts.indices, pixel_size=parts.pixel_size,
                             invert=self.invertContrast.get(),
                             ctf=parts.ctf if self._modelPhaseFlips(model) else None, pose=model.predictsPose(),
                             options=dict(batch_size=self.batchSize.get(), bfloat16=self.bfloat16.get(),
                                          rotations=self.rotations.get()),
                             angles=parts.angles if normalised else None, shifts=parts.shifts if normalised else None)

    def _jobFolder(self) -> str:
        return self._getExtraPath("job")

    def convertInputStep(self, job_fp, chunk_size):
        self._logToRunLog()
        job = self._buildJob()
        if job.fingerprint() != job_fp:
            raise ValueError("The inputs or the model changed while the run was starting: run it again.")
        job.save(self._jobFolder())
        n_chunks = len(chunk_bounds(len(job.ids), chunk_size))
        where = "cluster jobs" if self.useQueueForSteps() else "processes"
        self.info(f"{len(job.ids)} particles: {n_chunks} chunks of at most {chunk_size} particles, "
                  f"{min(n_chunks, self._parallelChunks())} {where} at a time")
        for line in self._cropping():
            self.info(line)
        return [os.path.join(self._jobFolder(), name) for name in ("job.npz", "job.json")]

    def predictChunkStep(self, start, stop, job_fp):
        """One chunk as a process of the package's command line; it reads the job folder and
        writes its chunk file atomically."""
        return self._runChunkStep("predict-chunk", self._jobFolder(), start, stop, job_fp, PredictionJob.DONE)

    def createOutputStep(self, job_fp, chunk_size):
        job = PredictionJob.load_checked(self._jobFolder(), job_fp)
        data = job.gather(self._jobFolder(), chunk_size)
        tmp = self._getExtraPath("predicted.tmp.npz")
        np.savez(tmp, ids=job.ids, **data)
        os.replace(tmp, self._getExtraPath("predicted.npz"))
        path = self._getPath("particles_flex.sqlite")
        if os.path.exists(path):  # a continued run that had finished before
            os.remove(path)
        out = SetOfParticlesFlex(filename=path, progName=convert.FLEX_PROG_NAME)
        convert.fill_flex_particles(out, self.inputParticles.get(), job.ids, data["amplitudes"],
                                    self.inputModel.get().getModes(), convert.SOURCE_NETWORK,
                                    data.get("angles"), data.get("shifts"))
        self._defineOutputs(outputParticles=out)
        self._defineSourceRelation(self.inputParticles, out)
        self._defineSourceRelation(self.inputModel, out)

    def _validate(self):
        model, parts = self.inputModel.get(), self.inputParticles.get()
        if model is None or parts is None:
            return ["Choose a trained model and particles."]
        if parts.getSize() == 0:
            return ["The input set of particles is empty."]
        box_errors = self._modelBoxErrors(model, parts)
        if box_errors:
            return box_errors
        if self._modelPhaseFlips(model) and not parts.hasCTF():
            return ["The model was trained on phase-flipped images: the particles need a CTF."]
        if self._modelPoseNormalises(model):
            if not parts.hasAlignmentProj():
                return [POSES_NEEDED]
            if self.rotations.get() > 1:
                return ["The model turns every image to its pose (pose normalisation): set 'In-plane rotations "
                        "to average' to 1."]
        if parts.getXDim() < model.getImageSize():
            return [f"The particles ({parts.getXDim()} px) are smaller than the model's images "
                    f"({model.getImageSize()} px): their pixel size is coarser than the training data's. "
                    f"Use particles at {model.getPixelSize():g} Å/px or finer."]
        return []

    def _cropping(self) -> list:
        """[the line saying how the particles are downsampled to the model's box] or []."""
        parts, model = self.inputParticles.get(), self.inputModel.get()
        line = self._croppingLine(parts.getXDim(), parts.getSamplingRate(), model.getImageSize(),
                                  "the model's box")
        return [line] if line else []

    @staticmethod
    def _modelPhaseFlips(model) -> bool:
        config = ModelFolder(model.getModelDir() or "").read_config()
        return config is not None and config.preprocessing.phase_flip

    @staticmethod
    def _modelPoseNormalises(model) -> bool:
        """The model turns and centres every image by its pose (its config.json says so)."""
        config = ModelFolder(model.getModelDir() or "").read_config()
        return config is not None and config.preprocessing.pose_normalise

    def _summary(self):
        if not hasattr(self, "outputParticles"):
            return []
        data = np.load(self._getExtraPath("predicted.npz"))
        modes = self.inputModel.get().getModes()
        from ..reports import error_summary_lines, prediction_warning
        averaged = f", averaged over {self.rotations.get()} in-plane rotations" if self.rotations.get() > 1 else ""
        if self._modelPoseNormalises(self.inputModel.get()):
            averaged += ", each image turned and centred by its own pose (pose normalisation)"
        return [f"Amplitudes of {len(data['ids'])} particles predicted for modes {modes}{averaged}.",
                "Mean ± std (Å): " + ", ".join(f"mode {m}: {a.mean():.1f} ± {a.std():.1f}"
                                               for m, a in zip(modes, data["amplitudes"].T))
                ] + self._cropping() + error_summary_lines(self.outputParticles, self.inputParticles.get()) \
            + prediction_warning(self.outputParticles, self.getProject(), self._trainingParticles())

    def _trainingParticles(self):
        """The particles the input model was trained on (None when its training run is not known)."""
        from ..reports import producer
        train = producer(self.inputModel.get(), self.getProject())
        pointer = getattr(train, "inputParticles", None)
        return pointer.get() if pointer is not None else None

    def _methods(self):
        return ["Normal-mode amplitudes were predicted with a trained DeepHEMNMA network [Hamitouche2022]."]
