"""A density map as a reference: its approximation by Gaussian pseudoatoms."""
import json
import os

from pwem.objects import AtomStruct
from pyworkflow.protocol import params

from ..core.modes import pseudoatoms as pa
from .base import FlexDLProtBase

MASK_NONE, MASK_THRESHOLD, MASK_VOLUME = 0, 1, 2


def _file(obj) -> str:
    """A Scipion image/volume file name without its ':mrc' style suffix."""
    name = obj.getFileName()
    return name.split(":")[0] if name and ":" in os.path.basename(name) else name


class FlexDLProtPseudoatoms(FlexDLProtBase):
    """Approximate a cryo-EM map by Gaussian pseudoatoms (Jonic & Sorzano 2016).

    Gaussians of one width are placed where the map is least well explained and
    their positions and weights refined until the relative error reaches the
    target (or the maximum number of pseudoatoms is used). The pseudoatoms form
    an atomic structure (flagged as pseudoatoms) whose normal modes the NMA
    protocol computes, and which synthesis and alignment project with the
    pseudoatoms' widths and weights."""
    _label = "map to pseudoatoms"
    _possibleOutputs = {"outputPdb": AtomStruct}

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputVolume", params.PointerParam, pointerClass="Volume", important=True,
                      label="Density map", help="A cubic cryo-EM map (MRC). Its sampling rate is taken "
                                                "from Scipion.")
        form.addParam("maskMode", params.EnumParam, choices=["none", "threshold", "mask"], default=MASK_NONE,
                      display=params.EnumParam.DISPLAY_HLIST, label="Restrict the map by",
                      help="none: approximate the whole map. threshold: map values below the threshold "
                           "count as 0 (noise and solvent). mask: only voxels inside a binary mask count.")
        form.addParam("threshold", params.FloatParam, default=0.0, condition="maskMode == 1",
                      label="Threshold", help="In the map's units; values below it are set to 0.")
        form.addParam("inputMask", params.PointerParam, pointerClass="VolumeMask", allowsNull=True,
                      condition="maskMode == 2", label="Mask", help="Same size as the map; nonzero = keep.")
        form.addSection(label="Pseudoatoms")
        form.addParam("sigmaVoxels", params.FloatParam, default=1.0, validators=[params.Positive],
                      label="Pseudoatom width (voxels)",
                      help="Standard deviation of every Gaussian, in voxels (sigma in Å = this x the "
                           "sampling rate). Smaller widths follow finer detail with more pseudoatoms; "
                           "1 voxel is ContinuousFlex's default.")
        form.addParam("targetError", params.FloatParam, default=5.0, validators=[params.Range(0.1, 99)],
                      label="Target error (%)",
                      help="Relative L2 error ||map - approximation|| / ||map|| to reach, in percent. "
                           "(ContinuousFlex's percentage is the squared ratio, so its 5 % is looser.)")
        form.addParam("maxPseudoatoms", params.IntParam, default=20000, validators=[params.GT(0)],
                      label="Maximum pseudoatoms",
                      help="Stop here even if the target is not reached; the summary says which happened.")
        self._addDeviceParam(form)

    # --------------------------- STEPS -----------------------------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertStep, needsGPU=False)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def _pdbFile(self):
        return self._getExtraPath("pseudoatoms.pdb")

    def _infoFile(self):
        return self._getExtraPath("pseudoatoms.json")

    def _approximationFile(self):
        return self._getExtraPath("pseudoatoms_approximation.mrc")

    def _mask(self):
        if self.maskMode.get() != MASK_VOLUME or self.inputMask.get() is None:
            return None
        return pa.read_map(_file(self.inputMask.get()))[0]

    def convertStep(self):
        self._logToRunLog()
        volume = self.inputVolume.get()
        data, _ = pa.read_map(_file(volume))
        pixel = float(volume.getSamplingRate())
        threshold = self.threshold.get() if self.maskMode.get() == MASK_THRESHOLD else None

        def progress(done, total, message):
            self.info("Pseudoatoms: %s" % message)

        result = pa.volume_to_pseudoatoms(
            data, pixel, self.sigmaVoxels.get() * pixel, target_error=self.targetError.get() / 100.0,
            max_atoms=self.maxPseudoatoms.get(), threshold=threshold, mask=self._mask(),
            device=self._getDevice(), progress=progress)
        pa.write_pseudoatoms_pdb(self._pdbFile(), result)
        approx = pa.render_pseudoatoms(result.coords, result.weights, result.sigma, result.box, pixel)
        pa.write_map(self._approximationFile(), approx, pixel)
        with open(self._infoFile(), "w") as fh:
            json.dump({"n_atoms": result.n_atoms, "sigma": result.sigma, "error": result.error,
                       "target_error": result.target_error, "reached": result.reached,
                       "pixel_size": pixel, "box": result.box, "seconds": result.seconds,
                       "history": result.history}, fh, indent=1)
        self.info("%d pseudoatoms, relative error %.4f (target %.4f, %s)" % (
            result.n_atoms, result.error, result.target_error, "reached" if result.reached else "NOT reached"))

    def createOutputStep(self):
        structure = AtomStruct(filename=self._pdbFile(), pseudoatoms=True)
        self._defineOutputs(outputPdb=structure)
        self._defineSourceRelation(self.inputVolume, structure)

    # --------------------------- INFO ------------------------------------------
    def _info(self):
        with open(self._infoFile()) as fh:
            return json.load(fh)

    def _validate(self):
        volume = self.inputVolume.get()
        if volume is None:
            return ["Choose a density map."]
        path = _file(volume)
        if not path or not os.path.exists(path):
            return [f"The map file {path} does not exist."]
        shape = _map_shape(path)
        if shape is None or len(shape) != 3 or len(set(shape)) != 1:
            return [f"The map {path} must be a cubic 3-D MRC map (its shape is {shape})."]
        errors = _voxel_size_errors(path, float(volume.getSamplingRate()))
        if self.maskMode.get() == MASK_VOLUME:
            mask = self.inputMask.get()
            if mask is None:
                errors.append("Choose a mask, or restrict the map by threshold or not at all.")
            elif _map_shape(_file(mask)) != shape:
                errors.append(f"The mask's size {_map_shape(_file(mask))} differs from the map's {shape}.")
        return errors

    def _summary(self):
        if not hasattr(self, "outputPdb") or not os.path.exists(self._infoFile()):
            return ["Pseudoatoms not computed yet."]
        info = self._info()
        state = "reached" if info["reached"] else "NOT reached: raise the maximum number of pseudoatoms"
        return [f"{info['n_atoms']} pseudoatoms of width sigma {info['sigma']:.2f} Å approximate the "
                f"{info['box']}^3 map ({info['pixel_size']:g} Å/voxel).",
                f"Relative approximation error {100 * info['error']:.2f} % (target "
                f"{100 * info['target_error']:.2f} %, {state}).",
                "Approximation map: " + self._approximationFile()]

    def _methods(self):
        if not hasattr(self, "outputPdb") or not os.path.exists(self._infoFile()):
            return []
        info = self._info()
        return [f"The map {self.getObjectTag('inputVolume')} was approximated by {info['n_atoms']} Gaussian "
                f"pseudoatoms of standard deviation {info['sigma']:.2f} Å [Jonic2016] with a relative L2 "
                f"error of {100 * info['error']:.2f} %."]

    def _citations(self):
        return ["Jonic2016"]


