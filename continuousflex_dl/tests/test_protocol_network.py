"""DeepHEMNMA training and prediction protocols in a Scipion project."""
import os
import re

import numpy as np
from pyworkflow.tests import setupTestProject

from continuousflex_dl import convert
from continuousflex_dl.core.network.training import load_model
from continuousflex_dl.protocols import (FlexDLProtPredict, FlexDLProtSynthesize,
                                         FlexDLProtTrain)
from continuousflex_dl.tests.base import FlexDLTestBase


class TestProtNetwork(FlexDLTestBase):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.modes = cls.computeTestModes()
        common = dict(inputModes=cls.modes, modeList="7-9", boxSize=32, samplingRate=3.0,
                      inPlaneRotation=False, maxShift=0.0, applyCTF=False, addNoise=False)
        cls.train_set = cls.launchProtocol(cls.newProtocol(
            FlexDLProtSynthesize, numberOfImages=96, seed=1, **common)).outputParticles
        cls.test_set = cls.launchProtocol(cls.newProtocol(
            FlexDLProtSynthesize, numberOfImages=40, seed=2, **common)).outputParticles
        cls.bad_set = cls.launchProtocol(cls.newProtocol(
            FlexDLProtSynthesize, numberOfImages=5, seed=3, **common)).outputParticles
        cls.trunc_set = cls.launchProtocol(cls.newProtocol(
            FlexDLProtSynthesize, numberOfImages=3, seed=5, **common)).outputParticles
        # poseNormalise "no": this model is predicted with in-plane rotation averaging
        cls.train = cls.newProtocol(FlexDLProtTrain, inputParticles=cls.train_set, workingSize=0, epochs=2,
                                    batchSize=16, valFraction=0.2, seed=0, poseNormalise=2)
        cls.launchProtocol(cls.train)

    def test_train_then_predict(self):
        train = self.train
        model = train.outputModel
        self.assertEqual(model.getModes(), [7, 8, 9])
        self.assertEqual(model.getImageSize(), 32)
        self.assertAlmostEqual(model.getPixelSize(), 3.0)
        rows = train.metrics()
        self.assertEqual(len(rows), 2)
        from continuousflex_dl.viewers import FlexDLTrainingViewer
        viewer = FlexDLTrainingViewer(project=self.proj)
        viewer.setProtocol(train)
        curves = viewer._showCurves()[0]._figure
        self.assertEqual(list(curves.axes[0].lines[0].get_xdata()), [1, 2])  # one point per epoch
        self.assertEqual(load_model(model.getModelDir()).config.model.modes, [7, 8, 9])

        predict = self.newProtocol(FlexDLProtPredict, inputModel=model, inputParticles=self.test_set,
                                   rotations=2)
        self.launchProtocol(predict)
        self.assertIn("averaged over 2 in-plane rotations", predict.summary()[0])
        out = predict.outputParticles
        self.assertSetSize(out, 40)
        self.assertEqual(convert.flex_mode_numbers(out), [7, 8, 9])
        pred = convert.read_particles(out, need_amplitudes=True)
        truth = convert.read_particles(self.test_set, need_amplitudes=True)
        self.assertEqual(pred.amplitudes.shape, (40, 3))
        self.assertTrue(np.all(np.isfinite(pred.amplitudes)))
        # Two epochs on 77 images learn little, but the outputs are amplitudes in Å on the
        # scale of the training targets (standardisation undone), not standardised values.
        self.assertLess(np.abs(pred.amplitudes.mean(0) - truth.amplitudes.mean(0)).max(), 100.0)
        self.assertGreater(pred.amplitudes.std(), 1.0)

    def test_pose_normalised_model_remembers_it_and_needs_poses_to_predict(self):
        """'auto' turns and centres the images of particles with poses; the model's config says
        so, prediction uses the particles' own poses, and particles without poses are refused with
        what to do."""
        from pwem.constants import ALIGN_NONE
        from pwem.objects import SetOfParticles
        from continuousflex_dl.core.imaging.dataset import POSES_NEEDED
        train = self.newProtocol(FlexDLProtTrain, inputParticles=self.train_set, workingSize=16, epochs=1,
                                 batchSize=16, valFraction=0.2, seed=0)
        self.assertTrue(train._poseNormalise())
        self.assertFalse(self.newProtocol(FlexDLProtTrain, inputParticles=self.train_set,
                                          predictPose=True)._poseNormalise())
        self.launchProtocol(train)
        self.assertTrue(load_model(train.outputModel.getModelDir()).config.preprocessing.pose_normalise)
        self.assertTrue(any("pose normalisation" in line for line in train.summary()), train.summary())
        predict = self.newProtocol(FlexDLProtPredict, inputModel=train.outputModel, inputParticles=self.test_set)
        self.launchProtocol(predict)
        self.assertIn("each image turned and centred by its own pose", predict.summary()[0])
        self.assertSetSize(predict.outputParticles, 40)
        rotated = self.newProtocol(FlexDLProtPredict, inputModel=train.outputModel, inputParticles=self.test_set,
                                   rotations=4)
        self.assertTrue(any("to 1" in e for e in rotated.validate()), rotated.validate())
        unaligned = SetOfParticles(filename=self.proj.getTmpPath("unaligned.sqlite"))
        unaligned.copyInfo(self.test_set)
        unaligned.setAlignment(ALIGN_NONE)
        for particle in self.test_set.iterItems(limit=2):
            particle.setTransform(None)
            unaligned.append(particle)
        unaligned.write()
        predict = self.newProtocol(FlexDLProtPredict, inputModel=train.outputModel)
        predict.inputParticles.set(unaligned)
        self.assertEqual(predict.validate(), [POSES_NEEDED])
        asked = self.newProtocol(FlexDLProtTrain, poseNormalise=1, predictPose=True)
        asked.inputParticles.set(self.train_set)
        self.assertTrue(any("'Also predict the pose?' to No" in e for e in asked.validate()), asked.validate())

    def test_form_checks_the_window_with_the_rule_training_uses(self):
        """32 px of 3 Å: a 97 Å window is 32 px (rounded) and trains, so the form accepts it; a
        100 Å window (33 px) and a working size above the window are refused with the fix."""
        def errors(**kwargs):
            return self.newProtocol(FlexDLProtTrain, inputParticles=self.train_set, **kwargs).validate()
        self.assertEqual(errors(window=97.0, workingSize=16), [])
        self.assertTrue(any("at most 96 Å" in e for e in errors(window=100.0, workingSize=16)))
        self.assertTrue(any("make it at most 20" in e for e in errors(window=60.0, workingSize=24)))

    def test_predict_refuses_a_different_box(self):
        from continuousflex_dl.objects import FlexDLModel
        model = FlexDLModel(modelDir="/nonexistent")
        model.setImageSize(64)
        model.setPixelSize(3.0)
        prot = self.newProtocol(FlexDLProtPredict, inputParticles=self.test_set)
        prot.inputModel.set(model)
        errors = prot.validate()
        self.assertTrue(any("96.0 Å" in e and "192.0 Å" in e for e in errors), errors)

    def test_predict_refuses_nan_and_blank_particles_by_id(self):
        import mrcfile
        parts = convert.read_particles(self.bad_set)
        with mrcfile.open(parts.stacks[0], mode="r+") as mrc:
            mrc.data[parts.indices[parts.ids == 2][0], 4, 4] = np.nan
            mrc.data[parts.indices[parts.ids == 4][0]] = 0.0
        predict = self.newProtocol(FlexDLProtPredict, inputModel=self.train.outputModel, inputParticles=self.bad_set)
        with self.assertRaises(Exception):
            self.launchProtocol(predict)
        log = self.runLog(predict)
        self.assertIn("Particles with ids [2] contain NaN or infinite pixels", log)
        self.assertIn("Particles with ids [4] are constant images", log)
        self.assertFalse(hasattr(predict, "outputParticles"))
        # The chunk process's reason is the protocol's error text, whole.
        self.assertIn("predict-chunk rows 0-5: Particles with ids [2] contain NaN or infinite pixels (1 of 5 "
                      "images); Particles with ids [4] are constant images", predict.getErrorMessage())

    def test_predict_says_which_stack_is_truncated(self):
        stack = convert.read_particles(self.trunc_set).stacks[0]
        with open(stack, "r+b") as f:
            f.truncate(os.path.getsize(stack) - 100)  # the last image loses 100 bytes
        predict = self.newProtocol(FlexDLProtPredict, inputModel=self.train.outputModel,
                                   inputParticles=self.trunc_set)
        with self.assertRaises(Exception):
            self.launchProtocol(predict)
        self.assertRegex(predict.getErrorMessage(), rf"predict-chunk rows 0-3: .*{re.escape(os.path.basename(stack))}"
                                                    rf".* is truncated")

    def test_train_on_simulated_particles_then_fine_tune(self):
        """Noisy particles with CTFs: a simulated epoch matched to them, then a fine-tuning epoch,
        through a 72 Å window Fourier-cropped to 16 px."""
        noisy = self.launchProtocol(self.newProtocol(
            FlexDLProtSynthesize, inputModes=self.modes, modeList="7-9", boxSize=32, samplingRate=3.0,
            inPlaneRotation=True, maxShift=2.0, applyCTF=True, defocusMin=8000.0, defocusMax=12000.0,
            addNoise=True, snr=0.5, numberOfImages=60, seed=4)).outputParticles
        settings = dict(inputParticles=noisy, workingSize=16, window=72.0, epochs=1, batchSize=16,
                        valFraction=0.2, simImages=48, finetuneEpochs=1)
        missing = self.newProtocol(FlexDLProtTrain, trainingData=3, **settings)
        self.assertTrue(any("needs the normal modes" in e for e in missing.validate()), missing.validate())
        self.assertEqual(self.newProtocol(FlexDLProtTrain, **settings)._trainingData(), "particles")  # auto, GT
        train = self.newProtocol(FlexDLProtTrain, trainingData=3, inputModes=self.modes, **settings)
        self.launchProtocol(train)
        self.assertEqual([r["epoch"] for r in train.metrics()], ["1", "2"])
        config = load_model(train.outputModel.getModelDir()).config
        pre = config.preprocessing
        self.assertEqual((config.data.source, pre.window, pre.window_px, pre.input_size(config.fitted.image_size)),
                         ("simulated+finetune", 72.0, 24, 16))
        self.assertAlmostEqual(config.fitted.simulation["snr"], 0.5, delta=0.15)
        self.assertLessEqual(config.fitted.simulation["max_shift_px"], 2.0)
        self.assertGreater(config.fitted.simulation["max_shift_px"], 1.5)  # the particles' shifts, within ±2 px
        summary = train.summary()
        self.assertEqual(summary[0], "2 epochs: simulated training (epoch 1), then fine-tuning on the "
                                     "particles' amplitudes (epoch 2).")
        self.assertTrue(summary[3].startswith("Training data: simulated, then fine-tuned on the particles ("))
        log = self.runLog(train)
        self.assertIn("epoch 1/2 (simulated)", log)
        self.assertIn("epoch 2/2 (particles)", log)

    def test_continue_with_changed_settings(self):
        """Continue after a finished run: a changed learning rate is refused, more epochs continue it."""
        train = self.newProtocol(FlexDLProtTrain, inputParticles=self.train_set, workingSize=16, epochs=1,
                                 batchSize=16, valFraction=0.2, seed=0, lrSchedule=1)  # plateau
        self.launchProtocol(train)
        first = train.metrics()
        self.assertEqual([r["epoch"] for r in first], ["1"])
        train.learningRate.set(1e-4)
        with self.assertRaises(Exception):
            self.launchProtocol(train)
        log = self.runLog(train)
        self.assertIn("learning_rate: 0.002 -> 0.0001", log)
        self.assertIn("Restart", log)
        self.assertEqual(train.metrics(), first)  # nothing was overwritten
        train.learningRate.set(2e-3)
        train.epochs.set(2)
        self.launchProtocol(train)
        rows = train.metrics()
        self.assertEqual([r["epoch"] for r in rows], ["1", "2"])
        self.assertEqual(rows[0], first[0])  # epoch 1 kept, epoch 2 trained from its checkpoint
        # 'Invert contrast?' reads the images with the opposite sign, and a run trained on the
        # other sign is not continued with it: the particles' data changed.
        parts = convert.read_particles(self.train_set)
        plain = train._imageSource(parts).read([0, 1])
        train.invertContrast.set(True)
        np.testing.assert_array_equal(train._imageSource(parts).read([0, 1]), -plain)
        with self.assertRaises(Exception):
            self.launchProtocol(train)
        self.assertIn("particles", self.runLog(train))
        self.assertEqual(train.metrics(), rows)
