"""The workflow template loads into a project as the demo pipeline, wired output to input,
with a default structure that exists and the test particles' images tied to the training ones."""
import json
import os

from pyworkflow.template import Validations
from pyworkflow.tests import BaseTest, setupTestProject

from continuousflex_dl.core.imaging.structure import example_structure_path
from continuousflex_dl.plugin import Plugin


class TestTemplate(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)

    def _template(self):
        templates = Plugin().getTemplates()  # what Scipion's template tools list
        self.assertEqual(len(templates), 1)
        template = templates[0]
        self.assertIn("DeepHEMNMA", template.description)
        template.replaceEnvVariables()
        template.parseContent()
        return template

    def test_template_loads_and_links(self):
        template = self._template()
        params = {p.getAlias(): p for p in template.params.values()}
        # The test set's box, pixel size and SNR are not asked: they follow the training set's.
        self.assertEqual(set(params), {"pdb", "ntrain", "ntest", "box", "pixel", "snr", "epochs"})
        # Every default passes the kickoff form's validation (the structure is a file that exists).
        self.assertEqual({a: Validations.check(p.getValue(), p.getType()) for a, p in params.items()},
                         {a: None for a in params})
        self.assertEqual(params["pdb"].getValue(), str(example_structure_path("4ake")))
        template.setParamValue("ntrain", "50")
        template.setParamValue("box", "48")
        template.setParamValue("pixel", "2.5")
        template.setParamValue("snr", "0.05")
        path = template.createTemplateFile()
        with open(path) as f:
            self.assertEqual(json.load(f)[0]["pdbFile"], str(example_structure_path("4ake")))
        protocols = self.proj.loadProtocols(path)
        os.remove(path)
        names = [type(p).__name__ for p in protocols.values()]
        self.assertEqual(names, ["ProtImportPdb", "FlexDLProtNMA", "FlexDLProtSynthesize",
                                 "FlexDLProtSynthesize", "FlexDLProtAlign", "FlexDLProtOutliers",
                                 "FlexDLProtTrain", "FlexDLProtPredict"])
        # Keys are the template's object ids.
        train_synth, test_synth = protocols["4"], protocols["5"]
        self.assertEqual(train_synth.numberOfImages.get(), 50)
        self.assertEqual(test_synth.numberOfImages.get(), 200)
        self.assertEqual(test_synth.seed.get(), 1)
        for synth in (train_synth, test_synth):
            self.assertEqual((synth.boxSize.get(), synth.samplingRate.get(), synth.snr.get()), (48, 2.5, 0.05))
        align = protocols["6"]
        self.assertIs(align.inputParticles.getObjValue(), train_synth)
        self.assertEqual(align.inputParticles.getExtended(), "outputParticles")
        predict = protocols["9"]
        self.assertIs(predict.inputModel.getObjValue(), protocols["8"])
        self.assertIs(predict.inputParticles.getObjValue(), test_synth)
