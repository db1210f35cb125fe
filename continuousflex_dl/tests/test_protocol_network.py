"""DeepHEMNMA training and prediction protocols in a Scipion project."""
import numpy as np
from pyworkflow.tests import BaseTest, setupTestProject

from continuousflex_dl import convert
from continuousflex_dl.core.training import load_model
from continuousflex_dl.protocols import (FlexDLProtPredict, FlexDLProtSynthesize,
                                         FlexDLProtTrain)
from continuousflex_dl.tests.test_protocol_nma import compute_test_modes


class TestProtNetwork(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        common = dict(inputModes=compute_test_modes(cls), modeList="7-9", boxSize=32, samplingRate=3.0,
                      inPlaneRotation=False, maxShift=0.0, applyCTF=False, addNoise=False)
        cls.train_set = cls.launchProtocol(cls.newProtocol(
            FlexDLProtSynthesize, numberOfImages=96, seed=1, **common)).outputParticles
        cls.test_set = cls.launchProtocol(cls.newProtocol(
            FlexDLProtSynthesize, numberOfImages=40, seed=2, **common)).outputParticles

    def test_train_then_predict(self):
        train = self.newProtocol(FlexDLProtTrain, inputParticles=self.train_set, workingSize=0, epochs=2,
                                 batchSize=16, valFraction=0.2, seed=0)
        self.launchProtocol(train)
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
        self.assertEqual(load_model(model.getModelDir()).config.modes, [7, 8, 9])

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

    def test_predict_refuses_a_different_box(self):
        from continuousflex_dl.objects import FlexDLModel
        model = FlexDLModel(modelDir="/nonexistent")
        model.setImageSize(64)
        model.setPixelSize(3.0)
        prot = self.newProtocol(FlexDLProtPredict, inputParticles=self.test_set)
        prot.inputModel.set(model)
        errors = prot.validate()
        self.assertTrue(any("96.0 Å" in e and "192.0 Å" in e for e in errors), errors)
