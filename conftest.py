"""Headless Scipion for plain pytest: configure pyworkflow before anything imports it."""
import tempfile
from pathlib import Path

from continuousflex_dl.scipion_env import configure_scipion

configure_scipion(Path(tempfile.mkdtemp(prefix="cfdl-scipion-")))
