"""The reference's image model refined on the data: scattering weight per atom type and a
global B-factor, fitted once per set from aligned particles.

HEMNMA's projector (:mod:`projection`) draws every atom as one Gaussian of width ``sigma``
(Å) and mass ``weight``. Real images are projections of the electrostatic potential:
atoms of different elements scatter differently (carbon about 2.5, nitrogen 2.2,
oxygen 2.0, sulphur 5.2 in Peng's units, plus 0.5 per hydrogen that a heavy-atom model
leaves out), and their potential is blurred by thermal motion, beam-induced motion and the
detector. The mismatch biases the amplitudes even on clean images. An :class:`ImageModel`
corrects the reference with a few numbers fitted to the particles:

* ``type_weights``: the scattering weight of each atom type (element), relative to the
  most common type (1); an atom's weight becomes ``weight * type_weights[type]``;
* ``b_factor``: a global B-factor change ``B`` (Å²): every Gaussian's variance becomes
  ``sigma^2 + B / (8 pi^2)`` (the Debye-Waller factor ``exp(-B q^2 / 4)``; ``B < 0`` sharpens).

:func:`fit_image_model` fits them by least squares on the image residual under the CTF,
with the poses and amplitudes of an alignment fixed and each image's scale and offset
free; :func:`refine_image_model` runs the rounds (align a subset, fit, re-refine the subset
with the new model, fit again). The alignment of the whole set then uses
:meth:`ImageModel.apply`'s widths and weights.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["ImageModel", "atom_types", "structure_atom_types", "fit_image_model", "refine_image_model", "ELEMENT_TYPES"]

#: Elements that get a type (and a weight) of their own; every other element shares 'other'.
ELEMENT_TYPES = ("C", "N", "O", "S", "P", "H")

#: The standard deviation of the prior on each log type weight (a factor e either way): it
#: keeps the weight of a type of few atoms (the 7 sulphurs of adenylate kinase) near 1 when
#: the images say little about it, and is negligible for well-determined types.
LOG_WEIGHT_PRIOR_SD = 1.0


def atom_types(elements: Sequence[str]) -> Tuple[np.ndarray, List[str]]:
    """Atom types of a structure from its element symbols (N,) (e.g. ProDy ``getElements()``;
    blank symbols of pseudoatoms are one type). Returns (labels (N,) int64 indices into the
    names, names: the types present, the most common first)."""
    sym = [str(e).strip().upper() for e in elements]
    sym = [s if s in ELEMENT_TYPES else ("pseudo" if not s else "other") for s in sym]
    names, counts = np.unique(np.asarray(sym, dtype=object), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    names = [str(n) for n in names[order]]
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[s] for s in sym], dtype=np.int64), names


def structure_atom_types(elements: Optional[Sequence[str]], names: Sequence[str],
                         residues: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, List[str]]:
    """:func:`atom_types` of a structure's atoms (N,) from their element symbols (None or blank:
    the first letter of the atom name, as PDB files without an element column mean it) and
    residue names; pseudoatoms (residue ``PSE``, :mod:`pseudoatoms`) are one type."""
    names = [str(n).strip() for n in names]
    if residues is not None and len(names) and all(str(r).strip() == "PSE" for r in residues):
        return atom_types([""] * len(names))
    given = [""] * len(names) if elements is None else [str(e).strip() for e in elements]
    return atom_types([e or next((c for c in n if c.isalpha()), "") for e, n in zip(given, names)])


@dataclass(frozen=True)
class ImageModel:
    """A refined image model (module docstring): one weight per atom type and a B-factor.

    type_names: T names (:func:`atom_types`); type_weights: T relative weights (the first,
    most common type is 1); b_factor: Å², the change of every atom's B-factor (0: none).
    fit: figures of the fit (images used, residual before and after), for the log.
    """
    type_names: Tuple[str, ...]
    type_weights: Tuple[float, ...]
    b_factor: float = 0.0
    fit: dict = field(default_factory=dict, compare=False)

    @classmethod
    def identity(cls, type_names: Sequence[str]) -> "ImageModel":
        """The unrefined model: every weight 1, no B-factor change."""
        return cls(tuple(type_names), (1.0,) * len(type_names), 0.0)

    def apply(self, labels: np.ndarray, sigma: Union[float, np.ndarray], weights: Optional[np.ndarray]
              ) -> Tuple[np.ndarray, np.ndarray]:
        """Widths (N,) Å and weights (N,) of the atoms of types ``labels`` (N,) with base widths
        ``sigma`` (N,) or a number (Å) and base weights (N,) or None (ones)."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.type_names)):
            raise ValueError(f"Atom type labels must be in [0, {len(self.type_names)}): the image model "
                             f"was fitted for other atom types; refine it again on this structure.")
        sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), labels.shape)
        var = sig ** 2 + self.b_factor / (8 * math.pi ** 2)
        if np.any(var <= 0):
            raise ValueError(f"A B-factor change of {self.b_factor:.1f} Å² leaves atoms without width.")
        base = np.ones(labels.shape) if weights is None else np.asarray(weights, dtype=np.float64)
        return np.sqrt(var), base * np.asarray(self.type_weights)[labels]

    def widths(self, sigma: float = 1.0) -> float:
        """The width (Å) that an atom of base width ``sigma`` gets."""
        return float(math.sqrt(sigma ** 2 + self.b_factor / (8 * math.pi ** 2)))

    def describe(self, sigma: float = 1.0) -> str:
        """One line: the weights, the B-factor change and the resulting width of an atom."""
        weights = ", ".join(f"{n} {w:.2f}" for n, w in zip(self.type_names, self.type_weights))
        return (f"weights {weights}; B-factor change {self.b_factor:+.1f} Å² (atom width "
                f"{sigma:.2f} -> {self.widths(sigma):.2f} Å)")

    def to_dict(self) -> dict:
        """JSON-able form (:meth:`from_dict` reads it back)."""
        return {"type_names": list(self.type_names), "type_weights": [float(w) for w in self.type_weights],
                "b_factor": float(self.b_factor), "fit": dict(self.fit)}

    @classmethod
    def from_dict(cls, data: dict) -> "ImageModel":
        return cls(tuple(data["type_names"]), tuple(float(w) for w in data["type_weights"]),
                   float(data["b_factor"]), dict(data.get("fit", {})))


