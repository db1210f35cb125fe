"""The FSC of a reconstruction's half maps."""
from pyworkflow.protocol import params
from pyworkflow.viewer import DESKTOP_TKINTER, ProtocolViewer

from ..core.landscape.reconstruction import read_fsc_csv
from ..protocols import FlexDLProtReconstruct
from .plot_fsc import plot_fsc
from .views import FigureView, TableRowsView


class FlexDLReconstructViewer(ProtocolViewer):
    """Gold-standard FSC between the half maps, as a plot and as a table (from the FSC file)."""
    _label = "FSC"
    _targets = [FlexDLProtReconstruct]
    _environments = [DESKTOP_TKINTER]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("displayFSC", params.LabelParam, label="FSC plot",
                      help="FSC between the masked half maps against spatial frequency; the legend gives "
                           "the resolution where it falls below 0.143.")
        form.addParam("displayTable", params.LabelParam, label="FSC table",
                      help="Shell, frequency (1/Å), resolution (Å) and FSC of every shell.")

    def _getVisualizeDict(self):
        return {"displayFSC": self._showFSC, "displayTable": self._showTable}

    def _curve(self):
        return read_fsc_csv(self.protocol.fscFile())

    def _showFSC(self, param=None):
        try:
            freq, curve = self._curve()
        except ValueError as exc:
            return [self.errorMessage(str(exc))]
        return [FigureView(plot_fsc({"half maps": (freq, curve)}), "FSC", self._tkRoot)]

    def _showTable(self, param=None):
        try:
            freq, curve = self._curve()
        except ValueError as exc:
            return [self.errorMessage(str(exc))]
        rows = [[s, "%.4f" % f, "%.2f" % (1 / f) if f > 0 else "inf", "%.3f" % c]
                for s, (f, c) in enumerate(zip(freq, curve))]
        return [TableRowsView(["shell", "frequency (1/Å)", "resolution (Å)", "FSC"], rows, "FSC")]
