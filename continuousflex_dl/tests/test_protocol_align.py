"""HEMNMA alignment and outlier removal protocols on synthetic particles with known truth."""
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
from pyworkflow.tests import setupTestProject

from continuousflex_dl import convert
from continuousflex_dl.core.hemnma.alignment_job import AlignmentJob, chunk_path, run_chunk
from continuousflex_dl.core.landscape.analysis import amplitude_errors, pose_errors
from continuousflex_dl.core.chunks import chunk_error_path, read_chunk
from continuousflex_dl.core.hemnma.image_model import ImageModel
from continuousflex_dl.core.hemnma.alignment import AlignConfig, reference_count
from continuousflex_dl.protocols import (FlexDLProtAlign, FlexDLProtOutliers,
                                         FlexDLProtSynthesize, FlexDLProtTrain)
from continuousflex_dl.protocols.protocol_outliers import DISTANCE_ATTR
from continuousflex_dl.tests.base import FlexDLTestBase

N_IMAGES = 16


class TestProtAlign(FlexDLTestBase):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.modes = cls.computeTestModes()
        synth = cls.newProtocol(FlexDLProtSynthesize, inputModes=cls.modes, modeList="7-9",
                                numberOfImages=N_IMAGES, boxSize=48, samplingRate=2.0, maxShift=2.0,
                                applyCTF=False, addNoise=False, seed=11)
        cls.launchProtocol(synth)
        cls.truth = synth.outputParticles
        cls.align = cls.newProtocol(FlexDLProtAlign, inputParticles=cls.truth, inputModes=cls.modes,
                                    modeList="7-9", workingSize=48, chunkSize=8, effort=0, maxShift=3.0)
        cls.launchProtocol(cls.align)

    def test_alignment_recovers_the_truth(self):
        out = self.align.outputParticles
        self.assertSetSize(out, N_IMAGES)
        self.assertEqual(convert.flex_mode_numbers(out), [7, 8, 9])
        est = convert.read_particles(out, need_amplitudes=True)
        gt = convert.read_particles(self.truth, need_amplitudes=True)
        np.testing.assert_array_equal(est.ids, gt.ids)
        amp = amplitude_errors(est.amplitudes, gt.amplitudes)
        pose = pose_errors(est.angles, gt.angles, est.shifts, gt.shifts)
        print(f"HEMNMA protocol, {N_IMAGES} clean 48 px images: amplitude MAE {amp.mean_abs_error:.2f} Å, "
              f"angular error median {pose.angular_median:.2f} deg, shift median {pose.shift_median:.2f} px")
        # Clean images made with the same image model: the alignment must find the truth almost exactly
        # (measured: 1e-4 Å, 1e-5 deg); noisy and CTF cases are covered by the core tests and the bench.
        self.assertLess(amp.mean_abs_error, 2.0)
        self.assertLess(pose.angular_median, 1.0)
        self.assertLess(pose.shift_median, 0.1)
        self.assertTrue(all(hasattr(p, "_cfdlScore") for p in out))
        # Each particle carries its amplitude uncertainty, a list in the order of zFlex.
        stds = np.array([[float(v) for v in getattr(p, convert.ZFLEX_STD_ATTR)] for p in out])
        self.assertEqual(stds.shape, (N_IMAGES, 3))
        self.assertTrue(np.all(np.isfinite(stds) & (stds >= 0)))
        # ... the honest one (core.hemnma.reliability), at least the Laplace one; and its pose
        # reliability, near 1 for these clean images of the alignment's own image model.
        reliability = np.array([getattr(p, convert.RELIABILITY_ATTR).get() for p in out])
        with np.load(self.align._resultFile()) as data:
            np.testing.assert_allclose(stds, data["reliability_amplitude_std"], rtol=1e-6)
            self.assertTrue(np.all(stds >= data["amplitude_std"] * (1 - 1e-6)))
            np.testing.assert_allclose(reliability, data["reliability_reliability"], rtol=1e-6)
        self.assertGreater(reliability.mean(), 0.9)
        summary = "\n".join(self.align.summary())
        self.assertIn("Uncertainty (Laplace standard deviation", summary)
        self.assertIn(f"{int(np.sum(reliability >= 0.5))} of {N_IMAGES} particles reliable", summary)
        self.assertIn("Pixel size checked: the images fit", summary)
        self.assertNotIn("WARNING", summary)
        self.assertIn("Amplitude errors against the ground truth (16 particles", summary)
        # Amplitudes well inside the default range: none at its limit, and the summary says so.
        self.assertIn("Particles with an amplitude at a limit of the range (grown where answers "
                      "reached it): 0.0 %.", summary)

    def test_training_on_hemnma_amplitudes_finds_their_modes_through_the_project(self):
        """No modes in the training form: those of the alignment the particles come from, so
        'auto' trains on the simulated stream then fine-tunes, and the form says which modes."""
        train = self.newProtocol(FlexDLProtTrain, inputParticles=self.align.outputParticles)
        self.assertEqual(train._modes().getObjId(), self.modes.getObjId())
        self.assertEqual(train._trainingData(), "simulated+finetune")
        self.assertFalse([e for e in train.validate() if "normal modes" in e], train.validate())
        self.assertIn("found through the project", train.summary()[-1])
        truth = self.newProtocol(FlexDLProtTrain, inputParticles=self.truth)  # ground truth: not looked up
        self.assertIsNone(truth._modes())
        self.assertEqual(truth._trainingData(), "particles")

    def test_chunks_are_reused_only_when_inputs_match(self):
        folder = self.align._getExtraPath()
        job_fp = AlignmentJob.load(folder).fingerprint()
        chunk0, chunk1 = chunk_path(folder, 0, 8), chunk_path(folder, 8, 16)
        before = read_chunk(chunk1).arrays["amplitudes"]
        mtime0 = os.path.getmtime(chunk0)
        os.remove(chunk1)  # as if the run had stopped during chunk 1
        self.assertFalse(run_chunk(folder, 0, 8, job_fp)[1])
        self.assertTrue(run_chunk(folder, 8, 16, job_fp)[1])
        self.assertEqual(os.path.getmtime(chunk0), mtime0)
        # Recomputed in float32, possibly with another thread count: equal to 0.01 Å.
        np.testing.assert_allclose(read_chunk(chunk1).arrays["amplitudes"], before, atol=1e-2)
        # A job folder prepared for other settings is refused, not mixed in.
        with self.assertRaisesRegex(ValueError, "prepared for other inputs or settings"):
            run_chunk(folder, 0, 8, "0" * 64)
        # The command line each chunk step runs says the same, and keeps an up-to-date chunk.
        command = [sys.executable, "-m", "continuousflex_dl", "align-chunk", folder, "--rows", "8", "16",
                   "--threads", "1"]
        refused = subprocess.run(command + ["--fingerprint", "0" * 64], capture_output=True, text=True)
        self.assertEqual(refused.returncode, 1)
        self.assertIn("prepared for other inputs or settings", refused.stderr)
        mtime1 = os.path.getmtime(chunk1)
        kept = subprocess.run(command + ["--fingerprint", job_fp], capture_output=True, text=True)
        self.assertEqual(kept.returncode, 0, kept.stderr)
        self.assertIn("up to date", kept.stdout)
        self.assertEqual(os.path.getmtime(chunk1), mtime1)

    def test_one_box_rule_for_a_network_relative_to_its_own_box(self):
        """Alignment seeded by a network and prediction refuse particles whose box in Å differs
        from the network's by more than 1 % of the network's box (the scale error of the
        Fourier-cropped images the network sees): 95.045 Å against the particles' 96 Å is a
        1.005 % error, refused by both (alignment divided by the particles' box before: 0.995 %)."""
        from continuousflex_dl.objects import FlexDLModel
        from continuousflex_dl.protocols import FlexDLProtPredict

        def box_errors(model_pixel_size):
            model = FlexDLModel(modelDir="")
            model.setImageSize(32)
            model.setPixelSize(model_pixel_size)  # the particles: 48 px at 2 Å/px = 96 Å
            align = self.newProtocol(FlexDLProtAlign, inputParticles=self.truth, inputModes=self.modes,
                                     modeList="7-9")
            predict = self.newProtocol(FlexDLProtPredict, inputParticles=self.truth)
            align.inputModel.set(model)
            predict.inputModel.set(model)
            return [[e for e in prot.validate() if "boxes" in e] for prot in (align, predict)]

        refused = box_errors(95.045 / 32)
        self.assertEqual(refused[0], refused[1])
        self.assertEqual(refused[0], ["The particles cover 96.0 Å (48 px at 2 Å/px) but the network was trained on "
                                      "95.0 Å boxes (32 px at 2.97016 Å/px). Re-extract or window the particles to "
                                      "the same box in Å, or use a network trained on boxes of the particles' size "
                                      "in Å."])
        self.assertEqual(box_errors(95.05 / 32), [[], []])  # 0.9995 %
        self.assertEqual(box_errors(3.0), [[], []])

    def test_a_cluster_jobs_refusal_reaches_the_step(self):
        """With 'Use queue for steps', runJob returns when the job ends, whatever its exit status:
        the chunk step reads the reason the job left beside its chunk file."""
        from continuousflex_dl.protocols.base import ChunkFailed
        folder = self.align._getExtraPath()
        chunk1 = chunk_path(folder, 8, 16)
        mtime1 = os.path.getmtime(chunk1)
        ran = []

        def queued_job(program, arguments, **kwargs):  # as a queue's runJob: no exception on failure
            ran.append(subprocess.run(shlex.split(program) + [str(a) for a in arguments]).returncode)

        self.align.useQueueForSteps = lambda: True
        self.align.runJob = queued_job
        self.align._plan = (8, 2)
        try:
            with self.assertRaises(ChunkFailed) as caught:
                self.align._runChunkStep("align-chunk", folder, 8, 16, "0" * 64, "aligned")
        finally:
            del self.align.useQueueForSteps, self.align.runJob
            os.remove(chunk_error_path(folder, 8, 16))
        self.assertEqual(ran, [1])
        self.assertRegex(str(caught.exception), r"^align-chunk rows 8-16: The alignment job in .* was prepared for "
                                                r"other inputs or settings")
        self.assertEqual(os.path.getmtime(chunk1), mtime1)
        # A local chunk killed before it could say why (out of memory: SIGKILL) is said to be so.

        def killed(program, arguments, **kwargs):
            raise subprocess.CalledProcessError(-9, program)

        self.align.runJob = killed
        try:
            with self.assertRaisesRegex(ChunkFailed, r"^align-chunk rows 8-16 stopped without giving a reason "
                                                     r"\(.*died with <Signals.SIGKILL: 9>\.\); it may have been "
                                                     r"killed \(out of memory\?\)"):
                self.align._runChunkStep("align-chunk", folder, 8, 16, "0" * 64, "aligned")
        finally:
            del self.align.runJob

    def test_outlier_removal_keeps_the_central_particles(self):
        prot = self.newProtocol(FlexDLProtOutliers, inputParticles=self.truth, fraction=0.25, robust=False)
        self.launchProtocol(prot)
        kept = prot.outputParticles
        self.assertSetSize(kept, 12)
        gt = convert.read_particles(self.truth, need_amplitudes=True)
        centre = gt.amplitudes.mean(axis=0)
        cov = np.cov(gt.amplitudes.T)
        d = np.sqrt(np.einsum("ij,jk,ik->i", gt.amplitudes - centre, np.linalg.pinv(cov), gt.amplitudes - centre))
        expected = set(gt.ids[np.argsort(d)[:12]].tolist())
        self.assertEqual({p.getObjId() for p in kept}, expected)
        for p in kept:
            self.assertAlmostEqual(getattr(p, DISTANCE_ATTR).get(), d[list(gt.ids).index(p.getObjId())], places=6)

    def test_outlier_removal_by_uncertainty(self):
        est = convert.read_particles(self.align.outputParticles, need_amplitudes=True)
        worst = est.amplitude_std.max(1)
        limit = float(np.median(worst))
        prot = self.newProtocol(FlexDLProtOutliers, inputParticles=self.align.outputParticles, fraction=0.0,
                                maxUncertainty=limit)
        self.launchProtocol(prot)
        self.assertEqual({p.getObjId() for p in prot.outputParticles}, set(est.ids[worst <= limit].tolist()))
        self.assertIn(f"{int(np.sum(worst > limit))} particles removed for an amplitude uncertainty",
                      "\n".join(prot.summary()))
        # The landscape viewer colours the cloud by the same uncertainty.
        from continuousflex_dl.viewers.viewer_flex import COLOR_UNCERTAINTY, cloud_figure
        fig = cloud_figure([self.align.outputParticles], color_by=COLOR_UNCERTAINTY)
        shown = next(c for c in fig.axes[0].collections if c.get_array() is not None).get_array()
        np.testing.assert_allclose(np.sort(np.asarray(shown)), np.sort(np.linalg.norm(est.amplitude_std, axis=1)),
                                   rtol=1e-6)

    def test_outlier_removal_by_reliability(self):
        """The clean particles are all reliable (the calibration particles' poses were all right): a
        smallest reliability of 0.5 keeps them all, one above them all is refused with the fix, and
        a set without reliabilities (the ground truth) too."""
        est = convert.read_particles(self.align.outputParticles, need_amplitudes=True)
        self.assertTrue(np.all(est.reliability > 0.9), est.reliability)
        prot = self.newProtocol(FlexDLProtOutliers, inputParticles=self.align.outputParticles, fraction=0.0,
                                minReliability=0.5)
        self.launchProtocol(prot)
        self.assertSetSize(prot.outputParticles, N_IMAGES)
        for particles, limit, message in ((self.align.outputParticles, 0.999, "pose reliability below 0.999"),
                                          (self.truth, 0.5, "carry no pose reliability")):
            prot = self.newProtocol(FlexDLProtOutliers, inputParticles=particles, fraction=0.0, minReliability=limit)
            with self.assertRaises(Exception):
                self.launchProtocol(prot)
            log = "".join(open(path).read() for path in prot.getLogPaths()[:2])
            self.assertIn(message, log)

    def test_nan_images_are_refused_with_their_ids(self):
        import mrcfile
        synth = self.newProtocol(FlexDLProtSynthesize, inputModes=self.modes, modeList="7-9", numberOfImages=4,
                                 boxSize=32, samplingRate=3.0, applyCTF=False, addNoise=False, seed=5)
        self.launchProtocol(synth)
        stack = convert.read_particles(synth.outputParticles).stacks[0]
        with mrcfile.open(stack, mode="r+") as mrc:
            mrc.data[2, 5, 5] = np.nan  # particle id 3
        align = self.newProtocol(FlexDLProtAlign, inputParticles=synth.outputParticles, inputModes=self.modes,
                                 modeList="7-9", workingSize=32)
        with self.assertRaises(Exception):
            self.launchProtocol(align)
        self.assertIn("ids [3] contain NaN", self.runLog(align))
        # The reason is the protocol's error text, whole (from a chunk process it was only the exit
        # status; the pixel-size check in the conversion step may now be the one that refuses).
        self.assertRegex(align.getErrorMessage(), r"(align-chunk rows \d-4: )?Particles with ids \[3\] contain NaN or "
                                                  r"infinite pixels \(1 of \d images\)\. They carry no usable "
                                                  r"signal: remove them \(make a subset without them\) before "
                                                  r"aligning\.")

    def test_invert_contrast_reads_the_opposite_sign(self):
        """White-on-black particles read with 'Invert contrast' look inverted: HEMNMA refuses them
        with the fix (so the option reaches the images, and the check the run)."""
        align = self.newProtocol(FlexDLProtAlign, inputParticles=self.truth, inputModes=self.modes,
                                 modeList="7-9", workingSize=48, chunkSize=N_IMAGES, effort=0, maxShift=3.0,
                                 invertContrast=True)
        with self.assertRaises(Exception):
            self.launchProtocol(align)
        log = self.runLog(align)
        self.assertIn("contrast-inverted", log)
        self.assertIn("Invert contrast", log)
        self.assertIn("contrast-inverted", align.getErrorMessage())

    def test_network_first_answer(self):
        """A (poorly trained) pose network seeds the alignment: its poor answers go through the
        global search, the result stays right, and the summary says how many took each path."""
        synth = self.newProtocol(FlexDLProtSynthesize, inputModes=self.modes, modeList="7-9", numberOfImages=40,
                                 boxSize=32, samplingRate=3.0, maxShift=2.0, applyCTF=False, addNoise=False,
                                 seed=12)   # the same 96 Å box as the particles to align
        self.launchProtocol(synth)
        train = self.newProtocol(FlexDLProtTrain, inputParticles=synth.outputParticles, workingSize=16,
                                 epochs=1, batchSize=8, valFraction=0.2, predictPose=True, seed=0)
        self.launchProtocol(train)
        seeded = self.newProtocol(FlexDLProtAlign, inputParticles=self.truth, inputModes=self.modes,
                                  modeList="7-9", workingSize=48, chunkSize=N_IMAGES, effort=0, maxShift=3.0,
                                  inputModel=train.outputModel)
        self.launchProtocol(seeded)
        est = convert.read_particles(seeded.outputParticles, need_amplitudes=True)
        gt = convert.read_particles(self.truth, need_amplitudes=True)
        self.assertLess(amplitude_errors(est.amplitudes, gt.amplitudes).mean_abs_error, 2.0)
        with np.load(seeded._resultFile()) as data:
            paths = np.bincount(data["path"].astype(int), minlength=3)
        self.assertEqual(paths.sum(), N_IMAGES)
        self.assertEqual(paths[0], reference_count(N_IMAGES, AlignConfig().seed_reference))  # 8 references
        summary = "\n".join(seeded.summary())
        self.assertIn(f"Paths: {paths[1]} particles from the network's answer, {paths[0]} by the global search",
                      summary)

    def test_image_model_refinement(self):
        """'Refine the image model' on particles made with HEMNMA's own image model: the fit finds
        (about) that model, the result stays right, the summary gives the fitted values, and the
        job (so every chunk) differs from the unrefined one's, so a Continue never mixes them."""
        align = self.newProtocol(FlexDLProtAlign, inputParticles=self.truth, inputModes=self.modes,
                                 modeList="7-9", workingSize=48, chunkSize=N_IMAGES, effort=0, maxShift=3.0,
                                 refineImageModel=True, modelFitParticles=10)
        self.launchProtocol(align)
        est = convert.read_particles(align.outputParticles, need_amplitudes=True)
        gt = convert.read_particles(self.truth, need_amplitudes=True)
        self.assertLess(amplitude_errors(est.amplitudes, gt.amplitudes).mean_abs_error, 2.0)
        with np.load(align._resultFile()) as data:
            fitted = ImageModel.from_dict(json.loads(str(data["image_model"])))
        print(f"Image model refined on {N_IMAGES} of HEMNMA's own images: {fitted.describe()}")
        self.assertEqual(fitted.fit["images"], 10)
        self.assertTrue(np.all(np.abs(np.log(fitted.type_weights)) < 0.2), fitted.describe())
        self.assertLess(abs(fitted.b_factor), 15.0)
        self.assertIn("Image model refined on 10 particles: weights C 1.00", "\n".join(align.summary()))
        job = AlignmentJob.load(align._getExtraPath())
        self.assertNotEqual(job.fingerprint(), AlignmentJob.load(self.align._getExtraPath()).fingerprint())
        job.image_model = None
        with self.assertRaisesRegex(ValueError, "no fitted model yet: Continue"):
            job.align(np.zeros((1, 48, 48), np.float32), 0, 1)

    def test_threads_run_one_chunk_fewer_at_a_time(self):
        def chunk_intervals(prot):
            return [(s.initTime.datetime(), s.endTime.datetime()) for s in prot.loadSteps()
                    if s.funcName.get() == "alignChunkStep"]

        help_text = self.align.getParam("numberOfThreads").help.get()
        self.assertIn("N threads run N-1 chunks at the same time", help_text)
        self.assertEqual(self.align.numberOfThreads.get(), 3)  # the default: two chunks at once
        (a0, a1), (b0, b1) = chunk_intervals(self.align)
        self.assertTrue(a0 < b1 and b0 < a1, "with 3 threads the 2 chunks should have run together")
        # 2 threads: one chunk after the other.
        synth = self.newProtocol(FlexDLProtSynthesize, inputModes=self.modes, modeList="7-9", numberOfImages=4,
                                 boxSize=32, samplingRate=3.0, applyCTF=False, addNoise=False, seed=8)
        self.launchProtocol(synth)
        serial = self.newProtocol(FlexDLProtAlign, inputParticles=synth.outputParticles, inputModes=self.modes,
                                  modeList="7-9", workingSize=32, chunkSize=2, effort=0, numberOfThreads=2)
        self.launchProtocol(serial)
        (a0, a1), (b0, b1) = sorted(chunk_intervals(serial))
        self.assertLessEqual(a1, b0)

    def test_form_refuses_rigid_modes_and_a_box_smaller_than_the_structure(self):
        align = self.newProtocol(FlexDLProtAlign, inputParticles=self.truth, inputModes=self.modes, modeList="6-8")
        errors = align.validate()
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("Modes [6] are rigid-body motions", errors[0])
        align.modeList.set("7-9")
        self.assertEqual(align.validate(), [])
        particles = align.inputParticles.get()
        try:  # the same 48 px particles, as if at 1 Å/px: 48 Å for a 61.8 Å structure
            particles.setSamplingRate(1.0)
            errors = align.validate()
        finally:
            particles.setSamplingRate(2.0)
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("The particles' box is 48 px x 1 Å/px = 48 Å, smaller than the structure (62 Å", errors[0])

    def test_outlier_removal_keeping_no_particle_fails_clearly(self):
        prot = self.newProtocol(FlexDLProtOutliers, inputParticles=self.truth, criterion=1, threshold=0.01)
        with self.assertRaises(Exception):
            self.launchProtocol(prot)
        log = "".join(open(path).read() for path in prot.getLogPaths()[:2])
        self.assertIn("No particle is within the distance threshold 0.01", log)
        self.assertFalse(hasattr(prot, "outputParticles"))

    def test_damaged_stacks_are_refused_at_the_form(self):
        synth = self.newProtocol(FlexDLProtSynthesize, inputModes=self.modes, modeList="7-9", numberOfImages=4,
                                 boxSize=32, samplingRate=3.0, applyCTF=False, addNoise=False, seed=6)
        self.launchProtocol(synth)
        stack = convert.read_particles(synth.outputParticles).stacks[0]
        align = self.newProtocol(FlexDLProtAlign, inputParticles=synth.outputParticles, inputModes=self.modes,
                                 modeList="7-9", workingSize=32)
        self.assertEqual(align.validate(), [])
        with open(stack, "rb") as f:
            sound = f.read()
        self.assertEqual(len(sound), 1024 + 4 * 32 * 32 * 4)
        try:
            with open(stack, "wb") as f:
                f.write(bytes(1024) + sound[1024:])
            errors = "\n".join(align.validate())
            self.assertIn("the MRC header is damaged", errors)
            self.assertNotIn("too small", errors)
            with open(stack, "wb") as f:
                f.write(sound[:1024 + 32 * 32 * 4 * 3])  # 3 of 4 images
            errors = "\n".join(align.validate())
            self.assertIn("is truncated: 13,312 bytes where its header promises 4 images of 32 x 32 px "
                          "(17,408 bytes); only 3 images are complete", errors)
        finally:
            with open(stack, "wb") as f:
                f.write(sound)


