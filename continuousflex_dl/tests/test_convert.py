"""Known-value round trips of convert.py, the one place that translates between Scipion objects
and core arrays (like scipion-em-relion's tests/test_convert.py ``test_isInverse``): poses
Transform <-> our angles and shifts, CTFModel + Acquisition <-> CTFParams, zFlex <-> amplitudes.

The pose matrices are checked against the ALIGN_PROJ matrix as scipion-em-relion builds it
(``matrixFromGeometry(shifts, angles, inverseTransform=True)``: ZYZ Euler matrix of the negated
angles from pwem's transformations, translation minus the shifts, inverted), written here from
pwem's primitives, and against matrices worked out by hand.
"""
import mrcfile
import numpy as np
import pytest
from pwem.convert import transformations as tfs
from pwem.objects import Acquisition, CTFModel, Particle, SetOfParticles, SetOfParticlesFlex, Transform

from continuousflex_dl import convert
from continuousflex_dl.core.imaging.ctf import CTFParams
from continuousflex_dl.core.imaging.geometry import euler_to_matrix, pose_to_scipion_matrix

#: Euler ZYZ (rot, tilt, psi) deg and shifts (x, y) px; tilts away from 0 and 180 (unique angles).
ANGLES = np.array([[0.0, 30.0, 0.0], [30.0, 60.0, 90.0], [-120.5, 45.25, 10.0], [170.0, 120.0, -35.0]])
SHIFTS = np.array([[0.0, 0.0], [1.5, -2.0], [-3.25, 0.5], [4.0, 4.0]])
BOX = 8


def relion_projection_matrix(angles, shifts):
    """scipion-em-relion's ``matrixFromGeometry(shifts, angles, inverseTransform=True)``."""
    m = tfs.euler_matrix(*-np.deg2rad(angles), axes="szyz")
    m[:3, 3] = -np.append(shifts, 0.0)
    return np.linalg.inv(m)


def test_pose_matrices_are_scipions_align_proj():
    # By hand: no rotation keeps the shifts as the translation; psi = 90 deg turns x into y.
    np.testing.assert_allclose(pose_to_scipion_matrix(np.zeros(3), [2.0, -3.0]),
                               [[1, 0, 0, 2], [0, 1, 0, -3], [0, 0, 1, 0], [0, 0, 0, 1]], atol=1e-12)
    np.testing.assert_allclose(pose_to_scipion_matrix([0.0, 0.0, 90.0], [1.0, 0.0]),
                               [[0, -1, 0, 0], [1, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1]], atol=1e-12)
    for angles, shifts in zip(ANGLES, SHIFTS):
        np.testing.assert_allclose(pose_to_scipion_matrix(angles, shifts), relion_projection_matrix(angles, shifts),
                                   atol=1e-12)


def _particles(tmp_path, with_ctf=True):
    """A SetOfParticles of 4 images (8 px, 1.5 Å/px, ids 1-4, stored in reverse order) with
    Transforms made by scipion-em-relion's formula and, optionally, CTFs at 200 kV."""
    stack = str(tmp_path / "stack.mrcs")
    with mrcfile.new(stack) as mrc:
        mrc.set_data(np.zeros((4, BOX, BOX), np.float32))
    parts = SetOfParticles(filename=str(tmp_path / "particles.sqlite"))
    parts.setSamplingRate(1.5)
    acq = Acquisition(voltage=200.0, sphericalAberration=2.0, amplitudeContrast=0.07, magnification=50000)
    parts.setAcquisition(acq)
    parts.setHasCTF(with_ctf)
    parts.setAlignmentProj()
    for i in reversed(range(4)):
        p = Particle(location=(i + 1, stack))
        p.setObjId(i + 1)
        p.setTransform(Transform(relion_projection_matrix(ANGLES[i], SHIFTS[i])))
        if with_ctf:
            ctf = CTFModel(defocusU=12000.0 + 1000 * i, defocusV=11000.0 + 1000 * i, defocusAngle=15.0 * i)
            ctf.setPhaseShift(5.0 * i)
            p.setCTF(ctf)
        p.setAcquisition(acq)
        parts.append(p)
    parts.write()
    return parts


def test_read_particles_gives_the_poses_ctfs_and_files(tmp_path):
    parts = _particles(tmp_path)
    arrays = convert.read_particles(parts)
    np.testing.assert_array_equal(arrays.ids, [1, 2, 3, 4])  # by id, whatever the storage order
    np.testing.assert_array_equal(arrays.indices, [0, 1, 2, 3])
    assert arrays.stacks == [str(tmp_path / "stack.mrcs")] * 4
    assert (arrays.pixel_size, arrays.box) == (1.5, BOX)
    np.testing.assert_allclose(arrays.angles, ANGLES, atol=1e-9)
    np.testing.assert_allclose(arrays.shifts, SHIFTS, atol=1e-9)
    ctf = arrays.ctf
    np.testing.assert_allclose(ctf.column("defocus_u"), [12000, 13000, 14000, 15000])
    np.testing.assert_allclose(ctf.column("defocus_v"), [11000, 12000, 13000, 14000])
    np.testing.assert_allclose(ctf.column("defocus_angle"), [0, 15, 30, 45])
    np.testing.assert_allclose(ctf.column("phase_shift"), [0, 5, 10, 15])
    np.testing.assert_allclose([ctf.column("voltage")[0], ctf.column("cs")[0], ctf.column("amplitude_contrast")[0]],
                               [200.0, 2.0, 0.07])
    assert arrays.amplitudes is None
    with pytest.raises(ValueError, match="carry no normal-mode amplitudes"):
        convert.read_particles(parts, need_amplitudes=True)


