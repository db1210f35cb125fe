"""The main job end to end on adenylate kinase, as a Scipion project built with the pyworkflow API.

``make demo`` (or ``python -m continuousflex_dl demo``) runs: import 4AKE ->
NMA -> synthesize particles (random orientations and shifts, CTF, SNR 0.1,
the paper's amplitude relation on modes 7-9) -> later stages as they exist.
Each stage is a normal Scipion protocol, so the project opens in the Scipion
GUI afterwards.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("continuousflex_dl.demo")


@dataclass
class DemoSize:
    """Sizes of a demo run (the default fits 2 CPU cores; ``--full`` is the paper's)."""
    n_particles: int = 1200
    box: int = 64
    pixel_size: float = 2.0
    max_shift: float = 3.0

    @classmethod
    def full(cls) -> "DemoSize":
        return cls(n_particles=8000, box=256, pixel_size=1.0, max_shift=5.0)


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _new_project(name: str):
    from pyworkflow.project import Manager
    manager = Manager()
    existing = {p.getName() for p in manager.listProjects()}
    base, k = name, 1
    while name in existing:
        k += 1
        name = f"{base}_{k}"
    project = manager.createProject(name)
    os.chdir(project.getPath())  # pyworkflow resolves run folders relative to the project
    return project


def _run(project, prot, what: str):
    t0 = time.time()
    _say(f"{what} ...")
    project.launchProtocol(prot, wait=True)
    if not prot.isFinished():
        log = os.path.join(prot.getWorkingDir(), "logs", "run.stdout")
        raise RuntimeError(f"{what} failed; see the run log {log}")
    _say(f"{what}: done in {time.time() - t0:.0f} s")
    return prot


def run_demo(out_dir: Path, size: DemoSize, seed: int = 0) -> dict:
    """Build and run the demo project; returns {stage: protocol}."""
    from .scipion_env import configure_scipion
    configure_scipion(out_dir / "scipion", overwrite=False)
    from pwem.protocols import ProtImportPdb

    from .core.structure import example_structure_path
    from .protocols import FlexDLProtNMA, FlexDLProtSynthesize

    project = _new_project("continuousflex_dl_demo")
    _say(f"Scipion project '{project.getName()}' in {project.getPath()}")
    stages = {}
    stages["import"] = _run(project, project.newProtocol(
        ProtImportPdb, inputPdbData=1, pdbFile=str(example_structure_path("4ake"))),
        "Import adenylate kinase (4AKE chain A)")
    stages["nma"] = _run(project, project.newProtocol(
        FlexDLProtNMA, inputStructure=stages["import"].outputPdb, numberOfModes=20),
        "Normal mode analysis")
    stages["synthesis"] = _run(project, project.newProtocol(
        FlexDLProtSynthesize, inputModes=stages["nma"].outputModes, modeList="7-9",
        numberOfImages=size.n_particles, boxSize=size.box, samplingRate=size.pixel_size,
        maxShift=size.max_shift,
        defocusMin=5000, defocusMax=5000, snr=0.1, seed=seed),
        f"Synthesize {size.n_particles} particles ({size.box} px, CTF, SNR 0.1)")
    _report(project, stages)
    return stages


def _report(project, stages) -> None:
    from . import convert
    rows = convert.modes_table(stages["nma"].outputModes)
    print("\nNormal modes of adenylate kinase (heavy atoms, cutoff 8 Å):")
    print("  mode  eigenvalue  collectivity  enabled")
    for r in rows[6:12]:
        print(f"  {r['number']:4d}  {r['eigenvalue']:10.5f}  {r['collectivity']:12.3f}  "
              f"{'yes' if r['enabled'] else 'no'}")
    where = lambda prot, *p: os.path.abspath(prot._getExtraPath(*p))  # noqa: E731
    print(f"\nMode animations (ChimeraX/VMD): {where(stages['nma'], 'animations')}")
    print(f"Particles and ground truth (RELION star): {where(stages['synthesis'])}")
    print(f"\nOpen the project in the Scipion GUI:\n  SCIPION_USER_DATA={os.environ['SCIPION_USER_DATA']} "
          f"{sys.executable} -m pyworkflow.apps.pw_project {os.path.basename(project.getName())}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="continuousflex_dl demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("demo_output"),
                        help="folder for the Scipion project (default: ./demo_output)")
    parser.add_argument("--full", action="store_true", help="the paper's size (256 px, 8000 particles)")
    parser.add_argument("--particles", type=int, help="number of particles (overrides the size preset)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    size = DemoSize.full() if args.full else DemoSize()
    if args.particles:
        size.n_particles = args.particles
    t0 = time.time()
    run_demo(args.output.absolute(), size, args.seed)
    _say(f"Demo finished in {time.time() - t0:.0f} s")
    return 0
