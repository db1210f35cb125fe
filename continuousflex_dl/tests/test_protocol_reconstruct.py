"""Reconstruction protocol: synthetic particles of one conformation -> a map that matches the atoms,
with half maps, voxel size and origin set for ChimeraX, and the resolution in the summary."""
import os

import mrcfile
import numpy as np
from pwem.constants import ALIGN_NONE
from pwem.objects import Particle, SetOfParticles
from pwem.protocols import ProtImportPdb
from pyworkflow.tests import BaseTest, setupTestProject

from continuousflex_dl import convert
from continuousflex_dl.core.modes.nma import displace
from continuousflex_dl.core.imaging.projection import density_map
from continuousflex_dl.core.landscape.reconstruction import map_correlation, model_map_correlation, soft_spherical_mask
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms
from continuousflex_dl.protocols import (FlexDLProtCluster, FlexDLProtNMA, FlexDLProtReconstruct,
                                        FlexDLProtSynthesize, FlexDLProtTrajectory)
from continuousflex_dl.viewers.viewer_reconstruct import FlexDLReconstructViewer

BOX, PIXEL = 32, 3.0


class TestProtReconstruct(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        imp = cls.newProtocol(ProtImportPdb, inputPdbData=1, pdbFile=str(example_structure_path("4ake")))
        cls.launchProtocol(imp)
        cls.structure = imp.outputPdb

    def _synthesize(self, n, **kwargs):
        prot = self.newProtocol(FlexDLProtSynthesize, inputType=1, inputStructure=self.structure,
                                numberOfImages=n, boxSize=BOX, samplingRate=PIXEL, maxShift=3.0,
                                defocusMin=8000.0, defocusMax=20000.0, snr=1.0, seed=1, **kwargs)
        self.launchProtocol(prot)
        return prot.outputParticles

    def test_map_of_synthetic_particles_matches_the_atoms(self):
        particles = self._synthesize(300)
        prot = self.newProtocol(FlexDLProtReconstruct, inputParticles=particles, useGpu=False)
        self.launchProtocol(prot)
        volume = prot.outputVolume
        self.assertAlmostEqual(volume.getSamplingRate(), PIXEL, places=5)
        self.assertEqual(volume.getXDim(), BOX)
        # Scipion and the MRC header put voxel box // 2 at 0 Å (ChimeraX then overlays the
        # centred reference).
        np.testing.assert_allclose(volume.getShiftsFromOrigin(), [-(BOX // 2) * PIXEL] * 3)
        halves = volume.getHalfMaps().split(",")
        self.assertEqual(len(halves), 2)
        with mrcfile.open(volume.getFileName()) as mrc:
            data = np.asarray(mrc.data)
            self.assertAlmostEqual(float(mrc.voxel_size.x), PIXEL, places=4)
            self.assertAlmostEqual(float(mrc.header.origin.x), -(BOX // 2) * PIXEL, places=4)
        atoms = load_atoms(str(example_structure_path("4ake")), "heavy")
        truth = density_map(centre(atoms.coords), BOX, PIXEL, sigma=atoms.sigma, weights=atoms.weights).numpy()
        mask = soft_spherical_mask(BOX, BOX / 2 - 4).numpy()
        # Measured 0.95 (300 particles, SNR 1, CTF, shifts up to 3 px, resolution 6.1 Å).
        self.assertGreater(map_correlation(data, truth, mask), 0.9)
        with mrcfile.open(halves[0]) as h1, mrcfile.open(halves[1]) as h2:
            self.assertGreater(map_correlation(h1.data, h2.data, mask), 0.8)
        self.assertLess(prot.resolution(), 9.0)  # Nyquist 6 Å; clean enough to reach it
        summary = "\n".join(prot.summary())
        self.assertIn("%.2f Å" % prot.resolution(), summary)
        self.assertIn("0.143", "\n".join(prot.methods()))
        # The viewer's FSC plot and table read the same curve.
        viewer = FlexDLReconstructViewer(project=self.proj, protocol=prot)
        figure_view = viewer._showFSC()[0]
        png = figure_view.save(self.proj.getTmpPath("fsc.png"))
        self.assertGreater(os.path.getsize(png), 1000)
        legend = figure_view._figure.axes[0].get_legend().get_texts()[0].get_text()
        self.assertIn("%.2f Å at 0.143" % prot.resolution(), legend)
        table = viewer._showTable()[0]
        self.assertEqual(len(table.rows), BOX // 2 + 1)

    def test_validation_names_the_fix(self):
        no_ctf = self._synthesize(4, applyCTF=False)
        prot = self.newProtocol(FlexDLProtReconstruct, inputParticles=no_ctf)
        self.assertTrue(any("'Correct the CTF?' to No" in e for e in prot.validate()), prot.validate())
        prot = self.newProtocol(FlexDLProtReconstruct, inputParticles=no_ctf, correctCTF=False)
        self.assertEqual(prot.validate(), [])
        prot = self.newProtocol(FlexDLProtReconstruct, inputParticles=no_ctf, correctCTF=False,
                                maskDiameter=BOX * PIXEL + 10)
        self.assertTrue(any("larger than the box" in e for e in prot.validate()))
        unaligned = SetOfParticles(filename=self.proj.getTmpPath("unaligned.sqlite"))
        unaligned.setSamplingRate(PIXEL)
        unaligned.setAlignment(ALIGN_NONE)
        for i in range(2):
            unaligned.append(Particle(location=(i + 1, "particles.mrcs")))
        unaligned.write()
        prot = self.newProtocol(FlexDLProtReconstruct, correctCTF=False)
        prot.inputParticles.set(unaligned)
        self.assertTrue(any("no 3-D poses" in e for e in prot.validate()), prot.validate())


class TestGroupMaps(BaseTest):
    """Two conformations at opposite ends of mode 7 (±AMPLITUDE Å): each group's map must look
    like its own conformation more than like the other."""
    AMPLITUDE = 200.0

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        imp = cls.newProtocol(ProtImportPdb, inputPdbData=1, pdbFile=str(example_structure_path("4ake")))
        cls.launchProtocol(imp)
        nma = cls.newProtocol(FlexDLProtNMA, inputStructure=imp.outputPdb, numberOfModes=8)
        cls.launchProtocol(nma)
        cls.modes = nma.outputModes
        table = cls.proj.getTmpPath("two_states.txt")
        with open(table, "w") as f:
            f.write("%g 0\n%g 0\n" % (cls.AMPLITUDE, -cls.AMPLITUDE))
        synth = cls.newProtocol(FlexDLProtSynthesize, inputModes=cls.modes, modeList="7-8", amplitudeRelation=6,
                                amplitudeTable=table, numberOfImages=400, boxSize=BOX, samplingRate=PIXEL,
                                maxShift=3.0, defocusMin=8000.0, defocusMax=20000.0, snr=1.0, seed=2)
        cls.launchProtocol(synth)
        cls.particles = synth.outputParticles
        atoms, vectors = convert.read_modes(cls.modes, [7, 8])
        cls.atoms = atoms
        # The two true conformations in the maps' frame (centred reference, then displaced).
        cls.states = {s: displace(centre(atoms.coords), vectors, np.array([[s * cls.AMPLITUDE, 0.0]]))[0]
                      for s in (1, -1)}

    def _check_maps(self, prot, signs):
        """signs: {map id: +1 / -1 conformation expected}."""
        maps = prot.outputMaps
        self.assertSetSize(maps, len(signs))
        for volume in maps.iterItems(orderBy="id"):
            self.assertAlmostEqual(volume.getSamplingRate(), PIXEL, places=5)
            np.testing.assert_allclose(volume.getShiftsFromOrigin(), [-(BOX // 2) * PIXEL] * 3)
            with mrcfile.open(volume.getFileName()) as mrc:
                data = np.asarray(mrc.data)
            mask = soft_spherical_mask(BOX, BOX / 2 - 4).numpy()
            own, other = (model_map_correlation(self.states[s], data, PIXEL, 8.0, self.atoms.sigma,
                                                self.atoms.weights, mask)
                          for s in (signs[volume.getObjId()], -signs[volume.getObjId()]))
            # Measured 0.98 against 0.55 (±200 Å along mode 7, 200 particles per group).
            self.assertGreater(own, 0.9, (volume.getObjId(), own, other))
            self.assertLess(other, own - 0.2, (volume.getObjId(), own, other))
        summary = "\n".join(prot.summary())
        self.assertIn("fit of its structure", summary)
        self.assertNotIn("fits better", summary)

    def test_cluster_maps_show_their_conformation(self):
        prot = self.newProtocol(FlexDLProtCluster, inputParticles=self.particles, inputModes=self.modes,
                                numberOfClusters=2, reconstructMaps=True, useGpu=False)
        self.launchProtocol(prot)
        centres = np.load(prot._getExtraPath("clusters.npz"))["centres"]
        self._check_maps(prot, {c + 1: int(np.sign(centres[c, 0])) for c in range(2)})

    def test_trajectory_maps_show_their_conformation(self):
        # Two frames at the ends of the first principal component: the two states.
        prot = self.newProtocol(FlexDLProtTrajectory, inputParticles=self.particles, inputModes=self.modes,
                                extent=1, numberOfFrames=2, reconstructMaps=True, useGpu=False)
        self.launchProtocol(prot)
        path = np.loadtxt(prot._getExtraPath("path_points.txt")).reshape(-1, 2)
        self.assertEqual(len(path), 2)
        self._check_maps(prot, {f + 1: int(np.sign(path[f, 0])) for f in range(2)})