def test_ctf_round_trip_and_default_acquisition():
    ctf = CTFParams(defocus_u=np.array([15000.0, 9000.0]), defocus_v=np.array([14000.0, 8500.0]),
                    defocus_angle=np.array([-20.0, 75.0]), voltage=300.0, cs=2.7, amplitude_contrast=0.1,
                    phase_shift=np.array([0.0, 90.0]))
    models = [convert.ctf_model(ctf, i) for i in range(2)]
    assert [(m.getDefocusU(), m.getDefocusV(), m.getDefocusAngle(), m.getPhaseShift()) for m in models] == [
        (15000.0, 14000.0, -20.0, 0.0), (9000.0, 8500.0, 75.0, 90.0)]
    back = convert.read_ctf(Acquisition(voltage=300.0, sphericalAberration=2.7, amplitudeContrast=0.1),
                            [convert._ctf_row(m) for m in models])
    for name in ("defocus_u", "defocus_v", "defocus_angle", "phase_shift", "voltage", "cs", "amplitude_contrast"):
        np.testing.assert_allclose(back.column(name), ctf.expand(2).column(name), err_msg=name)
    # An acquisition Scipion left unset reads as the documented default microscope.
    unset = convert.read_ctf(Acquisition(), [convert._ctf_row(models[0])])
    assert (unset.column("voltage")[0], unset.column("cs")[0], unset.column("amplitude_contrast")[0]) == (
        300.0, 2.7, 0.1)


def test_flex_particles_round_trip(tmp_path):
    parts = _particles(tmp_path)
    ids = np.array([3, 1, 4])  # a subset, in another order: rows are placed by id
    amplitudes = np.array([[30.0, -3.5], [10.0, -1.5], [40.0, -4.5]])
    std = np.array([[3.0, 0.3], [1.0, 0.1], [4.0, 0.4]])
    score = np.array([0.3, 0.1, 0.4])
    angles = ANGLES[[2, 0, 3]] + [5.0, -5.0, 2.0]
    shifts = -SHIFTS[[2, 0, 3]]
    out = SetOfParticlesFlex(filename=str(tmp_path / "flex.sqlite"), progName=convert.FLEX_PROG_NAME)
    convert.fill_flex_particles(out, parts, ids, amplitudes, [7, 9], convert.SOURCE_HEMNMA, angles, shifts,
                                extra={convert.ZFLEX_STD_ATTR: std, "_cfdlScore": score})
    out.write()
    back = convert.read_particles(out, need_amplitudes=True)
    np.testing.assert_array_equal(back.ids, [1, 3, 4])
    order = [1, 0, 2]  # rows of ``ids`` in id order
    np.testing.assert_array_equal(back.amplitudes, amplitudes[order])
    np.testing.assert_array_equal(back.amplitude_std, std[order])
    assert back.mode_numbers == [7, 9] == convert.particles_mode_numbers(out)
    assert convert.flex_source(out) == convert.SOURCE_HEMNMA
    np.testing.assert_allclose(euler_to_matrix(back.angles), euler_to_matrix(angles[order]), atol=1e-9)
    np.testing.assert_allclose(back.shifts, shifts[order], atol=1e-9)
    np.testing.assert_allclose(back.ctf.column("defocus_u"), [12000, 14000, 15000])  # copied from the input
    row = {int(i): k for k, i in enumerate(ids)}
    for p in out.iterItems(orderBy="id"):
        k = row[p.getObjId()]
        assert list(p.getZFlex()) == amplitudes[k].tolist()
        assert getattr(p, "_cfdlScore").get() == score[k]
        np.testing.assert_allclose(p.getTransform().getMatrix(), relion_projection_matrix(angles[k], shifts[k]),
                                   atol=1e-12)


def test_a_set_without_mode_names_is_refused_where_modes_are_needed(tmp_path):
    out = SetOfParticlesFlex(filename=str(tmp_path / "flex.sqlite"), progName=convert.FLEX_PROG_NAME)
    assert convert.flex_mode_numbers(out) is None
    with pytest.raises(ValueError, match="do not name their normal modes"):
        convert.particles_mode_numbers(out)
    # Amplitude columns that do not name their modes are the first non-rigid modes.
    arrays = convert.ParticleArrays(ids=np.arange(2), stacks=["s", "s"], indices=np.arange(2), pixel_size=1.0,
                                    box=8, amplitudes=np.zeros((2, 3)))
    assert arrays.amplitude_modes() == [7, 8, 9]
    arrays.mode_numbers = [7, 9, 12]
    assert arrays.amplitude_modes() == [7, 9, 12]


def test_mode_lists():
    assert convert.parse_mode_list("7-9, 12") == [7, 8, 9, 12]
    with pytest.raises(ValueError):
        convert.parse_mode_list("7-x")
