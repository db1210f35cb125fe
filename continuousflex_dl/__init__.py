"""continuousflex_dl: continuous conformational landscapes from cryo-EM particles.

Normal mode analysis, HEMNMA (elastic + rigid alignment of particles with
normal modes) and DeepHEMNMA (a ResNet34 regressor of normal-mode amplitudes),
as a pure-Python Scipion 3 plugin.

The Scipion ``Plugin`` class is loaded lazily (PEP 562) so that
``import continuousflex_dl.core`` never pulls in pyworkflow, pwem or tkinter.
"""

import os

__version__ = "0.3.0"

# Idle OpenMP threads that spin make torch several times slower on a shared or busy
# machine (measured 7x on 2 cores); let them sleep unless the user says otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def __getattr__(name):
    if name == "Plugin":
        from .plugin import Plugin
        return Plugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
