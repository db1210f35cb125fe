"""The plugin as Scipion sees it: registered classes, citations, and help on every parameter."""
import pyworkflow.utils as pwutils
from pwem import Domain

import continuousflex_dl.bibtex as bibtex
from continuousflex_dl import protocols
from continuousflex_dl.tests.base import EXPECTED_PROTOCOLS


def _ours(mapping):
    return {k for k, v in mapping.items() if getattr(v, "__module__", "").startswith("continuousflex_dl")}


def test_scipion_finds_protocols_objects_and_viewers():
    assert _ours(Domain.getProtocols()) == EXPECTED_PROTOCOLS
    assert _ours(Domain.getObjects()) == {"FlexDLModel"}
    assert _ours(Domain.getViewers()) == {"FlexDLNMAViewer", "FlexDLTrainingViewer", "FlexDLFlexViewer",
                                          "FlexDLReconstructViewer"}


def test_citations_resolve_and_every_parameter_has_help():
    keys = set(pwutils.parseBibTex(bibtex.__doc__))
    for name in EXPECTED_PROTOCOLS:
        cls = getattr(protocols, name)
        prot = cls()
        assert set(prot._citations()) <= keys, (name, set(prot._citations()) - keys)
        for pname, param in prot._definition.iterParams():
            if type(param).__name__ in ("LabelParam", "Line", "Group"):
                continue
            if pname in ("runName", "runMode", "hostName", "numberOfThreads", "numberOfMpi",
                         "useQueue", "queueParams", "useQueueForSteps", "comment", "_useQueue"):
                continue
            assert param.help.get(), f"{name}.{pname} has no help text"
