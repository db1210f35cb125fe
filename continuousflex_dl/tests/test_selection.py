"""Selection in the landscape (core regions, the subset protocol, the viewer's selection and
structures) and the image gallery (particles beside their fitted model)."""
import json

import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from pyworkflow.tests import setupTestProject

from continuousflex_dl import convert
from continuousflex_dl.core.hemnma.model_images import fitted_model_images
from continuousflex_dl.core.imaging.structure import load_atoms, read_atoms_plain
from continuousflex_dl.core.landscape.selection import (LinearView, box_polygon, format_ids, mode_view, parse_ids,
                                                        parse_polygon, pca_view, points_in_polygon, select)
from continuousflex_dl.core.landscape.trajectory import principal_components
from continuousflex_dl.core.modes.synthesis import synthesize
import mrcfile
from continuousflex_dl.protocols import FlexDLProtNMA, FlexDLProtSubset, FlexDLProtSynthesize
from continuousflex_dl.protocols.protocol_subset import AXES_PCA, SELECT_IDS
from continuousflex_dl.tests.base import FlexDLTestBase
from continuousflex_dl.viewers import gallery
from continuousflex_dl.viewers.viewer_flex import DIMS_PCA, FlexDLFlexViewer

STAR = np.array([[0, 3], [1, 1], [3, 1], [1.5, -0.5], [2.5, -3], [0, -1.2], [-2.5, -3], [-1.5, -0.5],
                 [-3, 1], [-1, 1]], dtype=float)  # a non-convex polygon


# ----------------------------------------------------------------------------- core
def test_points_in_polygon_agree_with_matplotlib():
    pts = np.random.default_rng(0).uniform(-4, 4, size=(5000, 2))
    mine = points_in_polygon(pts, STAR)
    theirs = MplPath(STAR).contains_points(pts)
    assert 800 < mine.sum() < 3000  # inside and outside both occur
    assert np.count_nonzero(mine != theirs) == 0
    box = points_in_polygon(pts, box_polygon(1, 2, -1, -0.5))
    np.testing.assert_array_equal(box, (np.abs(pts[:, 0]) < 1) & (pts[:, 1] > -0.5) & (pts[:, 1] < 2))
    with pytest.raises(ValueError, match="at least 3 vertices"):
        points_in_polygon(pts, STAR[:2])


def test_views_project_as_stated():
    q = np.random.default_rng(1).normal(size=(50, 3)) * [30.0, 10.0, 3.0]
    view = mode_view([7, 8, 9], [9, 7])
    np.testing.assert_array_equal(view.project(q), q[:, [2, 0]])
    assert view.labels == ("Mode 9 amplitude (Å)", "Mode 7 amplitude (Å)")
    with pytest.raises(ValueError, match=r"Modes \[10\] are not among"):
        mode_view([7, 8, 9], [7, 10])
    pca = pca_view(q)
    mean, comps, _ = principal_components(q)
    np.testing.assert_allclose(pca.project(q), (q - mean) @ comps[:2].T)
    again = LinearView.from_text(pca.to_text())
    np.testing.assert_allclose(again.project(q), pca.project(q), atol=1e-6)
    poly = box_polygon(-20, -5, 20, 5)
    np.testing.assert_array_equal(select(q, pca, poly), points_in_polygon(pca.project(q), poly))
    with pytest.raises(ValueError, match="origin ; axis 1 ; axis 2"):
        LinearView.from_text("1 2 ; 3")


def test_ids_and_polygons_as_text():
    assert format_ids([5, 1, 2, 3, 9, 10, 3]) == "1-3 5 9-10"
    np.testing.assert_array_equal(parse_ids("1-3 5, 9-10"), [1, 2, 3, 5, 9, 10])
    with pytest.raises(ValueError, match="ends before it starts"):
        parse_ids("5-2")
    with pytest.raises(ValueError, match="at least three vertices"):
        parse_polygon("1 2, 3 4")
    np.testing.assert_array_equal(parse_polygon("0 0, 1 0, 1 1.5"), [[0, 0], [1, 0], [1, 1.5]])


