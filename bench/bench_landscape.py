"""Speed of the landscape layer (viewer_flex, cluster and trajectory protocols' work) on
SetOfParticlesFlex of N particles, without a Scipion project.

Builds a ground-truth set (three Gaussian clusters of amplitudes over 3 modes, random poses)
and a copy with amplitudes + N(0, 4 Å) and psi + 10°, then times: writing both sets,
reading one back (convert.read_particles), the error report of one against the other
(reports.error_reports), a 3-D point cloud of both (viewer_flex.cloud_figure + PNG),
k-means (k = 3), copying the particles into one set per cluster (what FlexDLProtCluster's
createOutputStep does), and 20 trajectory frames of a 1656-atom structure written as a
multi-model PDB. Prints the figures (and the error report, to check it against the planted
perturbation); ``--out`` also writes them as JSON.

Example: python bench/bench_landscape.py --n 20000
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continuousflex_dl.scipion_env import configure_scipion  # noqa: E402

configure_scipion(Path(tempfile.mkdtemp(prefix="cfdl-bench-")), overwrite=False)

from pwem.objects import ParticleFlex, SetOfParticlesFlex, Transform  # noqa: E402

from continuousflex_dl import convert  # noqa: E402
from continuousflex_dl.core.imaging.geometry import (matrix_to_euler, pose_to_scipion_matrix,  # noqa: E402
                                             random_rotations)
from continuousflex_dl.core.imaging.structure import atoms_from_coords, write_multimodel_pdb  # noqa: E402
from continuousflex_dl.core.landscape.trajectory import kmeans, principal_path, trajectory_frames  # noqa: E402
from continuousflex_dl.reports import error_reports  # noqa: E402
from continuousflex_dl.viewers.viewer_flex import cloud_figure  # noqa: E402


def build_sets(folder: Path, n: int, rng: np.random.Generator):
    """(truth set, perturbed set, amplitude perturbation (n, 3))."""
    centres = rng.uniform(-200, 200, (3, 3))
    q = centres[rng.integers(3, size=n)] + rng.normal(0, 10, (n, 3))
    angles = matrix_to_euler(random_rotations(n, rng))
    shifts = rng.uniform(-3, 3, (n, 2))
    truth = SetOfParticlesFlex(filename=str(folder / "truth.sqlite"), progName=convert.FLEX_PROG_NAME)
    convert.set_acquisition(truth, 2.0, None)
    truth.setAlignmentProj()
    truth.setFlexInfo(convert.flex_info([7, 8, 9], convert.SOURCE_GROUND_TRUTH))
    mats = pose_to_scipion_matrix(angles, shifts)
    for i in range(n):
        p = ParticleFlex(progName=convert.FLEX_PROG_NAME)
        p.setLocation(i + 1, str(folder / "particles.mrcs"))
        p.setTransform(Transform(mats[i]))
        p.setZFlex(q[i].tolist())
        truth.append(p)
    truth.setDim((64, 64, 1))
    truth.write()
    delta = rng.normal(0, 4.0, (n, 3))
    pert = SetOfParticlesFlex(filename=str(folder / "hemnma.sqlite"), progName=convert.FLEX_PROG_NAME)
    a = convert.read_particles(truth, need_amplitudes=True)
    convert.fill_flex_particles(pert, truth, a.ids, a.amplitudes + delta, [7, 8, 9], convert.SOURCE_HEMNMA,
                                angles=a.angles + np.array([0.0, 0.0, 10.0]), shifts=a.shifts)
    pert.write()
    return truth, pert, delta


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="particles per set")
    parser.add_argument("--atoms", type=int, default=1656, help="atoms of the trajectory structure")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON file for the figures")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    folder = Path(tempfile.mkdtemp(prefix="cfdl-bench-landscape-"))
    fig = {"n_particles": args.n}

    t = time.perf_counter()
    truth, pert, delta = build_sets(folder, args.n, rng)
    fig["write_two_sets_s"] = time.perf_counter() - t

    t = time.perf_counter()
    a = convert.read_particles(pert, need_amplitudes=True)
    fig["read_set_s"] = time.perf_counter() - t

    t = time.perf_counter()
    (amp, pose), = error_reports(truth, [pert]).values()
    fig["error_report_s"] = time.perf_counter() - t
    fig["mean_abs_error_A"] = amp.mean_abs_error
    fig["expected_mean_abs_error_A"] = float(np.abs(delta).mean())
    fig["angular_error_deg"] = pose.angular_mean
    fig["shift_error_px"] = pose.shift_mean

    t = time.perf_counter()
    figure = cloud_figure([pert, truth], path=principal_path(a.amplitudes, 10))
    figure.savefig(folder / "cloud.png", dpi=80)
    fig["cloud_figure_png_s"] = time.perf_counter() - t

    t = time.perf_counter()
    labels, centres = kmeans(a.amplitudes, 3, seed=args.seed)
    fig["kmeans_s"] = time.perf_counter() - t
    fig["cluster_sizes"] = np.bincount(labels).tolist()

    t = time.perf_counter()
    outs = [SetOfParticlesFlex(filename=str(folder / f"cluster_{c}.sqlite"), progName=convert.FLEX_PROG_NAME)
            for c in range(3)]
    for out in outs:
        out.copyInfo(pert)
    row = {int(i): k for k, i in enumerate(a.ids)}
    for p in pert.iterItems(orderBy="id"):
        outs[labels[row[p.getObjId()]]].append(p.clone())
    for out in outs:
        out.write()
    fig["cluster_sets_s"] = time.perf_counter() - t

    coords = rng.normal(0, 15, (args.atoms, 3))
    modes = np.linalg.qr(rng.normal(size=(3 * args.atoms, 3)))[0].T.reshape(3, args.atoms, 3)
    t = time.perf_counter()
    frames = trajectory_frames(coords, modes, principal_path(a.amplitudes, args.frames))
    write_multimodel_pdb(folder / "trajectory.pdb", _pdb_atoms(coords), frames)
    fig["trajectory_pdb_s"] = time.perf_counter() - t

    for key, value in fig.items():
        print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")
    if args.out:
        Path(args.out).write_text(json.dumps(fig, indent=2))
    return fig


def _pdb_atoms(coords):
    """Atoms with a ProDy group (CA atoms of one chain) so they can be written as PDB."""
    import prody
    n = len(coords)
    group = prody.AtomGroup("bench")
    group.setCoords(coords)
    group.setNames(["CA"] * n)
    group.setResnames(["ALA"] * n)
    group.setResnums(np.arange(1, n + 1))
    group.setChids(["A"] * n)
    group.setElements(["C"] * n)
    atoms = atoms_from_coords(coords)
    atoms.group = group
    return atoms


if __name__ == "__main__":
    main()
