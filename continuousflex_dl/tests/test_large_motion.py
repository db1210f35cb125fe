"""The large-motion builder of the bench (tests/large_motion.py): hinge rotations of adenylate
kinase's LID and NMP domains are rigid, close the domain, move the atoms as a rotation about the
hinge axis does, and lie outside the span of the low normal modes; the experimental path 4AKE ->
1AKE ends at the crystal structure and its domains follow screw motions."""
import math

import numpy as np
import pytest

from continuousflex_dl.core.imaging.geometry import random_rotations
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms
from continuousflex_dl.core.modes.nma import compute_modes
from continuousflex_dl.tests.large_motion import (MOTIONS, experimental_motion, hinge_motion, kabsch, kabsch_rmsd,
                                                  rotation_about_axis, screw, span_projection)


@pytest.fixture(scope="module")
def adk():
    atoms = load_atoms(example_structure_path("4ake"), "heavy")
    coords = centre(atoms.coords)
    return coords, atoms.group.getResnums(), atoms.group.getNames(), compute_modes(coords, 9).vectors


@pytest.mark.parametrize("name,residues,hinges", MOTIONS)
def test_hinge_rotation_is_rigid_and_closes(adk, name, residues, hinges):
    coords, resnums, names, _ = adk
    motion = hinge_motion(coords, resnums, names, name, residues, hinges, 40.0)
    moved = coords + motion.displacement(coords, [1.0])[0]
    dom = motion.domain
    assert len(dom) == np.sum((resnums >= residues[0]) & (resnums <= residues[1])) > 100
    inside = np.linalg.norm(coords[dom][:, None] - coords[dom][None], axis=-1)
    inside_moved = np.linalg.norm(moved[dom][:, None] - moved[dom][None], axis=-1)
    assert np.abs(inside_moved - inside).max() < 1e-9
    rest = np.setdiff1d(np.arange(len(coords)), dom)
    assert np.array_equal(moved[rest], coords[rest])
    # Each domain atom moves by the chord 2 r sin(theta / 2), r its distance to the hinge axis.
    rel = coords[dom] - motion.pivot
    r = np.linalg.norm(rel - np.outer(rel @ motion.axis, motion.axis), axis=1)
    expected = math.sqrt(np.sum((2 * r * math.sin(math.radians(20.0))) ** 2) / len(coords))
    assert np.sqrt(np.mean(np.sum((moved - coords) ** 2, 1))) == pytest.approx(expected, rel=1e-9)
    assert 1.5 < kabsch_rmsd(moved[None], coords)[0] <= expected
    # Closing: the domain's centroid comes nearer to the rest of the protein.
    assert np.linalg.norm(moved[dom].mean(0) - coords[rest].mean(0)) \
        < np.linalg.norm(coords[dom].mean(0) - coords[rest].mean(0)) - 1.0
    # Progress is the angle: half way, the atoms move by the chord of 20 degrees.
    half = coords + motion.displacement(coords, [0.5])[0]
    assert np.linalg.norm(half[dom] - coords[dom], axis=1) == pytest.approx(2 * r * math.sin(math.radians(10.0)))


@pytest.mark.parametrize("name,residues,hinges", MOTIONS)
def test_hinge_rotation_leaves_the_span_of_the_low_modes(adk, name, residues, hinges):
    coords, resnums, names, vectors = adk
    motion = hinge_motion(coords, resnums, names, name, residues, hinges, 40.0)
    disp = motion.displacement(coords, [1.0])
    true = coords + disp
    best = coords + span_projection(disp, vectors[:9])
    # Modes 1-9 (rigid and 7-9) leave more than 1 Å of the 40 degree motion (about 2-3 Å).
    assert kabsch_rmsd(best, true)[0] > 1.0
    assert kabsch_rmsd(best, true)[0] < kabsch_rmsd(coords[None], true)[0]


