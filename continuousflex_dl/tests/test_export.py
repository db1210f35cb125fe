"""Results for other tools, read back by the other tools' own readers.

* Xmipp metadata (ContinuousFlex): Xmipp's reader (xmippLib, installed with scipion-em) as
  ContinuousFlex's HEMNMA run reads its images.xmd (``md.iterRows`` sorted by ``_itemId``),
  the pose turned into a Scipion Transform by scipion-em-xmipp's ``matrixFromGeometry``
  (ALIGN_PROJ: ``M = euler_matrix(-angles, 'szyz')``, ``M[:3, 3] = -shifts``, inverted; written
  out below), and the text reader of ContinuousFlex's DeepHEMNMA scripts
  (``processing_dh/utils/metadata.py``: every line shorter than 20 characters is header, the
  labels start at the 5th line, values split on spaces and quotes, ``_nmaDisplacements``
  spans K values). scipion-em-continuousflex itself does not import without Xmipp's binaries.
* RELION 3.1 star: scipion-em-relion's Reader (the test extra), as Scipion imports a star.
* cryoDRGN z.pkl: ``cryodrgn.utils.load_pkl`` when cryoDRGN is importable, else its documented
  format (the first pickle of ``z.<epoch>.pkl``: float32 (N, zdim); the second z_logvar).
"""
import os
import pickle
import re

import mrcfile
import numpy as np
import pytest
from pwem.constants import ALIGN_PROJ
from pwem.protocols import ProtImportParticles
from pwem.objects import CTFModel, ParticleFlex, SetOfParticles, SetOfParticlesFlex, Transform
from pyworkflow.tests import setupTestProject

from continuousflex_dl import convert
from continuousflex_dl.convert import export as convert_export
from continuousflex_dl.core.imaging.geometry import pose_to_scipion_matrix
from continuousflex_dl.core.landscape.export import write_latent, write_relion31_star, write_xmipp_images
from continuousflex_dl.tests.base import FlexDLTestBase

relion_convert = pytest.importorskip("relion.convert.convert31",
                                     reason="scipion-em-relion (the test extra) is not installed")

MODES = [7, 9, 12]
PIXEL, BOX, N = 1.31, 16, 7

OPTICS_INFO = """
# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnMicrographOriginalPixelSize #3
_rlnVoltage #4
_rlnSphericalAberration #5
_rlnAmplitudeContrast #6
_rlnImagePixelSize #7
_rlnImageSize #8
_rlnImageDimensionality #9
early 1 0.655 300.0 2.7 0.1 1.31 16 2
late 2 0.655 300.0 2.7 0.1 1.31 16 2
"""


def make_set(folder, optics=True, score=True, std=True, pose=True, ctf=True, seed=0):
    """A SetOfParticlesFlex of N known particles over two stacks (.mrcs and .mrc): poses, CTFs,
    amplitudes of :data:`MODES`, HEMNMA score and uncertainty, two RELION optics groups.
    Returns the set and the truth."""
    rng = np.random.default_rng(seed)
    truth = dict(angles=np.column_stack([rng.uniform(-180, 180, N), rng.uniform(5, 175, N),
                                         rng.uniform(-180, 180, N)]),
                 shifts=rng.uniform(-3, 3, (N, 2)), amplitudes=rng.normal(scale=150.0, size=(N, 3)),
                 std=rng.uniform(1, 5, (N, 3)), score=rng.uniform(0.2, 0.9, N),
                 defocus=np.column_stack([rng.uniform(8000, 20000, N), rng.uniform(8000, 20000, N),
                                          rng.uniform(-90, 90, N), rng.uniform(0, 30, N)]),
                 groups=np.array([1, 2, 1, 1, 2, 2, 1]), ids=np.arange(N) * 3 + 5,
                 images=rng.normal(size=(N, BOX, BOX)).astype(np.float32))
    stacks = [os.path.join(folder, "first.mrcs"), os.path.join(folder, "second.mrc")]
    with mrcfile.new(stacks[0], overwrite=True) as mrc:
        mrc.set_data(truth["images"][:4])
    with mrcfile.new(stacks[1], overwrite=True) as mrc:
        mrc.set_data(truth["images"][4:])
    truth["locations"] = [(i + 1, stacks[0]) for i in range(4)] + [(i + 1, stacks[1]) for i in range(3)]
    parts = SetOfParticlesFlex(filename=os.path.join(folder, f"particles_{seed}_{optics}_{pose}_{ctf}.sqlite"),
                               progName=convert.FLEX_PROG_NAME)
    parts.setSamplingRate(PIXEL)
    acq = parts.getAcquisition()
    acq.setVoltage(300.0)
    acq.setSphericalAberration(2.7)
    acq.setAmplitudeContrast(0.1)
    if optics:
        acq.opticsGroupInfo = convert.pwobj.String(OPTICS_INFO)
    parts.setHasCTF(ctf)
    if pose:
        parts.setAlignmentProj()
    parts.setFlexInfo(convert.flex_info(MODES, convert.SOURCE_HEMNMA))
    matrices = pose_to_scipion_matrix(truth["angles"], truth["shifts"])
    for i in range(N):
        p = ParticleFlex(progName=convert.FLEX_PROG_NAME)
        p.setObjId(int(truth["ids"][i]))
        p.setLocation(*truth["locations"][i])
        if pose:
            p.setTransform(Transform(matrices[i]))
        if ctf:
            du, dv, da, ph = truth["defocus"][i]
            model = CTFModel(defocusU=du, defocusV=dv, defocusAngle=da)
            model.setPhaseShift(ph)
            p.setCTF(model)
        p.setZFlex(truth["amplitudes"][i].tolist())
        if score:
            setattr(p, "_cfdlScore", convert.pwobj.Float(float(truth["score"][i])))
        if std:
            attr = convert.pwobj.CsvList(pType=float)
            attr.set(truth["std"][i].tolist())
            setattr(p, convert.ZFLEX_STD_ATTR, attr)
        if optics:
            setattr(p, convert_export.OPTICS_GROUP_ATTR, convert.pwobj.Integer(int(truth["groups"][i])))
        parts.append(p)
    parts.write()
    truth["matrices"] = matrices
    return parts, truth