def test_fitted_model_reproduces_a_noise_free_particle(tmp_path):
    """A particle synthesized noise-free with a CTF is its fitted model (residual ~ 0); the model of
    the wrong amplitudes leaves a residual."""
    rng = np.random.default_rng(2)
    coords = rng.normal(size=(300, 3)) * [12.0, 8.0, 5.0]
    modes = rng.normal(size=(2, 300, 3))
    modes /= np.linalg.norm(modes.reshape(2, -1), axis=1)[:, None, None]
    truth = synthesize(tmp_path / "p.mrcs", coords, modes, 6, 48, 1.5, amplitudes=rng.normal(size=(6, 2)) * 40,
                       max_shift_px=3.0, snr=None, seed=3)
    images = mrcfile.read(truth.stack_path)
    images = 2.5 * images + 7.0  # another scale and offset: fitted
    fit = fitted_model_images(images, coords, modes, truth.amplitudes, truth.angles, truth.shifts, 1.5,
                              ctf=truth.ctf)
    assert fit.models.shape == (6, 48, 48)
    assert fit.relative_residual.max() < 1e-4
    np.testing.assert_allclose(fit.scale, 2.5, rtol=1e-3)
    np.testing.assert_allclose(fit.particles - fit.models, fit.residuals, atol=1e-5)
    wrong = fitted_model_images(images, coords, modes, truth.amplitudes + 30.0, truth.angles, truth.shifts, 1.5,
                                ctf=truth.ctf)
    assert wrong.relative_residual.min() > 100 * fit.relative_residual.max()


def test_gallery_sorts_by_the_reliability_the_alignment_writes():
    # The reliability HEMNMA stores (convert.RELIABILITY_ATTR), read by convert into the arrays.
    arrays = convert.ParticleArrays(ids=np.array([3, 5, 9]), stacks=["a.mrcs"] * 3, indices=np.arange(3),
                                    pixel_size=2.0, box=64, reliability=np.array([0.9, 0.1, 0.5]))
    np.testing.assert_array_equal(gallery.sort_values(None, arrays, gallery.SORT_RELIABILITY), [0.9, 0.1, 0.5])


def test_plain_reader_matches_prody(tmp_path):
    from continuousflex_dl.core.imaging.structure import example_structure_path, write_coordinates_pdb
    path = example_structure_path("4ake")
    plain, parsed = read_atoms_plain(path), load_atoms(path, "all")
    np.testing.assert_array_equal(plain.coords, parsed.coords)
    out = write_coordinates_pdb(tmp_path / "moved.pdb", path, plain.coords + [1.0, -2.0, 0.5])
    moved = load_atoms(out, "all")
    np.testing.assert_allclose(moved.coords - parsed.coords, np.tile([1.0, -2.0, 0.5], (parsed.n_atoms, 1)),
                               atol=1e-3)
    assert list(moved.group.getNames()) == list(parsed.group.getNames())


# ----------------------------------------------------------------------------- Scipion
N_IMAGES = 40


