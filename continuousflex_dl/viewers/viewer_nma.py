"""Viewer of the NMA protocol: mode table, eigenvalues/collectivity, displacement profiles, animations.

Reads only what the NMA run stored (mode table, precomputed displacement profiles): the
GUI process never parses a structure (ProDy cannot be imported under ``python -O``).
"""
import numpy as np
from pyworkflow.protocol import params
from pyworkflow.viewer import DESKTOP_TKINTER, ProtocolViewer

from .. import convert
from ..protocols import FlexDLProtNMA
from . import plots
from .views import ErrorDialogs, FigureView, TableRowsView


class FlexDLNMAViewer(ErrorDialogs, ProtocolViewer):
    """Inspect normal modes: which are enabled, how collective, which atoms move."""
    _label = "normal modes viewer"
    _targets = [FlexDLProtNMA]
    _environments = [DESKTOP_TKINTER]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("displayTable", params.LabelParam, label="Table of modes",
                      help="Eigenvalue, collectivity, score and enabled flag of every mode.")
        form.addParam("displayEigen", params.LabelParam, label="Eigenvalues and collectivity",
                      help="Bar plots over mode numbers; disabled modes in grey.")
        form.addParam("modeNumber", params.IntParam, default=7, label="Mode",
                      help="Mode number (7 is the first non-rigid mode).")
        form.addParam("displayProfile", params.LabelParam, label="Displacement profile of the mode",
                      help="How far each atom moves along the mode (unit-norm vector), by residue.")
        form.addParam("displayAnimation", params.LabelParam, label="Animation file of the mode",
                      help="Where the multi-model PDB of the mode is; open it in ChimeraX or VMD "
                           "and play the models as a movie.")

    def _getVisualizeDict(self):
        return {"displayTable": self._showTable, "displayEigen": self._showEigen,
                "displayProfile": self._showProfile, "displayAnimation": self._showAnimation}

    def _rows(self):
        return convert.modes_table(self.protocol.outputModes)

    def _showTable(self, param=None):
        header = ["Mode", "Eigenvalue", "Collectivity", "Score", "Enabled"]
        data = [(r["number"], "%.5g" % r["eigenvalue"], "%.3f" % r["collectivity"], "%.3f" % r["score"],
                 "yes" if r["enabled"] else "no") for r in self._rows()]
        return [TableRowsView(header, data, "Normal modes")]

    def _showEigen(self, param=None):
        rows = self._rows()
        fig = plots.plot_eigenvalues(np.array([r["eigenvalue"] for r in rows]),
                                     np.array([r["collectivity"] for r in rows]),
                                     np.array([r["enabled"] for r in rows]),
                                     [r["number"] for r in rows])
        return [FigureView(fig, "Eigenvalues and collectivity", self._tkRoot)]

    def _modeRow(self):
        number = self.modeNumber.get()
        rows = {r["number"]: r for r in self._rows()}
        if number not in rows:
            raise ValueError(f"Mode {number} does not exist: choose 1-{max(rows)}.")
        return rows[number]

    def profileFigure(self):
        """The displacement profile Figure of the chosen mode (headless)."""
        number = self._modeRow()["number"]
        residues, profile = self.protocol.modeProfile(number)
        return plots.plot_mode_profile(profile, residues, mode_number=number,
                                       ylabel="Largest atom displacement (Å per Å of amplitude)")

    def _showProfile(self, param=None):
        return [FigureView(self.profileFigure(), f"Mode {self.modeNumber.get()}", self._tkRoot)]

    def _showAnimation(self, param=None):
        row = self._modeRow()
        if not row["animation"]:
            return [self.infoMessage(f"Mode {row['number']} is a rigid-body mode: no animation.")]
        return [self.infoMessage(f"Animation of mode {row['number']}:\n{row['animation']}\n\n"
                                 f"ChimeraX: open the file, then 'coordset #1' plays it.\n"
                                 f"VMD: vmd {row['animation']}", "Mode animation")]

