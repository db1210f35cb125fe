"""The Scipion plugin class (registered through the ``pyworkflow.plugin`` entry point)."""
import pwem

from . import __version__

_references = ["Hamitouche2022", "Hamitouche2021", "Jin2014"]


class Plugin(pwem.Plugin):
    """continuousflex_dl needs no external binaries: everything is pip-installed Python."""
    # pyworkflow locates a plugin through its class's module; the class lives here only so that
    # importing the package stays free of Scipion, so name the package as its module.
    __module__ = "continuousflex_dl"
    _url = "https://github.com/continuousflex-dl/scipion-em-continuousflex-dl"
    _supportedVersions = [__version__]

    @classmethod
    def _defineVariables(cls):
        # No environment variables: nothing to locate outside the Python environment.
        pass

    @classmethod
    def defineBinaries(cls, env):
        # Pure Python; dependencies come from pip (setup.py).
        pass

    def getTemplates(self):
        """The workflow templates, with the example structure and tied fields filled
        (:mod:`continuousflex_dl.workflow_template`)."""
        from .workflow_template import FlexDLTemplate
        return [FlexDLTemplate(t.source, t.templatePath) for t in super().getTemplates()]
