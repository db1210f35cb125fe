"""Our poses as RELION reads them: scipion-em-relion's own converter against RELION's image model.

The render below follows RELION's documented model and is written here, apart from our
projector: ``Euler_angles2matrix(rot, tilt, psi)`` rotates the reference into the
observation (an atom at ``r`` is seen at ``(A r)[:2]``), the projection is shifted by
MINUS the origin (``ObservationModel::predictObservation``: ``shiftImageInFourierTransform``
by ``-rlnOriginX/YAngst``), then multiplied by RELION's CTF (``CTF::getCTF``: ``-sin(chi)``
with ``chi = K1 dz u^2 + K2 u^4 - K3``, positive at zero frequency). A particle written by
us and read by RELION must match that render at the noise ceiling; the same render with the
shift negated or the rotation transposed must match the particle's details (finer than
20 Å) at least 3 times worse.
"""
import math
import os

import mrcfile
import numpy as np
import pytest
from pyworkflow.tests import BaseTest, setupTestProject

relion_convert = pytest.importorskip("relion.convert.convert31",
                                     reason="scipion-em-relion (the test extra) is not installed")
from emtable import Table  # noqa: E402  (installed with scipion-em-relion)
from pwem.constants import ALIGN_PROJ  # noqa: E402
from pwem.objects import SetOfParticles  # noqa: E402

from continuousflex_dl import convert  # noqa: E402
from continuousflex_dl.core.imaging.ctf import apply_ctf, ctf_image  # noqa: E402
from continuousflex_dl.core.imaging.geometry import euler_to_matrix  # noqa: E402
from continuousflex_dl.core.imaging.projection import project_gaussians  # noqa: E402
from continuousflex_dl.core.modes.nma import displace  # noqa: E402
from continuousflex_dl.core.imaging.structure import centre  # noqa: E402
from continuousflex_dl.protocols import FlexDLProtAlign, FlexDLProtSynthesize  # noqa: E402
from continuousflex_dl.tests.base import FlexDLTestBase  # noqa: E402

BOX, PIXEL, SNR, N = 64, 2.0, 0.1, 24
#: Correlation of a clean image with itself plus noise at SNR (noise over the whole box).
CEILING = math.sqrt(SNR / (1 + SNR))


