"""ContinuousFlex's own HEMNMA test case through Scipion, against Xmipp's answer.

The SPIDER stack of 10 synthetic adenylate kinase images (128 px, 1 Å/px) is imported with
pwem's ProtImportParticles, the normal modes of AK.pdb are computed by this plugin's NMA
protocol, and FlexDLProtAlign aligns the images with modes 7-8. On the 9 images where Xmipp
converged, the poses must agree with Xmipp's within 1° and 0.2 Å (Xmipp aligned the
stack resized to 2 Å/px: its shifts are converted to Å), and the amplitudes must
correlate above 0.99 with Xmipp's, mode by mode (their scale may differ: Xmipp's modes here
come from its own NMA of the same structure). Data: tests/data/continuousflex/README.md.
"""
import os

import numpy as np
from pwem.convert.transformations import euler_matrix
from pwem.protocols import ProtImportParticles, ProtImportPdb
from pyworkflow.tests import BaseTest, setupTestProject

from continuousflex_dl.core.imaging.geometry import scipion_matrix_to_pose
from continuousflex_dl.protocols import FlexDLProtAlign, FlexDLProtNMA

DATA = os.path.join(os.path.dirname(__file__), "data", "continuousflex")
#: Xmipp's cost of a converged image here is 0.0017-0.0024; image 4's is 0.077.
CONVERGED_COST = 0.01
#: Å/px of the images Xmipp aligned: scipion-em-continuousflex's test resizes the stack by a
#: factor 0.5 (XmippProtCropResizeParticles, 64 px) before its HEMNMA, so the gold shifts are
#: in pixels of 2 Å (the imported stack has 1 Å/px).
GOLD_PIXEL = 2.0


def read_xmipp_gold(path):
    """{itemId: (angles (3,) deg, shifts (2,) px, amplitudes (2,) Å, cost)} of an Xmipp
    metadata file (XMIPP_STAR_1: a loop of labels, one row per image; the displacements are a
    quoted vector)."""
    labels, rows = [], {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("_"):
                labels.append(line[1:])
            elif labels and line and not line.startswith(("#", "data_", "loop_")):
                head, vector, tail = line.split("'")
                values = dict(zip(labels, head.split() + [vector] + tail.split()))
                rows[int(values["itemId"])] = (
                    np.array([float(values[k]) for k in ("angleRot", "angleTilt", "anglePsi")]),
                    np.array([float(values["shiftX"]), float(values["shiftY"])]),
                    np.array([float(v) for v in values["nmaDisplacements"].split()]),
                    float(values["cost"]))
    return rows


def xmipp_to_scipion_matrix(angles, shifts):
    """The Scipion Transform (ALIGN_PROJ) of Xmipp's angles and shifts, as scipion-em-xmipp's
    ``matrixFromGeometry(shifts, angles, inverseTransform=True)`` builds it."""
    m = euler_matrix(*(-np.deg2rad(angles)), axes="szyz")
    m[:3, 3] = -np.array([shifts[0], shifts[1], 0.0])
    return np.linalg.inv(m)


class TestContinuousFlexGold(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        imp = cls.newProtocol(ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_FILES,
                              filesPath=DATA, filesPattern="smallstack_img.stk", samplingRate=1.0,
                              haveDataBeenPhaseFlipped=False)
        cls.launchProtocol(imp)
        cls.particles = imp.outputParticles
        pdb = cls.newProtocol(ProtImportPdb, inputPdbData=1, pdbFile=os.path.join(DATA, "AK.pdb"))
        cls.launchProtocol(pdb)
        nma = cls.newProtocol(FlexDLProtNMA, inputStructure=pdb.outputPdb, numberOfModes=10,
                              atomSelection=2)
        cls.launchProtocol(nma)
        cls.align = cls.newProtocol(FlexDLProtAlign, inputParticles=cls.particles, inputModes=nma.outputModes,
                                    modeList="7-8", maxShift=8.0)
        cls.launchProtocol(cls.align)

    def test_poses_and_amplitudes_match_xmipp(self):
        self.assertEqual(self.particles.getFirstItem().getFileName().rsplit(".", 1)[-1], "stk")
        gold = read_xmipp_gold(os.path.join(DATA, "images_PM_atoms_smallstack.xmd"))
        out = {p.getObjId(): p.clone() for p in self.align.outputParticles}
        self.assertEqual(sorted(out), sorted(gold))
        converged = [i for i in sorted(gold) if gold[i][3] < CONVERGED_COST]
        self.assertEqual(len(converged), 9)
        angle_err, shift_err, ours, theirs = [], [], [], []
        for i in converged:
            angles, shifts, amplitudes, _ = gold[i]
            m_gold = xmipp_to_scipion_matrix(angles, shifts * GOLD_PIXEL / 1.0)  # -> px of 1 Å
            m_ours = out[i].getTransform().getMatrix()
            r = m_ours[:3, :3] @ m_gold[:3, :3].T
            angle_err.append(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1))))
            s_ours = scipion_matrix_to_pose(m_ours[None])[1][0]
            s_gold = scipion_matrix_to_pose(m_gold[None])[1][0]
            shift_err.append(np.linalg.norm(s_ours - s_gold) * 1.0)  # px of 1 Å -> Å
            ours.append(out[i].getZFlex())
            theirs.append(amplitudes)
        ours, theirs = np.array(ours), np.array(theirs)
        corr = [np.corrcoef(ours[:, k], theirs[:, k])[0, 1] for k in range(2)]
        scale = [np.polyfit(theirs[:, k], ours[:, k], 1)[0] for k in range(2)]
        print(f"ContinuousFlex gold, 9 converged images: angle error {min(angle_err):.2f}-{max(angle_err):.2f} "
              f"deg, shift error {min(shift_err):.3f}-{max(shift_err):.3f} Å, amplitude correlation "
              f"{corr[0]:.4f} / {corr[1]:.4f}, scale {scale[0]:.3f} / {scale[1]:.3f}")
        self.assertLess(max(angle_err), 1.0)
        self.assertLess(max(shift_err), 0.2)
        self.assertGreater(min(corr), 0.99)