def test_kabsch_rmsd_and_span_projection_against_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 3)) * 10
    rot = random_rotations(1, rng)[0]
    assert kabsch_rmsd((a @ rot.T + [3.0, -2.0, 1.0])[None], a)[0] == pytest.approx(0.0, abs=1e-9)
    noise = rng.normal(size=a.shape)
    noise -= noise.mean(0)
    # A small random perturbation: superposition lowers its RMSD only a little, never raises it.
    plain = np.sqrt(np.mean(np.sum(noise ** 2, 1)))
    assert 0.9 * plain < kabsch_rmsd((a + noise)[None], a)[0] <= plain
    basis = rng.normal(size=(2, 50, 3))
    inside = 2.0 * basis[0] - 0.5 * basis[1]
    assert np.allclose(span_projection(inside[None], basis)[0], inside)
    proj = span_projection(noise[None], basis)[0]
    assert abs(np.sum(proj * (noise - proj))) < 1e-9        # the residual is orthogonal to the span


def test_screw_motion_reproduces_a_known_rigid_motion():
    rng = np.random.default_rng(3)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    rot, shift = rotation_about_axis(axis, math.radians(50.0)), np.array([4.0, -1.0, 2.5])
    got_axis, pivot, angle, slide = screw(rot, shift)
    assert angle == pytest.approx(math.radians(50.0))
    assert abs(got_axis @ axis) == pytest.approx(1.0)
    x = rng.normal(size=(20, 3)) * 10
    screwed = (x - pivot) @ rotation_about_axis(got_axis, angle).T + pivot + slide * got_axis
    assert np.allclose(screwed, x @ rot.T + shift, atol=1e-9)
    # Kabsch recovers the motion from the points.
    r2, t2 = kabsch(x, x @ rot.T + shift)
    assert np.allclose(r2, rot, atol=1e-9) and np.allclose(t2, shift, atol=1e-9)


@pytest.fixture(scope="module")
def ake_path(adk):
    coords, resnums, names, vectors = adk
    closed = load_atoms(example_structure_path("1ake"), "chain A and protein and not hydrogen")
    motion = experimental_motion(coords, resnums, names, closed.coords, closed.group.getResnums(),
                                 closed.group.getNames())
    index = {}
    for i, key in enumerate(zip(closed.group.getResnums().tolist(), closed.group.getNames().tolist())):
        index.setdefault(key, i)
    end = closed.coords[[index[k] for k in zip(resnums.tolist(), names.tolist())]]
    return motion, end


def test_experimental_path_joins_the_crystal_structures(adk, ake_path):
    coords, _, _, vectors = adk
    motion, end = ake_path
    path = coords + motion.displacement(coords, np.linspace(0, 1, 5))
    rmsd_to_closed = kabsch_rmsd(path, end)
    assert rmsd_to_closed[0] == pytest.approx(7.19, abs=0.05)      # 4AKE-1AKE, chain A heavy atoms
    assert rmsd_to_closed[-1] < 1e-6
    assert np.all(np.diff(rmsd_to_closed) < 0)                       # nearer the closed end at every step
    # The domains turn by about 50 degrees (LID) and 45 (NMP) (Mueller et al. 1996: 'about 50').
    angles = [math.degrees(s[2]) for s in motion.screws]
    assert 45 < angles[0] < 60 and 35 < angles[1] < 55
    # Consecutive CA atoms stay 2.9-4.2 Å apart all along (no stretched chain at the hinges).
    ca = np.flatnonzero(adk[2] == "CA")
    gaps = np.linalg.norm(np.diff(path[:, ca], axis=1), axis=-1)
    assert gaps.min() > 2.9 and gaps.max() < 4.2
    # Outside the span of the low modes: modes 1-9 leave more than 3 Å at the closed end.
    best = coords + span_projection(path[-1:] - coords, vectors[:9])
    assert kabsch_rmsd(best, end)[0] > 3.0