class TestSelection(FlexDLTestBase):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        nma = cls.newProtocol(FlexDLProtNMA, inputStructure=cls.importStructure(), atomSelection=1,
                              numberOfModes=10)
        cls.launchProtocol(nma)
        cls.modes = nma.outputModes
        cls.synth = cls.newProtocol(FlexDLProtSynthesize, inputModes=cls.modes, modeList="7-9",
                                    amplitudeRelation=4, amplitudeScale=200.0, numberOfImages=N_IMAGES,
                                    boxSize=32, samplingRate=3.0, maxShift=2.0, addNoise=False, seed=1)
        cls.launchProtocol(cls.synth)
        cls.truth = convert.read_particles(cls.synth.outputParticles, need_amplitudes=True)

    def _viewer(self):
        viewer = FlexDLFlexViewer(project=self.proj)
        viewer.setProtocol(self.proj.getProtocol(self.synth.getObjId()))
        return viewer

    def _subset_ids(self, prot):
        return sorted(p.getObjId() for p in prot.outputParticles)

    def test_lasso_in_modes_makes_a_subset_run(self):
        viewer = self._viewer()
        viewer.modesToShow.set("8 9")
        selection = viewer.landscapeSelection()
        q = self.truth.amplitudes
        np.testing.assert_array_equal(selection.points, q[:, [1, 2]])
        lasso = STAR * np.std(q[:, 1:], axis=0) / 1.5 + np.median(q[:, 1:], axis=0)
        n = selection.select_polygon(lasso)
        expected = self.truth.ids[MplPath(lasso).contains_points(q[:, [1, 2]])]
        assert 3 <= n < N_IMAGES and n == len(expected)
        fig = selection.make_figure()
        colours = fig.axes[0].collections[0].get_facecolors()
        assert np.sum(np.all(np.isclose(colours[:, :3], [1.0, 0.498, 0.055], atol=0.01), axis=1)) == n  # orange
        prot = viewer.makeSubset(selection, wait=True)
        prot = self.proj.getProtocol(prot.getObjId())
        self.assertTrue(prot.isFinished(), prot.getErrorMessage())
        assert self._subset_ids(prot) == sorted(expected.tolist())
        assert prot.viewModes.get() == "8 9" and len(parse_polygon(prot.polygon.get())) == len(STAR)
        assert prot.outputParticles.getFlexInfo().getAttr("modes") == self.synth.outputParticles.getFlexInfo(
        ).getAttr("modes")
        assert prot.summary()[0] == f"Kept {n} of {N_IMAGES} particles."
        record = json.load(open(prot._getExtraPath("selection.json")))
        np.testing.assert_array_equal(parse_ids(record["ids"]), expected)
        # The subset run is in the graph, downstream of the synthesis.
        parents = [p.getName() for p in self.proj.getRunsGraph(refresh=True).getNode(prot.strId()).getParents()]
        assert parents == [self.synth.strId()]

    def test_box_on_principal_components_and_ids(self):
        viewer = self._viewer()
        viewer.dimensions.set(DIMS_PCA)
        selection = viewer.landscapeSelection()
        mean, comps, _ = principal_components(self.truth.amplitudes)
        pcs = (self.truth.amplitudes - mean) @ comps[:2].T
        np.testing.assert_allclose(np.abs(selection.points), np.abs(pcs), atol=1e-4)
        lo, hi = np.percentile(selection.points, [20, 80], axis=0)
        n = selection.select_box(lo[0], lo[1], hi[0], hi[1])
        inside = np.all((selection.points > lo) & (selection.points < hi), axis=1)
        assert n == inside.sum() > 0
        prot = self.proj.getProtocol(viewer.makeSubset(selection, wait=True).getObjId())
        self.assertTrue(prot.isFinished(), prot.getErrorMessage())
        assert prot.viewAxes.get() == AXES_PCA
        assert self._subset_ids(prot) == sorted(self.truth.ids[inside].tolist())
        by_ids = self.newProtocol(FlexDLProtSubset, selectBy=SELECT_IDS, particleIds="3-7 12")
        by_ids.inputParticles.set(self.synth)
        by_ids.inputParticles.setExtended("outputParticles")
        self.launchProtocol(by_ids)
        assert self._subset_ids(by_ids) == [3, 4, 5, 6, 7, 12]
        missing = self.newProtocol(FlexDLProtSubset, selectBy=SELECT_IDS, particleIds="39-41")
        missing.inputParticles.set(self.synth)
        missing.inputParticles.setExtended("outputParticles")
        with pytest.raises(Exception):
            self.launchProtocol(missing)
        assert "1 of the ids are not in the input set" in missing.getErrorMessage()

    def test_click_saves_the_displaced_structure(self):
        viewer = self._viewer()
        selection = viewer.landscapeSelection()
        row = selection.nearest(*selection.points[5] + 0.01)
        assert row == 5
        path = selection.structure_at(row, viewer.errorModes.get(), viewer._runFolder())
        atoms, vectors = convert.read_modes(self.modes, [7, 8, 9])
        written = load_atoms(path, "all").coords
        expected = atoms.coords + np.einsum("k,knd->nd", self.truth.amplitudes[5], vectors)
        np.testing.assert_allclose(written, expected, atol=1e-3)  # the PDB's 3 decimals
        assert path.name == f"structure_particle{self.truth.ids[5]}.pdb"

    def test_gallery_of_the_ground_truth(self):
        viewer = self._viewer()
        assert viewer.gallerySort.get() == gallery.SORT_AMPLITUDE  # no alignment score on a synthesis
        viewer.galleryCount.set(5)
        viewer.galleryLargestFirst.set(True)
        shown = viewer.particleGallery()
        norms = np.linalg.norm(self.truth.amplitudes, axis=1)
        np.testing.assert_array_equal(shown.ids, self.truth.ids[np.argsort(-norms, kind="stable")[:5]])
        np.testing.assert_allclose(shown.values, np.sort(norms)[::-1][:5])
        # Noise-free images of the truth: the fitted model is the particle.
        assert shown.images.relative_residual.max() < 1e-3
        fig = gallery.gallery_figure(shown)
        assert [ax.get_label() for ax in fig.axes] == ["particle", "model", "residual"] * 5
        viewer.gallerySort.set(gallery.SORT_SCORE)
        with pytest.raises(ValueError, match="no alignment score"):
            viewer.particleGallery()
        viewer.gallerySort.set(gallery.SORT_RELIABILITY)
        with pytest.raises(ValueError, match="no pose reliability"):
            viewer.particleGallery()
        viewer.gallerySort.set(gallery.SORT_RESIDUAL)
        viewer.galleryLargestFirst.set(False)
        assert len(viewer.particleGallery().ids) == 5
