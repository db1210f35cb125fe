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
                      help="Training and validation loss, validation MAE (mean absolute amplitude error, Å) "
                           "and learning rate per epoch; the phases (simulated training, fine-tuning) are "
                           "marked and the epoch whose weights the model keeps is ringed.")
        form.addParam("displayTable", params.LabelParam, label="Metrics table",
                      help="Every epoch: its phase, losses, validation MAE (Å), learning rate, speed "
                           "(images/s) and duration (s).")

    def _getVisualizeDict(self):
        return {"displayCurves": self._showCurves, "displayTable": self._showTable}

    def _rows(self):
        rows = self.protocol.metrics()
        if not rows:
            raise ValueError("No epoch finished yet: the curves appear after the first epoch.")
        return rows, self.protocol.phases(rows)

    def _showCurves(self, param=None):
        from ..core.network.training import best_epoch
        rows, phases = self._rows()
        kept = best_epoch(self.protocol._modelDir())
        figure = plots.plot_training_curves(rows, phases, int(kept["epoch"]) if kept else None)
        return [FigureView(figure, "Training curves", self._tkRoot)]

    def _showTable(self, param=None):
        from ..reports import metrics_table
        header, table = metrics_table(*self._rows())
        return [TableRowsView(header, table, "Training metrics", tkParent=self._tkRoot)]
