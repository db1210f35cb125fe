"""The layering rule: core never imports Scipion or tkinter."""
import subprocess
import sys


def test_core_does_not_import_scipion():
    code = ("import sys, importlib, pkgutil, continuousflex_dl.core as core\n"
            "for m in pkgutil.iter_modules(core.__path__):\n"
            "    importlib.import_module('continuousflex_dl.core.' + m.name)\n"
            "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('pyworkflow', 'pwem', 'tkinter'))\n"
            "print(bad)\n"
            "sys.exit(1 if bad else 0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
