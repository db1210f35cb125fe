"""Real particles through Scipion's real importers, then alignment, prediction and reconstruction.

Files from the cryoDRGN 4.3.1 source distribution (tests/data/cryodrgn/README.md): a RELION 3.1
star with an optics group, poses and CTFs (5 particles, 256 px, 2.806 Å/px) and 7 EMPIAR-10076
particles (320 px, 1.31 Å/px, CTF only) as a RELION 3.0 star and as a cryoSPARC .cs. Both stars
are imported with scipion-em-relion's importer through pwem's ProtImportParticles, its
acquisition read from the star as the form's wand does (``loadAcquisitionInfo``).
scipion-em-cryosparc2's .cs importer needs the pyem conda environment (it runs a script there),
so the .cs is read here with numpy as a second truth for the same particles. Every value is
asserted against the star/.cs (read with emtable, the library of scipion-em-relion), in the
Scipion set and in what this plugin's runs use. The images also go through a TIFF stack
imported as files, which the alignment converts once into an MRC stack in its folder.
"""
import os

import mrcfile
import numpy as np
import tifffile
from emtable import Table
from pwem.protocols import ProtImportParticles
from pyworkflow.tests import setupTestProject

from continuousflex_dl import convert
from continuousflex_dl.core.hemnma.alignment_job import AlignmentJob
from continuousflex_dl.core.imaging.dataset import MrcsImageSource
from continuousflex_dl.core.imaging.geometry import euler_to_matrix
from continuousflex_dl.core.network.prediction_job import PredictionJob
from continuousflex_dl.protocols import (FlexDLProtAlign, FlexDLProtPredict, FlexDLProtReconstruct,
                                         FlexDLProtSynthesize, FlexDLProtTrain)
from continuousflex_dl.tests.base import FlexDLTestBase

DATA = os.path.join(os.path.dirname(__file__), "data", "cryodrgn")
RELION31, EMPIAR_STAR, EMPIAR_CS = (os.path.join(DATA, n) for n in
                                    ("relion31.star", "empiar_10076_7.star", "empiar_10076_7.cs"))

#: The reference (adenylate kinase) is not these particles' molecule: the data's arrival is tested
#: here; the reliability calibration, whose simulated images of this mismatch carry no signal, runs
#: once (it must not refuse the run) and is left out of the other runs to save time.
NO_CALIBRATION = dict(calibrationParticles=0)


def star_columns(path, table, *labels):
    """Columns ``labels`` (float arrays) of the loop ``table`` of a STAR file, read by emtable."""
    t = Table(fileName=path, tableName=table)
    return [np.array([float(getattr(row, label)) for row in t]) for label in labels]


def import_star(test, path, **form):
    """The particles of a STAR file, imported by scipion-em-relion's importer with the
    acquisition the form's wand reads from the file (``loadAcquisitionInfo``) and ``form``."""
    prot = test.newProtocol(ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_RELION,
                            starFile=path, **form)
    for name, value in prot.loadAcquisitionInfo().items():
        getattr(prot, name).set(value)
    test.launchProtocol(prot)
    return prot.outputParticles


def assert_same_angle_mod_180(test, a, b):
    """CTF astigmatism angles (deg) equal up to 180° (the importer may add 180°)."""
    d = (np.asarray(a) - np.asarray(b) + 90.0) % 180.0 - 90.0
    np.testing.assert_allclose(d, 0.0, atol=1e-6)