def fit_image_model(images, coords: np.ndarray, modes: np.ndarray, pixel_size: float, result,
                    labels: np.ndarray, type_names: Sequence[str], *, ctf=None,
                    sigma: Union[float, np.ndarray] = 1.0, weights: Optional[np.ndarray] = None,
                    start: Optional[ImageModel] = None, size: int = 64, iters: int = 15,
                    device: Union[str, torch.device] = "cpu", chunk: int = 16, deformation: str = "linear",
                    blocks: Optional[np.ndarray] = None) -> ImageModel:
    """Least-squares fit of an :class:`ImageModel` to aligned particles.

    images: (M, box, box) particles (``[y, x]``); coords (N, 3) Å centred; modes (K, N, 3);
    pixel_size: Å/px of the images; result: their :class:`alignment.AlignmentResult` (poses
    and amplitudes, kept fixed); labels: (N,) atom types (:func:`atom_types`) of ``type_names``;
    ctf: CTFParams (one or M) or None; sigma, weights: the base widths (Å) and weights of the
    atoms; start: the model to start from (default: :meth:`ImageModel.identity`); size: the
    images are Fourier-cropped to this many px (the alignment's working size); deformation,
    blocks: how the amplitudes displace the structure (the alignment's,
    :mod:`~continuousflex_dl.core.modes.deformation`).

    Minimises ``sum_i |y_i - s_i C_i p_i(theta) - c_i|^2 / v_i + prior`` over
    ``theta = (log type weights but the first, B)``, with the scale ``s_i`` and offset ``c_i``
    of each image eliminated exactly, ``C_i`` its CTF, ``v_i`` its residual variance under the
    starting model (so noisier images count less) and a Gaussian prior of standard deviation
    :data:`LOG_WEIGHT_PRIOR_SD` on each log weight. L-BFGS with autograd through the projector.
    """
    from .alignment.model import apply_filter
    from .alignment.sizes import ANTI_ALIAS_PX, as_images, crop_images, projection_filters
    from ..imaging.projection import project_gaussians
    from ..modes.deformation import deform
    labels = np.asarray(labels, dtype=np.int64)
    start = start or ImageModel.identity(type_names)
    if tuple(start.type_names) != tuple(type_names):
        raise ValueError(f"The starting image model has types {start.type_names}, the structure {type_names}.")
    imgs = as_images(images, device)
    m, box = imgs.shape[0], imgs.shape[-1]
    if len(result.amplitudes) != m:
        raise ValueError(f"{m} images but {len(result.amplitudes)} aligned particles were given.")
    n = min(int(size), box)
    ps = pixel_size * box / n
    dev = imgs.device
    y = crop_images(imgs, n)
    y = y - y.mean(dim=(-2, -1), keepdim=True)
    blur = ANTI_ALIAS_PX * ps if n < box else 0.0          # Å, as the alignment's working size
    filt = projection_filters(ctf, m, n, ps, dev, torch.float32, source_box=box, blur=blur)
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=dev)  # noqa: E731
    x = t(deform(coords, np.asarray(modes).reshape(-1, len(coords), 3), result.amplitudes, deformation, blocks))
    from ..imaging.geometry import euler_to_matrix
    rot, shifts = t(euler_to_matrix(np.asarray(result.angles, dtype=np.float64))), t(result.shifts) * (n / box)
    sig0 = t(np.broadcast_to(np.asarray(sigma, dtype=np.float64), labels.shape).copy())
    w0 = torch.ones(len(labels), device=dev) if weights is None else t(weights)
    lab = torch.as_tensor(labels, device=dev)
    n_types = len(type_names)
    theta0 = [math.log(start.type_weights[i] / start.type_weights[0]) for i in range(1, n_types)]
    theta = torch.tensor(theta0 + [start.b_factor / 10.0], dtype=torch.float64, device=dev, requires_grad=True)
    var_floor = float((0.05 ** 2 - sig0.min() ** 2) * 8 * math.pi ** 2) / 10.0

    def atoms(th):
        logw = torch.cat([torch.zeros(1, dtype=th.dtype, device=dev), th[:n_types - 1]])
        b = torch.clamp(th[-1], min=var_floor) * 10.0                       # Å², scaled for L-BFGS
        s = torch.sqrt(sig0.double() ** 2 + b / (8 * math.pi ** 2) + blur ** 2).float()
        return s, (w0.double() * torch.exp(logw)[lab]).float(), logw

    def residual_costs(th):
        s, w, _ = atoms(th)
        costs = []
        for c0 in range(0, m, chunk):
            sl = slice(c0, c0 + chunk)
            p = apply_filter(project_gaussians(x[sl], rot[sl], shifts[sl], n, ps, sigma=s, weights=w), filt[sl])
            p = p - p.mean(dim=(-2, -1), keepdim=True)
            pi, pp = (p * y[sl]).sum(dim=(-2, -1)), (p * p).sum(dim=(-2, -1))
            costs.append((y[sl] * y[sl]).sum(dim=(-2, -1)) - pi * pi / (pp + 1e-30))
        return torch.cat(costs).double()

    with torch.no_grad():
        v = residual_costs(theta).clamp_min(1e-30)        # per image, the starting residual

    def objective(th):
        _, _, logw = atoms(th)
        prior = 0.5 * (logw[1:] ** 2).sum() / LOG_WEIGHT_PRIOR_SD ** 2
        return (residual_costs(th) / v).sum() * (n * n) / max(n * n - 2, 1) + prior

    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=int(iters), line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = objective(theta)
        loss.backward()
        return loss

    before = float(objective(theta.detach()))
    opt.step(closure)
    with torch.no_grad():
        final = theta.detach()
        after = float(objective(final))
        _, _, logw = atoms(final)
        b = float(torch.clamp(final[-1], min=var_floor) * 10.0)
    model = ImageModel(tuple(type_names), tuple(float(w) for w in torch.exp(logw).cpu()), b,
                       fit={"images": m, "size_px": n, "relative_residual_before": round(before / m, 6),
                            "relative_residual_after": round(after / m, 6)})
    logger.info("Image model fitted on %d particles: %s; residual %.4f -> %.4f of the starting one",
                m, model.describe(float(sig0.mean())), before / m, after / m)
    return model


