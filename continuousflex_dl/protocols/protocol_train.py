"""DeepHEMNMA training: a ResNet34 + MLP regressor of normal-mode amplitudes."""
import os
import shlex
import sys

from pyworkflow.protocol import params

from .. import convert
from ..core.imaging.dataset import Preprocessing
from ..core.network.distributed import TrainingJob
from ..core.network.training import SOURCES, ModelFolder, TrainConfig, best_epoch, source_of
from ..objects import FlexDLModel
from .base import FlexDLProtBase

LOSSES = ["l1", "mse"]
SCHEDULES = ["onecycle", "plateau", "cosine"]
#: The "Training data" choices: "auto", resolved to a source (see ``_trainingData``), then the
#: registered training-data sources by their labels.
TRAINING_DATA = {"auto": None, **{source.label: name for name, source in SOURCES.items()}}
#: The "Turn and centre images by their poses?" choices (``TrainConfig.pose_normalise``, "auto" resolved
#: by ``_poseNormalise``).
POSE_NORMALISE = ["auto", "yes", "no"]
#: The "Simulated amplitudes" choices (``TrainConfig.sim_prior``).
SIM_PRIORS = {"around the particles' amplitudes": "estimates", "uniform over their range": "range"}


def _shownFor(setting: str) -> str:
    """The form condition showing a parameter for "auto" and the sources that read ``setting``."""
    shown = [i for i, name in enumerate(TRAINING_DATA.values())
             if name is None or setting in SOURCES[name].settings]
    return f"trainingData in {shown}"


