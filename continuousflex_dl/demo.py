"""The main job end to end on adenylate kinase, as a Scipion project built with the pyworkflow API.

``make demo`` (or ``python -m continuousflex_dl demo``) runs: import 4AKE ->
NMA -> synthesize particles (random orientations and shifts, CTF, the
paper's noise: SNR 0.4 over a 128 Å box is its SNR 0.1 over 256 Å; the
paper's amplitude relation on modes 7-9; a training part and a test part)
-> HEMNMA alignment of the training part -> outlier removal -> train
DeepHEMNMA on particles simulated from the reference and matched to the set,
then fine-tuned on the HEMNMA amplitudes -> predict the test part -> error
report and point-cloud PNG -> a trajectory as a multi-model PDB.
Each stage is a normal Scipion protocol, so the project opens in the Scipion
GUI afterwards (``continuousflex-dl gui PROJECT_FOLDER``; the demo prints it).
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

logger = logging.getLogger("continuousflex_dl.demo")


@dataclass
class DemoSize:
    """Sizes of a demo run (the default fits 2 CPU cores; ``--full`` is the paper's).

    The default is the paper's noise in a smaller box: the paper's 256 px images
    of 1 Å at SNR 0.1 over their box carry, in a 128 Å box around the particle,
    a quarter of the noise variance per box (SNR 0.4 over that box; SNR is
    defined over the whole box, DESIGN.md). HEMNMA sees ``working_size`` px of
    the box; the network ``network_size`` px of a ``window`` Å window (None: the
    box), trained first on ``epochs`` x ``sim_images`` particles simulated from
    the reference and matched to the set, then ``finetune_epochs`` on the HEMNMA
    amplitudes, ``batch_size`` images per step; the test particles are predicted as the mean
    over ``rotations`` in-plane rotations of each.
    """
    n_particles: int = 400       # aligned by HEMNMA, then used to fine-tune the network
    n_test: int = 200            # predicted by the network
    box: int = 128
    pixel_size: float = 1.0
    snr: float = 0.4
    max_shift: float = 5.0
    working_size: int = 64       # HEMNMA
    network_size: int = 32       # the network
    window: Optional[float] = None
    epochs: int = 30             # simulated epochs
    sim_images: int = 2000       # new simulated images per epoch
    finetune_epochs: int = 10
    batch_size: int = 64         # CPU throughput at 32 px: 45 / 72 / 90 images/s at 32 / 64 / 128 (1 core)
    rotations: int = 8           # in-plane rotations averaged at prediction (the stream has all of them)

    @classmethod
    def full(cls) -> "DemoSize":
        return cls(n_particles=6000, n_test=2000, box=256, pixel_size=1.0, snr=0.1, max_shift=5.0,
                   working_size=128, network_size=64, window=128.0, epochs=50, sim_images=6000,
                   finetune_epochs=10, batch_size=32)


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


def _new(project, cls, label: str, **params):
    """A new protocol with a run label (pyworkflow 3.11's newProtocol drops ``objLabel``)."""
    prot = project.newProtocol(cls, **params)
    prot.setObjLabel(label)
    return prot


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

    from .core.imaging.structure import example_structure_path
    from .protocols import (FlexDLProtAlign, FlexDLProtNMA, FlexDLProtOutliers, FlexDLProtPredict,
                            FlexDLProtSynthesize, FlexDLProtTrain)

    project = _new_project("continuousflex_dl_demo")
    _say(f"Scipion project '{project.getName()}' in {project.getPath()}")
    stages = {}

    def stage(key, cls, label, what, **params):
        stages[key] = _run(project, _new(project, cls, label, **params), what)
        return stages[key]

    stage("import", ProtImportPdb, "import adenylate kinase (4AKE)", "Import adenylate kinase (4AKE chain A)",
          inputPdbData=1, pdbFile=str(example_structure_path("4ake")))
    modes = stage("nma", FlexDLProtNMA, "normal modes", "Normal mode analysis",
                  inputStructure=stages["import"].outputPdb, numberOfModes=20).outputModes
    synth = dict(inputModes=modes, modeList="7-9", boxSize=size.box, samplingRate=size.pixel_size,
                 maxShift=size.max_shift, defocusMin=5000, defocusMax=5000, snr=size.snr)
    stage("synthesis", FlexDLProtSynthesize, "synthesize training particles",
          f"Synthesize {size.n_particles} training particles ({size.box} px of {size.pixel_size:g} Å, CTF, "
          f"SNR {size.snr:g})",
          numberOfImages=size.n_particles, seed=seed, **synth)
    stage("synthesis_test", FlexDLProtSynthesize, "synthesize test particles",
          f"Synthesize {size.n_test} test particles", numberOfImages=size.n_test, seed=seed + 1, **synth)
    stage("hemnma", FlexDLProtAlign, "HEMNMA alignment (training)",
          f"HEMNMA alignment of {size.n_particles} particles",
          inputParticles=stages["synthesis"].outputParticles, inputModes=modes, modeList="7-9",
          maxShift=size.max_shift + 1, workingSize=size.working_size, numberOfThreads=3)
    stage("outliers", FlexDLProtOutliers, "outlier removal (HEMNMA, training)", "Outlier removal (10 %)",
          inputParticles=stages["hemnma"].outputParticles, fraction=0.1)
    stage("train", FlexDLProtTrain, "DeepHEMNMA training",
          f"DeepHEMNMA training: {size.epochs} x {size.sim_images} simulated particles, then "
          f"{size.finetune_epochs} epochs on the HEMNMA amplitudes",
          inputParticles=stages["outliers"].outputParticles, inputModes=modes,
          workingSize=size.network_size, window=size.window or 0.0, epochs=size.epochs,
          simImages=size.sim_images, finetuneEpochs=size.finetune_epochs, batchSize=size.batch_size, seed=seed,
          poseNormalise=2)  # "no": the demo's measured path (in-plane rotation averaging at prediction)
    stage("predict", FlexDLProtPredict, "DeepHEMNMA prediction (test)",
          f"DeepHEMNMA prediction of {size.n_test} test particles, averaged over {size.rotations} in-plane "
          "rotations",
          inputModel=stages["train"].outputModel, inputParticles=stages["synthesis_test"].outputParticles,
          rotations=size.rotations)
    _report(project, stages)
    return stages


#: The paper's numbers for this case (all random, SNR 0.1, CTF): HEMNMA after outlier removal
#: and the network (Table I, last row; Table II).
PAPER_HEMNMA_MAE = 6.58
PAPER_NETWORK_MAE = 27.60


def results_dir(stages) -> Path:
    """The demo's result folder, inside the Scipion project."""
    return Path(os.path.abspath(stages["nma"]._getExtraPath())).parents[2] / "demo_results"


def _report(project, stages) -> None:
    import numpy as np

    from . import convert
    from .core.landscape.analysis import amplitude_errors, format_error_table, pose_errors, write_error_csv
    from .core.modes.nma import displace
    from .core.imaging.structure import write_multimodel_pdb
    from .core.landscape.trajectory import principal_path

    out = results_dir(stages)
    out.mkdir(exist_ok=True)
    truth = convert.read_particles(stages["synthesis"].outputParticles, need_amplitudes=True)
    hem = convert.read_particles(stages["hemnma"].outputParticles, need_amplitudes=True)
    kept = convert.read_particles(stages["outliers"].outputParticles, need_amplitudes=True)
    test_truth = convert.read_particles(stages["synthesis_test"].outputParticles, need_amplitudes=True)
    pred = convert.read_particles(stages["predict"].outputParticles, need_amplitudes=True)
    atoms, modes = convert.read_modes(stages["nma"].outputModes, [7, 8, 9])
    by_id = {i: k for k, i in enumerate(truth.ids)}
    kept_rows = np.array([by_id[i] for i in kept.ids])
    reports = {
        "HEMNMA (all)": amplitude_errors(hem.amplitudes, truth.amplitudes, [7, 8, 9], modes),
        "HEMNMA (outliers removed)": amplitude_errors(kept.amplitudes, truth.amplitudes[kept_rows],
                                                      [7, 8, 9], modes),
        "DeepHEMNMA (test set)": amplitude_errors(pred.amplitudes, test_truth.amplitudes, [7, 8, 9], modes),
        # What a network that learned nothing scores: always the mean training amplitudes.
        "Baseline: mean training amplitudes": amplitude_errors(
            np.broadcast_to(kept.amplitudes.mean(axis=0), test_truth.amplitudes.shape),
            test_truth.amplitudes, [7, 8, 9], modes),
    }
    poses = pose_errors(hem.angles, truth.angles, hem.shifts, truth.shifts)
    write_error_csv(out / "errors.csv", list(reports.values()) + [poses])
    table = format_error_table(reports)
    print("\nAmplitude errors against the ground truth (mean ± std of |error|, Å):")
    print(table)
    print(f"Paper (same case, 256 px): HEMNMA {PAPER_HEMNMA_MAE} Å after outlier removal, "
          f"network {PAPER_NETWORK_MAE} Å with 6,000 training images.")
    print(_training_line(stages["train"], len(kept.ids)))
    print(f"HEMNMA poses: angular error median {poses.angular_median:.1f}°, "
          f"shift error median {poses.shift_median:.2f} px")
    fig = point_cloud_figure(truth.amplitudes, test_truth.amplitudes, kept.amplitudes, pred.amplitudes)
    fig.savefig(out / "point_cloud.png", dpi=110)
    path = principal_path(kept.amplitudes, 12)  # through the HEMNMA cloud the network learned from
    write_multimodel_pdb(out / "trajectory_pc1.pdb", atoms, displace(atoms.coords, modes, path))
    (out / "errors.md").write_text(table + "\n")
    where = lambda prot, *p: os.path.abspath(prot._getExtraPath(*p))  # noqa: E731
    print(f"\nResults in {out}:")
    print("  errors.csv / errors.md   error report (Tables I-II format)")
    print("  point_cloud.png          amplitudes: truth (black), HEMNMA (blue), DeepHEMNMA (red) (Figure 3a)")
    print("  trajectory_pc1.pdb       motion along the first principal component of the HEMNMA cloud "
          "(ChimeraX/VMD)")
    print(f"Mode animations: {where(stages['nma'], 'animations')}")
    print(f"Trained model: {where(stages['train'], 'model')}")
    from .gui import shell_line
    folder = os.path.abspath(project.getPath())
    print(f"\nOpen the project in the Scipion GUI (Analyze results on a run shows its landscape):\n"
          f"  continuousflex-dl gui {folder}\n"
          f"which runs\n  {shell_line(folder)}")


def _training_line(train, n_kept: int) -> str:
    """What the network learned from, read from the trained model's config."""
    from .core.network.training import ModelFolder, best_epoch, source_of
    folder = Path(os.path.abspath(train._getExtraPath("model")))
    config = ModelFolder(folder).read_config()
    phases = source_of(config).phases(config)
    if not source_of(config).simulates:
        return f"The network learned from the HEMNMA amplitudes of {n_kept} particles."
    text = (f"The network learned from {config.optimiser.epochs * config.data.sim_images:,} particles simulated "
            f"from the reference (SNR {config.fitted.simulation.get('snr') or 0:.2f} estimated from the particles)")
    if len(phases) > 1:
        best = best_epoch(folder)
        text += (f", then {phases[1].epochs} epochs on the HEMNMA amplitudes of {n_kept} particles; "
                 f"it keeps the weights of epoch {best['epoch']} "
                 + ("(fine-tuned)" if best["source"] == "particles" else
                    "(simulated: fine-tuning did not lower the validation loss)"))
    return text + "."


def point_cloud_figure(train_truth, test_truth, hemnma, predicted):
    """The demo's Figure 3a: amplitudes (M, 3) Å of modes 7-9 of the true conformations (all
    particles), HEMNMA (training particles, outliers removed) and DeepHEMNMA (test particles)."""
    import numpy as np

    from .convert import SOURCE_GROUND_TRUTH, SOURCE_HEMNMA, SOURCE_NETWORK
    from .viewers.plots import plot_point_cloud
    sets = {f"ground truth ({len(train_truth) + len(test_truth)} particles)":
            np.concatenate([train_truth, test_truth]),
            f"HEMNMA ({len(hemnma)} training particles)": hemnma,
            f"DeepHEMNMA ({len(predicted)} test particles)": predicted}
    sources = dict(zip(sets, (SOURCE_GROUND_TRUTH, SOURCE_HEMNMA, SOURCE_NETWORK)))
    return plot_point_cloud(sets, [7, 8, 9], sources=sources, marker_size=10,
                            title="Conformational space (modes 7-9)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="continuousflex_dl demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("demo_output"),
                        help="folder for the Scipion project (default: ./demo_output)")
    parser.add_argument("--full", action="store_true",
                        help="the paper's size (256 px, 6000 training + 2000 test particles); needs a GPU "
                             "or hours of CPU")
    parser.add_argument("--particles", type=int, help="training particles (overrides the size preset)")
    parser.add_argument("--test-particles", type=int, help="test particles (overrides the size preset)")
    parser.add_argument("--epochs", type=int, help="training epochs (overrides the size preset)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    size = DemoSize.full() if args.full else DemoSize()
    if args.particles:
        size.n_particles = args.particles
    if args.test_particles:
        size.n_test = args.test_particles
    if args.epochs:
        size.epochs = args.epochs
    t0 = time.time()
    run_demo(args.output.absolute(), size, args.seed)
    _say(f"Demo finished in {time.time() - t0:.0f} s")
    return 0