class TestRealData(FlexDLTestBase):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.relion31 = import_star(cls, RELION31)
        # RELION 3.0: the pixel size is the detector pixel (µm) * 1e4 / magnification.
        detector, magnification = star_columns(EMPIAR_STAR, "", "rlnDetectorPixelSize", "rlnMagnification")
        cls.empiar_pixel = float(detector[0] * 1e4 / magnification[0])
        cls.empiar = import_star(cls, EMPIAR_STAR, samplingRate=cls.empiar_pixel)

    def test_relion31_arrives_exactly(self):
        s = self.relion31
        (pixel, cs, voltage, q, size) = star_columns(RELION31, "optics", "rlnImagePixelSize", "rlnSphericalAberration",
                                                     "rlnVoltage", "rlnAmplitudeContrast", "rlnImageSize")
        self.assertEqual((s.getSize(), s.getXDim(), s.getSamplingRate()), (5, int(size[0]), pixel[0]))
        acq = s.getAcquisition()
        self.assertEqual((acq.getVoltage(), acq.getSphericalAberration(), acq.getAmplitudeContrast()),
                         (voltage[0], cs[0], q[0]))
        self.assertEqual((cs[0], pixel[0]), (0.01, 2.806))  # not the form's defaults (2.7 mm, 1 Å/px)
        # The optics group travels with the set as RELION's own table.
        optics = Table()
        optics.read(_lines_file(self, acq.opticsGroupInfo.get()), tableName="optics")
        row = optics[0]
        self.assertEqual(optics.size(), 1)
        self.assertEqual((float(row.rlnImagePixelSize), float(row.rlnSphericalAberration), float(row.rlnVoltage),
                          float(row.rlnAmplitudeContrast), int(row.rlnImageSize)),
                         (pixel[0], cs[0], voltage[0], q[0], int(size[0])))
        # What this plugin's runs read: pixel size, CTF, poses and images exactly.
        arrays = convert.read_particles(s)
        du, dv, angle, rot, tilt, psi, ox, oy = star_columns(
            RELION31, "particles", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnAngleRot", "rlnAngleTilt",
            "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")
        self.assertEqual(arrays.pixel_size, 2.806)
        np.testing.assert_allclose(arrays.ctf.column("defocus_u"), du, rtol=1e-12)
        np.testing.assert_allclose(arrays.ctf.column("defocus_v"), dv, rtol=1e-12)
        assert_same_angle_mod_180(self, arrays.ctf.column("defocus_angle"), angle)
        np.testing.assert_allclose(arrays.ctf.column("cs"), 0.01)
        np.testing.assert_allclose(arrays.ctf.column("voltage"), 300.0)
        np.testing.assert_allclose(arrays.ctf.column("amplitude_contrast"), 0.1)
        np.testing.assert_allclose(euler_to_matrix(arrays.angles), euler_to_matrix(np.stack([rot, tilt, psi], 1)),
                                   atol=1e-9)
        # Our shifts are RELION's origin in pixels (DESIGN: the particle centre sits at box centre MINUS it).
        np.testing.assert_allclose(arrays.shifts, np.stack([ox, oy], 1) / 2.806, atol=1e-9)
        with mrcfile.open(os.path.join(DATA, "relion31.mrcs"), permissive=True) as mrc:  # no MAP ID: old file
            np.testing.assert_array_equal(MrcsImageSource(list(zip(arrays.stacks, arrays.indices))).read(range(5)),
                                          mrc.data)

    def test_empiar_star_and_cs_agree_exactly(self):
        s = self.empiar
        cs_file = np.load(EMPIAR_CS)
        self.assertEqual((s.getSize(), s.getXDim()), (7, 320))
        self.assertAlmostEqual(s.getSamplingRate(), float(cs_file["blob/psize_A"][0]), places=6)
        arrays = convert.read_particles(s)
        du, dv, angle, voltage, cs, q = star_columns(EMPIAR_STAR, "", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle",
                                                     "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
        for ours, star, cs_values in ((arrays.ctf.column("defocus_u"), du, cs_file["ctf/df1_A"]),
                                      (arrays.ctf.column("defocus_v"), dv, cs_file["ctf/df2_A"])):
            np.testing.assert_allclose(ours, star, rtol=1e-12)
            np.testing.assert_allclose(ours, cs_values, rtol=1e-6)  # float32 in the .cs
        assert_same_angle_mod_180(self, arrays.ctf.column("defocus_angle"), angle)
        np.testing.assert_allclose(np.radians(angle), cs_file["ctf/df_angle_rad"], rtol=1e-6)
        for name, star, cs_values in (("voltage", voltage, cs_file["ctf/accel_kv"]), ("cs", cs, cs_file["ctf/cs_mm"]),
                                      ("amplitude_contrast", q, cs_file["ctf/amp_contrast"])):
            np.testing.assert_allclose(arrays.ctf.column(name), star)
            np.testing.assert_allclose(arrays.ctf.column(name), cs_values, rtol=1e-6)
        self.assertIsNone(arrays.angles)  # CTF only: no poses are made up

    def test_alignment_reconstruction_and_prediction_on_real_boxes(self):
        modes = self.computeTestModes()
        align = self.newProtocol(FlexDLProtAlign, inputParticles=self.relion31, inputModes=modes, modeList="7-8",
                                 effort=0, workingSize=64, chunkSize=5, maxShift=3.0)
        self.launchProtocol(align)
        reliability = convert.read_particles(align.outputParticles).reliability
        print("reliability of real particles against a reference of another molecule:", reliability)
        self.assertEqual(reliability.shape, (5,))
        self.assertTrue(np.all((reliability >= 0) & (reliability < 0.5)), reliability)  # none called right
        job = AlignmentJob.load(align._getExtraPath())
        truth = convert.read_particles(self.relion31)
        self.assertEqual(job.pixel_size, 2.806)
        for name in ("defocus_u", "defocus_v", "defocus_angle", "cs", "voltage", "amplitude_contrast"):
            np.testing.assert_array_equal(job.ctf.column(name), truth.ctf.column(name))
        said = "Particles of 256 px at 2.806 Å/px were Fourier-cropped to 64 px (11.22 Å/px, 'Working image size')."
        self.assertIn(said, "\n".join(align.summary()))
        self.assertIn(said, self.runLog(align))

        # The same images as a TIFF stack (tifffile, one page per image) imported as files: the
        # run copies them once into an MRC stack in its folder and aligns exactly those images.
        tiff = self.proj.getTmpPath("relion31.tif")
        with mrcfile.open(os.path.join(DATA, "relion31.mrcs"), permissive=True) as mrc:
            images = np.array(mrc.data)
        tifffile.imwrite(tiff, images)
        imp = self.newProtocol(ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_FILES,
                               filesPath=os.path.dirname(os.path.abspath(tiff)), filesPattern="relion31.tif",
                               samplingRate=2.806)
        self.launchProtocol(imp)
        self.assertSetSize(imp.outputParticles, 5)
        align_tiff = self.newProtocol(FlexDLProtAlign, inputParticles=imp.outputParticles, inputModes=modes,
                                      modeList="7-8", effort=0, workingSize=32, maxShift=3.0, **NO_CALIBRATION)
        self.launchProtocol(align_tiff)
        job = AlignmentJob.load(align_tiff._getExtraPath())
        self.assertTrue(all(p.endswith(".mrcs") and "images" in p for p in job.stacks), job.stacks)
        np.testing.assert_array_equal(MrcsImageSource(list(zip(job.stacks, job.indices))).read(range(5)), images)
        self.assertIn("Converted 5 images of ", self.runLog(align_tiff))

        recon = self.newProtocol(FlexDLProtReconstruct, inputParticles=self.relion31, seed=1)
        self.launchProtocol(recon)
        volume = recon.outputVolume
        self.assertEqual(volume.getXDim(), 128)
        self.assertAlmostEqual(volume.getSamplingRate(), 2.806 * 256 / 128, places=9)
        with mrcfile.open(volume.getFileName()) as mrc:
            self.assertEqual(mrc.data.shape, (128, 128, 128))
            self.assertAlmostEqual(float(mrc.voxel_size.x), 5.612, places=3)
        said = "Particles of 256 px at 2.806 Å/px were Fourier-cropped to 128 px (5.612 Å/px, 'Largest box')."
        self.assertIn(said, "\n".join(recon.summary()))
        self.assertIn(said, self.runLog(recon))

        # A small network trained on boxes of the same extent in Å (320 px x 1.31 Å/px = 32 px x 13.1 Å/px).
        synth = self.newProtocol(FlexDLProtSynthesize, inputModes=modes, modeList="7-9", numberOfImages=32,
                                 boxSize=32, samplingRate=self.empiar_pixel * 10, maxShift=0.0, applyCTF=False,
                                 addNoise=False, seed=3)
        self.launchProtocol(synth)
        # poseNormalise "no": these EMPIAR particles have no poses to turn them by
        train = self.newProtocol(FlexDLProtTrain, inputParticles=synth.outputParticles, workingSize=0, epochs=1,
                                 batchSize=16, valFraction=0.25, seed=0, poseNormalise=2)
        self.launchProtocol(train)
        predict = self.newProtocol(FlexDLProtPredict, inputModel=train.outputModel, inputParticles=self.empiar)
        self.launchProtocol(predict)
        self.assertSetSize(predict.outputParticles, 7)
        job = PredictionJob.load(predict._jobFolder())
        self.assertEqual(job.pixel_size, self.empiar.getSamplingRate())
        said = (f"Particles of 320 px at {self.empiar_pixel:g} Å/px were Fourier-cropped to 32 px "
                f"({self.empiar_pixel * 10:.4g} Å/px, the model's box).")
        self.assertIn(said, "\n".join(predict.summary()))
        self.assertIn(said, self.runLog(predict))


def _lines_file(test, text: str) -> str:
    """A file holding ``text`` (emtable reads tables from files)."""
    path = test.proj.getTmpPath("optics.star")
    with open(path, "w") as f:
        f.write(text)
    return path
