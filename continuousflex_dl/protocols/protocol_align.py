"""HEMNMA: elastic (normal-mode amplitudes) and rigid (pose) alignment of particles, in chunks."""
import json
import os

import numpy as np
from pwem.objects import SetOfParticlesFlex
from pyworkflow.protocol import STEPS_PARALLEL, params

from .. import convert
from ..core.hemnma.alignment import PATH_FALLBACK, PATH_GLOBAL, PATH_SEEDED, PRESETS, AlignmentResult, preset_changes
from ..core.hemnma.alignment_job import ALIGN_CHUNK_SMALLEST, RESULT_KEYS, AlignmentJob, alignment_chunk_size, gather
from ..core.chunks import chunk_bounds
from ..core.hemnma.image_model import ImageModel, structure_atom_types
from ..core.hemnma.pixel_size import check_job_pixel_size
from ..core.hemnma.reliability import CALIBRATION_PARTICLES, Reliability, calibrate_job
from ..core.imaging.structure import centre
from ..core.modes.reference import Reference
from .base import FlexDLProtBase


class FlexDLProtAlign(FlexDLProtBase):
    """HEMNMA: for each particle, the normal-mode amplitudes, orientation and shift at once.

    A global search over orientations and a coarse grid of amplitudes (FFT
    shift search, CTF applied) is followed by a joint local refinement of all
    parameters through the differentiable projector. Particles are processed
    in chunks, as parallel steps. Continue reuses a chunk only when it was computed
    from the same particles, modes and settings; a changed setting recomputes what
    it changes, and results are placed by particle id."""
    _label = "HEMNMA alignment"
    _possibleOutputs = {"outputParticles": SetOfParticlesFlex}
    stepsExecutionMode = STEPS_PARALLEL

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles",
                      label="Particles", important=True,
                      help="Particle images; their CTF is used when the set has one.")
        form.addParam("inputModes", params.PointerParam, pointerClass="SetOfNormalModes",
                      label="Normal modes", important=True,
                      help="Output of the NMA protocol; its structure is the reference.")
        form.addParam("modeList", params.StringParam, default="",
                      label="Modes", help="Mode numbers, e.g. '7-9' or '7, 8, 12'. " + convert.DEFAULT_MODES_HELP)
        form.addParam("inputModel", params.PointerParam, pointerClass="FlexDLModel", allowsNull=True,
                      label="Network for a first answer (optional)",
                      help="A DeepHEMNMA model trained with pose prediction (for example on simulated "
                           "particles). Each particle then starts from the network's amplitudes and pose "
                           "and skips the global search (several times faster). A few particles per chunk "
                           "still take the global search, and particles whose fit scores clearly below "
                           "theirs take it too, so a poor network costs time, not accuracy. The summary "
                           "says how many particles took each path.")
        self._addContrastParam(form)
        form.addParam("amplitudeRange", params.FloatParam, default=0.0, validators=[params.GE(0)],
                      label="Amplitude range (Å, 0 = automatic)",
                      help="Amplitudes are searched in [-R, R] Å. 0 (the default) means automatic: R = "
                           "5 sqrt(N) Å for a structure of N atoms, which moves its atoms by 5 Å RMS along "
                           "one mode (about 200 Å for adenylate kinase, 3,341 heavy atoms). Where answers "
                           "reach R, the range grows there (to 3.5 R at most) and those particles are "
                           "refined again; the summary gives the fraction left at the limit.")
        form.addSection(label="Search")
        form.addParam("angularStep", params.FloatParam, default=15.0, validators=[params.Range(3, 45)],
                      label="Angular step (°)",
                      help="Spacing of the orientations tried by the global search, in degrees: smaller is "
                           "slower (the number of orientations grows as 1/step³) and finds the pose of "
                           "noisier particles more often.")
        form.addParam("maxShift", params.FloatParam, default=5.0, validators=[params.GE(0)],
                      label="Maximum shift (px)", help="Largest shift searched, in pixels of the input images.")
        form.addParam("workingSize", params.IntParam, default=64, validators=[params.GE(16)],
                      label="Working image size (px)",
                      help="Images are reduced to this size (Fourier cropping, which keeps the low "
                           "resolutions) for the final refinement: larger is slower and uses finer detail. "
                           "Particles smaller than this are used at their own size. Hamitouche & Jonic "
                           "(2022) aligned 128 px versions of 256 px images.")
        form.addParam("effort", params.EnumParam, choices=list(PRESETS), default=1,
                      display=params.EnumParam.DISPLAY_HLIST, label="Refinement effort",
                      help="How many candidate poses of each particle the search keeps and how long it refines "
                           "them: fast refines 4 candidates briefly (about half the time of normal); normal "
                           "refines 8; thorough refines 12, the best 2 of them at the working size, for longer "
                           "(about twice the time of normal), for noisy particles whose pose is often missed.")
        form.addParam("refineImageModel", params.BooleanParam, default=False,
                      label="Refine the image model on the data?",
                      help="HEMNMA draws every atom as a Gaussian of 1 Å with unit weight; real images are "
                           "projections of the electrostatic potential (elements scatter differently, hydrogens "
                           "add to their atoms, B-factors, motion and the detector blur it). The mismatch "
                           "biases the amplitudes even on clean images. With Yes, a subset of the particles is "
                           "aligned first; with their poses and amplitudes fixed, the scattering weight of each "
                           "element and a global B-factor are fitted to their images (least squares under the "
                           "CTF), the subset is refined again and the fit repeated; then the whole set is "
                           "aligned with the refined model. The fitted values are in the summary and the log.")
        form.addParam("modelFitParticles", params.IntParam, default=100, validators=[params.GE(10)],
                      condition="refineImageModel", expertLevel=params.LEVEL_ADVANCED,
                      label="Particles for the image model",
                      help="How many particles, spread evenly over the set, the image model is fitted on "
                           "(the model has a few numbers: a weight per element and a B-factor; 50 to 200 "
                           "particles suffice). They are aligned once more for the fit.")
        form.addParam("chunkSize", params.IntParam, default=0, validators=[params.GE(0)],
                      expertLevel=params.LEVEL_ADVANCED, label="Particles per chunk (0 = automatic)",
                      help="The particles are aligned in chunks, each a step of the run (a process of its "
                           "own, or a cluster job when 'Use a queue engine?' sends every step to the queue). "
                           "'Threads (chunks at a time + 1)' = N runs N-1 chunks at the same time. 0 means "
                           "automatic: about 4 "
                           f"chunks per parallel worker, of {ALIGN_CHUNK_SMALLEST} to 500 particles (fewer "
                           "only so that every worker has one: a chunk process takes about 2 s to start); "
                           "kept on Continue. Continue skips the chunks already done with the same inputs "
                           "and settings.")
        form.addParam("calibrationParticles", params.IntParam, default=CALIBRATION_PARTICLES,
                      validators=[params.GE(0)], expertLevel=params.LEVEL_ADVANCED,
                      label="Particles to calibrate the reliability",
                      help="After the alignment, this many particles are simulated to look like the set (the "
                           "reference in random poses, shaped and made noisy as the set's images are, measured "
                           "on them), and aligned the same way, plus a few noise images. Their known poses "
                           "calibrate each particle's pose reliability (the probability that its pose is within "
                           "10°, stored per particle) and an honest amplitude σ (stored per particle), and the "
                           "summary warns when the set carries too little signal to fix poses. 0: no "
                           "calibration (the Laplace σ is stored as it is).")
        self._addDeviceParam(form)
        self._addChunkParallelSection(form)

    # --------------------------- STEPS -----------------------------------------
    def _insertAllSteps(self):
        # Every step carries the job fingerprint (inputs and settings): Continue after a change
        # reruns exactly the steps whose inputs changed, and chunk files are placed by id.
        self._job = self._buildJob()
        job_fp = self._job.fingerprint()
        size = self._chunkSize(job_fp, len(self._job.ids))
        bounds = chunk_bounds(len(self._job.ids), size)
        self._plan = (size, len(bounds))  # read by the steps, which run in this process
        self._resetDamagedChunks(self._jobFolder(), bounds, job_fp)
        first = self._insertFunctionStep(self.convertInputStep, job_fp, size, needsGPU=False)
        if self._job.model_fit_particles:
            first = self._insertFunctionStep(self.fitImageModelStep, job_fp, prerequisites=[first],
                                             needsGPU=self._usesGPU())
        chunk_steps = [self._insertFunctionStep(self.alignChunkStep, start, stop, job_fp,
                                                prerequisites=[first], needsGPU=self._usesGPU())
                       for start, stop in bounds]
        self._insertFunctionStep(self.createOutputStep, job_fp, size, self.calibrationParticles.get(),
                                 prerequisites=chunk_steps, needsGPU=False)

    def _chunkSize(self, job_fp: str, n: int) -> int:
        """The form's chunk size, or (0) the one an earlier run of the same job used, or an
        automatic one for ``n`` particles and the parallel chunks of the form."""
        if self.chunkSize.get() > 0:
            return self.chunkSize.get()
        try:
            with open(self._planFile()) as f:
                plan = json.load(f)
            if plan.get("fingerprint") == job_fp and int(plan.get("chunk_size", 0)) > 0:
                return int(plan["chunk_size"])
        except (OSError, ValueError):
            pass
        return alignment_chunk_size(n, self._parallelChunks())

    def _planFile(self) -> str:
        return self._getExtraPath("plan.json")

    def _modeNumbers(self):
        text = (self.modeList.get() or "").strip()
        if text:
            return convert.parse_mode_list(text)
        return convert.default_mode_numbers(self.inputModes.get())

    def _options(self) -> dict:
        """Keyword arguments of core.hemnma.alignment.align_particles set by the form."""
        return dict(max_shift_px=self.maxShift.get(), working_size=self.workingSize.get(),
                    angular_step_deg=self.angularStep.get(),
                    amplitude_range=self.amplitudeRange.get() or None,
                    **preset_changes(list(PRESETS)[self.effort.get()]))

    def _buildJob(self) -> AlignmentJob:
        numbers = self._modeNumbers()
        atoms, modes = convert.read_modes(self.inputModes.get(), numbers)
        parts = self._readParticles(self.inputParticles.get())
        types, type_names = None, []
        if self.refineImageModel.get():
            group = atoms.group
            types, type_names = structure_atom_types(group.getElements(), group.getNames(), group.getResnames())
        return AlignmentJob(reference=Reference(centre(atoms.coords), modes, atoms.sigma, atoms.weights),
                            mode_numbers=numbers, ids=parts.ids, stacks=parts.stacks, indices=parts.indices,
                            pixel_size=parts.pixel_size, ctf=parts.ctf, options=self._options(),
                            invert=self.invertContrast.get(), seed_source=self._seedSource(),
                            atom_types=types, type_names=type_names,
                            model_fit_particles=self.modelFitParticles.get() if self.refineImageModel.get() else 0)

    def _seedSource(self) -> str:
        """The network's weights file and its date ('' without a network): part of the job."""
        model = self.inputModel.get()
        if model is None:
            return ""
        from ..core.network.training import ModelFolder
        return ModelFolder(model.getModelDir()).weights_stamp()

    def _seeds(self, job: AlignmentJob):
        """The network's first answer for every particle of the job, or None."""
        model = self.inputModel.get()
        if model is None:
            return None
        if list(model.getModes()) != list(job.mode_numbers):
            raise ValueError(f"The network predicts modes {model.getModes()} but the alignment uses modes "
                             f"{job.mode_numbers}: choose the network's modes, or another network.")
        parts = self._readParticles(self.inputParticles.get())
        amplitudes, angles, shifts = self._networkPrediction(parts, model, pose=True)
        return {"amplitudes": amplitudes, "angles": angles, "shifts": shifts}

    def _jobFolder(self) -> str:
        return self._getExtraPath()

    def convertInputStep(self, job_fp, chunk_size):
        self._logToRunLog()
        job = getattr(self, "_job", None) or self._buildJob()
        if job.fingerprint() != job_fp:
            raise ValueError("The inputs changed while the run was starting: run it again.")
        job.seeds = self._seeds(job)
        self._checkPixelSize(job)
        job.save(self._jobFolder())
        with open(self._planFile(), "w") as f:
            json.dump({"fingerprint": job_fp, "chunk_size": int(chunk_size)}, f)
        n_chunks = len(chunk_bounds(len(job.ids), chunk_size))
        where = "cluster jobs" if self.useQueueForSteps() else "processes"
        self.info(f"{len(job.ids)} particles, modes {job.mode_numbers}, {job.reference.n_atoms} atoms in the "
                  f"reference: {n_chunks} chunks of at most {chunk_size} particles, "
                  f"{min(n_chunks, self._parallelChunks())} {where} at a time")
        for line in self._cropping():
            self.info(line)
        return [os.path.join(self._jobFolder(), name) for name in ("job.npz", "job.json")] + [self._planFile()]

    def _checkPixelSize(self, job: AlignmentJob):
        """Refuse a grossly wrong pixel size, warn of a doubtful one (core.hemnma.pixel_size); the
        verdict goes to the log and the summary."""
        level, message = check_job_pixel_size(job).verdict()
        with open(self._getExtraPath("pixel_size_check.json"), "w") as f:
            json.dump({"level": level, "message": message}, f)
        if level == "refuse":
            raise ValueError(message)
        (self.warning if level in ("warning", "undecided") else self.info)(message)

    def _cropping(self) -> list:
        """[the line saying how the particles are downsampled to the working size] or []."""
        parts = self.inputParticles.get()
        line = self._croppingLine(parts.getXDim(), parts.getSamplingRate(), self.workingSize.get(),
                                  "'Working image size'")
        return [line] if line else []

    def fitImageModelStep(self, job_fp):
        """Align a subset, fit the image model to it (core.hemnma.image_model) and save it in the job,
        where every chunk reads it."""
        self._logToRunLog()
        job = AlignmentJob.load(self._jobFolder())
        if job.fingerprint() != job_fp:
            raise ValueError("The alignment job was prepared for other inputs or settings: Continue the run "
                             "(its conversion step writes it again).")
        model = job.fit_image_model(device=self._getDevice(), progress=lambda done, total, msg: self.info(msg))
        job.save(self._jobFolder())
        self.info(f"Image model fitted on {model.fit.get('images')} particles: {model.describe()}")
        return [os.path.join(self._jobFolder(), "job.json")]

    def alignChunkStep(self, start, stop, job_fp):
        """One chunk as a process of the package's command line (a cluster job with 'Use queue
        for steps'); it reads the job folder and writes its chunk file atomically."""
        return self._runChunkStep("align-chunk", self._jobFolder(), start, stop, job_fp, AlignmentJob.DONE)

    def createOutputStep(self, job_fp, chunk_size, calibration_particles=CALIBRATION_PARTICLES):
        self._logToRunLog()
        job, result = gather(self._jobFolder(), job_fp, chunk_size)
        ids, numbers = job.ids, job.mode_numbers
        reliability, extra = None, {}
        if calibration_particles > 0:
            reliability = calibrate_job(job, result, n_calibration=calibration_particles)
            for line in reliability.summary_lines(result.score, numbers):
                (self.warning if line.startswith("WARNING") else self.info)(line)
            extra = {convert.RELIABILITY_ATTR: reliability.reliability}
        tmp = self._getExtraPath("alignment.tmp.npz")
        np.savez(tmp, ids=ids, mode_numbers=np.asarray(numbers), image_model=json.dumps(job.image_model),
                 **result.to_dict(), **(reliability.to_dict() if reliability else {}))
        os.replace(tmp, self._resultFile())
        path = self._getPath("particles_flex.sqlite")
        if os.path.exists(path):  # a continued run that had finished before
            os.remove(path)
        out = SetOfParticlesFlex(filename=path, progName=convert.FLEX_PROG_NAME)
        convert.fill_flex_particles(out, self.inputParticles.get(), ids, result.amplitudes, numbers,
                                    convert.SOURCE_HEMNMA, result.angles, result.shifts,
                                    extra={convert.SCORE_ATTR: result.score, **extra, convert.ZFLEX_STD_ATTR:
                                           result.amplitude_std if reliability is None else reliability.amplitude_std})
        self._defineOutputs(outputParticles=out)
        self._defineSourceRelation(self.inputParticles, out)
        self._defineSourceRelation(self.inputModes, out)

    def _resultFile(self) -> str:
        """ids, mode_numbers and the AlignmentResult arrays of the output, by particle."""
        return self._getExtraPath("alignment.npz")

    # --------------------------- INFO ------------------------------------------
    def _validate(self):
        errors = []
        parts, modes = self.inputParticles.get(), self.inputModes.get()
        if parts is None or modes is None:
            return ["Choose the particles and the normal modes."]
        if parts.getSize() == 0:
            errors.append("The input set of particles is empty.")
        if modes.getPdb() is None:
            errors.append("The normal modes have no structure attached: compute them with this plugin's NMA.")
        try:
            numbers = self._modeNumbers()
        except ValueError as exc:
            return errors + [str(exc)]
        errors += self._modeListErrors(numbers, modes)
        model = self.inputModel.get()
        if model is not None:
            if not model.predictsPose():
                errors.append("The network does not predict poses: train it with 'Also predict the pose?' "
                              "set to Yes, or leave the network empty.")
            if list(model.getModes()) != list(numbers):
                errors.append(f"The network predicts modes {model.getModes()}, the alignment uses {numbers}: "
                              f"align with the network's modes.")
            errors += self._modelBoxErrors(model, parts)
        if not numbers:
            errors.append("No enabled modes from 7 on: give a mode list, e.g. '7-9'.")
        if not parts.getSize():
            return errors
        stack_errors = self._stackErrors(parts)
        errors += stack_errors
        if not stack_errors and (parts.getXDim() or 0) < 16:
            errors.append(f"Particles of {parts.getXDim()} px are too small to align (16 px at least).")
        elif not stack_errors and modes.getPdb() is not None:
            errors += [e + " Check the pixel size of the particles, or extract them in a larger box."
                       for e in self._boxErrors(parts.getXDim(), parts.getSamplingRate(),
                                                modes.getPdb().getFileName(), whose="The particles' box")]
        return errors

    def _summary(self):
        if not hasattr(self, "outputParticles"):
            return ["Not aligned yet."]
        with np.load(self._resultFile()) as data:
            result = AlignmentResult(**{k: data[k] for k in RESULT_KEYS if k in data.files})
            numbers = data["mode_numbers"].tolist()
            fitted = json.loads(str(data["image_model"])) if "image_model" in data.files else None
            reliability = Reliability.from_dict(data)
        from ..reports import error_summary_lines, literal
        default = "" if (self.modeList.get() or "").strip() else " (the default: first enabled non-rigid modes)"
        paths = np.bincount(result.path.astype(int), minlength=3)
        lines = [f"{len(result.score)} particles aligned with modes {numbers}{default}."] + self._cropping()
        check = self._getExtraPath("pixel_size_check.json")
        if os.path.exists(check):
            with open(check) as f:
                lines.append(json.load(f)["message"])
        if reliability is not None:
            lines += reliability.summary_lines(result.score, numbers) + [
                f"(per particle: the reliability in {literal(convert.RELIABILITY_ATTR)}, the honest σ in "
                f"{literal(convert.ZFLEX_STD_ATTR)})"]
        if self.inputModel.get() is not None:
            lines.append(f"Paths: {paths[PATH_SEEDED]} particles from the network's answer, {paths[PATH_GLOBAL]} "
                         f"by the global search as the reference, {paths[PATH_FALLBACK]} by the global search "
                         f"after a poor network answer.")
        if fitted:
            lines.append(f"Image model refined on {fitted['fit'].get('images')} particles: "
                         f"{ImageModel.from_dict(fitted).describe()}.")
        return lines + [
                f"Score (normalised cross-correlation): mean {result.score.mean():.3f}, "
                f"median {np.median(result.score):.3f}.",
                f"Particles with an amplitude at a limit of the range (grown where answers reached it): "
                f"{100 * result.fraction_at_limit:.1f} %.",
                "Amplitudes (Å): " + ", ".join(f"mode {m}: {a.mean():.1f} ± {a.std():.1f}"
                                              for m, a in zip(numbers, result.amplitudes.T)),
                "Uncertainty (Laplace standard deviation, median over particles): " + ", ".join(
                    f"mode {m}: {s:.1f} Å" for m, s in zip(numbers, np.median(result.amplitude_std, 0)))
                + f"; angles {np.median(result.angle_std):.2f}°, shifts {np.median(result.shift_std):.2f} px"
                + ("" if reliability else f" (per particle in {literal(convert.ZFLEX_STD_ATTR)}, in the order of "
                                          f"zFlex)") + "."
                ] + error_summary_lines(self.outputParticles, self.inputParticles.get(), self.inputModes.get())

    def _methods(self):
        if not hasattr(self, "outputParticles"):
            return []
        return ["Normal-mode amplitudes, orientations and shifts of the particles were estimated by HEMNMA "
                "[Jin2014] (global search followed by joint continuous refinement through a differentiable "
                "projector of Gaussian atoms)."]

    def _citations(self):
        return ["Jin2014", "Hamitouche2022"]
