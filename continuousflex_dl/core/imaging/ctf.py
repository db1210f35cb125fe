"""Contrast transfer function (CTF): parameters, 2-D CTF images, application and phase flipping.

Formula (RELION's ``CTF::getCTF``, without B-factor envelope):

* electron wavelength ``lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))`` Å, ``V`` in volts
  (relativistic correction);
* astigmatic defocus along the azimuth ``theta`` of the spatial frequency
  ``dz(theta) = (U + V)/2 + (U - V)/2 cos(2 (theta - angle))`` Å, positive = underfocus, so
  ``defocus_u`` is the defocus along the direction at ``defocus_angle`` degrees from the x axis;
* ``gamma(k) = -pi lambda dz k^2 + pi/2 Cs lambda^3 k^4 - phase_shift - atan(Q / sqrt(1 - Q^2))``
  with ``k`` in 1/Å, ``Cs`` in Å and ``Q`` the amplitude contrast; ``CTF = -sin(gamma)``.

RELION writes ``K1 * deltaf * u2`` with ``deltaf = -(U + V)/2 - ...`` (its defocus average is
negated), which is the ``-pi lambda dz k^2`` term above. The CTF equals ``Q`` (> 0) at ``k = 0``
and rises towards 1; its first zero is where
``pi lambda dz k^2 - pi/2 Cs lambda^3 k^4 + atan(Q/sqrt(1-Q^2)) + phase_shift = pi``.
This is the convention of RELION, Xmipp and Scipion's ``CTFModel`` (defocusU/V in Å,
defocusAngle in degrees), so values from any of them can be used directly.

Frequencies follow ``torch.fft.rfft2`` of a ``(box, box)`` image indexed ``[y, x]``:
CTF images have shape ``(B, box, box // 2 + 1)``; row ``i`` is ``ky = fftfreq(box)[i] / pixel_size``,
column ``j`` is ``kx = j / (box * pixel_size)``. A real, even filter commutes with the box centre
(``n // 2``), so no shift is needed. Multiplication in Fourier space is a circular convolution:
signal delocalised past the box edge wraps around (as in RELION and Xmipp).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Dict, Mapping, Optional, Union

import numpy as np
import torch

__all__ = ["CTFParams", "electron_wavelength", "ctf_image", "apply_ctf", "phase_flip"]

ArrayLike = Union[float, np.ndarray, torch.Tensor, list, tuple]


def electron_wavelength(voltage_kv: ArrayLike) -> np.ndarray:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV (e.g. 300 -> 0.01969)."""
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    if np.any(v <= 0):
        raise ValueError(f"The voltage must be positive (kV), got {voltage_kv}.")
    return 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))


