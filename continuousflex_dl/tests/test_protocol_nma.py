"""The NMA protocol in a headless Scipion project."""
import os

import numpy as np
from pyworkflow.tests import setupTestProject

from continuousflex_dl import convert
from continuousflex_dl.core.modes.nma import compute_modes, subspace_overlap
from continuousflex_dl.core.imaging.structure import example_structure_path, load_atoms
from continuousflex_dl.protocols import FlexDLProtAlign, FlexDLProtNMA
from continuousflex_dl.tests.base import FlexDLTestBase


class TestProtNMA(FlexDLTestBase):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.structure = cls.importStructure()

    def test_modes_output(self):
        prot = self.newProtocol(FlexDLProtNMA, inputStructure=self.structure, numberOfModes=12,
                                collectivityThreshold=0.45)
        self.launchProtocol(prot)
        modes = prot.outputModes
        self.assertSetSize(modes, 12)
        rows = convert.modes_table(modes)
        self.assertEqual([r["number"] for r in rows], list(range(1, 13)))
        coll = np.array([r["collectivity"] for r in rows])
        enabled = np.array([r["enabled"] for r in rows])
        # Rigid modes stay enabled; non-rigid ones are enabled exactly when collective enough.
        self.assertTrue(enabled[:6].all())
        np.testing.assert_array_equal(enabled[6:], coll[6:] >= 0.45)
        self.assertFalse(enabled[6:].all(), "a 0.45 threshold should disable some of modes 7-12")
        for r in rows:
            self.assertTrue(os.path.exists(r["file"]))
            if r["number"] > 6:
                self.assertTrue(os.path.exists(r["animation"]))
        # The modes refer to the heavy atoms written as the output structure.
        atoms, vectors = convert.read_modes(modes, [7, 8, 9])
        self.assertEqual(atoms.n_atoms, 1656)
        reference = compute_modes(load_atoms(example_structure_path(), "heavy").coords, 12, 8.0)
        self.assertGreater(subspace_overlap(vectors, reference.vectors[6:9]), 0.999)
        self.assertEqual(modes.getPdb().getFileName(), prot.outputStructure.getFileName())
        self.assertEqual(convert.enabled_mode_numbers(modes), [7 + i for i in np.flatnonzero(enabled[6:])])
        # An empty mode list means the first three enabled non-rigid modes (some are disabled here).
        first_three = [7 + i for i in np.flatnonzero(enabled[6:])[:3]]
        self.assertEqual(convert.default_mode_numbers(modes), first_three)
        align = self.newProtocol(FlexDLProtAlign, inputModes=modes, modeList="")
        self.assertEqual(align._modeNumbers(), first_three)
        self.assertIn("first 3 enabled non-rigid modes", align.getParam("modeList").help.get())
        summary = "\n".join(prot.summary())
        self.assertIn("12 modes of 1656 atoms", summary)

    def test_too_many_modes_is_refused(self):
        prot = self.newProtocol(FlexDLProtNMA, inputStructure=self.structure, atomSelection=3,
                                customSelection="name CA and resnum 1 to 3", numberOfModes=20)
        errors = prot.validate()
        self.assertTrue(any("at most 3 modes" in e for e in errors), errors)

    def test_viewer(self):
        from continuousflex_dl.viewers import FlexDLNMAViewer
        prot = self.newProtocol(FlexDLProtNMA, inputStructure=self.structure, numberOfModes=10)
        self.launchProtocol(prot)
        viewer = FlexDLNMAViewer(project=self.proj)
        viewer.setProtocol(prot)
        table = viewer._showTable()[0]
        self.assertEqual(len(table.rows), 10)
        # Modes 1-6 are rigid-body motions, not "used": the table counts as the summary does.
        self.assertEqual([r[1:6:4] for r in table.rows[:6]], [("rigid body", "–")] * 6)
        used = sum(r[5] == "yes" for r in table.rows)
        self.assertIn(f"{used} of 4 non-rigid modes enabled", "\n".join(prot.summary()))
        viewer.modeNumber.set(8)
        profile = viewer._showProfile()[0]
        ax = profile._figure.axes[0]
        x, y = ax.lines[0].get_data()
        self.assertEqual(len(x), 214)  # one point per residue of adenylate kinase
        # Unit-norm mode: the squared per-atom displacements sum to 1, so the largest is below 1.
        self.assertTrue(0 < y.max() < 1)
        self.assertEqual(ax.get_title(), "Mode 8")
        # The run stored the profile: the largest per-atom norm of mode 8 in each residue.
        atoms, vectors = convert.read_modes(prot.outputModes, [8])
        norms, resnums = np.linalg.norm(vectors[0], axis=1), atoms.group.getResnums()
        np.testing.assert_array_equal(x, np.unique(resnums))
        np.testing.assert_allclose(y, [norms[resnums == r].max() for r in x], rtol=1e-7)
        profile.save(self.getOutputPath("profile.png"))
        self.assertTrue(os.path.getsize(self.getOutputPath("profile.png")) > 1000)
        eigen = viewer._showEigen()[0]
        bars = sum(len(c.patches) for c in eigen._figure.axes[0].containers)
        self.assertEqual(bars, 10)
        # A failing view reaches the user as an error dialog (pyworkflow would only print it).
        viewer.modeNumber.set(99)
        shown = []
        viewer.showError = lambda message, title="": shown.append(message)
        viewer._visualizeParam("displayProfile")
        self.assertEqual(shown, ["Mode 99 does not exist: choose 1-10."])
