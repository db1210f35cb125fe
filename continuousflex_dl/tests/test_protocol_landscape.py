"""Landscape layer: trajectory and cluster protocols, point-cloud viewer and error reports."""
import csv
import os
import tempfile

import numpy as np
import prody
from matplotlib.image import imread
from pwem.objects import SetOfParticlesFlex
from pyworkflow.object import Pointer
from pyworkflow.tests import setupTestProject
from scipy.cluster.hierarchy import fcluster, linkage

from continuousflex_dl import convert
from continuousflex_dl.core.modes.nma import displace
from continuousflex_dl.protocols import FlexDLProtNMA, FlexDLProtSynthesize
from continuousflex_dl.protocols.protocol_cluster import FlexDLProtCluster, parse_ranges
from continuousflex_dl.protocols.protocol_trajectory import FlexDLProtTrajectory, parse_points
from continuousflex_dl.tests.base import FlexDLTestBase
from continuousflex_dl.reports import error_summary_lines
from continuousflex_dl.viewers.viewer_flex import FlexDLFlexViewer

N_IMAGES = 40
SPREAD = 10.0  # Å, the synthesis 'clusters' relation's Gaussian spread per mode


def pdb_frames(path):
    """(F, N, 3) coordinates of every model of a PDB file."""
    prody.LOGGER.verbosity = "warning"
    return np.asarray(prody.parsePDB(str(path)).getCoordsets(), dtype=float)


