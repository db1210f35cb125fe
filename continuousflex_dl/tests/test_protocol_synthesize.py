"""Synthesis protocol: Scipion output carries the truth that reproduces the images."""

import mrcfile
import numpy as np
import torch
from pyworkflow.tests import setupTestProject

from continuousflex_dl import convert
from continuousflex_dl.core.imaging.ctf import apply_ctf, ctf_image
from continuousflex_dl.core.imaging.geometry import euler_to_matrix
from continuousflex_dl.core.modes.nma import displace
from continuousflex_dl.core.imaging.projection import project_gaussians
from continuousflex_dl.core.imaging.star import read_particles_star
from continuousflex_dl.core.imaging.structure import centre
from continuousflex_dl.protocols import FlexDLProtSynthesize
from continuousflex_dl.tests.base import FlexDLTestBase


class TestProtSynthesize(FlexDLTestBase):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.modes = cls.computeTestModes()

    def _synthesize(self, **kwargs):
        args = dict(inputModes=self.modes, modeList="7-9", numberOfImages=12, boxSize=49,
                    samplingRate=2.0, maxShift=3.0, defocusMin=5000, defocusMax=15000, seed=3)
        args.update(kwargs)
        prot = self.newProtocol(FlexDLProtSynthesize, **args)
        self.launchProtocol(prot)
        return prot

    def test_clean_particles_match_independent_projection(self):
        prot = self._synthesize(addNoise=False)
        parts = prot.outputParticles
        self.assertSetSize(parts, 12)
        self.assertTrue(parts.hasCTF() and parts.hasAlignmentProj())
        self.assertEqual(convert.flex_mode_numbers(parts), [7, 8, 9])
        arrays = convert.read_particles(parts, need_amplitudes=True)
        q = arrays.amplitudes
        self.assertEqual(q.shape, (12, 3))
        # The paper's relation: q7 = -200 r, q8 = 200 sin(pi r), q9 = 200 cos(pi r).
        np.testing.assert_allclose(q[:, 1] ** 2 + q[:, 2] ** 2, 200.0 ** 2, rtol=1e-6)
        r = -q[:, 0] / 200.0
        np.testing.assert_allclose(q[:, 1], 200 * np.sin(np.pi * r), atol=1e-6)
        self.assertTrue(np.all(np.abs(arrays.shifts) <= 3.0))
        self.assertTrue(np.all((arrays.ctf.defocus_u >= 5000) & (arrays.ctf.defocus_u <= 15000)))
        # Re-project the ground truth read back from Scipion (pose, CTF, amplitudes).
        atoms, modes = convert.read_modes(self.modes, [7, 8, 9])
        coords = displace(centre(atoms.coords), modes, q)
        rot = euler_to_matrix(torch.as_tensor(arrays.angles))
        clean = project_gaussians(torch.as_tensor(coords), rot, torch.as_tensor(arrays.shifts), 49, 2.0,
                                  sigma=atoms.sigma, weights=atoms.weights)
        expected = apply_ctf(clean, ctf_image(arrays.ctf, 49, 2.0, dtype=clean.dtype)).numpy()
        with mrcfile.open(arrays.stacks[0], permissive=True) as mrc:
            stack = np.asarray(mrc.data)
            self.assertAlmostEqual(float(mrc.voxel_size.x), 2.0, places=4)
        for i in range(12):
            image = stack[arrays.indices[i]]
            corr = np.corrcoef(image.ravel(), expected[i].ravel())[0, 1]
            self.assertGreater(corr, 0.999)
        # The RELION star beside the stack holds the same truth.
        star = read_particles_star(prot._getExtraPath("ground_truth.star"))
        np.testing.assert_allclose(star.amplitudes, q, atol=1e-3)

    def test_noisy_particles_have_the_target_snr(self):
        clean = self._synthesize(addNoise=False, seed=5)
        noisy = self._synthesize(addNoise=True, snr=0.1, seed=5)
        a = convert.read_particles(clean.outputParticles)
        b = convert.read_particles(noisy.outputParticles)
        np.testing.assert_allclose(a.amplitudes, b.amplitudes)
        with mrcfile.open(a.stacks[0]) as m1, mrcfile.open(b.stacks[0]) as m2:
            s = np.asarray(m1.data, dtype=float)
            t = np.asarray(m2.data, dtype=float)
        snr = s.var(axis=(1, 2)) / (t - s).var(axis=(1, 2))
        self.assertAlmostEqual(float(np.mean(snr)), 0.1, delta=0.01)

    def test_validation_names_the_problem(self):
        prot = self.newProtocol(FlexDLProtSynthesize, inputModes=self.modes, modeList="7-9, 30")
        errors = prot.validate()
        self.assertTrue(any("[30]" in e for e in errors), errors)
        prot = self.newProtocol(FlexDLProtSynthesize, inputModes=self.modes, modeList="7-8")
        self.assertTrue(any("three modes" in e for e in prot.validate()))

    def test_box_smaller_than_the_structure_and_rigid_modes_are_refused(self):
        # Adenylate kinase (open, 4ake) heavy atoms span 61.8 Å between the two farthest.
        prot = self.newProtocol(FlexDLProtSynthesize, inputModes=self.modes, modeList="7-9", boxSize=24,
                                samplingRate=1.0)
        errors = "\n".join(prot.validate())
        self.assertIn("24 px x 1 Å/px = 24 Å, smaller than the structure (62 Å", errors)
        self.assertIn("at least 62 px at 1 Å/px", errors)
        prot = self.newProtocol(FlexDLProtSynthesize, inputModes=self.modes, modeList="7-9", boxSize=62,
                                samplingRate=1.0)
        self.assertEqual(prot.validate(), [])
        prot = self.newProtocol(FlexDLProtSynthesize, inputModes=self.modes, modeList="5-7")
        errors = prot.validate()
        self.assertTrue(any("Modes [5, 6] are rigid-body motions" in e for e in errors), errors)

