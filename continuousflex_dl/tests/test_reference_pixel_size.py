"""A reference map at another pixel size and box than the particles (map 72 px at 1.06 Å/px,
particles 64 px at 1.31 Å/px): the map becomes pseudoatoms in Å through its Scipion sampling
rate, so the model seen at the particles' pixel size and box is the molecule at its true size;
a map whose file and Scipion disagree on the pixel size is refused with the fix named.
Truth: the atoms of adenylate kinase the map is made from."""
import os
import tempfile

import numpy as np
import torch
from pwem.protocols import ProtImportVolumes
from pyworkflow.tests import BaseTest, setupTestProject

from continuousflex_dl.core.imaging.projection import density_map
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms
from continuousflex_dl.core.landscape.reconstruction import map_correlation
from continuousflex_dl.core.modes import pseudoatoms as pa
from continuousflex_dl.protocols.protocol_pseudoatoms import FlexDLProtPseudoatoms

MAP_BOX, MAP_PIXEL = 72, 1.06
PART_BOX, PART_PIXEL = 64, 1.31
SIGMA = 2.0  # Å, the atoms' width in the map


def rendered(coords, sigma, weights=None):
    """The density of Gaussians at the particles' box and pixel size (PART_BOX px, PART_PIXEL Å/px)."""
    w = None if weights is None else torch.as_tensor(weights)
    return density_map(torch.as_tensor(coords), PART_BOX, PART_PIXEL, sigma=sigma, weights=w).numpy()


class TestReferencePixelSize(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.atoms = centre(load_atoms(example_structure_path("4ake"), "heavy").coords)
        folder = tempfile.mkdtemp(prefix="cfdl-ref-")
        path = str(pa.write_map(os.path.join(folder, "ake_106.mrc"),
                                density_map(cls.atoms, MAP_BOX, MAP_PIXEL, sigma=SIGMA).numpy(), MAP_PIXEL))
        cls.volume, cls.mislabelled = (cls.launchProtocol(cls.newProtocol(
            ProtImportVolumes, filesPath=path, samplingRate=rate, setOrigCoord=False)).outputVolume
            for rate in (MAP_PIXEL, PART_PIXEL))

    def test_pseudoatoms_give_the_molecule_at_the_particles_pixel_size(self):
        prot = self.newProtocol(FlexDLProtPseudoatoms, inputVolume=self.volume, targetError=5.0)
        self.launchProtocol(prot)
        pseudo = load_atoms(prot.outputPdb.getFileName(), "all")
        np.testing.assert_allclose(pseudo.sigma, MAP_PIXEL)  # 1 voxel of the map, in Å
        truth = rendered(self.atoms, SIGMA)
        ours = rendered(pseudo.coords, pseudo.sigma, pseudo.weights)
        # The silent error this guards against: the map read at the particles' pixel size.
        scaled = rendered(pseudo.coords * PART_PIXEL / MAP_PIXEL, pseudo.sigma * PART_PIXEL / MAP_PIXEL,
                          pseudo.weights)
        good, bad = map_correlation(ours, truth), map_correlation(scaled, truth)
        print(f"Map at {MAP_PIXEL} Å/px -> pseudoatoms seen at {PART_PIXEL} Å/px: correlation with the atoms "
              f"{good:.3f}; with the {PART_PIXEL / MAP_PIXEL:.3f}x scale error {bad:.3f}")
        self.assertGreater(good, 0.95)
        self.assertLess(bad, good - 0.1)
        # Radius of gyration in Å: blurred density, so Rg^2 + 3 sigma^2 on both sides.
        w = pseudo.weights / pseudo.weights.sum()
        rg_pseudo = np.sqrt((w * ((pseudo.coords - (w[:, None] * pseudo.coords).sum(0)) ** 2).sum(1)).sum()
                            + 3 * MAP_PIXEL ** 2)
        rg_atoms = np.sqrt(((self.atoms - self.atoms.mean(0)) ** 2).sum(1).mean() + 3 * SIGMA ** 2)
        self.assertAlmostEqual(rg_pseudo / rg_atoms, 1.0, delta=0.02)

    def test_map_whose_file_and_scipion_disagree_is_refused(self):
        errors = self.newProtocol(FlexDLProtPseudoatoms, inputVolume=self.mislabelled).validate()
        message = "\n".join(errors)
        self.assertIn("The map's file says 1.06 Å/px but Scipion gives it 1.31 Å/px", message)
        self.assertIn("1.236 times too large", message)
        self.assertIn("Import the map again with the sampling rate of the file (1.06 Å/px)", message)
        self.assertEqual(self.newProtocol(FlexDLProtPseudoatoms, inputVolume=self.volume).validate(), [])