def relion_matrix(rot, tilt, psi):
    """RELION's ``Euler_angles2matrix`` (degrees), transcribed from src/euler.cpp."""
    a, b, g = np.radians([rot, tilt, psi])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array([[cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
                     [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
                     [sc, ss, cb]])


def relion_ctf(row, optics, box):
    """RELION's CTF (``CTF::getCTF``) on the unshifted FFT grid, from a particle row."""
    volt = float(optics.rlnVoltage) * 1e3
    lam = 12.2643247 / math.sqrt(volt * (1 + volt * 0.978466e-6))
    cs = float(optics.rlnSphericalAberration) * 1e7
    q = float(optics.rlnAmplitudeContrast)
    k1, k2, k3 = math.pi * lam, math.pi / 2 * cs * lam ** 3, math.atan(q / math.sqrt(1 - q * q))
    freq = np.fft.fftfreq(box, d=float(optics.rlnImagePixelSize))
    uy, ux = np.meshgrid(freq, freq, indexing="ij")
    u2 = ux ** 2 + uy ** 2
    ang = np.arctan2(uy, ux) - math.radians(float(row.rlnDefocusAngle))
    du, dv = float(row.rlnDefocusU), float(row.rlnDefocusV)
    dz = -(du + dv) / 2 - (du - dv) / 2 * np.cos(2 * ang)       # RELION: negative underfocus
    return -np.sin(k1 * dz * u2 + k2 * u2 * u2 - k3)


def relion_render(coords, row, optics, box, shift_sign=-1.0, transpose=False):
    """The image RELION predicts for one particle row: Gaussian blobs at ``(A r)[:2]`` (px from
    the box centre) moved by ``shift_sign * origin``, times the CTF. coords: (N, 3) Å."""
    ps = float(optics.rlnImagePixelSize)
    a = relion_matrix(row.rlnAngleRot, row.rlnAngleTilt, row.rlnAnglePsi)
    a = a.T if transpose else a
    origin = np.array([row.rlnOriginXAngst, row.rlnOriginYAngst], dtype=float) / ps
    xy = (coords @ a.T)[:, :2] / ps + shift_sign * origin + box // 2
    grid = np.arange(box)
    gx = np.exp(-(grid[None] - xy[:, :1]) ** 2 / 2)           # 1 px wide blobs
    gy = np.exp(-(grid[None] - xy[:, 1:]) ** 2 / 2)
    image = gy.T @ gx
    return np.real(np.fft.ifft2(np.fft.fft2(image) * relion_ctf(row, optics, box)))


def read_star(path):
    """(optics of each row, rows) of a RELION 3.1 star, or of a 3.0 star (optics in the rows)."""
    rows = list(Table(fileName=str(path), tableName="particles"))
    with open(path) as f:
        has_optics = "data_optics" in f.read()
    if not has_optics:
        return rows, rows
    groups = {g.rlnOpticsGroup: g for g in Table(fileName=str(path), tableName="optics")}
    return [groups[r.rlnOpticsGroup] for r in rows], rows


def read_image(row, root):
    """The image of a row; ``root``: the folder its file name is relative to."""
    index, name = row.rlnImageName.split("@")
    with mrcfile.open(os.path.join(root, name), permissive=True) as mrc:
        return np.asarray(mrc.data[int(index) - 1], dtype=float)


#: Spatial frequencies (1/Å) from which the controls are compared: the detail of the
#: particle. Below it, two views of a 214-residue protein look alike (the transposed rotation
#: keeps 0.43 of the correlation over all frequencies at 64 px, 2 Å/px).
DETAIL = 1 / 20.0


def _detail(image, pixel_size):
    freq = np.fft.fftfreq(image.shape[-1], d=pixel_size)
    keep = np.hypot(freq[:, None], freq[None, :]) >= DETAIL
    return np.real(np.fft.ifft2(np.fft.fft2(image) * keep))


def correlations(star_path, coords_of_row, root=None):
    """Correlations (M, 4) of each image with RELION's render over all frequencies, and over
    the detail band (>= :data:`DETAIL`) with the render, the render with the shift negated
    and the render with the rotation transposed. root: the folder of the image names
    (default: the star's)."""
    optics, rows = read_star(star_path)
    root = os.path.dirname(str(star_path)) if root is None else root
    out = np.zeros((len(rows), 4))
    for i, row in enumerate(rows):
        image, coords = read_image(row, root), coords_of_row(i, row)
        ps = float(optics[i].rlnImagePixelSize)
        renders = [relion_render(coords, row, optics[i], BOX, **kw)
                   for kw in ({}, {"shift_sign": 1.0}, {"transpose": True})]
        out[i, 0] = np.corrcoef(image.ravel(), renders[0].ravel())[0, 1]
        detail = _detail(image, ps).ravel()
        out[i, 1:] = [np.corrcoef(detail, _detail(r, ps).ravel())[0, 1] for r in renders]
    return out


class TestRelionReadsOurPoses(FlexDLTestBase):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.modes = cls.computeTestModes()
        cls.synth = cls.newProtocol(FlexDLProtSynthesize, inputModes=cls.modes, modeList="7-9",
                                    numberOfImages=N, boxSize=BOX, samplingRate=PIXEL, maxShift=5.0,
                                    defocusMin=5000, defocusMax=15000, addNoise=True, snr=SNR, seed=21)
        cls.launchProtocol(cls.synth)
        atoms, cls.vectors = convert.read_modes(cls.modes, [7, 8, 9])
        cls.coords = centre(atoms.coords)

    def _write_star(self, parts, name):
        path = self.proj.getTmpPath(name)
        relion_convert.Writer().writeSetOfParticles(parts, path, alignType=ALIGN_PROJ)
        return path

    def _coords_from(self, parts):
        amplitudes = convert.read_particles(parts, need_amplitudes=True).amplitudes
        return lambda i, row: displace(self.coords, self.vectors, amplitudes[i])

    def _check(self, per_image, what):
        corr = per_image.mean(0)
        print(f"{what}: correlation with RELION's render {corr[0]:.3f} (noise ceiling {CEILING:.3f}); "
              f"over the detail band: {corr[1]:.3f}, negated shift {corr[2]:.3f}, transposed rotation "
              f"{corr[3]:.3f}")
        # Measured at 64 px, 2 Å/px, SNR 0.1 (synthesized particles): 0.286; detail band 0.158,
        # negated shift 0.007, transposed rotation 0.023 (all frequencies: 0.015 and 0.128).
        self.assertGreaterEqual(corr[0], 0.9 * CEILING)
        self.assertLessEqual(corr[2], corr[1] / 3)
        self.assertLessEqual(corr[3], corr[1] / 3)
        self.assertTrue(np.all(per_image[:, 1] > per_image[:, 2:].max(1)), per_image)

    def test_synthesized_particles(self):
        parts = self.synth.outputParticles
        self._check(correlations(self._write_star(parts, "synth.star"), self._coords_from(parts),
                                 self.proj.getPath()),
                    "Synthesized particles, written by scipion-em-relion")

    def test_ground_truth_star_beside_the_stack(self):
        self._check(correlations(self.synth._getExtraPath("ground_truth.star"),
                                 self._coords_from(self.synth.outputParticles)),
                    "Synthesis' own ground_truth.star")

    def test_aligned_particles(self):
        align = self.newProtocol(FlexDLProtAlign, inputParticles=self.synth.outputParticles,
                                 inputModes=self.modes, modeList="7-9", workingSize=BOX, maxShift=6.0)
        self.launchProtocol(align)
        parts = align.outputParticles
        self._check(correlations(self._write_star(parts, "aligned.star"), self._coords_from(parts),
                                 self.proj.getPath()),
                    "HEMNMA-aligned particles, written by scipion-em-relion")


class TestWeReadRelionPoses(BaseTest):
    """A RELION 3.1 star with known poses, imported through scipion-em-relion's reader."""

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)

    def test_known_poses_round_trip(self):
        rng = np.random.default_rng(4)
        n = 5
        angles = np.column_stack([rng.uniform(-180, 180, n), rng.uniform(5, 175, n), rng.uniform(-180, 180, n)])
        origins_px = rng.uniform(-4, 4, (n, 2))
        coords = rng.normal(scale=8.0, size=(60, 3))
        stack = self.proj.getTmpPath("known.mrcs")
        optics = Table(columns=["rlnOpticsGroupName", "rlnOpticsGroup", "rlnVoltage",
                                "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize",
                                "rlnImageSize", "rlnImageDimensionality"])
        optics.addRow("opticsGroup1", 1, 300.0, 2.7, 0.1, PIXEL, BOX, 2)
        parts = Table(columns=["rlnImageName", "rlnOpticsGroup", "rlnAngleRot", "rlnAngleTilt",
                               "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU",
                               "rlnDefocusV", "rlnDefocusAngle"])
        for i in range(n):
            parts.addRow(f"{i + 1:06d}@known.mrcs", 1, *angles[i], *(origins_px[i] * PIXEL),
                         8000.0 + 500 * i, 7600.0 + 500 * i, 30.0)
        images = np.stack([relion_render(coords, row, optics[0], BOX) for row in parts]).astype(np.float32)
        with mrcfile.new(stack, overwrite=True) as mrc:
            mrc.set_data(images)
        star = self.proj.getTmpPath("known.star")
        with open(star, "w") as f:
            f.write("# version 30001\n")
            optics.writeStar(f, tableName="optics")
            f.write("# version 30001\n")
            parts.writeStar(f, tableName="particles")
        part_set = SetOfParticles(filename=self.proj.getTmpPath("known.sqlite"))
        relion_convert.Reader().readSetOfParticles(star, part_set, alignType=ALIGN_PROJ)
        arrays = convert.read_particles(part_set)
        np.testing.assert_allclose(arrays.shifts, origins_px, atol=1e-6)
        got = np.stack([relion_matrix(*a) for a in arrays.angles])
        want = np.stack([relion_matrix(*a) for a in angles])
        np.testing.assert_allclose(got, want, atol=1e-6)
        np.testing.assert_allclose(arrays.ctf.defocus_u, 8000.0 + 500 * np.arange(n))
        # Our projector, given the pose we read, draws the particle where RELION does.
        ours = apply_ctf(project_gaussians(coords, euler_to_matrix(arrays.angles), arrays.shifts, BOX, PIXEL,
                                           sigma=PIXEL), ctf_image(arrays.ctf, BOX, PIXEL)).numpy()
        for i in range(n):
            self.assertGreater(np.corrcoef(ours[i].ravel(), images[i].ravel())[0, 1], 0.99)
