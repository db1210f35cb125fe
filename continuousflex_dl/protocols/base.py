"""What every protocol of this plugin shares: device choice, logging, citations."""
import logging
import math
import os
import sys
from typing import List, Sequence

from pwem.protocols import EMProtocol
from pyworkflow.protocol import params

from .. import convert
from ..core.device import resolve_device
from ..core.modes.nma import N_RIGID
from ..core.imaging.structure import diameter, read_coordinates



class ChunkFailed(RuntimeError):
    """A chunk process refused or failed; the message is its reason, for the protocol's error text."""


class FlexDLProtBase(EMProtocol):
    """Base class: protocols stay thin and call continuousflex_dl.core."""
    _devStatus = "BETA"

    def _addDeviceParam(self, form):
        """Scipion's GPU row of the Run section ('GPU IDs': Yes/No and a list of ids), as other
        plugins have it; :meth:`_deviceChoice` and :meth:`_gpuSlot` map it to the core's device."""
        form.addHidden(params.USE_GPU, params.BooleanParam, default=True, label="Use GPU?",
                       help="Yes: compute on the GPUs listed in 'GPU IDs' when this machine has a CUDA GPU, "
                            "on the CPU when it has none. No: always compute on the CPU.")
        form.addHidden(params.GPU_LIST, params.StringParam, default="0", label="GPU IDs",
                       help="Yes: compute on these GPUs when this machine has a CUDA GPU (on the CPU when "
                            "it has none). No: always compute on the CPU. The GPUs are given by number as "
                            "nvidia-smi lists them (0 is the first), separated by spaces, e.g. '0' or '0 1'. "
                            "Scipion gives each step running at the same time GPUs of its own from this "
                            "list; list a GPU twice ('0 0') to let two steps share it. A cluster job uses "
                            "the GPUs its queue gives it.")

    def _addChunkParallelSection(self, form, parallel: int = 2):
        """The parallel section of a protocol whose chunks are parallel steps: Scipion keeps
        one thread to schedule the steps, so ``numberOfThreads`` N runs N-1 chunks at a time
        (default ``parallel`` + 1). :meth:`_parallelChunks` gives N-1."""
        form.addParallelSection(threads=parallel + 1, mpi=0)
        param = form.getParam("numberOfThreads")
        param.label.set("Threads (chunks at a time + 1)")
        param.help.set(f"Scipion keeps one thread to schedule the steps, so N threads run N-1 chunks at "
                       f"the same time: 1 or 2 run one chunk after another, {parallel + 1} (the default) "
                       f"runs {parallel} chunks at once. The CPU cores are shared among the chunks "
                       f"running together; Scipion gives each running chunk GPUs of its own from 'GPU IDs'. "
                       f"When 'Use a queue engine?' sends every step to the queue, N-1 chunks are queued "
                       f"as cluster jobs at the same time.")

    def _addContrastParam(self, form):
        form.addParam("invertContrast", params.BooleanParam, default=False, label="Invert contrast?",
                      help="Yes for particles with dark protein on a bright background, as some pipelines "
                           "export them: their images are read with the opposite sign. This plugin, like "
                           "RELION, expects white particles on black (HEMNMA refuses inverted particles "
                           "and says so).")

    def _imageSource(self, parts, size: int = 0):
        """The images of ``parts`` (convert.ParticleArrays) read with the sign of 'Invert
        contrast', Fourier-cropped to ``size`` px as they are read when given and different
        from their box."""
        from ..core.imaging.dataset import FourierCroppedSource, MrcsImageSource
        invert = bool(getattr(self, "invertContrast", None) and self.invertContrast.get())
        source = MrcsImageSource(list(zip(parts.stacks, parts.indices.tolist())), invert=invert)
        if not size or parts.box == size:
            return source
        return FourierCroppedSource(source, size)

    @staticmethod
    def _croppingLine(box: int, pixel_size: float, size: int, why: str) -> str:
        """What a run does to particles of ``box`` px at ``pixel_size`` Å/px worked on at
        ``size`` px (for its log and summary): '' when nothing, else the Fourier cropping and
        the pixel size it gives; ``why`` names the setting or model that chose ``size``."""
        if not size or size >= box:
            return ""
        return (f"Particles of {box} px at {pixel_size:g} Å/px were Fourier-cropped to {size} px "
                f"({pixel_size * box / size:.4g} Å/px, {why}).")

    def _networkPrediction(self, parts, model, pose: bool, **options):
        """(amplitudes (M, K) Å, angles (M, 3) deg or None, shifts (M, 2) px of the particles or
        None) of a FlexDLModel on ``parts``; options: of core.network.training.predict."""
        from ..core.network.training import load_model, predict_particles
        loaded = load_model(model.getModelDir(), self._getDevice())
        return predict_particles(loaded, self._imageSource(parts), parts.pixel_size, parts.ctf, return_pose=pose,
                                 ids=parts.ids, progress=lambda done, total, message: self.info(
                                     f"Predicted {done} / {total} particles"), **options)

    def _runChunkStep(self, command: str, folder: str, start: int, stop: int, job_fp: str, done: str) -> List[str]:
        """The body of a chunk step: rows ``[start, stop)`` of the job folder as a process of the
        package's command line (``python -m continuousflex_dl <command>``; a cluster job with 'Use
        queue for steps'), which writes its chunk file atomically. A refusal or failure of that
        process becomes this step's error (the protocol's error text) whole: the process leaves
        its reason in a file beside the chunk file, read here (files, not pipes, so that it
        arrives from a cluster job too). Local chunks share this machine's cores; a cluster job
        uses what the queue gives it. ``self._plan`` is (chunk size, number of chunks).
        done: what finished rows are ("aligned"), for messages. Returns the chunk file (in a list)."""
        import shlex
        from ..core.chunks import chunk_error_path, chunk_path, finished_chunk, read_chunk_error
        from ..core.device import cpu_threads_available
        size, n_chunks = self._plan
        chunk_error_path(folder, start, stop).unlink(missing_ok=True)
        threads = 0 if self.useQueueForSteps() else max(
            1, cpu_threads_available() // min(n_chunks, self._parallelChunks()))
        failure = None
        try:
            self.runJob(shlex.quote(sys.executable),
                        ["-m", "continuousflex_dl", command, os.path.abspath(folder), "--rows", start, stop,
                         "--fingerprint", job_fp, "--device", self._deviceChoice(), "--slot", self._gpuSlot(start // size),
                         "--threads", threads])
        except Exception as exc:  # the command's exit status; its reason is in the file
            failure = exc
        reason = read_chunk_error(folder, start, stop)
        if reason:
            raise ChunkFailed(reason)
        if failure is not None:  # killed (out of memory, a signal) before it could say why
            raise ChunkFailed(f"{command} rows {start}-{stop} stopped without giving a reason ({failure}); it may "
                              f"have been killed (out of memory?): see the end of the run's log, then Continue "
                              f"the run.") from None
        finished_chunk(folder, start, stop, job_fp, done)  # a cluster job that died leaves none
        return [str(chunk_path(folder, start, stop))]

    def _resetDamagedChunks(self, folder: str, bounds: Sequence, job_fp: str) -> None:
        """Remove the chunk files of ``bounds`` ([(start, stop), ...]) that exist but are damaged
        (truncated, unreadable) or not a result of the job ``job_fp``, so that their steps, whatever state Scipion recorded for them,
        run again on Continue (a finished step whose result file is missing is run again).
        Called from ``_insertAllSteps``, before Scipion compares the steps with the last run's."""
        from ..core.chunks import chunk_path, chunk_problem
        for start, stop in bounds:
            problem = chunk_problem(folder, start, stop, job_fp)
            if problem and problem != "missing":
                path = chunk_path(folder, start, stop)
                os.remove(path)
                self.info(f"The chunk file {path} is {problem}: removed; its step computes rows "
                          f"{start}-{stop} again.")

    def _parallelChunks(self) -> int:
        """How many chunk steps Scipion runs at the same time (numberOfThreads - 1, at least 1)."""
        return max(1, self.numberOfThreads.get() - 1)

    def _addFlexInputParams(self, form, modes_help: str):
        """``inputParticles`` (amplitudes of this plugin) and ``inputModes`` (their normal modes)."""
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticlesFlex",
                      label="Particles with amplitudes", important=True,
                      help="Output of the HEMNMA, DeepHEMNMA or synthesis protocol of this plugin.")
        form.addParam("inputModes", params.PointerParam, pointerClass="SetOfNormalModes",
                      label="Normal modes", important=True, help=modes_help)

    def _readParticles(self, particles, need_amplitudes: bool = False):
        """convert.ParticleArrays of a set whose images core can read: files in formats other
        than MRC and SPIDER are converted once into MRC stacks in the run's extra folder
        (convert.native_stacks), and the run log says so."""
        parts = convert.read_particles(particles, need_amplitudes=need_amplitudes)
        convert.native_stacks(parts, self._getExtraPath("images"), log=self.info)
        return parts

    def _flexInputErrors(self) -> List[str]:
        """Validation errors for the ``inputParticles`` / ``inputModes`` pair of
        :meth:`_addFlexInputParams`: empty list when usable."""
        particles, modes_set = self.inputParticles.get(), self.inputModes.get()
        if particles is None:
            return ["Choose the particles (a SetOfParticlesFlex of this plugin)."]
        if modes_set is None:
            return ["Choose the normal modes used for the particles' amplitudes."]
        if not particles.getSize():
            return ["The input set of particles is empty: choose a set with particles (the output of "
                    "the HEMNMA, DeepHEMNMA or synthesis protocol)."]
        try:
            numbers = convert.particles_mode_numbers(particles)
        except ValueError as exc:
            return [str(exc)]
        available = {r["number"] for r in convert.modes_table(modes_set)}
        missing = sorted(set(numbers) - available)
        if missing:
            return [f"The particles use modes {missing} that are not in the chosen normal modes."]
        return []

    def _stackErrors(self, particles, most: int = 3) -> List[str]:
        """Validation errors for the image files of a set of particles: missing, damaged
        header, truncated, or a format Scipion's image library cannot read here
        (convert.stack_error); at most ``most`` of them."""
        errors = []
        for path in sorted(set(particles.getUniqueValues("_filename"))):
            error = convert.stack_error(path)
            if error:
                errors.append(error)
        more = [f"... and {len(errors) - most} more damaged stacks."] if len(errors) > most else []
        return errors[:most] + more

    def _modeListErrors(self, numbers: Sequence[int], modes_set) -> List[str]:
        """Validation errors for a list of mode numbers of ``modes_set``: rigid-body modes
        (1-6) and modes the set does not have."""
        errors = []
        rigid = sorted(n for n in numbers if n <= N_RIGID)
        if rigid:
            errors.append(f"Modes {rigid} are rigid-body motions (modes 1-{N_RIGID}: three translations and "
                          f"three rotations), not flexibility: the pose (angles and shifts) already covers "
                          f"them, and their amplitudes would trade off against it. Choose modes from "
                          f"{N_RIGID + 1} on, e.g. '{N_RIGID + 1}-{N_RIGID + 3}'.")
        available = {r["number"] for r in convert.modes_table(modes_set)}
        missing = sorted(set(numbers) - available)
        if missing:
            errors.append(f"Modes {missing} are not in the input set of modes (it has modes "
                          f"{min(available)}-{max(available)}).")
        return errors

    def _boxErrors(self, box_px: int, pixel_size: float, structure_path: str,
                   records: Sequence[str] = ("ATOM", "HETATM"), whose: str = "The box") -> List[str]:
        """A validation error when a box of ``box_px`` px at ``pixel_size`` Å/px is smaller than
        the structure's diameter (its two farthest atoms), so particles would be cut off."""
        try:
            span = diameter(read_coordinates(structure_path, records))
        except ValueError:
            return []  # the run reads the structure itself and says what is wrong with it
        side = box_px * pixel_size
        if side >= span:
            return []
        return [f"{whose} is {box_px} px x {pixel_size:g} Å/px = {side:.0f} Å, smaller than the structure "
                f"({span:.0f} Å between its two farthest atoms): the particle would be cut off in most "
                f"images. Use a box of at least {math.ceil(span / pixel_size)} px at {pixel_size:g} Å/px, "
                f"or a larger pixel size."]

    @staticmethod
    def _modelBoxErrors(model, particles) -> List[str]:
        """A validation error when ``particles`` (a SetOfParticles) do not cover the box in Å of
        the images a FlexDLModel was trained on, within 1 % of the model's box: the images are
        Fourier-cropped to the model's size, so their pixel size then differs from the model's
        by (particles' box - model's box) / model's box, the quantity bounded here."""
        model_extent = model.getImageSize() * model.getPixelSize()
        extent = (particles.getXDim() or 0) * particles.getSamplingRate()
        if abs(extent - model_extent) <= 0.01 * model_extent:
            return []
        return [f"The particles cover {extent:.1f} Å ({particles.getXDim()} px at {particles.getSamplingRate():g} "
                f"Å/px) but the network was trained on {model_extent:.1f} Å boxes ({model.getImageSize()} px at "
                f"{model.getPixelSize():g} Å/px). Re-extract or window the particles to the same box in Å, or use "
                f"a network trained on boxes of the particles' size in Å."]

    def _deviceChoice(self) -> str:
        """The core's device choice (``core.device.DEVICE_CHOICES``) for the form's GPU row: 'cpu'
        when 'Use GPU?' is No, else 'auto' (a GPU when one is visible, else the CPU); 'auto' for
        protocols without the row."""
        return "cpu" if self.allowsGpu() and not self.useGpu.get() else "auto"

    def _stepGpus(self) -> List[int]:
        """The GPU ids that Scipion gave the running step (from 'GPU IDs'), else the form's list."""
        try:
            gpus = self._stepsExecutor.getGpuList()
        except AttributeError:  # no executor (called outside a run), or a step outside a step thread
            gpus = None
        return [int(g) for g in (gpus or self.getGpuList())]

    def _gpuSlot(self, index: int = 0) -> int:
        """The core's GPU slot (``resolve_device(choice, slot)``: GPU ``slot mod count``) of the
        ``index``-th job of a step: the step's GPU ids taken in turn, else ``index`` itself."""
        gpus = self._stepGpus() if self.allowsGpu() else []
        return gpus[index % len(gpus)] if gpus else index

    def _gpuEnv(self):
        """The environment of a local process that uses several GPUs (DDP training): this one's, with
        CUDA_VISIBLE_DEVICES set to the step's GPU ids, so that it sees those GPUs first; None
        (unchanged) on the CPU, for a cluster job (its queue gives the GPUs) or when
        CUDA_VISIBLE_DEVICES is set already (its ids are what the form's ids refer to)."""
        if self._deviceChoice() == "cpu" or not self.allowsGpu() or self.useQueue() \
                or os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
            return None
        gpus = list(dict.fromkeys(self._stepGpus()))  # '0 0' shares GPU 0: one id for one process
        return dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(map(str, gpus))) if gpus else None

    def _usesGPU(self) -> bool:
        """For steps' needsGPU: 'Use GPU?' is Yes and this machine has a CUDA GPU (so that Scipion
        does not hold CPU steps back waiting for a free GPU of 'GPU IDs')."""
        if self._deviceChoice() == "cpu":
            return False
        import torch
        return torch.cuda.is_available()

    def _getDevice(self) -> str:
        """'cpu' or 'cuda:<id>' for work done in this process: the first GPU of the step's ids."""
        try:
            return resolve_device(self._deviceChoice(), self._gpuSlot(0))
        except ValueError as exc:
            raise RuntimeError(str(exc)) from None

    def getBinThreads(self) -> int:
        """The CPU threads of one chunk (pyworkflow logs it as 'binary Threads' at the start of a
        run; our protocols have no 'binThreads' parameter: the chunks share this machine's cores)."""
        if self.modeSerial():
            return super().getBinThreads()
        from ..core.device import cpu_threads_available
        return max(1, cpu_threads_available() // self._parallelChunks())

    def _logToRunLog(self):
        """Send the core's progress lines (logging) to this run's log."""
        logger = logging.getLogger("continuousflex_dl")
        if not any(getattr(h, "_cfdl", False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            handler._cfdl = True
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False

    def _citations(self):
        return ["Hamitouche2022", "Jin2014"]