@pytest.fixture
def exported(tmp_path):
    parts, truth = make_set(str(tmp_path))
    out = tmp_path / "export"
    out.mkdir()
    written = convert_export.export_particles(parts, str(out), cost=1 - truth["score"])
    return parts, truth, out, written


# ------------------------------------------------------------------ Xmipp / ContinuousFlex

def xmipp_matrix(rot, tilt, psi, shift_x, shift_y):
    """scipion-em-xmipp's ``matrixFromGeometry(shifts, angles, inverseTransform=True)``."""
    from pwem.convert.transformations import euler_matrix
    m = euler_matrix(*(-np.deg2rad([rot, tilt, psi])), "szyz")
    m[:3, 3] = -np.array([shift_x, shift_y, 0.0])
    return np.linalg.inv(m)


def test_xmipp_metadata_read_by_xmipp_as_continuousflex_does(exported):
    import pwem.emlib.metadata as md
    import xmippLib
    from pwem import emlib
    _, truth, out, written = exported
    assert "images.xmd" in written
    assert md.MetaData(str(out / "images.xmd")).size() == N
    for i, row in enumerate(md.iterRows(str(out / "images.xmd"), sortByLabel=emlib.MDL_ITEM_ID)):
        assert row.getValue(emlib.MDL_ITEM_ID) == truth["ids"][i]
        assert row.getValue(emlib.MDL_ENABLED) == 1
        # Xmipp reads vectors to 6 significant digits (its own files are written so).
        np.testing.assert_allclose(row.getValue(emlib.MDL_NMA), truth["amplitudes"][i], rtol=1e-5)
        assert row.getValue(emlib.MDL_COST) == pytest.approx(1 - truth["score"][i], abs=1e-15)
        pose = [row.getValue(label) for label in (emlib.MDL_ANGLE_ROT, emlib.MDL_ANGLE_TILT,
                                                  emlib.MDL_ANGLE_PSI, emlib.MDL_SHIFT_X, emlib.MDL_SHIFT_Y)]
        np.testing.assert_allclose(xmipp_matrix(*pose), truth["matrices"][i], atol=1e-12)
        # Xmipp reads the right image (a .mrc stack needs its ':mrcs' suffix).
        image = xmippLib.Image(row.getValue(emlib.MDL_IMAGE)).getData()
        np.testing.assert_array_equal(image, truth["images"][i])


def continuousflex_text_reader(path):
    """The reading rules of ContinuousFlex's DeepHEMNMA ``metadata.read_file``/``create_array``:
    ``{label: column of strings}`` with ``_nmaDisplacements`` as K columns."""
    lines = open(path).readlines()
    head = sum(len(line) < 20 for line in lines)
    labels = [line.rstrip("\n") for line in lines[4:head]]
    values = [[v for v in re.split(r"\s|'", line.replace("\n", " ")) if v] for line in lines[head:]]
    k = len(values[0]) - (len(labels) - 1)
    at = labels.index(" _nmaDisplacements")
    data = np.array(values)
    out = {lab.strip(): data[:, j if j < at else j + k - 1] for j, lab in enumerate(labels) if j != at}
    out["_nmaDisplacements"] = data[:, at:at + k].astype(float)
    return out


