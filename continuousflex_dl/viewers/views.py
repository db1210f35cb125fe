"""Scipion Views of this plugin's viewers (a matplotlib Figure, a table) and their error dialogs."""
import logging
from typing import List, Sequence, Tuple

from pyworkflow.viewer import View

logger = logging.getLogger(__name__)


class ErrorDialogs:
    """Mixin for a ProtocolViewer: an error while building or showing a view opens an
    error dialog (pyworkflow would only print it in the terminal). A ValueError shows
    its message (it says what to do); any other error its type too."""

    def _visualizeParam(self, paramName=None):
        try:
            super()._visualizeParam(paramName)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the user must see it
            logger.exception("Viewer %s: %s failed", type(self).__name__, paramName)
            text = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            self.showError(text, "Cannot show this")


class FigureView(View):
    """Show ``figure`` (a matplotlib Figure built by viewers.plots) in its own window."""

    def __init__(self, figure, title: str = "continuousflex_dl", tkParent=None):
        View.__init__(self)
        self._figure = figure
        self._title = title
        self._parent = tkParent
        self.window = None

    @property
    def figure(self):
        return self._figure

    def show(self):
        import tkinter as tk
        from matplotlib.backends.backend_tkagg import FigureCanvasTkAgg, NavigationToolbar2Tk
        window = tk.Toplevel(self._parent) if self._parent is not None else tk.Tk()
        window.title(self._title)
        canvas = FigureCanvasTkAgg(self._figure, master=window)
        NavigationToolbar2Tk(canvas, window).update()
        canvas.get_tk_widget().pack(fill=tk.BOTH, expand=True)
        canvas.draw()
        self.window = window

    def save(self, path, dpi: int = 100):
        """Write the figure (PNG, PDF, SVG from the suffix); used by tests and scripts."""
        self._figure.savefig(path, dpi=dpi)
        return path


def column_widths(header: Sequence[str], rows: Sequence[Sequence], measure_header, measure_cell,
                  padding: int = 24) -> List[int]:
    """Pixel width of each column: its widest header or cell text, plus ``padding``.
    measure_header, measure_cell: text -> pixels (tkinter Font.measure of each font)."""
    widths = [measure_header(str(h)) for h in header]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"A table row has {len(row)} values for {len(header)} columns.")
        widths = [max(w, measure_cell(str(v))) for w, v in zip(widths, row)]
    return [w + padding for w in widths]


class TableRowsView(View):
    """A table (header + rows) in its own window, sized to its content: every column as
    wide as its widest text, every row visible (up to ``max_rows``, then a scroll bar),
    with an optional message (e.g. where the CSV is) above it."""

    def __init__(self, header, rows, title: str = "continuousflex_dl", message: str = "",
                 tkParent=None, max_rows: int = 25):
        View.__init__(self)
        self.header = list(header)
        self.rows = [tuple(r) for r in rows]
        self._title = title
        self.message = message
        self._parent = tkParent
        self._max_rows = max_rows
        self.window = None

    def size(self) -> Tuple[int, int]:
        """(width, height) in pixels the window asks for (after :meth:`show`)."""
        self.window.update_idletasks()
        return self.window.winfo_reqwidth(), self.window.winfo_reqheight()

    def show(self):
        import tkinter as tk
        from tkinter import font as tkfont
        from tkinter import ttk
        window = tk.Toplevel(self._parent) if self._parent is not None else tk.Tk()
        window.title(self._title)
        cell_font = tkfont.nametofont("TkDefaultFont")
        heading_font = tkfont.nametofont("TkHeadingFont")
        widths = column_widths(self.header, self.rows, heading_font.measure, cell_font.measure)
        height = max(1, min(len(self.rows), self._max_rows))
        style = ttk.Style(window)
        style.configure("CFDL.Treeview", rowheight=cell_font.metrics("linespace") + 6)
        columns = [f"c{i}" for i in range(len(self.header))]
        tree = ttk.Treeview(window, columns=columns, show="headings", height=height, style="CFDL.Treeview")
        for col, text, width in zip(columns, self.header, widths):
            tree.heading(col, text=text)
            tree.column(col, width=width, minwidth=width, anchor="w" if col == "c0" else "e", stretch=True)
        for i, row in enumerate(self.rows):
            tree.insert("", "end", values=[str(v) for v in row], tags=("odd" if i % 2 else "even",))
        tree.tag_configure("odd", background="#eeeeee")
        row = 0
        if self.message:
            ttk.Label(window, text=self.message, wraplength=max(sum(widths), 300), justify="left",
                      padding=(8, 6)).grid(row=0, column=0, columnspan=2, sticky="w")
            row = 1
        tree.grid(row=row, column=0, sticky="nsew")
        if len(self.rows) > height:
            bar = ttk.Scrollbar(window, orient=tk.VERTICAL, command=tree.yview)
            tree.configure(yscrollcommand=bar.set)
            bar.grid(row=row, column=1, sticky="ns")
        window.grid_columnconfigure(0, weight=1)
        window.grid_rowconfigure(row, weight=1)
        self.window = window
