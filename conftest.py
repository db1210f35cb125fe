"""Headless Scipion for plain pytest: configure pyworkflow before anything imports it."""
import shutil
import tempfile
from pathlib import Path

from continuousflex_dl.scipion_env import configure_scipion

SCIPION_ROOT = configure_scipion(Path(tempfile.mkdtemp(prefix="cfdl-scipion-")))
# Every temporary file of the tests goes under the same root, removed after a green run.
(SCIPION_ROOT / "tmp").mkdir()
tempfile.tempdir = str(SCIPION_ROOT / "tmp")


def pytest_sessionfinish(session, exitstatus):
    """Remove the test projects after a green run; keep them (and say where) to debug a red one."""
    if exitstatus == 0:
        shutil.rmtree(SCIPION_ROOT, ignore_errors=True)
    else:
        print(f"\nScipion test projects and run logs kept in {SCIPION_ROOT}")