def test_xmipp_metadata_read_by_continuousflex_text_reader(exported):
    _, truth, out, _ = exported
    table = continuousflex_text_reader(out / "images.xmd")
    np.testing.assert_array_equal(table["_nmaDisplacements"], truth["amplitudes"])
    np.testing.assert_array_equal(table["_itemId"].astype(int), truth["ids"])
    pose = np.column_stack([table[label].astype(float) for label in
                            ("_angleRot", "_angleTilt", "_anglePsi", "_shiftX", "_shiftY")])
    np.testing.assert_allclose([xmipp_matrix(*row) for row in pose], truth["matrices"], atol=1e-12)


def test_continuousflex_particle_attribute_survives_the_database(tmp_path):
    parts, truth = make_set(str(tmp_path))
    out = SetOfParticlesFlex(filename=str(tmp_path / "out.sqlite"))
    convert_export.copy_with_xmipp_attributes(out, parts, truth["amplitudes"], 1 - truth["score"])
    out.write()
    out.close()
    again = SetOfParticlesFlex(filename=str(tmp_path / "out.sqlite"))
    read = [(p.getObjId(), " ".join(p._xmipp_nmaDisplacements), float(p._xmipp_cost))
            for p in again.iterItems(orderBy="id")]
    # ContinuousFlex's dimension reduction joins the strings; its viewers map them to float.
    np.testing.assert_array_equal([r[0] for r in read], truth["ids"])
    np.testing.assert_array_equal(np.array([r[1].split() for r in read], dtype=float), truth["amplitudes"])
    np.testing.assert_allclose([r[2] for r in read], 1 - truth["score"])
    np.testing.assert_array_equal([p.getZFlex() for p in again.iterItems(orderBy="id")], truth["amplitudes"])


def test_xmipp_writer_refuses_what_continuousflex_cannot_read(tmp_path):
    with pytest.raises(ValueError, match="space"):
        write_xmipp_images(tmp_path / "a.xmd", ["000001@/a b/c.mrcs"], np.zeros((1, 2)), [1])
    with pytest.raises(ValueError, match="shape"):
        write_xmipp_images(tmp_path / "a.xmd", ["000001@c.mrcs"], np.zeros((2, 2)), [1])


# ------------------------------------------------------------------ RELION 3.1

def read_relion(star, labels=()):
    out = SetOfParticles(filename=os.path.join(os.path.dirname(star), "relion_read.sqlite"))
    relion_convert.Reader().readSetOfParticles(str(star), out, alignType=ALIGN_PROJ, extraLabels=list(labels))
    return out


def defocus_profile(u, v, angle):
    """Defocus (Å) along 0, 10, ..., 170 degrees of an astigmatic CTF (RELION's and Scipion's model)."""
    theta = np.radians(np.arange(0, 180, 10) - angle)
    return (u + v) / 2 + (u - v) / 2 * np.cos(2 * theta)


def optics_rows(text):
    from emtable import Table
    import io
    table = Table()
    table.readStar(io.StringIO(text), tableName="optics")
    return [row._asdict() for row in table]


def test_relion_star_read_back_exactly_by_scipion_relion(exported):
    _, truth, out, written = exported
    assert "2 optics group(s)" in written["particles.star"]
    labels = ["rlnOpticsGroup"] + [f"cfdlAmplitudeMode{m}" for m in MODES]
    back = read_relion(out / "particles.star", labels)
    assert back.getSize() == N
    assert back.getSamplingRate() == PIXEL
    acq = back.getAcquisition()
    assert (acq.getVoltage(), acq.getSphericalAberration(), acq.getAmplitudeContrast()) == (300.0, 2.7, 0.1)
    groups = optics_rows(acq.opticsGroupInfo.get())
    assert [(g["rlnOpticsGroupName"], g["rlnOpticsGroup"], g["rlnMicrographOriginalPixelSize"],
             g["rlnImagePixelSize"], g["rlnImageSize"]) for g in groups] == [
        ("early", 1, 0.655, PIXEL, BOX), ("late", 2, 0.655, PIXEL, BOX)]
    for i, p in enumerate(back.iterItems(orderBy="id")):
        assert p.getObjId() == truth["ids"][i]
        np.testing.assert_allclose(p.getTransform().getMatrix(), truth["matrices"][i], atol=1e-12)
        ctf = p.getCTF()  # standardized by the reader (U >= V): compare the defocus in every direction
        np.testing.assert_allclose(defocus_profile(ctf.getDefocusU(), ctf.getDefocusV(), ctf.getDefocusAngle()),
                                   defocus_profile(*truth["defocus"][i, :3]), rtol=1e-12)
        assert ctf.getPhaseShift() == truth["defocus"][i, 3]
        assert int(p._rlnOpticsGroup) == truth["groups"][i]
        np.testing.assert_array_equal([float(getattr(p, f"_cfdlAmplitudeMode{m}")) for m in MODES],
                                      truth["amplitudes"][i])
        index, name = p.getLocation()
        want_index, want_stack = truth["locations"][i]
        assert not os.path.isabs(name) and name.endswith(".mrcs")  # RELION's rules for a stack
        assert index == want_index
        assert os.path.realpath(out / name) == os.path.realpath(want_stack)