class TestProtAlignContinue(FlexDLTestBase):
    """Stop a run, change the chunk size and the mode list, Continue: the output must be what
    an uninterrupted run with the new settings gives (issue 13, part 2)."""
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.modes = cls.computeTestModes()
        # Clean particles displaced along modes 7 and 8 only: an alignment with modes 7-8 finds them.
        synth = cls.newProtocol(FlexDLProtSynthesize, inputModes=cls.modes, modeList="7-8", amplitudeRelation=1,
                                amplitudeScale=100.0, numberOfImages=12, boxSize=32, samplingRate=3.0,
                                maxShift=2.0, applyCTF=False, addNoise=False, seed=4)
        cls.launchProtocol(synth)
        cls.truth = synth.outputParticles

    def test_continue_after_changing_chunk_size_and_modes(self):
        align = self.newProtocol(FlexDLProtAlign, inputParticles=self.truth, inputModes=self.modes,
                                 modeList="7-9", workingSize=32, chunkSize=6, effort=0, maxShift=3.0)
        self.proj.launchProtocol(align, wait=False)
        chunks = os.path.join(self.proj.getPath(align.workingDir.get()), "extra", "chunks")
        deadline = time.time() + 300
        while not [f for f in glob.glob(os.path.join(chunks, "*.npz")) if ".tmp" not in f]:
            self.assertLess(time.time(), deadline, "the first chunk never appeared")
            time.sleep(0.1)
        self.proj.stopProtocol(align)  # killed during the second chunk (or just after it)
        self.assertTrue(align.isAborted(), align.getStatusMessage())
        align.chunkSize.set(3)
        align.modeList.set("7-8")
        self.launchProtocol(align)  # Continue (run mode 'resume')

        out = align.outputParticles
        self.assertSetSize(out, 12)
        self.assertEqual(convert.flex_mode_numbers(out), [7, 8])
        est = convert.read_particles(out, need_amplitudes=True)
        gt = convert.read_particles(self.truth, need_amplitudes=True)
        np.testing.assert_array_equal(est.ids, gt.ids)
        errors = np.abs(est.amplitudes - gt.amplitudes)
        print(f"Continued HEMNMA, 12 clean 32 px images, modes 7-8: amplitude errors max {errors.max():.2f} Å")
        # Every particle carries its own amplitudes (a row of another particle is ~100 Å off).
        self.assertLess(errors.max(), 5.0)
        self.assertIn("12 particles aligned with modes [7, 8]", "\n".join(align.summary()))

    def _align(self, **settings):
        return self.newProtocol(FlexDLProtAlign, inputParticles=self.truth, inputModes=self.modes, modeList="7-8",
                                workingSize=32, chunkSize=6, effort=0, maxShift=3.0, **settings)

    def test_a_damaged_chunk_of_a_finished_run_is_computed_again_on_continue(self):
        """Issue 31: a truncated chunk file of a finished step made every Continue fail; now
        Continue computes it again, and the log says so."""
        align = self._align()
        self.launchProtocol(align)
        folder = align._getExtraPath()
        with np.load(align._resultFile()) as data:
            before = {k: data[k] for k in data.files}
        original = read_chunk(chunk_path(folder, 0, 6)).arrays
        damaged = chunk_path(folder, 0, 6)
        damaged.write_bytes(damaged.read_bytes()[:300])
        self.assertIsNone(read_chunk(damaged))
        self.launchProtocol(align)  # Continue
        log = self.runLog(align)
        self.assertRegex(log, rf"The chunk file {re.escape(str(damaged))} is damaged \(.*\): removed; its step computes rows 0-6 "
                              rf"again\.")
        self.assertRegex(log, r"rows 0-6: 6 particles aligned")  # ... and it did
        recomputed = read_chunk(damaged).arrays
        for key, value in original.items():  # float32 on another thread count: equal to round-off
            np.testing.assert_allclose(recomputed[key], value, atol=1e-2, err_msg=key)
        with np.load(align._resultFile()) as data:
            for key, value in before.items():
                np.testing.assert_array_equal(data[key], value, err_msg=key)
        self.assertSetSize(align.outputParticles, 12)

    def test_a_full_disk_is_said_clearly_and_continue_completes(self):
        """Issue 31: a chunk process on a full disk gave a raw OSError traceback and left its
        temporary file. Here each align-chunk process's np.savez writes part of the file, then
        fails with ENOSPC (a sitecustomize on PYTHONPATH for this run only)."""
        patch = os.path.join(self.getOutputPath(), "full_disk")
        os.makedirs(patch, exist_ok=True)
        with open(os.path.join(patch, "sitecustomize.py"), "w") as f:
            f.write("import sys\n"
                    "if 'align-chunk' in sys.argv:\n"
                    "    import errno, numpy\n"
                    "    def savez(*file, **arrays):\n"
                    "        open(file[0], 'wb').write(b'PK' + bytes(1000))\n"
                    "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
                    "    numpy.savez = savez\n")
        align = self._align()
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([patch] + ([saved] if saved else []))
        try:
            with self.assertRaises(Exception):
                self.launchProtocol(align)
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
        chunks = os.path.abspath(os.path.join(align._getExtraPath(), "chunks"))
        error = align.getErrorMessage()
        self.assertRegex(error, rf"align-chunk rows (0-6|6-12): No space left on the disk of {re.escape(chunks)}: writing a "
                                rf"file of about \d+ kB failed \(.* free\)\. Free some space there, then Continue "
                                rf"the run\.")
        self.assertNotIn("[Errno 28]", self.runLog(align))  # the chunk's reason, not a raw OSError traceback
        self.assertEqual([f for f in os.listdir(chunks) if ".tmp" in f], [])
        self.launchProtocol(align)  # Continue, once space is free
        self.assertSetSize(align.outputParticles, 12)
        self.assertEqual([f for f in os.listdir(chunks) if not f.endswith(".npz")], [])  # reasons gone
