"""Viewer of the NMA protocol: mode table, eigenvalues/collectivity, displacement profiles, animations.

Reads only what the NMA run stored (mode table, precomputed displacement profiles): the
GUI process never parses a structure (ProDy cannot be imported under ``python -O``).
"""
import numpy as np
from pyworkflow.protocol import params
from pyworkflow.viewer import DESKTOP_TKINTER, ProtocolViewer

from .. import convert
from ..core.modes.nma import N_RIGID
from ..protocols import FlexDLProtNMA
from . import plots
from .views import ErrorDialogs, FigureView, TableRowsView


#: The y label of a displacement profile (two lines: one line is taller than the plot).
PROFILE_YLABEL = "Largest atom displacement\n(Å per Å of amplitude)"
#: The unit of the eigenvalues: the Hessian is linear in the spring constant ('Spring constant' on the form).
EIGENVALUE_LABEL = "Eigenvalue (× spring constant)"


def mode_table(rows) -> tuple:
    """``(header, rows)`` of the table of modes (rows of ``convert.modes_table``), read as the NMA
    summary counts them: modes 1-6 are rigid-body motions, never used as flexibility (no
    'Used' flag); the others are used when enabled (collectivity above the threshold)."""
    header = ["Mode", "Motion", EIGENVALUE_LABEL, "Collectivity (0-1)", "Score", "Used"]
    data = [(r["number"], "rigid body" if r["number"] <= N_RIGID else "flexible",
             "%.4g" % r["eigenvalue"] if r["eigenvalue"] is not None else "–", "%.3f" % r["collectivity"],
             "%.3f" % r["score"], "–" if r["number"] <= N_RIGID else "yes" if r["enabled"] else "no")
            for r in rows]
    return header, data


class FlexDLNMAViewer(ErrorDialogs, ProtocolViewer):
    """Inspect normal modes: which are enabled, how collective, which atoms move."""
    _label = "normal modes viewer"
    _targets = [FlexDLProtNMA]
    _environments = [DESKTOP_TKINTER]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("displayTable", params.LabelParam, label="Table of modes",
                      help="Every mode: rigid body (modes 1-6) or flexible, eigenvalue (in units of the "
                           "spring constant), collectivity (0: one atom moves, 1: all atoms move alike), "
                           "score, and whether the flexible mode is used (enabled: collectivity above the "
                           "threshold).")
        form.addParam("displayEigen", params.LabelParam, label="Eigenvalues and collectivity",
                      help="Bar plots over mode numbers; eigenvalues in units of the spring constant; "
                           "modes not used (rigid body or disabled) in grey.")
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
        header, data = mode_table(self._rows())
        return [TableRowsView(header, data, "Normal modes")]

    def _showEigen(self, param=None):
        rows = self._rows()
        fig = plots.plot_eigenvalues(np.array([r["eigenvalue"] for r in rows]),
                                     np.array([r["collectivity"] for r in rows]),
                                     np.array([r["enabled"] and r["number"] > N_RIGID for r in rows]),
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
                                       ylabel=PROFILE_YLABEL)

    def _showProfile(self, param=None):
        return [FigureView(self.profileFigure(), f"Mode {self.modeNumber.get()}", self._tkRoot)]

    def _showAnimation(self, param=None):
        row = self._modeRow()
        if not row["animation"]:
            return [self.infoMessage(f"Mode {row['number']} is a rigid-body mode: no animation.")]
        return [self.infoMessage(f"Animation of mode {row['number']}:\n{row['animation']}\n\n"
                                 f"ChimeraX: open the file, then 'coordset #1' plays it.\n"
                                 f"VMD: vmd {row['animation']}", "Mode animation")]

