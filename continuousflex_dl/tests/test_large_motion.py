"""The large-motion builder of the bench (tests/large_motion.py): hinge rotations of adenylate
kinase's LID and NMP domains are rigid, close the domain, move the atoms as a rotation about the
hinge axis does, and lie outside the span of the low normal modes."""
import math

import numpy as np
import pytest

from continuousflex_dl.core.imaging.geometry import random_rotations
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms
from continuousflex_dl.core.modes.nma import compute_modes
from continuousflex_dl.tests.large_motion import MOTIONS, hinge_motion, kabsch_rmsd, span_projection


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
