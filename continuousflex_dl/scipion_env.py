"""Point Scipion (pyworkflow) at a self-contained folder, for tests and the demo.

Must run before anything imports pyworkflow: pyworkflow reads its environment
once, at import time. Imports nothing from Scipion itself.
"""
import os
import sys
from pathlib import Path

HOSTS_CONF = ("[localhost]\n"
              "PARALLEL_COMMAND = mpirun -np %_(JOB_NODES)d --map-by node %_(COMMAND)s\n")


def configure_scipion(root: Path, overwrite: bool = True) -> Path:
    """Set the SCIPION_* variables so projects, tests and logs live under ``root``.

    With ``overwrite=False`` variables already set (a real Scipion install) are kept.
    Returns ``root``.
    """
    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    hosts = root / "hosts.conf"
    if not hosts.exists():
        hosts.write_text(HOSTS_CONF)
    values = {
        "SCIPION_DOMAIN": "pwem",
        "SCIPION_HOME": str(root),
        "SCIPION_HOSTS": str(hosts),
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
