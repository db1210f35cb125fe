"""Drive the real Scipion GUI in an X server, as a user would, for test_demo.

Run as ``python -O gui_driver.py PROJECT RUN_ID OUT_DIR`` with DISPLAY set and the
environment of ``continuousflex-dl gui``. Opens the project window, selects run RUN_ID
and clicks "Analyze results", then shows the point cloud and the error table of the
viewer that opened; opens the selection window, lassos the middle of the cloud (through the
LassoSelector's callback), clicks "Create subset" and waits for that run, clicks a point for
its structure, and opens the image gallery. Saves a screenshot of each window in OUT_DIR and
what the windows hold in OUT_DIR/gui.json (or the traceback in OUT_DIR/error.txt). Not a
test module.
"""
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from PIL import ImageGrab
from pyworkflow.gui.project import ProjectWindow
from pyworkflow.project import Manager

from continuousflex_dl.viewers import selection as selection_view, views

STEP_MS = 1500  # between GUI actions, so windows are drawn before they are captured
SUBSET_TIMEOUT_S = 180  # for the subset run to finish


def grab(window, path: Path) -> str:
    """Screenshot of one toplevel window (raised first) as PNG."""
    window.lift()
    window.update()
    x, y = window.winfo_rootx(), window.winfo_rooty()
    box = (x, y, x + window.winfo_width(), y + window.winfo_height())
    ImageGrab.grab(bbox=box, xdisplay=os.environ["DISPLAY"]).save(path)
    return str(path)


