"""An independent, physical-style particle renderer, to test and bench HEMNMA on images its
Gaussian-atom model does not produce exactly.

Image formation, each step written here and not borrowed from :mod:`core.imaging.projection`:

1. **Atoms with hydrogens.** Adenylate kinase with its hydrogens (ProDy's
   ``4akeA_alg_fixed.pdb``); each hydrogen rides on its nearest heavy atom, so a structure
   deformed along modes of the heavy atoms moves its hydrogens with them. Per-atom
   B-factors (the file has none): ``b_backbone`` Å² for N, CA, C, O, ``b_sidechain`` Å² for
   the other heavy atoms, and their heavy atom's value plus ``b_hydrogen_extra`` for hydrogens.
2. **Electrostatic potential.** Every atom is the inverse Fourier transform of its elastic
   electron scattering factor ``f_e(q) = sum_i a_i exp(-b_i q^2 / 4)`` (5 Gaussians, Peng et
   al. 1996, Acta Cryst. A52:257, Table 1, ``0 <= s <= 2`` Å⁻¹, the table of
   International Tables C 4.3.2.2), times the Debye-Waller factor ``exp(-B q^2 / 4)``
   (``q = 1/d`` in Å⁻¹): a sum of 5 normalised 3-D Gaussians of variance
   ``(b_i + B) / (8 pi^2)`` Å² and mass ``a_i``. It is integrated over the voxels of a
   ``(box, box, box)`` grid (pixel size Å).
3. **Projection** by the Fourier-slice theorem (``torch_fourier_slice.project_3d_to_2d``,
   trilinear interpolation of the padded 3-D DFT), so the orientation enters through
   interpolation in Fourier space, not through atom coordinates. The pose convention is the
   project's (:mod:`core.imaging.geometry`): the reference point ``r`` lands at ``(A r)[:2]`` and the
   particle centre at box centre minus the shift; the shift is a Fourier phase (sub-pixel).
4. **Microscope and detector**: the CTF (:mod:`core.imaging.ctf`, RELION's convention), a detector
   modulation transfer function ``1 / (1 + (f / mtf_half)^2)`` (``f`` in cycles/px; 0.5 at
   ``mtf_half``), and white Gaussian noise of variance ``var(clean) / snr`` per image.

Nothing of this is in the package: it lives with the tests, which import it, and
``bench/bench_alignment_physical.py`` uses it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

#: Peng et al. (1996) elastic electron scattering factors, 5-Gaussian fit for 0 <= s <= 2 Å⁻¹:
#: element -> (a_1..a_5 Å, b_1..b_5 Å²), ``f(s) = sum a_i exp(-b_i s^2)`` with ``s = q / 2``.
PENG_1996 = {
    "H": ((0.0349, 0.1201, 0.1970, 0.0573, 0.1195), (0.5347, 3.5867, 12.3471, 18.9525, 38.6269)),
    "C": ((0.0893, 0.2563, 0.7570, 1.0487, 0.3575), (0.2465, 1.7100, 6.4094, 18.6113, 50.2523)),
    "N": ((0.1022, 0.3219, 0.7982, 0.8197, 0.1715), (0.2451, 1.7481, 6.1925, 17.3894, 48.1431)),
    "O": ((0.0974, 0.2921, 0.6910, 0.6990, 0.2039), (0.2067, 1.3815, 4.6943, 12.7105, 32.4726)),
    "P": ((0.2548, 0.6106, 1.4541, 2.3204, 0.8477), (0.2908, 1.8740, 8.5176, 24.3434, 63.2996)),
    "S": ((0.2497, 0.5628, 1.3899, 2.1865, 0.7715), (0.2681, 1.6711, 7.0267, 19.5377, 50.3888)),
}

BACKBONE = ("N", "CA", "C", "O")


@dataclass
class PhysicalStructure:
    """All atoms of a structure for the renderer.

    coords: (N, 3) Å, in the frame of the heavy-atom reference (its heavy-atom mean at 0);
    elements: (N,) element symbols (keys of :data:`PENG_1996`); b_factors: (N,) Å²;
    parent: (N,) index into the heavy atoms of the atom each atom moves with (itself for
    heavy atoms); heavy: (H,) indices of the heavy atoms, in the order of the reference.
    """
    coords: np.ndarray
    elements: np.ndarray
    b_factors: np.ndarray
    parent: np.ndarray
    heavy: np.ndarray

    def deformed(self, heavy_displacement: np.ndarray) -> np.ndarray:
        """(N, 3) Å: all atoms moved by the displacements (H, 3) Å of the heavy atoms."""
        return self.coords + heavy_displacement[self.parent]


def load_4ake(b_backbone: float = 15.0, b_sidechain: float = 30.0,
              b_hydrogen_extra: float = 5.0) -> PhysicalStructure:
    """Adenylate kinase (4AKE chain A) with hydrogens; B-factors in Å² as the module says.
    Its heavy atoms are, in order, those of ``load_atoms(example_structure_path('4ake'))``."""
    import prody
    from continuousflex_dl.core.imaging.structure import example_structure_path
    prody.LOGGER.verbosity = "warning"
    group = prody.parsePDB(str(example_structure_path("4ake")))
    elements = np.array([e.strip().upper() or n[0] for e, n in zip(group.getElements(), group.getNames())])
    xyz = np.asarray(group.getCoords(), dtype=np.float64)
    is_h = elements == "H"
    heavy = np.flatnonzero(~is_h)
    origin = xyz[heavy].mean(0)
    from scipy.spatial import cKDTree
    _, nearest = cKDTree(xyz[heavy]).query(xyz[is_h])
    parent = np.empty(len(xyz), dtype=np.int64)
    parent[heavy] = np.arange(len(heavy))
    parent[is_h] = nearest
    names = group.getNames()
    b = np.where(np.isin(names, BACKBONE), b_backbone, b_sidechain).astype(np.float64)
    b[is_h] = b[heavy][nearest] + b_hydrogen_extra
    return PhysicalStructure(coords=xyz - origin, elements=elements, b_factors=b, parent=parent, heavy=heavy)


def potential_volume(coords: np.ndarray, elements: np.ndarray, b_factors: np.ndarray, box: int,
                     pixel_size: float) -> torch.Tensor:
    """Projected-potential units on a (box, box, box) grid indexed ``[z, y, x]`` (float64).

    coords: (N, 3) Å (voxel ``(iz, iy, ix)`` at ``((ix, iy, iz) - box // 2) * pixel_size``);
    elements: (N,) keys of :data:`PENG_1996`; b_factors: (N,) Å². Each voxel holds the
    integral of the potential over the voxel, so an atom adds ``f_e(0) = sum_i a_i``.
    """
    a = np.array([PENG_1996[e][0] for e in elements])                      # (N, 5)
    var = (np.array([PENG_1996[e][1] for e in elements]) + b_factors[:, None]) / (8 * math.pi ** 2)
    pos = torch.as_tensor(coords / pixel_size + box // 2)                 # (N, 3) voxels, xyz
    sd = torch.as_tensor(np.sqrt(var) / pixel_size)                        # (N, 5) voxels
    half = int(math.ceil(5 * float(sd.max()))) + 1
    k = torch.arange(-half, half + 1, dtype=torch.float64)
    centre = torch.round(pos)                                              # (N, 3)
    edges = centre[..., None] + k - 0.5                                    # (N, 3, W)
    t = (torch.cat([edges, edges[..., -1:] + 1], -1)[:, :, None, :] - pos[..., None, None]) \
        / (sd[:, None, :, None] * math.sqrt(2))                            # (N, 3, 5, W+1)
    prof = 0.5 * (torch.erf(t[..., 1:]) - torch.erf(t[..., :-1]))          # (N, 3, 5, W)
    px, py, pz = prof[:, 0], prof[:, 1], prof[:, 2]                        # (N, 5, W)
    w = torch.as_tensor(a)
    blob = torch.einsum("ng,ngz,ngy,ngx->nzyx", w, pz, py, px)             # (N, W, W, W)
    idx = centre.long()[..., None] + k.long()                              # (N, 3, W)
    ix, iy, iz = idx[:, 0], idx[:, 1], idx[:, 2]
    valid = ((ix >= 0) & (ix < box))[:, None, None, :] & ((iy >= 0) & (iy < box))[:, None, :, None] \
        & ((iz >= 0) & (iz < box))[:, :, None, None]
    flat = (iz.clamp(0, box - 1)[:, :, None, None] * box + iy.clamp(0, box - 1)[:, None, :, None]) * box \
        + ix.clamp(0, box - 1)[:, None, None, :]
    vol = torch.zeros(box ** 3, dtype=torch.float64)
    vol.index_add_(0, flat.reshape(-1), (blob * valid).reshape(-1))
    return vol.reshape(box, box, box)


def fourier_slice_projections(volume: torch.Tensor, rotations: np.ndarray, shifts: np.ndarray) -> torch.Tensor:
    """Projections (B, box, box) of a volume (box, box, box) ``[z, y, x]`` for rotations A
    (B, 3, 3) and shifts (B, 2) px (particle centre at box centre minus the shift)."""
    from torch_fourier_slice import project_3d_to_2d
    box = volume.shape[-1]
    a = torch.as_tensor(np.asarray(rotations), dtype=torch.float32)
    # The image frame is A r: image point (x, y, 0) samples the volume at A^T (x, y, 0).
    proj = project_3d_to_2d(volume.float(), a.transpose(1, 2).contiguous(), pad_factor=2.0)
    ky = torch.fft.fftfreq(box)[:, None]
    kx = torch.fft.rfftfreq(box)[None, :]
    off = -torch.as_tensor(np.asarray(shifts), dtype=torch.float32)        # particle offset, px
    phase = torch.exp(-2j * math.pi * (kx * off[:, 0, None, None] + ky * off[:, 1, None, None]))
    return torch.fft.irfft2(torch.fft.rfft2(proj) * phase, s=(box, box))


def detector_mtf(box: int, mtf_half: float) -> torch.Tensor:
    """(box, box // 2 + 1) MTF ``1 / (1 + (f / mtf_half)^2)`` on the rfft2 grid (f cycles/px)."""
    ky = torch.fft.fftfreq(box)[:, None]
    kx = torch.fft.rfftfreq(box)[None, :]
    return 1.0 / (1.0 + (kx * kx + ky * ky) / mtf_half ** 2)


def render(structure: PhysicalStructure, modes: np.ndarray, amplitudes: np.ndarray, rotations: np.ndarray,
           shifts: np.ndarray, box: int, pixel_size: float, ctf=None, mtf_half: Optional[float] = 0.4,
           snr: Optional[float] = None, rng: Optional[np.random.Generator] = None,
           b_scale: float = 1.0, envelope_b: float = 0.0) -> np.ndarray:
    """Particle images (M, box, box) float32, white on black.

    modes: (K, H, 3) unit-norm modes of the heavy atoms; amplitudes: (M, K) Å; rotations:
    (M, 3, 3); shifts: (M, 2) px; ctf: :class:`core.imaging.ctf.CTFParams` (one or M) or None;
    mtf_half: cycles/px where the detector MTF is 0.5 (None: no MTF); snr: var(clean) /
    var(noise) per image over the box (None: clean); b_scale multiplies every B-factor;
    envelope_b: Å², a global envelope ``exp(-envelope_b q^2 / 4)`` (beam-induced motion, drift).
    """
    from continuousflex_dl.core.imaging.ctf import ctf_image
    out = []
    for i in range(len(amplitudes)):
        disp = np.einsum("k,knd->nd", amplitudes[i], modes)
        vol = potential_volume(structure.deformed(disp), structure.elements, structure.b_factors * b_scale,
                               box, pixel_size)
        out.append(fourier_slice_projections(vol, rotations[i:i + 1], shifts[i:i + 1]))
    img = torch.cat(out)
    filt = torch.ones(box, box // 2 + 1)
    if mtf_half is not None:
        filt = filt * detector_mtf(box, mtf_half)
    if envelope_b:
        q2 = (torch.fft.fftfreq(box)[:, None] ** 2 + torch.fft.rfftfreq(box)[None, :] ** 2) / pixel_size ** 2
        filt = filt * torch.exp(-envelope_b * q2 / 4)
    spectra = torch.fft.rfft2(img) * filt
    if ctf is not None:
        spectra = spectra * ctf_image(ctf, box, pixel_size)
    img = torch.fft.irfft2(spectra, s=(box, box)).numpy()
    if snr is not None:
        sd = np.sqrt(img.var(axis=(1, 2)) / snr)
        img = img + rng.normal(size=img.shape) * sd[:, None, None]
    return img.astype(np.float32)


@dataclass
class PhysicalSet:
    """A set of physical-style particles with their truth: clean (M, box, box) images (CTF,
    MTF, envelope; no noise), amplitudes (M, K) Å, rotations (M, 3, 3), shifts (M, 2) px, the
    CTF (M), and the reference HEMNMA aligns them with: heavy-atom coords (H, 3) Å centred,
    modes (K, H, 3), atom sigma (H,) Å and weights (H,)."""
    clean: np.ndarray
    amplitudes: np.ndarray
    rotations: np.ndarray
    shifts: np.ndarray
    ctf: object
    coords: np.ndarray
    modes: np.ndarray
    sigma: np.ndarray
    weights: np.ndarray
    pixel_size: float

    def noisy(self, snr: float, seed: int) -> np.ndarray:
        """(M, box, box) float32: the clean images plus white noise of var(clean) / snr per image."""
        rng = np.random.default_rng(seed)
        sd = np.sqrt(self.clean.var(axis=(1, 2)) / snr)
        return (self.clean + rng.normal(size=self.clean.shape) * sd[:, None, None]).astype(np.float32)


def adenylate_kinase_set(n: int, box: int = 64, pixel_size: float = 2.0, max_shift: float = 3.0,
                         seed: int = 1) -> PhysicalSet:
    """n particles of 4AKE deformed along ANM modes 7-9 of its heavy atoms (cutoff 8 Å) with the
    DeepHEMNMA paper's amplitudes (q7 = -200 r, q8 = 200 sin(pi r), q9 = 200 cos(pi r) Å),
    random rotations, shifts within ``max_shift`` px, defocus 0.5-2 um, an 80 Å² envelope and
    the detector MTF: the physical-style images of issues 26 and 31."""
    from continuousflex_dl.core.imaging.ctf import CTFParams
    from continuousflex_dl.core.imaging.geometry import random_rotations
    from continuousflex_dl.core.modes.nma import compute_modes
    from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms
    rng = np.random.default_rng(seed)
    atoms = load_atoms(example_structure_path("4ake"), "heavy")
    coords = centre(atoms.coords)
    modes = compute_modes(coords, n_modes=9, cutoff=8.0).vectors[6:9]
    r = rng.random(n)
    q = np.stack([-200 * r, 200 * np.sin(np.pi * r), 200 * np.cos(np.pi * r)], -1)
    rot = random_rotations(n, rng)
    shifts = rng.uniform(-max_shift, max_shift, (n, 2))
    dz = rng.uniform(5000.0, 20000.0, n)
    ctf = CTFParams(defocus_u=dz, defocus_v=dz)
    clean = render(load_4ake(), modes, q, rot, shifts, box, pixel_size, ctf=ctf, envelope_b=80.0)
    return PhysicalSet(clean=clean, amplitudes=q, rotations=rot, shifts=shifts, ctf=ctf, coords=coords, modes=modes,
                       sigma=np.asarray(atoms.sigma), weights=np.asarray(atoms.weights), pixel_size=pixel_size)