def _map_shape(path):
    """(nz, ny, nx) of an MRC file from its header, or None if unreadable."""
    import mrcfile
    try:
        with mrcfile.open(path, header_only=True, permissive=True) as mrc:
            h = mrc.header
            return (int(h.nz), int(h.ny), int(h.nx))
    except Exception:  # any unreadable file is reported by _validate
        return None


#: Relative difference between a map's header voxel size and its Scipion sampling rate above
#: which the map is refused: a scale error in Å would follow into every pseudoatom, mode and
#: alignment, silently.
VOXEL_TOLERANCE = 0.005


def _voxel_size_errors(path, sampling_rate: float):
    """A validation error when the MRC header of the map gives a voxel size other than the
    Scipion sampling rate (Å/px) that places the pseudoatoms in Å. Headers that give no
    voxel size (0) or MRC's default of 1 Å are not trusted to disagree."""
    import mrcfile
    try:
        with mrcfile.open(path, header_only=True, permissive=True) as mrc:
            voxel = float(mrc.voxel_size.x)
    except Exception:  # an unreadable file is reported by the shape check
        return []
    if voxel <= 0 or voxel == 1.0 or abs(voxel - sampling_rate) <= VOXEL_TOLERANCE * voxel:
        return []
    return [f"The map's file says {voxel:g} Å/px but Scipion gives it {sampling_rate:g} Å/px: the pseudoatoms "
            f"would be {sampling_rate / voxel:.3f} times too {'large' if sampling_rate > voxel else 'small'}. "
            f"Import the map again with the sampling rate of the file ({voxel:g} Å/px), or, if Scipion's value "
            f"is right, correct the file's header (e.g. ChimeraX 'volume #1 voxelSize {sampling_rate:g}' then "
            f"save) and import it again. The particles may have any pixel size: each is used in Å."]