@dataclass
class CTFParams:
    """CTF parameters of one image or a batch of ``B`` images.

    Each field is a float (shared by all images) or a (B,) array (one value per image):

    defocus_u, defocus_v: Å, positive = underfocus (Scipion ``CTFModel.getDefocusU/V``,
        RELION ``rlnDefocusU/V``);
    defocus_angle: degrees, angle of the U axis from the image x axis (``getDefocusAngle``,
        ``rlnDefocusAngle``);
    voltage: kV (acquisition ``voltage``, ``rlnVoltage``);
    cs: spherical aberration in mm (acquisition ``sphericalAberration``, ``rlnSphericalAberration``);
    amplitude_contrast: fraction in [0, 1) (acquisition ``amplitudeContrast``, ``rlnAmplitudeContrast``);
    phase_shift: degrees (``CTFModel.getPhaseShift``, ``rlnPhaseShift``; 0 without phase plate).
    """
    defocus_u: ArrayLike
    defocus_v: ArrayLike
    defocus_angle: ArrayLike = 0.0
    voltage: ArrayLike = 300.0
    cs: ArrayLike = 2.7
    amplitude_contrast: ArrayLike = 0.1
    phase_shift: ArrayLike = 0.0

    def __post_init__(self):
        sizes = set()
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            arr = np.asarray(value, dtype=np.float64)
            if arr.ndim > 1:
                raise ValueError(f"CTF parameter {f.name} must be a number or a 1-D array, "
                                 f"got shape {arr.shape}.")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"CTF parameter {f.name} contains non-finite values.")
            if arr.ndim == 1:
                sizes.add(arr.shape[0])
            setattr(self, f.name, float(arr) if arr.ndim == 0 else arr)
        if len(sizes) > 1:
            raise ValueError(f"CTF parameter arrays have different lengths {sorted(sizes)}; "
                             "give one value per image or a single number.")
        q = np.asarray(self.amplitude_contrast)
        if np.any(q < 0) or np.any(q >= 1):
            raise ValueError(f"The amplitude contrast must be in [0, 1), got {self.amplitude_contrast}.")
        if np.any(np.asarray(self.voltage) <= 0):
            raise ValueError(f"The voltage must be positive (kV), got {self.voltage}.")
        self._batch = sizes.pop() if sizes else 1

    @property
    def batch_size(self) -> int:
        """Number of images B the parameters describe (1 when every field is a number)."""
        return self._batch

    @classmethod
    def from_scipion(cls, defocusU: ArrayLike, defocusV: ArrayLike, defocusAngle: ArrayLike = 0.0,
                     voltage: ArrayLike = 300.0, sphericalAberration: ArrayLike = 2.7,
                     amplitudeContrast: ArrayLike = 0.1, phaseShift: Optional[ArrayLike] = None
                     ) -> "CTFParams":
        """Build from Scipion field names: ``CTFModel`` (defocusU/V Å, defocusAngle deg,
        phaseShift deg or None) and ``Acquisition`` (voltage kV, sphericalAberration mm,
        amplitudeContrast), e.g. ``CTFParams.from_scipion(defocusU=ctf.getDefocusU(), ...)``."""
        return cls(defocus_u=defocusU, defocus_v=defocusV, defocus_angle=defocusAngle,
                   voltage=voltage, cs=sphericalAberration, amplitude_contrast=amplitudeContrast,
                   phase_shift=0.0 if phaseShift is None else phaseShift)

    def column(self, name: str) -> np.ndarray:
        """Field ``name`` as a (B,) float64 array."""
        return np.broadcast_to(np.asarray(getattr(self, name), dtype=np.float64), (self.batch_size,)).copy()

    def to_columns(self, prefix: str = "ctf_") -> Dict[str, np.ndarray]:
        """Every field as a (B,) float64 array named ``prefix + field`` (for ``np.savez``);
        :meth:`from_columns` reads them back exactly."""
        return {prefix + f.name: self.column(f.name) for f in fields(self)}

    @classmethod
    def from_columns(cls, columns: Mapping[str, np.ndarray], prefix: str = "ctf_"
                     ) -> Optional["CTFParams"]:
        """Inverse of :meth:`to_columns` (a dict or an ``np.load`` archive); None when the
        columns are absent (images without CTF). Fields the columns lack take their defaults."""
        names = [f.name for f in fields(cls)]
        if prefix + names[0] not in columns:
            return None
        return cls(**{name: np.asarray(columns[prefix + name], dtype=np.float64)
                      for name in names if prefix + name in columns})

    def select(self, index) -> "CTFParams":
        """Parameters of a subset of images (``index``: slice, integer array or mask)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value if np.ndim(value) == 0 else np.asarray(value)[index]
        return CTFParams(**out)

    def expand(self, n: int) -> "CTFParams":
        """The same parameters as (n,) arrays of ``n`` images (B = 1 or n -> B = n)."""
        if self.batch_size not in (1, n):
            raise ValueError(f"The CTF describes {self.batch_size} images; give one for all images "
                             f"or one per image ({n}).")
        return CTFParams(**{f.name: np.broadcast_to(self.column(f.name), (n,)).copy() for f in fields(self)})


def _frequencies(box: int, pixel_size: float, device) -> tuple:
    """(ky (box, 1), kx (1, box//2+1)) in 1/Å, float64, rfft2 layout."""
    ky = torch.fft.fftfreq(box, d=pixel_size, dtype=torch.float64, device=device)[:, None]
    kx = torch.fft.rfftfreq(box, d=pixel_size, dtype=torch.float64, device=device)[None, :]
    return ky, kx


def ctf_image(params: CTFParams, box: int, pixel_size: float, device=None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """2-D CTFs in ``torch.fft.rfft2`` layout for ``(box, box)`` images of ``pixel_size`` Å/px.

    Returns a real tensor (B, box, box // 2 + 1), ``B = params.batch_size``. Computed in
    float64 and cast to ``dtype``.
    """
    if int(box) != box or box < 2:
        raise ValueError(f"The box size must be an integer >= 2 px, got {box}.")
    if not pixel_size > 0:
        raise ValueError(f"The pixel size must be positive (Å/px), got {pixel_size}.")
    box = int(box)
    device = torch.device(device) if device is not None else torch.device("cpu")
    ky, kx = _frequencies(box, float(pixel_size), device)
    k2 = kx * kx + ky * ky                                   # (box, box//2+1)
    safe = torch.where(k2 > 0, k2, torch.ones_like(k2))
    cos2t = torch.where(k2 > 0, (kx * kx - ky * ky) / safe, torch.ones_like(k2))  # cos(2 theta)
    sin2t = torch.where(k2 > 0, 2.0 * kx * ky / safe, torch.zeros_like(k2))      # sin(2 theta)

    def col(name):
        return torch.as_tensor(params.column(name), dtype=torch.float64, device=device)[:, None, None]

    lam = torch.as_tensor(electron_wavelength(params.column("voltage")), dtype=torch.float64,
                          device=device)[:, None, None]
    du, dv, ang = col("defocus_u"), col("defocus_v"), col("defocus_angle") * (math.pi / 180.0)
    q = col("amplitude_contrast")
    k1 = math.pi * lam                                       # (B, 1, 1)
    k2c = 0.5 * math.pi * col("cs") * 1e7 * lam ** 3
    offset = col("phase_shift") * (math.pi / 180.0) + torch.atan(q / torch.sqrt(1.0 - q * q))
    # gamma = -k1 dz(theta) k^2 + k2c k^4 - offset with cos(2 (theta - angle)) =
    # cos 2theta cos 2angle + sin 2theta sin 2angle: a linear combination of 5 fixed images.
    basis = torch.stack([k2, cos2t * k2, sin2t * k2, k2 * k2, torch.ones_like(k2)]).reshape(5, -1)
    coef = torch.cat([-k1 * 0.5 * (du + dv), -k1 * 0.5 * (du - dv) * torch.cos(2.0 * ang),
                      -k1 * 0.5 * (du - dv) * torch.sin(2.0 * ang), k2c, -offset], dim=1)[:, :, 0]
    gamma = (coef @ basis).reshape(-1, box, box // 2 + 1)
    return (-torch.sin(gamma)).to(dtype)


def _check_pair(images: torch.Tensor, ctf: torch.Tensor) -> None:
    if images.ndim < 2 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"Images must be square (..., box, box), got shape {tuple(images.shape)}.")
    box = images.shape[-1]
    if ctf.shape[-2:] != (box, box // 2 + 1):
        raise ValueError(f"CTF of shape {tuple(ctf.shape)} does not match images of box {box}: "
                         f"expected (..., {box}, {box // 2 + 1}) (rfft2 layout).")


def apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Multiply the Fourier transform of ``images`` (B, box, box) by ``ctf``
    (B or 1, box, box // 2 + 1, see :func:`ctf_image`); returns real images (B, box, box)."""
    _check_pair(images, ctf)
    box = images.shape[-1]
    ctf = ctf.to(device=images.device)
    ft = torch.fft.rfft2(images) * ctf
    return torch.fft.irfft2(ft, s=(box, box)).to(images.dtype)


def phase_flip(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Phase-flip ``images`` (B, box, box): multiply their Fourier transform by ``sign(ctf)``
    (+1 where ``ctf >= 0``, -1 elsewhere, as RELION). Returns (B, box, box)."""
    _check_pair(images, ctf)
    box = images.shape[-1]
    sign = torch.where(ctf.to(device=images.device) < 0, -1.0, 1.0)
    ft = torch.fft.rfft2(images) * sign
    return torch.fft.irfft2(ft, s=(box, box)).to(images.dtype)
