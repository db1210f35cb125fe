"""Point Scipion (pyworkflow) at a self-contained folder, for tests, the demo and the GUI.

Must run before anything imports pyworkflow: pyworkflow reads its environment
once, at import time. Imports nothing from Scipion itself.
"""
import os
import sys
from pathlib import Path
from typing import Dict, Mapping, Optional

#: The GUI's font: draws 'Å' whole in Tk text boxes, and ships with most Linux systems.
GUI_FONT = "DejaVu Sans"

HOSTS_CONF = ("[localhost]\n"
              "PARALLEL_COMMAND = mpirun -np %_(JOB_NODES)d --map-by node %_(COMMAND)s\n")


def write_hosts_conf(folder: Path) -> Path:
    """``folder/hosts.conf`` (a one-host configuration), written unless it exists."""
    hosts = Path(folder) / "hosts.conf"
    if not hosts.exists():
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text(HOSTS_CONF)
    return hosts


def configure_scipion(root: Path, overwrite: bool = True) -> Path:
    """Set the SCIPION_* variables so projects, tests and logs live under ``root``.

    With ``overwrite=False`` variables already set (a real Scipion install) are kept.
    Returns ``root``.
    """
    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    values = {
        "SCIPION_DOMAIN": "pwem",
        "SCIPION_HOME": str(root),
        "SCIPION_HOSTS": str(write_hosts_conf(root)),
        "SCIPION_USER_DATA": str(root / "userdata"),
        "SCIPION_TESTS": str(root / "tests"),
        "SCIPION_TESTS_OUTPUT": str(root / "tests-output"),
        "SCIPION_PYTHON": sys.executable,
        "SCIPION_TEST_NOSYNC": "1",
        "SCIPION_NOTIFY": "False",
        "MPLBACKEND": "Agg",
    }
    for key, value in values.items():
        if overwrite or key not in os.environ:
            os.environ[key] = value
    return root


def gui_environment(user_data: Path, base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The environment of a Scipion GUI process on the projects of ``user_data``.

    ``base`` (default ``os.environ``) plus: SCIPION_DOMAIN=pwem (pyworkflow needs it
    under ``python -O``), SCIPION_USER_DATA, SCIPION_HOSTS (``hosts.conf`` beside
    ``user_data``, written if missing, unless SCIPION_HOSTS already names a file),
    SCIPION_NOTIFY=False and SCIPION_PYTHON (this interpreter, for protocol runs).
    A non-interactive MPLBACKEND (Agg, as tests set it) is removed so that
    Scipion's plots open windows. SCIPION_FONT_NAME, unless set, is DejaVu Sans:
    Scipion's default, Helvetica, is usually Nimbus Sans on Linux, whose 'Å' loses its
    ring in Tk text boxes (the run summaries).
    """
    user_data = Path(user_data).absolute()
    env = dict(os.environ if base is None else base)
    hosts = env.get("SCIPION_HOSTS", "")
    if not hosts or not os.path.isfile(hosts):
        hosts = str(write_hosts_conf(user_data.parent))
    env.update(SCIPION_DOMAIN="pwem", SCIPION_USER_DATA=str(user_data), SCIPION_HOSTS=hosts,
               SCIPION_NOTIFY="False", SCIPION_PYTHON=sys.executable)
    env.setdefault("SCIPION_HOME", str(user_data.parent))
    env.setdefault("SCIPION_FONT_NAME", GUI_FONT)
    if env.get("MPLBACKEND", "").lower() == "agg":
        del env["MPLBACKEND"]
    return env