class TestLandscape(FlexDLTestBase):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        structure = cls.importStructure()
        nma = cls.newProtocol(FlexDLProtNMA, inputStructure=structure, atomSelection=1, numberOfModes=10)
        cls.launchProtocol(nma)
        cls.modes = nma.outputModes
        synth = cls.newProtocol(FlexDLProtSynthesize, inputModes=cls.modes, modeList="7-9",
                                amplitudeRelation=4, amplitudeScale=200.0, numberOfImages=N_IMAGES,
                                boxSize=32, samplingRate=3.0, maxShift=2.0, addNoise=False, seed=1)
        cls.launchProtocol(synth)
        cls.particles = synth.outputParticles
        cls.truth = convert.read_particles(cls.particles, need_amplitudes=True)
        cls.atoms, cls.vectors = convert.read_modes(cls.modes, [7, 8, 9])

    def _viewer(self, target):
        v = FlexDLFlexViewer(project=self.proj)
        v.setProtocol(target)
        return v

    def _perturbed(self, delta, dangles=None, dshifts=None):
        """A copy of the ground truth with amplitudes + delta (and poses moved), as 'HEMNMA'."""
        out = SetOfParticlesFlex(filename=os.path.join(tempfile.mkdtemp(), "perturbed.sqlite"),
                                 progName=convert.FLEX_PROG_NAME)
        t = self.truth
        angles = None if dangles is None else t.angles + dangles
        shifts = None if dshifts is None else t.shifts + dshifts
        convert.fill_flex_particles(out, self.particles, t.ids, t.amplitudes + delta, [7, 8, 9],
                                    convert.SOURCE_HEMNMA, angles=angles, shifts=shifts)
        out.write()
        return out

    # ------------------------------------------------------------------ trajectory
    def test_trajectory_through_given_points(self):
        points = np.array([[-150.0, 40.0, 100.0], [0.0, 0.0, 0.0], [120.0, -60.0, -90.0]])
        text = "\n".join(" ".join(str(v) for v in p) for p in points)
        prot = self.newProtocol(FlexDLProtTrajectory, inputParticles=self.particles,
                                inputModes=self.modes, pathType=2, points=text)
        self.launchProtocol(prot)
        frames = pdb_frames(prot._getExtraPath("trajectory.pdb"))
        self.assertEqual(frames.shape, (3, self.atoms.n_atoms, 3))
        expected = displace(np.zeros_like(self.atoms.coords), self.vectors, points)
        np.testing.assert_allclose(frames - self.atoms.coords, expected, atol=2e-3)  # PDB: 3 decimals
        self.assertSetSize(prot.outputStructures, 3)
        for i, item in enumerate(prot.outputStructures.iterItems(orderBy="id")):
            np.testing.assert_allclose(pdb_frames(item.getFileName())[0], frames[i], atol=1e-6)
        self.assertIn("3 frames", "\n".join(prot.summary()))
        # The viewer of the protocol draws the path over the cloud of its particles.
        line = self._viewer(prot).cloudFigure().axes[0].get_lines()[0]
        np.testing.assert_allclose(np.stack(line.get_data_3d(), axis=1), points, atol=1e-6)

    def test_trajectory_along_first_principal_component(self):
        # In-process (no launch): the form's path choice -> the points the step displaces.
        prot = self.newProtocol(FlexDLProtTrajectory, inputParticles=self.particles,
                                inputModes=self.modes, pathType=0, extent=1, numberOfFrames=6)
        self.assertEqual(prot.validate(), [])
        q = self.truth.amplitudes
        path = prot._pathPoints(q)
        self.assertEqual(path.shape, (6, 3))
        # Independent PCA: the path runs through the mean along the top covariance eigenvector,
        # from the smallest to the largest projection of the particles ('range' extent).
        w, v = np.linalg.eigh(np.cov(q, rowvar=False))
        pc1 = v[:, -1]
        steps = np.diff(path, axis=0)
        np.testing.assert_allclose(np.abs(steps @ pc1), np.linalg.norm(steps, axis=1), rtol=1e-6)
        np.testing.assert_allclose(steps, steps[:1].repeat(5, axis=0), atol=1e-9)  # evenly spaced
        t = (q - q.mean(0)) @ pc1
        ends = sorted((path[[0, -1]] - q.mean(0)) @ pc1)
        np.testing.assert_allclose(ends, [t.min(), t.max()], atol=1e-6)
        # Through points: evenly spaced in arc length, first and last points kept.
        prot = self.newProtocol(FlexDLProtTrajectory, inputParticles=self.particles, inputModes=self.modes,
                                pathType=1, points="0 0 0\n30 0 0\n30 40 0", numberOfFrames=8)
        path = prot._pathPoints(q)
        np.testing.assert_allclose(np.linalg.norm(np.diff(path, axis=0), axis=1), 10.0, atol=1e-9)
        np.testing.assert_allclose(path[[0, -1]], [[0, 0, 0], [30, 40, 0]])

    def test_trajectory_validation(self):
        prot = self.newProtocol(FlexDLProtTrajectory, inputParticles=self.particles,
                                inputModes=self.modes, pathType=1, points="1 2\n3 4")
        self.assertTrue(any("3 numbers per line" in e for e in prot.validate()), prot.validate())
        with self.assertRaises(ValueError):
            parse_points("1 x 3", 3)

    def test_empty_set_is_refused_at_the_form(self):
        empty = SetOfParticlesFlex(filename=os.path.join(tempfile.mkdtemp(), "empty.sqlite"),
                                   progName=convert.FLEX_PROG_NAME)
        empty.copyInfo(self.particles)
        empty.setFlexInfo(convert.flex_info([7, 8, 9], convert.SOURCE_HEMNMA))
        empty.write()
        self.assertEqual(empty.getSize(), 0)
        for cls, kwargs in ((FlexDLProtTrajectory, {}), (FlexDLProtCluster, {"numberOfClusters": 2})):
            prot = self.newProtocol(cls, inputParticles=self.particles, inputModes=self.modes, **kwargs)
            self.assertEqual(prot.validate(), [])
            prot.inputParticles.set(empty)
            errors = prot.validate()
            self.assertEqual(len(errors), 1, errors)
            self.assertIn("The input set of particles is empty", errors[0])

    # ------------------------------------------------------------------ clusters
    def test_kmeans_clusters_recover_the_planted_clusters(self):
        q = self.truth.amplitudes
        # Independent truth: single-linkage groups of points closer than 8 spreads.
        planted = fcluster(linkage(q, "single"), t=8 * SPREAD, criterion="distance")
        self.assertEqual(len(set(planted)), 3, "the synthesized clusters should be well separated")
        prot = self.newProtocol(FlexDLProtCluster, inputParticles=self.particles, inputModes=self.modes,
                                numberOfClusters=3, seed=2)
        self.launchProtocol(prot)
        ids = self.truth.ids
        sizes, groups = [], []
        centre_files = [s.getFileName() for s in prot.outputStructures.iterItems(orderBy="id")]
        self.assertEqual(len(centre_files), 3)
        for c in range(1, 4):
            out = getattr(prot, "outputCluster_%02d" % c)
            self.assertTrue(out.hasCTF() and out.hasAlignmentProj())
            arrays = convert.read_particles(out, need_amplitudes=True)
            sizes.append(len(arrays.ids))
            groups.append(set(arrays.ids.tolist()))
            # Each cluster is tight around its centre (Gaussian spread 10 Å per mode).
            centre = arrays.amplitudes.mean(axis=0)
            rms = np.sqrt(np.mean(np.sum((arrays.amplitudes - centre) ** 2, axis=1)))
            self.assertLess(rms, 3 * SPREAD)
            # Particles keep their pose and CTF (same rows as the input).
            rows = np.searchsorted(ids, arrays.ids)
            np.testing.assert_allclose(arrays.angles, self.truth.angles[rows], atol=1e-6)
            np.testing.assert_allclose(arrays.ctf.defocus_u, self.truth.ctf.defocus_u[rows])
            # The centre structure is the reference displaced by the centre amplitudes.
            np.testing.assert_allclose(pdb_frames(centre_files[c - 1])[0] - self.atoms.coords,
                                       displace(np.zeros_like(self.atoms.coords), self.vectors, centre),
                                       atol=2e-3)
        self.assertEqual(sum(sizes), N_IMAGES)
        self.assertEqual(set().union(*groups), set(ids.tolist()))
        expected = {frozenset(ids[planted == g].tolist()) for g in set(planted)}
        self.assertEqual({frozenset(g) for g in groups}, expected)
        self.assertEqual(sorted(sizes, reverse=True), sizes)  # numbered by decreasing size
        self.assertIn("outputCluster_03", "\n".join(prot.summary()))

    def test_range_selection(self):
        q = self.truth.amplitudes
        cut = float(np.median(q[:, 0]))
        prot = self.newProtocol(FlexDLProtCluster, inputParticles=self.particles, inputModes=self.modes,
                                method=1, ranges=f"7 * {cut}\n7 {cut} *; 9 0 *")
        self.assertEqual(prot.validate(), [])
        self.launchProtocol(prot)
        expected = [q[:, 0] <= cut, (q[:, 0] >= cut) & (q[:, 2] >= 0)]
        for c, mask in enumerate(expected, start=1):
            out = getattr(prot, "outputCluster_%02d" % c)
            self.assertEqual(sorted(convert.read_particles(out).ids.tolist()), self.truth.ids[mask].tolist())
        self.assertSetSize(prot.outputStructures, 2)
        # The viewer of the protocol draws the two group centres (mean amplitudes) over the cloud.
        v = self._viewer(prot)
        self.assertEqual(v.validate(), [])
        line = v.cloudFigure().axes[0].get_lines()[0]
        np.testing.assert_allclose(np.stack(line.get_data_3d(), axis=1),
                                   [q[m].mean(axis=0) for m in expected], atol=1e-6)
        self.assertEqual(parse_ranges("7 * 5; 9 0 *", [7, 8, 9]), [{0: (None, 5.0), 2: (0.0, None)}])
        bad = self.newProtocol(FlexDLProtCluster, inputParticles=self.particles, inputModes=self.modes,
                               method=1, ranges="12 0 1")
        self.assertTrue(any("mode 12" in e for e in bad.validate()))

    # ------------------------------------------------------------------ viewer
    def test_point_cloud_figures(self):
        overlay = self._perturbed(np.full(3, 5.0))
        v = self._viewer(overlay)
        v.overlaySets.append(Pointer(self.particles))
        v.modesToShow.set("8")
        ax = v.cloudFigure().axes[0]
        self.assertEqual(ax.get_xlabel(), "Mode 8 amplitude (Å)")
        heights = [sum(p.get_height() for p in c) for c in ax.containers]
        self.assertEqual(heights, [N_IMAGES, N_IMAGES])
        v.modesToShow.set("9 7")
        ax = v.cloudFigure().axes[0]
        self.assertEqual((ax.get_xlabel(), ax.get_ylabel()), ("Mode 9 amplitude (Å)", "Mode 7 amplitude (Å)"))
        offsets = [c.get_offsets() for c in ax.collections]
        self.assertEqual([len(o) for o in offsets], [N_IMAGES, N_IMAGES])
        # x is mode 9, y mode 7; the overlay is the truth, matched by id.
        np.testing.assert_allclose(offsets[0], self.truth.amplitudes[:, [2, 0]] + 5.0, atol=1e-5)
        np.testing.assert_allclose(offsets[1], self.truth.amplitudes[:, [2, 0]], atol=1e-5)
        # Labels: the source of a set no run made; the run label (and source) of the synthesis.
        self.assertEqual([t.get_text() for t in ax.get_legend().get_texts()],
                         ["HEMNMA", "synthesize particles (ground truth)"])
        v.modesToShow.set("")
        v.colorBy.set(3)  # error to ground truth
        fig = v.cloudFigure()
        ax = fig.axes[0]
        self.assertEqual((ax.get_xlabel(), ax.get_ylabel(), ax.get_zlabel()),
                         tuple(f"Mode {m} amplitude (Å)" for m in (7, 8, 9)))
        self.assertEqual([len(c._offsets3d[0]) for c in ax.collections], [N_IMAGES, N_IMAGES])
        np.testing.assert_allclose(ax.collections[0].get_array(), np.sqrt(3) * 5.0, rtol=1e-6)
        path = os.path.join(tempfile.mkdtemp(), "cloud.png")
        fig.savefig(path, dpi=60)
        png = imread(path)[..., :3]
        self.assertEqual(png.shape[:2], (int(5.2 * 60), int(6.4 * 60)))
        # The truth's points are drawn black and on top: many more near-black pixels than in
        # the same view of the main set alone.
        self.assertGreater(ax.collections[1].get_zorder(), ax.collections[0].get_zorder())
        alone = self._viewer(overlay)
        alone.colorBy.set(3)
        alone.groundTruth.set(self.particles)
        path_alone = os.path.join(tempfile.mkdtemp(), "alone.png")
        alone.cloudFigure().savefig(path_alone, dpi=60)

        def blackish(image):
            return int(np.sum(image.max(axis=-1) < 0.2))
        self.assertGreater(blackish(png), blackish(imread(path_alone)[..., :3]) + 50)

    def test_error_report_against_itself_is_zero(self):
        copy = self._perturbed(np.zeros(3), np.zeros((N_IMAGES, 3)), np.zeros((N_IMAGES, 2)))
        v = self._viewer(copy)
        v.groundTruth.set(self.particles)
        v.errorModes.set(self.modes)
        (amp, pose), = v.errorReports().values()
        self.assertEqual(amp.mean_abs_error, 0.0)
        np.testing.assert_array_equal(amp.per_mode_mean, 0.0)
        self.assertEqual(amp.rmsd_mean, 0.0)
        self.assertLess(pose.angular_mean, 1e-3)
        self.assertAlmostEqual(pose.shift_mean, 0.0, places=9)  # poses written again, not copied

    def test_error_report_equals_the_perturbation(self):
        rng = np.random.default_rng(0)
        delta = rng.normal(0.0, 4.0, (N_IMAGES, 3))
        dangles = np.zeros((N_IMAGES, 3))
        dangles[:, 2] = 10.0  # psi + 10 degrees: a 10 degree rotation about the viewing axis
        dshifts = np.tile([3.0, -4.0], (N_IMAGES, 1))  # 5 px
        pert = self._perturbed(delta, dangles, dshifts)
        v = self._viewer(pert)
        v.overlaySets.append(Pointer(self.particles))  # found as ground truth by its FlexInfo
        v.errorModes.set(self.modes)
        reports = v.errorReports()
        self.assertEqual(list(reports), ["HEMNMA"])
        amp, pose = reports["HEMNMA"]
        err = np.abs(delta)
        np.testing.assert_allclose(amp.per_mode_mean, err.mean(0), atol=1e-6)
        np.testing.assert_allclose(amp.per_mode_std, err.std(0), atol=1e-6)
        self.assertAlmostEqual(amp.mean_abs_error, err.mean(), places=6)
        # Modes are orthonormal 3N vectors: RMSD = |e| / sqrt(N).
        n = self.atoms.n_atoms
        self.assertAlmostEqual(amp.rmsd_mean, np.linalg.norm(err.mean(0)) / np.sqrt(n), places=6)
        self.assertAlmostEqual(amp.rmsd_mean_plus_std, np.linalg.norm(err.mean(0) + err.std(0)) / np.sqrt(n),
                               places=6)
        np.testing.assert_allclose(pose.angular, 10.0, atol=1e-4)
        np.testing.assert_allclose(pose.shift, 5.0, atol=1e-6)
        # The table and the CSV carry the same numbers.
        views = v._showErrors()
        self.assertEqual(views[0].rows[0][2], f"{err.mean(0)[0]:.2f} ± {err.std(0)[0]:.2f}")
        # RMSD column: each particle's atomic RMSD to its true conformation, |delta| / sqrt(N).
        per_particle = np.linalg.norm(delta, axis=1) / np.sqrt(n)
        self.assertEqual(views[0].header[-3], "RMSD (Å)")
        self.assertEqual(views[0].rows[0][-3], f"{per_particle.mean():.2f} ± {per_particle.std():.2f}")
        # No run made this set: the CSV goes to the project's temporary folder, not beside a set.
        self.assertEqual(os.path.dirname(v.csvFile), os.path.abspath(v.getWorkingDir()))
        with open(v.csvFile) as f:
            rows = list(csv.DictReader(f))
        by_key = {(r["quantity"], r["mode"]): r for r in rows}
        self.assertAlmostEqual(float(by_key["amplitude_abs_error", "8"]["mean"]), err.mean(0)[1], places=6)
        self.assertAlmostEqual(float(by_key["angular_error", ""]["mean"]), 10.0, places=3)
        self.assertEqual(by_key["shift_error", ""]["unit"], "px")
        summary = "\n".join(error_summary_lines(pert, self.particles, self.modes))
        self.assertIn(f"{err.mean():.2f} ± {err.std():.2f} Å over all modes", summary)
        self.assertIn(f"to the true conformations: {per_particle.mean():.2f} ± {per_particle.std():.2f} Å",
                      summary)
        self.assertIn("shift error 5.00 px", summary)
        self.assertEqual(error_summary_lines(self.particles, pert), [])  # pert is not a ground truth
        histograms = v._showErrorHistograms()[0]
        path = histograms.save(os.path.join(tempfile.mkdtemp(), "errors.png"))
        self.assertGreater(os.path.getsize(path), 5000)
        self.assertEqual(len(histograms._figure.axes), 3)
