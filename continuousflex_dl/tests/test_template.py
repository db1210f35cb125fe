"""The workflow template loads into a project as the demo pipeline, wired output to input."""
import glob
import os

from pyworkflow.template import LocalTemplate
from pyworkflow.tests import BaseTest, setupTestProject

import continuousflex_dl
from continuousflex_dl.core.structure import example_structure_path


class TestTemplate(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)

    def test_template_loads_and_links(self):
        folder = os.path.join(os.path.dirname(continuousflex_dl.__file__), "templates")
        paths = glob.glob(os.path.join(folder, "*.json.template"))
        self.assertEqual(len(paths), 1)
        template = LocalTemplate("continuousflex_dl", paths[0])
        self.assertIn("DeepHEMNMA", template.description)
        template.replaceEnvVariables()
        template.parseContent()
        aliases = {p.getAlias() for p in template.params.values()}
        self.assertEqual(aliases, {"pdb", "ntrain", "ntest", "box", "pixel", "snr", "boxtest", "pixeltest", "snrtest", "epochs"})
        template.setParamValue("pdb", str(example_structure_path("4ake")))
        template.setParamValue("ntrain", "50")
        protocols = self.proj.loadProtocols(template.createTemplateFile())
        names = [type(p).__name__ for p in protocols.values()]
        self.assertEqual(names, ["ProtImportPdb", "FlexDLProtNMA", "FlexDLProtSynthesize",
                                 "FlexDLProtSynthesize", "FlexDLProtAlign", "FlexDLProtOutliers",
                                 "FlexDLProtTrain", "FlexDLProtPredict"])
        # Keys are the template's object ids.
        train_synth, test_synth = protocols["4"], protocols["5"]
        self.assertEqual(train_synth.numberOfImages.get(), 50)
        self.assertEqual(test_synth.numberOfImages.get(), 200)
        self.assertEqual(test_synth.seed.get(), 1)
        align = protocols["6"]
        self.assertIs(align.inputParticles.getObjValue(), train_synth)
        self.assertEqual(align.inputParticles.getExtended(), "outputParticles")
        predict = protocols["9"]
        self.assertIs(predict.inputModel.getObjValue(), protocols["8"])
        self.assertIs(predict.inputParticles.getObjValue(), test_synth)
