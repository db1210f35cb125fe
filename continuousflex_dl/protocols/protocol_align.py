"""HEMNMA: elastic (normal-mode amplitudes) and rigid (pose) alignment of particles, in chunks."""
import json
import os

import numpy as np
from pwem.objects import SetOfParticlesFlex
from pyworkflow.protocol import STEPS_PARALLEL, params

from .. import convert
from ..core.alignment import AlignmentResult, align_particles
from ..core.dataset import MrcsImageSource
from ..core.structure import centre
from .base import FlexDLProtBase

#: Refinement effort -> keyword arguments of core.alignment.align_particles ('normal': its
#: defaults, the settings of the benchmark in the README).
EFFORT = {
    "fast": dict(n_candidates=4, search_iters=8, refine_iters=10),
    "normal": dict(),
    "thorough": dict(n_candidates=12, n_final=2, search_iters=15, refine_iters=25),
}
SCORE_ATTR = "_cfdlScore"


class FlexDLProtAlign(FlexDLProtBase):
    """HEMNMA: for each particle, the normal-mode amplitudes, orientation and shift at once.

    A global search over orientations and a coarse grid of amplitudes (FFT
    shift search, CTF applied) is followed by a joint local refinement of all
    parameters through the differentiable projector. Particles are processed
    in chunks, as parallel steps: a stopped run continues where it stopped."""
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
                      label="Modes", help="Mode numbers, e.g. '7-9'. Empty: the enabled modes from 7 on.")
        form.addParam("amplitudeRange", params.FloatParam, default=0.0, validators=[params.GE(0)],
                      label="Amplitude range (Å)",
                      help="Amplitudes are searched in [-R, R]. 0: R = 5 sqrt(N) Å, which moves the N atoms "
                           "by 5 Å RMS along one mode (about 200 Å for adenylate kinase).")
        form.addSection(label="Search")
        form.addParam("angularStep", params.FloatParam, default=15.0, validators=[params.Range(3, 45)],
                      label="Angular step (deg)", help="Spacing of the global orientation search.")
        form.addParam("maxShift", params.FloatParam, default=5.0, validators=[params.GE(0)],
                      label="Maximum shift (px)", help="Largest shift searched, in pixels of the input images.")
        form.addParam("workingSize", params.IntParam, default=64, validators=[params.GE(16)],
                      label="Working image size (px)",
                      help="Images are reduced to this size by Fourier cropping for the final refinement "
                           "(the paper aligned 128 px versions of 256 px images).")
        form.addParam("effort", params.EnumParam, choices=list(EFFORT), default=1,
                      display=params.EnumParam.DISPLAY_HLIST, label="Refinement effort",
                      help="How many candidate poses are refined, and for how long.")
        form.addParam("chunkSize", params.IntParam, default=100, validators=[params.GT(0)],
                      expertLevel=params.LEVEL_ADVANCED, label="Particles per step",
                      help="Each chunk is one step: chunks run in parallel (threads) and a continued "
                           "run skips the chunks already done.")
        self._addDeviceParam(form)
        form.addParallelSection(threads=1, mpi=0)

    # --------------------------- STEPS -----------------------------------------
    def _insertAllSteps(self):
        convert_step = self._insertFunctionStep(self.convertInputStep, needsGPU=False)
        n = self.inputParticles.get().getSize()
        size = self.chunkSize.get()
        chunk_steps = [self._insertFunctionStep(self.alignChunkStep, k, prerequisites=[convert_step],
                                                needsGPU=self._usesGPU())
                       for k in range((n + size - 1) // size)]
        self._insertFunctionStep(self.createOutputStep, prerequisites=chunk_steps, needsGPU=False)

    def _modeNumbers(self):
        text = (self.modeList.get() or "").strip()
        if text:
            return convert.parse_mode_list(text)
        return convert.enabled_mode_numbers(self.inputModes.get())

    def convertInputStep(self):
        self._logToRunLog()
        numbers = self._modeNumbers()
        atoms, modes = convert.read_modes(self.inputModes.get(), numbers)
        parts = convert.read_particles(self.inputParticles.get())
        ctf = None
        if parts.ctf is not None:
            c = parts.ctf
            ctf = np.column_stack([c.defocus_u, c.defocus_v, c.defocus_angle])
        np.savez(self._getExtraPath("input.npz"), coords=centre(atoms.coords), modes=modes,
                 sigma=atoms.sigma, weights=atoms.weights, ids=parts.ids, indices=parts.indices,
                 ctf=ctf if ctf is not None else np.zeros((0, 3)))
        with open(self._getExtraPath("input.json"), "w") as f:
            json.dump(dict(stacks=parts.stacks, mode_numbers=numbers, pixel_size=parts.pixel_size,
                           voltage=parts.voltage, cs=parts.cs, amplitude_contrast=parts.amplitude_contrast),
                      f)
        os.makedirs(self._getExtraPath("chunks"), exist_ok=True)
        self.info(f"{len(parts.ids)} particles of {parts.box} px, modes {numbers}, "
                  f"{atoms.n_atoms} atoms in the reference")

    def _chunkFile(self, k):
        return self._getExtraPath("chunks", "chunk_%05d.npz" % k)

    def alignChunkStep(self, k):
        from ..core.ctf import CTFParams
        self._logToRunLog()
        out = self._chunkFile(k)
        if os.path.exists(out):  # done by an earlier run
            return
        data = np.load(self._getExtraPath("input.npz"))
        with open(self._getExtraPath("input.json")) as f:
            meta = json.load(f)
        size = self.chunkSize.get()
        rows = np.arange(k * size, min((k + 1) * size, len(data["ids"])))
        source = MrcsImageSource([(meta["stacks"][i], int(data["indices"][i])) for i in rows])
        images = source.read(np.arange(len(rows)))
        if not np.all(np.isfinite(images)):
            bad = rows[~np.isfinite(images).all(axis=(1, 2))]
            raise ValueError(f"Particles with ids {data['ids'][bad][:10].tolist()} contain NaN or "
                             f"infinite pixels: remove them (subset) before aligning.")
        ctf = None
        if len(data["ctf"]):
            c = data["ctf"][rows]
            ctf = CTFParams(c[:, 0], c[:, 1], c[:, 2], meta["voltage"], meta["cs"], meta["amplitude_contrast"])
        modes = data["modes"]
        amp_range = None
        if self.amplitudeRange.get() > 0:
            r = self.amplitudeRange.get()
            amp_range = np.tile([-r, r], (len(modes), 1))

        def progress(fraction, message):
            self.info(f"chunk {k}: {100 * fraction:.0f}% {message}")

        result = align_particles(images, data["coords"], modes, meta["pixel_size"], ctf=ctf,
                                 sigma=data["sigma"], weights=data["weights"],
                                 max_shift_px=self.maxShift.get(), amplitude_range=amp_range,
                                 working_size=min(self.workingSize.get(), images.shape[-1]),
                                 angular_step_deg=self.angularStep.get(), device=self._getDevice(),
                                 progress=progress, **EFFORT[list(EFFORT)[self.effort.get()]])
        tmp = out + ".tmp.npz"
        np.savez(tmp, rows=rows, **result.to_dict())
        os.replace(tmp, out)  # a chunk file exists only when complete
        self.info(f"chunk {k}: {len(rows)} particles aligned, mean score {result.score.mean():.3f}")

    def _gather(self) -> AlignmentResult:
        n = len(np.load(self._getExtraPath("input.npz"))["ids"])
        size = self.chunkSize.get()
        parts = [np.load(self._chunkFile(k)) for k in range((n + size - 1) // size)]
        return AlignmentResult(**{key: np.concatenate([p[key] for p in parts])
                                  for key in ("amplitudes", "angles", "shifts", "score")})

    def createOutputStep(self):
        result = self._gather()
        data = np.load(self._getExtraPath("input.npz"))
        with open(self._getExtraPath("input.json")) as f:
            numbers = json.load(f)["mode_numbers"]
        out = SetOfParticlesFlex(filename=self._getPath("particles_flex.sqlite"),
                                 progName=convert.FLEX_PROG_NAME)
        convert.fill_flex_particles(out, self.inputParticles.get(), data["ids"], result.amplitudes, numbers,
                                    convert.SOURCE_HEMNMA, result.angles, result.shifts,
                                    extra={SCORE_ATTR: result.score})
        self._defineOutputs(outputParticles=out)
        self._defineSourceRelation(self.inputParticles, out)
        self._defineSourceRelation(self.inputModes, out)

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
        available = {r["number"] for r in convert.modes_table(modes)}
        missing = sorted(set(numbers) - available)
        if missing:
            errors.append(f"Modes {missing} are not in the input set of modes.")
        if not numbers:
            errors.append("No enabled modes from 7 on: give a mode list, e.g. '7-9'.")
        if parts.getSize() and parts.getXDim() < 16:
            errors.append(f"Particles of {parts.getXDim()} px are too small to align (16 px at least).")
        return errors

    def _summary(self):
        if not hasattr(self, "outputParticles"):
            return ["Not aligned yet."]
        result = self._gather()
        with open(self._getExtraPath("input.json")) as f:
            numbers = json.load(f)["mode_numbers"]
        from ..reports import error_summary_lines
        return [f"{len(result.score)} particles aligned with modes {numbers}.",
                f"Score (normalised cross-correlation): mean {result.score.mean():.3f}, "
                f"median {np.median(result.score):.3f}.",
                "Amplitudes (Å): " + ", ".join(f"mode {m}: {a.mean():.1f} ± {a.std():.1f}"
                                              for m, a in zip(numbers, result.amplitudes.T))
                ] + error_summary_lines(self.outputParticles, self.inputParticles.get(), self.inputModes.get())

    def _methods(self):
        if not hasattr(self, "outputParticles"):
            return []
        return ["Normal-mode amplitudes, orientations and shifts of the particles were estimated by HEMNMA "
                "[Jin2014] (global search followed by joint continuous refinement through a differentiable "
                "projector of Gaussian atoms)."]

    def _citations(self):
        return ["Jin2014", "Hamitouche2022"]
