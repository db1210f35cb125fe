"""The map -> pseudoatoms protocol in a headless Scipion project, and NMA on its output."""
import os
import tempfile

import numpy as np
import torch
from pwem.protocols import ProtImportVolumes
from pyworkflow.tests import BaseTest, setupTestProject

from continuousflex_dl import convert
from continuousflex_dl.core.modes import nma
from continuousflex_dl.core.modes import pseudoatoms as pa
from continuousflex_dl.core.imaging.projection import density_map
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms
from continuousflex_dl.protocols.protocol_nma import FlexDLProtNMA
from continuousflex_dl.protocols.protocol_pseudoatoms import FlexDLProtPseudoatoms

BOX, PIXEL = 48, 2.0


class TestProtPseudoatoms(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.atoms = centre(load_atoms(example_structure_path("4ake"), "heavy").coords)
        cls.map = density_map(cls.atoms, BOX, PIXEL, sigma=2.0).numpy()
        folder = tempfile.mkdtemp(prefix="cfdl-pseudo-")
        cls.map_path = str(pa.write_map(os.path.join(folder, "ake_map.mrc"), cls.map, PIXEL))
        # A mask of the wrong size, for validation.
        cls.bad_mask = str(pa.write_map(os.path.join(folder, "small_mask.mrc"), np.ones((8, 8, 8)), PIXEL))
        prot = cls.newProtocol(ProtImportVolumes, filesPath=cls.map_path, samplingRate=PIXEL,
                               setOrigCoord=False)
        cls.launchProtocol(prot)
        cls.volume = prot.outputVolume

    def test_pseudoatoms_then_nma(self):
        prot = self.newProtocol(FlexDLProtPseudoatoms, inputVolume=self.volume, targetError=5.0)
        self.launchProtocol(prot)
        out = prot.outputPdb
        self.assertTrue(out.getPseudoAtoms())
        atoms = load_atoms(out.getFileName(), "all")
        np.testing.assert_allclose(atoms.sigma, PIXEL)             # 1 voxel at 2 Å/voxel
        scale = float(pa.read_pdb_remarks(out.getFileName())["WEIGHT_SCALE"])
        # Independent check of the recorded error from the written file alone.
        rebuilt = density_map(torch.as_tensor(atoms.coords), BOX, PIXEL, sigma=atoms.sigma,
                              weights=torch.as_tensor(atoms.weights * scale)).numpy()
        err = np.linalg.norm(rebuilt - self.map) / np.linalg.norm(self.map)
        self.assertLess(err, 0.05)
        summary = "\n".join(prot.summary())
        self.assertIn(f"{atoms.n_atoms} pseudoatoms", summary)
        self.assertIn("target 5.00 %, reached", summary)
        recorded = float(summary.split("Relative approximation error ")[1].split(" %")[0])
        self.assertAlmostEqual(recorded, 100 * err, delta=0.02)
        self.assertIn("Jonic2016", prot._citations())

        # The NMA protocol takes the pseudoatoms (all of them, relative cutoff).
        nma_prot = self.newProtocol(FlexDLProtNMA, inputStructure=out, numberOfModes=9, cutoffMode=2,
                                    rcPercentage=100.0)
        self.launchProtocol(nma_prot)
        self.assertTrue(nma_prot.outputStructure.getPseudoAtoms())
        patoms, vectors = convert.read_modes(nma_prot.outputModes, [7, 8, 9])
        self.assertEqual(patoms.n_atoms, atoms.n_atoms)
        # The modes' structure keeps the widths and weights that synthesis and alignment project.
        np.testing.assert_allclose(patoms.sigma, atoms.sigma)
        np.testing.assert_allclose(patoms.weights, atoms.weights, atol=0.006)
        atomic = nma.compute_modes(self.atoms, 9, 8.0).vectors[6:9]
        at_pseudo = pa.interpolate_vectors(self.atoms, atomic, patoms.coords, PIXEL)
        self.assertGreaterEqual(nma.subspace_overlap(vectors, at_pseudo), 0.8)

    def test_threshold_and_limit(self):
        # Half the map's maximum as threshold and at most 30 pseudoatoms: the target is
        # not reached, and the summary says so.
        prot = self.newProtocol(FlexDLProtPseudoatoms, inputVolume=self.volume, maskMode=1,
                                threshold=float(0.5 * self.map.max()), maxPseudoatoms=30)
        self.launchProtocol(prot)
        atoms = load_atoms(prot.outputPdb.getFileName(), "all")
        self.assertLessEqual(atoms.n_atoms, 30)
        summary = "\n".join(prot.summary())
        self.assertIn("NOT reached", summary)
        # All pseudoatoms sit in the thresholded (dense) region.
        kept = np.argwhere(self.map >= 0.5 * self.map.max())                  # (iz, iy, ix)
        dense = (kept[:, ::-1] - BOX // 2) * PIXEL
        nearest = np.min(np.linalg.norm(atoms.coords[:, None] - dense[None], axis=2), axis=1)
        self.assertLess(nearest.max(), 2 * PIXEL)

    def test_validation(self):
        from pwem.objects import VolumeMask
        mask = VolumeMask(location=self.bad_mask)
        mask.setSamplingRate(PIXEL)
        prot = self.newProtocol(FlexDLProtPseudoatoms, inputVolume=self.volume, maskMode=2)
        self.assertTrue(any("Choose a mask" in e for e in prot.validate()))
        prot.inputMask.set(mask)
        self.assertTrue(any("differs from the map" in e for e in prot.validate()), prot.validate())
