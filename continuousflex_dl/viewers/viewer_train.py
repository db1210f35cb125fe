"""Training curves of a DeepHEMNMA model."""
from pyworkflow.protocol import params
from pyworkflow.viewer import DESKTOP_TKINTER, ProtocolViewer

from ..protocols import FlexDLProtTrain
from . import plots
from .views import ErrorDialogs, FigureView, TableRowsView


class FlexDLTrainingViewer(ErrorDialogs, ProtocolViewer):
    """Loss and validation error per epoch, read from the model's metrics.csv."""
    _label = "training curves"
    _targets = [FlexDLProtTrain]
    _environments = [DESKTOP_TKINTER]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("displayCurves", params.LabelParam, label="Training curves",
                      help="Training and validation loss, validation MAE (Å) and learning rate per epoch.")
        form.addParam("displayTable", params.LabelParam, label="Metrics table",
                      help="The rows of metrics.csv.")

    def _getVisualizeDict(self):
        return {"displayCurves": self._showCurves, "displayTable": self._showTable}

    def _showCurves(self, param=None):
        rows = self.protocol.metrics()
        if not rows:
            raise ValueError("No epoch finished yet.")
        return [FigureView(plots.plot_training_curves(rows), "Training curves", self._tkRoot)]

    def _showTable(self, param=None):
        rows = self.protocol.metrics()
        if not rows:
            raise ValueError("No epoch finished yet.")
        header = list(rows[0])
        return [TableRowsView(header, [[r[h] for h in header] for r in rows], "Training metrics",
                              tkParent=self._tkRoot)]