def main(name: str, run_id: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shown = []
    for cls in (views.FigureView, views.TableRowsView, selection_view.SelectionView):  # every view shown
        def show(self, _original=cls.show):
            _original(self)
            shown.append(self)
        cls.show = show
    window = ProjectWindow(Manager().getProjectPath(name))
    root = window.root
    result = {"shots": {}}

    def fail():
        (out / "error.txt").write_text(traceback.format_exc())
        os._exit(1)

    def instances(type_name):
        return [o for o in gc.get_objects() if type(o).__name__ == type_name]

    def select_and_analyze():
        try:
            view, = instances("ProtocolsView")
            prot = window.project.getProtocol(run_id)
            view._selectItemProtocol(prot)
            result["summary"] = view.summaryText.getText()
            result["shots"]["project"] = grab(root, out / "project_window.png")
            # The viewer's form runs a nested main loop: schedule the next step first.
            root.after(STEP_MS, show_cloud)
            view.btnAnalyze.event_generate("<Button-1>")  # the "Analyze results" button
        except Exception:  # noqa: BLE001
            fail()

    def show_cloud():
        try:
            viewer, = [v for v in instances("FlexDLFlexViewer") if v.formWindow is not None]
            result["viewer"] = type(viewer).__name__
            result["overlays"] = [p.get().getObjId() for p in viewer.overlaySets]
            result["ground_truth"] = viewer.groundTruth.get().getObjId()
            result["modes"] = viewer.errorModes.get().getObjId()
            result["shots"]["form"] = grab(viewer.formWindow.root, out / "viewer_form.png")
            viewer._visualizeParam("displayCloud")  # the eye button of "Show the point cloud"
            cloud = shown[-1]
            ax = cloud.figure.axes[0]
            result["cloud"] = {"legend": [t.get_text() for t in ax.get_legend().get_texts()],
                               "points": [len(c._offsets3d[0]) for c in ax.collections]}
            root.after(STEP_MS, lambda: show_table(viewer, cloud))
        except Exception:  # noqa: BLE001
            fail()

    def show_table(viewer, cloud):
        try:
            result["shots"]["cloud"] = grab(cloud.window, out / "point_cloud_window.png")
            viewer._visualizeParam("displayErrors")
            table = shown[-1]
            table.window.update()
            tree, = [w for w in table.window.winfo_children() if w.winfo_class() == "Treeview"]
            from tkinter import font as tkfont
            heading = tkfont.nametofont("TkHeadingFont")
            columns = tree["columns"]
            result["table"] = {
                "header": table.header, "rows": [list(map(str, r)) for r in table.rows],
                "size": list(table.size()),
                "headers_fit": all(heading.measure(tree.heading(c)["text"]) < tree.column(c, "width")
                                   for c in columns),
                "columns_width": sum(tree.column(c, "width") for c in columns),
            }
            root.after(STEP_MS, lambda: select(viewer, table))
        except Exception:  # noqa: BLE001
            fail()

    def select(viewer, table):
        try:
            result["shots"]["table"] = grab(table.window, out / "error_table_window.png")
            viewer._visualizeParam("displaySelection")  # the eye button of "Select particles"
            view = shown[-1]
            sel = view.selection
            lo, hi = np.percentile(sel.points, [25, 75], axis=0)
            lasso = [(lo[0], lo[1]), (hi[0], lo[1]), (hi[0], hi[1]), ((lo[0] + hi[0]) / 2, hi[1] + 5),
                     (lo[0], hi[1])]
            view.lasso.onselect(lasso)  # what the LassoSelector calls when the mouse is released
            view.canvas.draw()
            result["selection"] = {"labels": list(sel.view.labels), "lasso": [list(map(float, v)) for v in lasso],
                                   "selected": sel.selected_ids.tolist(), "status": view.status.get()}
            subset = view.create_subset()  # the "Create subset" button
            result["selection"]["subset_run"] = subset.getObjId()
            result["selection"]["status_after"] = view.status.get()
            root.after(STEP_MS, lambda: click(viewer, view))
        except Exception:  # noqa: BLE001
            fail()

    def click(viewer, view):
        try:
            result["shots"]["selection"] = grab(view.window, out / "selection_window.png")
            path = view.show_structure(0)  # what a click on the first particle's point does
            result["structure"] = {"path": str(path), "id": int(view.selection.arrays.ids[0]),
                                   "status": view.status.get()}
            root.after(STEP_MS, lambda: show_gallery(viewer, view.structure_views[-1]))
        except Exception:  # noqa: BLE001
            fail()

    def show_gallery(viewer, structure):
        try:
            result["shots"]["structure"] = grab(structure.window, out / "structure_window.png")
            viewer._visualizeParam("displayGallery")  # the eye button of "Particles beside their fitted model"
            gallery = shown[-1]
            result["gallery"] = {"panels": [ax.get_label() for ax in gallery.figure.axes],
                                 "rows": [ax.get_ylabel() for ax in gallery.figure.axes if ax.get_label() == "particle"],
                                 "sort": viewer.gallerySort.get(), "count": viewer.galleryCount.get()}
            started = time.time()
            root.after(STEP_MS, lambda: wait_for_subset(gallery, started))
        except Exception:  # noqa: BLE001
            fail()

    def wait_for_subset(gallery, started):
        try:
            prot, = [r for r in window.project.getRuns(refresh=True)  # reads the run's own database
                     if r.getObjId() == result["selection"]["subset_run"]]
            if prot.isActive() and time.time() - started < SUBSET_TIMEOUT_S:
                root.after(1000, lambda: wait_for_subset(gallery, started))
                return
            result["shots"]["gallery"] = grab(gallery.window, out / "gallery_window.png")
            result["subset"] = {"status": prot.getStatus(), "error": prot.getErrorMessage(),
                                "ids": sorted(p.getObjId() for p in prot.outputParticles)
                                if hasattr(prot, "outputParticles") else None}
            view, = instances("ProtocolsView")
            view.refreshRuns()
            view._selectItemProtocol(prot)
            result["subset"]["summary"] = view.summaryText.getText()
            root.after(STEP_MS, finish)
        except Exception:  # noqa: BLE001
            fail()

    def finish():
        try:
            result["shots"]["project_with_subset"] = grab(root, out / "project_window_subset.png")
            result["prody_imported"] = "prody" in sys.modules
            (out / "gui.json").write_text(json.dumps(result, indent=1))
        except Exception:  # noqa: BLE001
            fail()
        os._exit(0)

    root.after(STEP_MS, select_and_analyze)
    window.show()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
