"""What every protocol of this plugin shares: device choice, logging, citations."""
import logging
import math
import os
import sys
from typing import List, Sequence

from pwem.protocols import EMProtocol
from pyworkflow.protocol import params

from .. import convert
from ..core.device import DEVICE_CHOICES, resolve_device
from ..core.imaging.mrc import check_mrc_stack
from ..core.modes.nma import N_RIGID
from ..core.imaging.structure import diameter, read_coordinates



class ChunkFailed(RuntimeError):
    """A chunk process refused or failed; the message is its reason, for the protocol's error text."""


class FlexDLProtBase(EMProtocol):
    """Base class: protocols stay thin and call continuousflex_dl.core."""
    _devStatus = "BETA"

    def _addDeviceParam(self, form):
        form.addParam("device", params.EnumParam, choices=list(DEVICE_CHOICES), default=0,
                      display=params.EnumParam.DISPLAY_HLIST, label="Compute device",
                      expertLevel=params.LEVEL_ADVANCED,
                      help="auto: the first CUDA GPU when one is visible, else the CPU. "
                           "cuda: refuse to run without a GPU. cpu: never use a GPU.")

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
                       f"running together (a GPU is shared too). With 'Use queue for steps', N-1 chunks "
                       f"are queued as cluster jobs at the same time.")

    def _addContrastParam(self, form):
        form.addParam("invertContrast", params.BooleanParam, default=False, label="Invert contrast?",
                      help="Yes for particles with dark protein on a bright background, as some pipelines "
                           "export them: their images are read with the opposite sign. This plugin, like "
                           "RELION, expects white particles on black (HEMNMA refuses inverted particles "
                           "and says so).")

    def _imageSource(self, parts):
        """The images of ``parts`` (convert.ParticleArrays) read with the sign of 'Invert contrast'."""
        from ..core.imaging.dataset import MrcsImageSource
        invert = bool(getattr(self, "invertContrast", None) and self.invertContrast.get())
        return MrcsImageSource(list(zip(parts.stacks, parts.indices.tolist())), invert=invert)

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
                         "--fingerprint", job_fp, "--device", self._deviceChoice(), "--slot", start // size,
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
        header, truncated (core.imaging.dataset.check_mrc_stack); at most ``most`` of them."""
        errors = []
        for path in sorted(set(particles.getUniqueValues("_filename"))):
            try:
                check_mrc_stack(path)
            except ValueError as exc:
                errors.append(str(exc))
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
        """The device parameter as a string ('auto' for protocols without one)."""
        return DEVICE_CHOICES[self.device.get()] if hasattr(self, "device") else "auto"

    def _usesGPU(self) -> bool:
        """For steps' needsGPU: everything but an explicit 'cpu' may use a GPU."""
        return self._deviceChoice() != "cpu"

    def _getDevice(self) -> str:
        try:
            return resolve_device(self._deviceChoice())
        except ValueError as exc:
            raise RuntimeError(str(exc)) from None

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
