"""What every protocol of this plugin shares: device choice, logging, citations."""
import logging
import sys
from typing import List

from pwem.protocols import EMProtocol
from pyworkflow.protocol import params

from ..core.mrc import check_mrc_stack

DEVICE_CHOICES = ["auto", "cpu", "cuda"]


class FlexDLProtBase(EMProtocol):
    """Base class: protocols stay thin and call continuousflex_dl.core."""
    _devStatus = "BETA"

    def _addDeviceParam(self, form):
        form.addParam("device", params.EnumParam, choices=DEVICE_CHOICES, default=0,
                      display=params.EnumParam.DISPLAY_HLIST, label="Compute device",
                      expertLevel=params.LEVEL_ADVANCED,
                      help="auto: the first CUDA GPU when one is visible, else the CPU. "
                           "cuda: refuse to run without a GPU. cpu: never use a GPU.")

    def _addFlexInputParams(self, form, modes_help: str):
        """``inputParticles`` (amplitudes of this plugin) and ``inputModes`` (their normal modes)."""
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticlesFlex",
                      label="Particles with amplitudes", important=True,
                      help="Output of the HEMNMA, DeepHEMNMA or synthesis protocol of this plugin.")
        form.addParam("inputModes", params.PointerParam, pointerClass="SetOfNormalModes",
                      label="Normal modes", important=True, help=modes_help)

    def _stackErrors(self, particles, most: int = 3) -> List[str]:
        """Validation errors for the image files of a set of particles: missing, damaged
        header, truncated (core.dataset.check_mrc_stack); at most ``most`` of them."""
        errors = []
        for path in sorted(set(particles.getUniqueValues("_filename"))):
            try:
                check_mrc_stack(path)
            except ValueError as exc:
                errors.append(str(exc))
        more = [f"... and {len(errors) - most} more damaged stacks."] if len(errors) > most else []
        return errors[:most] + more

    def _deviceChoice(self) -> str:
        """The device parameter as a string ('auto' for protocols without one)."""
        return DEVICE_CHOICES[self.device.get()] if hasattr(self, "device") else "auto"

    def _usesGPU(self) -> bool:
        """For steps' needsGPU: everything but an explicit 'cpu' may use a GPU."""
        return self._deviceChoice() != "cpu"

    def _getDevice(self) -> str:
        import torch
        choice = self._deviceChoice()
        if choice == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if choice == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("Device 'cuda' was chosen but no CUDA GPU is visible; choose 'auto' or 'cpu'.")
        return choice

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