def test_relion_star_without_optics_groups_takes_the_acquisition(tmp_path):
    parts, truth = make_set(str(tmp_path), optics=False)
    convert_export.export_particles(parts, str(tmp_path), xmipp=False, latent=False)
    back = read_relion(tmp_path / "particles.star", ["rlnOpticsGroup"])
    groups = optics_rows(back.getAcquisition().opticsGroupInfo.get())
    assert [(g["rlnOpticsGroup"], g["rlnVoltage"], g["rlnImagePixelSize"], g["rlnImageSize"]) for g in groups] \
        == [(1, 300.0, PIXEL, BOX)]
    assert [int(p._rlnOpticsGroup) for p in back] == [1] * N


def test_set_without_poses_or_ctf(tmp_path):
    import pwem.emlib.metadata as md
    from pwem import emlib
    parts, truth = make_set(str(tmp_path), pose=False, ctf=False, score=False, std=False)
    written = convert_export.export_particles(parts, str(tmp_path))
    assert "no poses" in written["images.xmd"] and "no poses, no CTF" in written["particles.star"]
    assert "log-variance" not in written["z.pkl"]
    labels = md.MetaData(str(tmp_path / "images.xmd")).getActiveLabels()
    assert emlib.MDL_NMA in labels and emlib.MDL_ANGLE_ROT not in labels and emlib.MDL_COST not in labels
    back = read_relion(tmp_path / "particles.star", [f"cfdlAmplitudeMode{m}" for m in MODES])
    assert not back.hasCTF() and all(p.getTransform() is None for p in back)
    np.testing.assert_array_equal([[float(getattr(p, f"_cfdlAmplitudeMode{m}")) for m in MODES] for p in back],
                                  truth["amplitudes"])


def test_relion_stack_of_another_format_is_converted(tmp_path):
    import xmippLib
    data = np.random.default_rng(1).normal(size=(3, BOX, BOX)).astype(np.float32)
    stack = str(tmp_path / "images.stk")
    for i in range(3):
        image = xmippLib.Image()
        image.setData(data[i])
        image.write(f"{i + 1}@{stack}")
    names = convert_export.relion_image_names([stack] * 3, [2, 0, 1], str(tmp_path / "out"))
    assert names == ["000003@Particles/images.mrcs", "000001@Particles/images.mrcs", "000002@Particles/images.mrcs"]
    with mrcfile.open(tmp_path / "out" / "Particles" / "images.mrcs") as mrc:
        np.testing.assert_array_equal(mrc.data, data)


def test_relion_writer_refuses_inconsistent_optics(tmp_path):
    optics = {"rlnOpticsGroupName": ["g1"], "rlnOpticsGroup": [1], "rlnVoltage": [300.0],
              "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [1.0],
              "rlnImageSize": [16], "rlnImageDimensionality": [2]}
    with pytest.raises(ValueError, match="pixel size"):
        write_relion31_star(tmp_path / "a.star", ["000001@a.mrcs"], [1], optics, [1], 1.31)
    with pytest.raises(ValueError, match="unknown"):
        write_relion31_star(tmp_path / "a.star", ["000001@a.mrcs"], [1], optics, [2], 1.0)


# ------------------------------------------------------------------ cryoDRGN

def load_pkl(path):
    """cryoDRGN's loader when importable, else what it does (the first pickle of the file)."""
    try:
        from cryodrgn.utils import load_pkl as cryodrgn_load
    except ImportError:
        with open(path, "rb") as f:
            return pickle.load(f)
    return cryodrgn_load(str(path))


