"""Deformations along normal modes (core/modes/deformation.py) against known truths: a mode that
is a rigid rotation extrapolated to 40 degrees, small amplitudes, the Jacobian, the blocks."""
import logging
import math

import numpy as np
import pytest
import torch

from continuousflex_dl.core.modes.deformation import (DEFORMATIONS, Deformation, deform, deformation,
                                                      residue_blocks)
from continuousflex_dl.core.modes.nma import compute_modes, displace
from continuousflex_dl.core.imaging.structure import centre, example_structure_path, load_atoms
from continuousflex_dl.tests.large_motion import rotation_about_axis


@pytest.fixture(scope="module")
def adk():
    """4AKE chain A heavy atoms (1,656, 214 residues), centred, their blocks and ANM modes 7-9."""
    atoms = load_atoms(example_structure_path("4ake"), "heavy")
    coords = centre(atoms.coords)
    blocks = atoms.blocks
    modes = compute_modes(coords, n_modes=9, cutoff=8.0).vectors[6:]
    return coords, blocks, modes


def _bonds(coords, blocks):
    """Index pairs of atoms of one residue closer than 1.7 Å (covalent bonds)."""
    d = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    i, j = np.nonzero((d < 1.7) & (blocks[:, None] == blocks[None]) & np.triu(np.ones_like(d, bool), 1))
    return i, j


def test_residue_blocks_follow_chain_and_number():
    blocks = residue_blocks([5, 5, 6, 6, 5, 7], ["A", "A", "A", "A", "B", "B"])
    np.testing.assert_array_equal(blocks, [0, 0, 1, 1, 2, 3])
    np.testing.assert_array_equal(residue_blocks([3, 3, 1]), [0, 0, 1])
    with pytest.raises(ValueError, match="chain id"):
        residue_blocks([1, 2], ["A"])


def test_rigid_rotation_mode_extrapolates_to_the_exact_rotation(adk):
    coords, blocks, _ = adk
    axis, pivot = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8]), np.array([3.0, -2.0, 1.0])
    mode = np.cross(axis, coords - pivot)                 # the velocities of a rotation about the axis
    norm = np.linalg.norm(mode)
    mode /= norm                                          # unit 3N vector: q Å turn by q / norm rad
    q = np.array([math.radians(40.0) * norm])
    exact = pivot + (coords - pivot) @ rotation_about_axis(axis, math.radians(40.0)).T
    rigid = deform(coords, mode[None], q, "rigid-blocks", blocks)
    linear = deform(coords, mode[None], q, "linear")
    assert np.abs(rigid - exact).max() < 1e-6
    i, j = _bonds(coords, blocks)
    bond0 = np.linalg.norm(coords[i] - coords[j], axis=1)
    assert np.abs(np.linalg.norm(rigid[i] - rigid[j], axis=1) - bond0).max() < 1e-6
    # The linear mode moves every atom along its tangent: bonds stretch by up to 1/cos(40) - 1.
    stretch = np.linalg.norm(linear[i] - linear[j], axis=1) / bond0 - 1
    assert 0.1 < stretch.max() < 1 / math.cos(math.radians(40.0)) - 1 + 1e-6
    assert np.sqrt(((linear - exact) ** 2).sum(1).mean()) > 2.0          # Å RMS off at 40 degrees


def test_small_amplitudes_agree_with_linear_to_second_order(adk):
    coords, blocks, modes = adk
    d = Deformation(coords, modes, "rigid-blocks", blocks)
    q = np.array([80.0, -60.0, 40.0])
    gaps = [np.abs(d(q * h) - displace(coords, modes, q * h)).max() for h in (1e-2, 1e-3)]
    assert gaps[0] < 1e-3                                  # Å at amplitudes below 1 Å
    assert gaps[0] / gaps[1] == pytest.approx(100.0, rel=0.02)       # the difference is O(q^2)
    np.testing.assert_allclose(d.jacobian(np.zeros(3)), modes, atol=1e-12)


@pytest.mark.parametrize("kind", DEFORMATIONS)
def test_jacobian_matches_finite_differences(adk, kind):
    coords, blocks, modes = adk
    d = Deformation(coords, modes, kind, blocks)
    # Rotations of the blocks from 0 to well past the series' range (0.3 rad) at 150 Å.
    q = np.array([[150.0, -90.0, 60.0], [0.0, 0.0, 0.0], [0.4, 0.1, -0.2], [-20.0, 35.0, 5.0]])
    jac = d.jacobian(q)
    assert jac.shape == (4, 3) + coords.shape
    h = 1e-5
    num = np.stack([(d(q + h * e) - d(q - h * e)) / (2 * h) for e in np.eye(3)], 1)
    assert np.abs(jac - num).max() < 1e-7
    # float32 on torch gives the same (the alignment's case).
    d32 = d.to(dtype=torch.float32)
    q32 = torch.tensor(q, dtype=torch.float32)
    assert np.abs(d32(q32).numpy() - d(q)).max() < 1e-3
    assert np.abs(d32.jacobian(q32).numpy() - jac).max() < 1e-4


def test_rigid_blocks_keep_residues_rigid_at_large_amplitudes(adk):
    coords, blocks, modes = adk
    q = np.array([200.0, -150.0, 100.0])                    # beyond the default range's end (203 Å)
    d = Deformation(coords, modes, "rigid-blocks", blocks)
    screw = d(q) - np.einsum("k,knd->nd", q, d.residual.numpy())     # the blocks' rigid motion alone
    i, j = np.nonzero((blocks[:, None] == blocks[None]) & np.triu(np.ones((len(blocks),) * 2, bool), 1))
    np.testing.assert_allclose(np.linalg.norm(screw[i] - screw[j], axis=1),
                               np.linalg.norm(coords[i] - coords[j], axis=1), atol=1e-6)
    # What the modes move within residues is small beside their rigid motion (1-3 % of each mode).
    assert np.all(np.linalg.norm(d.residual.numpy().reshape(3, -1), axis=1) < 0.05)
    i, j = _bonds(coords, blocks)
    bond0 = np.linalg.norm(coords[i] - coords[j], axis=1)
    err = {kind: np.abs(np.linalg.norm(x[i] - x[j], axis=1) - bond0).max()
           for kind in DEFORMATIONS for x in [deform(coords, modes, q, kind, blocks)]}
    assert err["rigid-blocks"] < err["linear"], err


def test_without_residues_the_deformation_is_linear_and_says_so(adk, caplog):
    coords, _, modes = adk
    with caplog.at_level(logging.WARNING):
        d = deformation(coords, modes, "rigid-blocks", None)
    assert d.kind == "linear" and "linearly" in caplog.text
    with pytest.raises(ValueError, match="needs the atoms' blocks"):
        Deformation(coords, modes, "rigid-blocks")
    with pytest.raises(ValueError, match="Unknown deformation"):
        Deformation(coords, modes, "nolb")