def refine_image_model(images, coords: np.ndarray, modes: np.ndarray, pixel_size: float,
                       labels: np.ndarray, type_names: Sequence[str], *, ctf=None,
                       sigma: Union[float, np.ndarray] = 1.0, weights: Optional[np.ndarray] = None,
                       blocks: Optional[np.ndarray] = None, rounds: int = 2, first=None,
                       device: Union[str, torch.device] = "cpu", progress=None,
                       **align_options) -> Tuple[ImageModel, object]:
    """Align particles with the reference's model, fit an :class:`ImageModel` to them, and
    ``rounds - 1`` times more: re-refine their poses and amplitudes locally with the fitted
    model (:meth:`alignment.Aligner.polish`) and fit again from there.

    images: (M, box, box), a subset of the set (a few tens to a hundred particles suffice:
    the model has T + 1 numbers); the other arguments as :func:`fit_image_model`, and
    ``align_options`` of :func:`alignment.align_particles` (``amplitude_range``, config fields);
    first: an AlignmentResult of these images under the unrefined model, if one is at hand
    (skips the first alignment). progress: :data:`~continuousflex_dl.core.progress.Progress`,
    called with (rounds done, rounds, message) after each round. Returns (the model, the
    AlignmentResult of the subset under it).
    """
    from .alignment import Aligner, AlignConfig
    from .alignment.sizes import as_images
    from ..modes.reference import Reference
    from ..progress import report
    from dataclasses import replace
    if rounds < 1:
        raise ValueError(f"Refining the image model needs at least one round, got {rounds}.")
    imgs = as_images(images, device)
    amplitude_range = align_options.pop("amplitude_range", None)
    config = replace(align_options.pop("config", None) or AlignConfig(), **align_options)
    model = ImageModel.identity(type_names)
    result = first
    for r in range(rounds):
        s, w = model.apply(labels, sigma, weights)
        aligner = Aligner(Reference(coords, modes, s, w, blocks), pixel_size, imgs.shape[-1], config,
                          amplitude_range=amplitude_range, device=device)
        result = aligner.align(imgs, ctf=ctf) if result is None else aligner.polish(imgs, result, ctf=ctf)
        model = fit_image_model(imgs, coords, modes, pixel_size, result, labels, type_names, ctf=ctf,
                                sigma=sigma, weights=weights, start=model, size=config.working_size,
                                device=device, deformation=aligner.deformation, blocks=blocks)
        report(progress, r + 1, rounds, f"image model, round {r + 1}/{rounds}: {model.describe()}")
    s, w = model.apply(labels, sigma, weights)
    final = Aligner(Reference(coords, modes, s, w, blocks), pixel_size, imgs.shape[-1], config,
                    amplitude_range=amplitude_range, device=device)
    return model, final.polish(imgs, result, ctf=ctf)