def test_cryodrgn_latent_in_particle_order(exported):
    _, truth, out, written = exported
    z = load_pkl(out / "z.pkl")
    assert z.dtype == np.float32 and z.shape == (N, 3)
    np.testing.assert_array_equal(z, truth["amplitudes"].astype(np.float32))
    with open(out / "z.pkl", "rb") as f:
        pickle.load(f)
        logvar = pickle.load(f)  # cryoDRGN's z_logvar, after z_mu
    np.testing.assert_allclose(np.exp(logvar / 2), truth["std"], rtol=1e-6)
    ids = np.loadtxt(out / "particle_ids.txt", dtype=int)
    np.testing.assert_array_equal(ids, truth["ids"])
    star_ids = [int(p.getObjId()) for p in read_relion(out / "particles.star")]
    np.testing.assert_array_equal(star_ids, ids)  # the star lists the particles in z's order


def test_cryodrgn_latent_without_uncertainty_has_one_pickle(tmp_path):
    assert not write_latent(tmp_path / "z.pkl", np.ones((4, 2)), np.full((4, 2), np.nan))
    with open(tmp_path / "z.pkl", "rb") as f:
        pickle.load(f)
        with pytest.raises(EOFError):
            pickle.load(f)


# ------------------------------------------------------------------ the protocol

class TestProtExport(FlexDLTestBase):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)

    def test_synthesized_set(self):
        from continuousflex_dl.protocols import FlexDLProtExport, FlexDLProtSynthesize
        synth = self.newProtocol(FlexDLProtSynthesize, inputModes=self.computeTestModes(),
                                 modeList="7-9", numberOfImages=5, boxSize=32, samplingRate=3.0, maxShift=2.0,
                                 defocusMin=5000, defocusMax=15000, seed=2)
        self.launchProtocol(synth)
        export = self.newProtocol(FlexDLProtExport, inputParticles=synth.outputParticles)
        self.launchProtocol(export)
        truth = convert.read_particles(synth.outputParticles, need_amplitudes=True)
        summary = "\n".join(export.summary())
        for name in ("images.xmd", "particles.star", "z.pkl", "particle_ids.txt"):
            self.assertIn(name, summary)
            self.assertTrue(os.path.exists(export._getExtraPath(name)), name)
        self.assertIn(export._getExtraPath(), summary)
        # Scipion's RELION import (scipion-em-relion) of the star, as a user would re-import it.
        imported = self.newProtocol(ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_RELION,
                                    starFile=self.proj.getPath(export._getExtraPath("particles.star")),
                                    samplingRate=3.0, voltage=300.0, sphericalAberration=2.7,
                                    amplitudeContrast=0.1, haveDataBeenPhaseFlipped=False)
        self.launchProtocol(imported)
        back = imported.outputParticles
        self.assertEqual(back.getSamplingRate(), 3.0)
        self.assertTrue(back.hasAlignmentProj())
        self.assertEqual([(g["rlnOpticsGroup"], g["rlnImagePixelSize"], g["rlnImageSize"])
                          for g in optics_rows(back.getAcquisition().opticsGroupInfo.get())], [(1, 3.0, 32)])
        got = convert.read_particles(back)
        np.testing.assert_array_equal(got.ids, truth.ids)
        mats = [np.stack([p.getTransform().getMatrix() for p in s.iterItems(orderBy="id")])
                for s in (back, synth.outputParticles)]
        np.testing.assert_allclose(mats[0], mats[1], atol=1e-12)
        for i in range(len(truth.ids)):  # the same CTF, the same image
            profiles = [defocus_profile(c.column("defocus_u")[i], c.column("defocus_v")[i],
                                        c.column("defocus_angle")[i]) for c in (got.ctf, truth.ctf)]
            np.testing.assert_allclose(*profiles, rtol=1e-12)
            with mrcfile.open(self.proj.getPath(got.stacks[i])) as a, \
                    mrcfile.open(self.proj.getPath(truth.stacks[i])) as b:
                np.testing.assert_array_equal(a.data[got.indices[i]], b.data[truth.indices[i]])
        np.testing.assert_array_equal(load_pkl(export._getExtraPath("z.pkl")), truth.amplitudes.astype(np.float32))
        out = export.outputParticles
        self.assertSetSize(out, 5)
        np.testing.assert_array_equal([list(map(float, p._xmipp_nmaDisplacements)) for p in out.iterItems(orderBy="id")],
                                      truth.amplitudes)
        self.assertFalse(any(hasattr(p, convert_export.XMIPP_COST_ATTR) for p in out))  # no HEMNMA score