class FlexDLProtTrain(FlexDLProtBase):
    """Train DeepHEMNMA on particles with known amplitudes (HEMNMA output or ground truth),
    on particles simulated from the reference and its normal modes, matched to the input
    set (its CTFs, its noise level and spectrum, the range of its amplitudes and shifts),
    or on the simulated particles first, then fine-tuned on the particles' amplitudes.

    The split into training and validation is by particle, target
    standardisation is fitted on the training split only and saved with the
    model, and the best (lowest validation loss) weights are kept. Continue
    resumes a stopped run from its last epoch with the same particles and
    settings (more epochs allowed, except with the one-cycle schedule);
    other changes are refused with what changed: use Restart for them.
    Particles with NaN, infinite or constant images are refused by id."""
    _label = "train DeepHEMNMA"
    _possibleOutputs = {"outputModel": FlexDLModel}

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticlesFlex",
                      label="Particles with amplitudes", important=True,
                      help="Output of the HEMNMA alignment (after outlier removal), or synthesized "
                           "particles with ground-truth amplitudes.")
        form.addParam("trainingData", params.EnumParam, choices=list(TRAINING_DATA), default=0,
                      label="Training data",
                      help="particles' amplitudes: the images and their amplitudes, as in DeepHEMNMA "
                           "(Hamitouche & Jonic 2022). "
                           "simulated from the reference: new particles every epoch, projected from the "
                           "normal modes' structure with the particles' CTFs, noise level and spectrum "
                           "(estimated from the images), amplitude and shift ranges, in random "
                           "orientations; needs the normal modes. simulated, then fine-tuned: the "
                           "simulated particles first, then some epochs on the particles' amplitudes. "
                           "auto: simulated then fine-tuned for HEMNMA amplitudes when the normal modes "
                           "are given, else the particles' amplitudes.")
        form.addParam("inputModes", params.PointerParam, pointerClass="SetOfNormalModes", allowsNull=True,
                      label="Normal modes (for simulation)",
                      help="The normal modes the particles' amplitudes refer to (their structure is the "
                           "reference); needed to train on simulated particles. Empty for particles from a "
                           "HEMNMA alignment: the modes that alignment used, found through the project "
                           "(the run's summary names them).")
        form.addParam("simImages", params.IntParam, default=6000, validators=[params.GT(0)],
                      condition=_shownFor("sim_images"), label="Simulated images per epoch",
                      help="Every epoch simulates this many new images (none is seen twice).")
        form.addParam("simPrior", params.EnumParam, choices=list(SIM_PRIORS), default=0,
                      condition=_shownFor("sim_prior"), expertLevel=params.LEVEL_ADVANCED,
                      label="Simulated amplitudes",
                      help="around the particles' amplitudes: each simulated particle takes the amplitudes "
                           "of a random input particle plus Gaussian noise (a kernel density, widths by "
                           "Scott's rule), so the simulated conformations are distributed as the set's (a "
                           "path stays a path) and the network learns what it will meet. uniform over their "
                           "range: independent uniform amplitudes in the range of the particles' (widened "
                           "by 10 %), for sets whose estimates are too few or too noisy to follow.")
        form.addParam("finetuneEpochs", params.IntParam, default=10, validators=[params.GT(0)],
                      condition=_shownFor("finetune_epochs"), label="Fine-tuning epochs",
                      help="Epochs on the particles' amplitudes after the simulated ones, at a tenth of "
                           "the learning rate.")
        form.addParam("workingSize", params.IntParam, default=64, validators=[params.GE(0)],
                      label="Working size (px, 0 = full size)",
                      help="The network sees images Fourier-cropped to this size (0: full size). "
                           "64 px trains fast on a CPU; 128 px on a GPU.")
        form.addParam("window", params.FloatParam, default=0.0, validators=[params.GE(0)],
                      label="Window (Å, 0 = whole box)",
                      help="The network sees a square window of this side around the box centre, then "
                           "Fourier-cropped to the working size (0: the whole box). A window a little "
                           "larger than the particle keeps its detail at a small working size.")
        form.addParam("phaseFlip", params.BooleanParam, default=True, label="Phase flip with the CTF?",
                      help="Correct the CTF phases of the images before the network sees them (when the "
                           "particles have a CTF). Prediction then applies the same correction.")
        form.addParam("poseNormalise", params.EnumParam, choices=POSE_NORMALISE, default=0,
                      display=params.EnumParam.DISPLAY_HLIST, label="Turn and centre images by their poses?",
                      help="Pose normalisation: before the network, every image is centred by its shifts and "
                           "turned by its in-plane angle (psi), so the network sees each particle as the "
                           "projection at (rot, tilt, psi = 0) without shift and has only the conformation and "
                           "the view direction left to learn; simulated particles are turned by their own "
                           "poses. The poses are the particles' (the HEMNMA alignment's, or a consensus "
                           "refinement's). Prediction then needs particles with poses and uses their own "
                           "(the model remembers the setting). auto: yes when the particles have a projection "
                           "alignment and the pose is not predicted, else no. It cannot be combined with pose "
                           "prediction or in-plane rotation augmentation.")
        form.addParam("predictPose", params.BooleanParam, default=False, label="Also predict the pose?",
                      help="Also regress the orientation (6-D rotation representation) and the shifts; "
                           "needs particles with a projection alignment.")
        form.addSection(label="Training")
        form.addParam("epochs", params.IntParam, default=30, validators=[params.GT(0)], label="Epochs",
                      help="Passes over the training images, or simulated epochs when training on "
                           "simulated particles (with the plateau or cosine schedule, early stopping may "
                           "end sooner).")
        form.addParam("batchSize", params.IntParam, default=32, validators=[params.GT(0)], label="Batch size",
                      help="Images per optimisation step (32 in Hamitouche & Jonic 2022), over all training processes: "
                           "each of N processes takes batch size / N of them, so the result does not depend "
                           "on N (a multiple of N). Lower it if memory runs out.")
        form.addParam("learningRate", params.FloatParam, default=2e-3, validators=[params.Positive],
                      label="Learning rate", help="Adam's peak learning rate (one-cycle schedule) or its "
                                                  "initial learning rate (the other schedules).")
        form.addParam("lrSchedule", params.EnumParam, choices=SCHEDULES, default=0,
                      expertLevel=params.LEVEL_ADVANCED, display=params.EnumParam.DISPLAY_HLIST,
                      label="Learning-rate schedule",
                      help="onecycle: warm up to the learning rate over the first 30 % of the steps, then "
                           "decay; runs all epochs and trains fastest. plateau: halve the rate when the "
                           "validation loss stops improving, with early stopping. cosine: cosine decay over "
                           "the epochs, with early stopping.")
        form.addParam("valFraction", params.FloatParam, default=0.1, validators=[params.Range(0.01, 0.5)],
                      label="Validation fraction", help="Fraction of the particles held out for validation.")
        form.addParam("patience", params.IntParam, default=8, validators=[params.GT(0)],
                      condition="lrSchedule != 0",
                      label="Early-stopping patience", expertLevel=params.LEVEL_ADVANCED,
                      help="Stop after this many epochs without validation improvement.")
        form.addParam("loss", params.EnumParam, choices=LOSSES, default=0, expertLevel=params.LEVEL_ADVANCED,
                      display=params.EnumParam.DISPLAY_HLIST, label="Loss",
                      help="l1 (mean absolute error, as in Hamitouche & Jonic 2022) or mse (mean squared error, which "
                           "weighs large errors more), on the amplitudes standardised to zero mean and unit "
                           "variance per mode.")
        form.addParam("augment", params.BooleanParam, default=False, label="In-plane rotation augmentation?",
                      help="Rotate training images by random in-plane angles (amplitudes unchanged, pose "
                           "labels rotated accordingly). Useful when the particles have random in-plane "
                           "angles, as real particles do; predict such a model with in-plane rotation "
                           "averaging ('In-plane rotations to average' 8 lowered the error by 10-22 % on synthetic "
                           "adenylate kinase particles).")
        form.addParam("seed", params.IntParam, default=0, label="Random seed",
                      help="Split, initialisation, shuffling and augmentation; same seed, same model.")
        self._addContrastParam(form)
        self._addDeviceParam(form)
        form.addParam("processes", params.IntParam, default=1, validators=[params.GE(1)],
                      label="Training processes (GPUs)", expertLevel=params.LEVEL_ADVANCED,
                      help="Train on this many processes of one machine at once: with 'Use GPU?' Yes, one GPU "
                           "each, the first N of 'GPU IDs' (list at least N); otherwise N processes share "
                           "the CPU cores. Each process trains on its share of every batch and the results "
                           "are combined, so N processes give the result of one, about N times faster on N "
                           "GPUs. A stopped training continues only with the same number.")

    def _insertAllSteps(self):
        # The settings are the step's argument: Continue after a change reruns the training step,
        # which continues the stopped run or refuses what cannot continue (then Restart).
        self._insertFunctionStep(self.trainStep, self._settings(), self.processes.get(),
                                 needsGPU=self._usesGPU())
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def _modelDir(self):
        return self._getExtraPath("model")

    def _trainingData(self) -> str:
        """The training data (a ``core.network.training.SOURCES`` name), "auto" resolved: simulated then
        fine-tuned for HEMNMA amplitudes when the normal modes are given, else the particles'."""
        chosen = list(TRAINING_DATA.values())[self.trainingData.get()]
        if chosen is not None:
            return chosen
        parts = self.inputParticles.get()
        hemnma = parts is not None and convert.flex_source(parts) == convert.SOURCE_HEMNMA
        return "simulated+finetune" if hemnma and self._modes() is not None else "particles"

    def _modes(self):
        """The normal modes simulated from: the form's, else, for HEMNMA amplitudes, those of the
        alignment they come from, found through the project (``reports.lineage_modes``)."""
        modes, parts = self.inputModes.get(), self.inputParticles.get()
        if modes is not None or parts is None or convert.flex_source(parts) != convert.SOURCE_HEMNMA:
            return modes
        from ..reports import lineage_modes
        return lineage_modes(parts, self.getProject())

    def _poseNormalise(self) -> bool:
        """Pose normalisation, "auto" resolved: on when the particles have a projection alignment and
        neither pose prediction nor in-plane rotation augmentation is asked for."""
        choice = POSE_NORMALISE[self.poseNormalise.get()]
        if choice != "auto":
            return choice == "yes"
        parts = self.inputParticles.get()
        return bool(parts is not None and parts.hasAlignmentProj() and not self.predictPose.get()
                    and not self.augment.get())

    def _settings(self) -> dict:
        """The form's training settings, as TrainConfig fields, and which particles and modes."""
        parts, modes = self.inputParticles.get(), self._modes()
        data = self._trainingData()
        source = SOURCES[data]
        form = dict(sim_images=self.simImages.get(), finetune_epochs=self.finetuneEpochs.get(),
                    sim_prior=list(SIM_PRIORS.values())[self.simPrior.get()])
        return dict(working_size=self.workingSize.get() or None, window=self.window.get() or None, source=data,
                    **{k: v for k, v in form.items() if k in source.settings}, predict_pose=self.predictPose.get(),
                    epochs=self.epochs.get(), batch_size=self.batchSize.get(),
                    learning_rate=self.learningRate.get(), loss=LOSSES[self.loss.get()],
                    lr_schedule=SCHEDULES[self.lrSchedule.get()], patience=self.patience.get(),
                    val_fraction=self.valFraction.get(), augment_rotation=self.augment.get(),
                    seed=self.seed.get(), phase_flip=self.phaseFlip.get(), invert=self.invertContrast.get(),
                    pose_normalise=self._poseNormalise(),
                    particles=f"{parts.getObjId()}:{parts.getSize()}" if parts is not None else "",
                    modes=str(modes.getObjId()) if modes is not None and source.simulates else "")

    def trainStep(self, settings: dict, processes: int = 1):
        """Train here (one process), or as a train-worker process of ``processes`` DDP ranks (a
        cluster job with 'Use queue for steps') reading the job from the run's folder."""
        self._logToRunLog()
        settings = dict(settings)
        settings.pop("particles")
        settings.pop("modes")
        phase_flip = settings.pop("phase_flip")
        settings.pop("invert")   # read by _imageSource
        parts = self._readParticles(self.inputParticles.get(), need_amplitudes=True)
        modes = parts.amplitude_modes()
        config = TrainConfig.build(modes=modes, pixel_size=parts.pixel_size, **settings)
        poses = (parts.angles, parts.shifts) if parts.angles is not None else None
        job = TrainingJob(self._imageSource(parts), parts.amplitudes, parts.ids, config, config.optimiser.seed,
                          poses, parts.ctf, phase_flip,
                          self._reference(modes) if source_of(config).simulates else None)
        if processes == 1 and not self.useQueueForSteps():
            job.train(self._modelDir(), self._getDevice())
            return
        folder = self._getExtraPath("train_job")
        job.save(folder)
        self.runJob(shlex.quote(sys.executable),
                    ["-m", "continuousflex_dl", "train-worker", os.path.abspath(folder),
                     os.path.abspath(self._modelDir()), "--processes", processes, "--device", self._deviceChoice()],
                    env=self._gpuEnv())

    def _reference(self, mode_numbers):
        """The structure of the normal modes and the modes of the amplitude columns (core Reference)."""
        from ..core.network.simulator import Reference
        from ..core.imaging.structure import centre
        atoms, vectors = convert.read_modes(self._modes(), mode_numbers)
        return Reference(centre(atoms.coords), vectors, atoms.sigma, atoms.weights)

    def createOutputStep(self):
        from ..core.network.training import load_model
        config = load_model(self._modelDir(), "cpu").config
        model = FlexDLModel(modelDir=self._modelDir())
        model.setModes(config.model.modes)
        model.setImageSize(config.fitted.image_size)
        model.setPixelSize(config.preprocessing.pixel_size)
        model.setPredictsPose(config.model.predict_pose)
        self._defineOutputs(outputModel=model)
        self._defineSourceRelation(self.inputParticles, model)

    def metrics(self):
        """Rows of metrics.csv (dicts of strings)."""
        import csv
        path = ModelFolder(self._modelDir()).metrics
        if not path.exists():
            return []
        with open(path) as f:
            return list(csv.DictReader(f))

    # --------------------------- INFO ------------------------------------------
    def _validate(self):
        parts = self.inputParticles.get()
        if parts is None:
            return ["Choose particles with amplitudes."]
        errors = []
        if self.batchSize.get() % self.processes.get():
            errors.append(f"The batch size ({self.batchSize.get()}) is shared by the {self.processes.get()} "
                          f"training processes: make it a multiple of {self.processes.get()}.")
        n = parts.getSize()
        if n < 20:
            errors.append(f"{n} particles are too few to train a network (give hundreds or thousands).")
        if self.workingSize.get() and parts.getSize() and self.workingSize.get() > parts.getXDim():
            errors.append(f"The working size ({self.workingSize.get()} px) is larger than the particles "
                          f"({parts.getXDim()} px).")
        if self.predictPose.get() and not parts.hasAlignmentProj():
            errors.append("Pose prediction needs particles with a projection alignment.")
        if POSE_NORMALISE[self.poseNormalise.get()] == "yes":
            if not parts.hasAlignmentProj():
                errors.append("Turning and centring images by their poses needs particles with a projection "
                              "alignment (from the HEMNMA alignment or a consensus refinement): align them first, "
                              "or set 'Turn and centre images by their poses?' to no.")
            if self.predictPose.get():
                errors.append("Pose normalisation takes the particles' poses as given: set 'Also predict the "
                              "pose?' to No, or 'Turn and centre images by their poses?' to no.")
            if self.augment.get():
                errors.append("Pose normalisation turns every image to psi = 0, which in-plane rotation "
                              "augmentation would undo: set one of them to No.")
        first = parts.getFirstItem() if n else None
        if first is not None and (not hasattr(first, "getZFlex") or not len(first.getZFlex())):
            errors.append("The particles carry no amplitudes: use the HEMNMA alignment or synthesis output.")
        if parts.getXDim():
            try:  # core's check, as training runs it
                Preprocessing(pixel_size=parts.getSamplingRate(), working_size=self.workingSize.get() or None,
                              window=self.window.get() or None).check(parts.getXDim())
            except ValueError as err:
                errors.append(str(err))
        if SOURCES[self._trainingData()].simulates:
            errors += self._modeErrors(parts)
        return errors

    def _modeErrors(self, parts):
        modes = self._modes()
        if modes is None:
            return ["Training on simulated particles needs the normal modes the amplitudes refer to: choose "
                    "them in 'Normal modes (for simulation)', or train on the particles' amplitudes."]
        wanted = convert.flex_mode_numbers(parts) or []
        have = {r["number"] for r in convert.modes_table(modes)}
        missing = [m for m in wanted if m not in have]
        return [f"The normal modes lack modes {missing} of the particles' amplitudes: choose the modes the "
                "amplitudes were computed with."] if missing else []

    def _foundModesLine(self):
        """Which modes training will use when the form leaves them empty ([] otherwise)."""
        if self.inputModes.get() is not None or self._modes() is None or \
                not SOURCES[self._trainingData()].simulates:
            return []
        from ..reports import producer, run_label
        prot = producer(self._modes(), self.getProject())
        where = f" of '{run_label(prot)}'" if prot is not None else ""
        return [f"Normal modes: those{where} (the HEMNMA alignment's, found through the project)."]

    def _summary(self):
        from .. import reports
        rows = self.metrics()
        if not rows:
            return ["Not trained yet."] + self._foundModesLine()
        config = self._config()
        best = (best_epoch(self._modelDir()) if config is not None else None) or \
            min(rows, key=lambda r: float(r["val_loss"]))
        source = source_of(config) if config is not None else None
        lines = reports.training_summary_lines(rows, self.phases(rows), int(best["epoch"]))
        if source is not None:
            hint = (" Give the normal modes to train on simulated particles first."
                    if not source.simulates and self.trainingData.get() == 0 and
                    convert.flex_source(self.inputParticles.get()) == convert.SOURCE_HEMNMA else "")
            lines.append(source.summary(config) + hint)
        lines += self._foundModesLine()
        if config is not None and config.preprocessing.pose_normalise:
            lines.append("Images turned and centred by their poses before the network (pose normalisation): "
                         "prediction needs particles with poses and uses their own.")
        lines += reports.network_warning(
            float(best["val_mae"]), reports.hemnma_error(self.inputParticles.get(), self.getProject()),
            "The network's distance to HEMNMA's amplitudes on held-out particles")
        lines.append(f"Model directory: {self._modelDir()}")
        return lines

    def phases(self, rows) -> list:
        """The phase of every metrics row as users read it ('simulated', 'fine-tuning', 'particles')."""
        from ..reports import training_phases
        config = self._config()
        if config is None:
            return training_phases(rows, "particles", len(rows))
        source = source_of(config)
        return training_phases(rows, source.name, source.phases(config)[0].epochs)

    def _config(self):
        """The trained model's TrainConfig, or None before training."""
        return ModelFolder(self._modelDir()).read_config()

    def _methods(self):
        if not self.metrics():
            return []
        config = self._config()
        n = self.inputParticles.get().getSize()
        data = f"on {n} particles" if config is None else source_of(config).methods(n)
        normalised = (" Each image was centred by its shifts and turned by its in-plane angle before the network "
                      "(pose normalisation)." if config is not None and config.preprocessing.pose_normalise else "")
        return [f"A DeepHEMNMA network (ResNet34 features and a 4-layer perceptron) [Hamitouche2022] was "
                f"trained for {len(self.metrics())} epochs {data} with L1 loss and a particle-wise "
                f"validation split.{normalised}"]
