"""A Scipion View that shows a ready-made matplotlib Figure in a Tk window."""
from pyworkflow.viewer import View


class FigureView(View):
    """Show ``figure`` (a matplotlib Figure built by viewers.plots) in its own window."""

    def __init__(self, figure, title: str = "continuousflex_dl", tkParent=None):
        View.__init__(self)
        self._figure = figure
        self._title = title
        self._parent = tkParent

    def show(self):
        import tkinter as tk
        from matplotlib.backends.backend_tkagg import FigureCanvasTkAgg, NavigationToolbar2Tk
        window = tk.Toplevel(self._parent) if self._parent is not None else tk.Tk()
        window.title(self._title)
        canvas = FigureCanvasTkAgg(self._figure, master=window)
        NavigationToolbar2Tk(canvas, window).update()
        canvas.get_tk_widget().pack(fill=tk.BOTH, expand=True)
        canvas.draw()

    def save(self, path, dpi: int = 100):
        """Write the figure (PNG, PDF, SVG from the suffix); used by tests and scripts."""
        self._figure.savefig(path, dpi=dpi)
        return path


class TableRowsView(View):
    """A table (header + rows) shown with pwem's TableView, built only when shown
    (pwem's TableView opens a Tk window as soon as it is constructed)."""

    def __init__(self, header, rows, title: str = "continuousflex_dl"):
        View.__init__(self)
        self.header = list(header)
        self.rows = [tuple(r) for r in rows]
        self._title = title

    def show(self):
        from pwem.viewers.views import TableView
        TableView(self.header, self.rows, None, self._title, height=min(len(self.rows), 25)).show()
