"""The layering rules: core never imports Scipion or tkinter, and its stages import only down
the pipeline (device < imaging < chunks < modes < hemnma < network < landscape)."""
import ast
import subprocess
import sys
from pathlib import Path

import continuousflex_dl.core as core

CORE = Path(core.__file__).parent
#: Rank of each top-level part of core: a module may import parts of its own rank or lower.
RANK = {"device": 0, "progress": 0, **{stage: i + 1 for i, stage in enumerate(core.STAGES)}, "chunks": 1.5}


def test_core_does_not_import_scipion():
    code = ("import sys, importlib, pkgutil, continuousflex_dl.core as core\n"
            "for m in pkgutil.walk_packages(core.__path__, 'continuousflex_dl.core.'):\n"
            "    importlib.import_module(m.name)\n"
            "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('pyworkflow', 'pwem', 'tkinter'))\n"
            "print(bad)\n"
            "sys.exit(1 if bad else 0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _core_imports(path: Path):
    """The top-level core parts (stage folders, ``device``, ``progress``, ``chunks``) that ``path`` imports."""
    here = path.relative_to(CORE).parts[:-1]  # the package folders below core
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[:len(here) - (node.level - 1)]) if node.level - 1 <= len(here) else None
                if base is None:
                    continue  # above core: the package itself (__version__)
                target = base + (node.module.split(".") if node.module else [])
                names = [target + [a.name] for a in node.names] if not node.module else [target]
            elif node.module and node.module.startswith("continuousflex_dl.core."):
                names = [node.module.split(".")[2:]]
            else:
                continue
            for parts in names:
                if parts and parts[0] in RANK:
                    yield parts[0]


def test_stages_import_only_down_the_pipeline():
    modules = sorted(p for p in CORE.rglob("*.py"))
    assert len(modules) > 20
    offences = []
    for path in modules:
        part = path.relative_to(CORE).parts[0].removesuffix(".py")
        if part not in RANK:
            continue
        for target in _core_imports(path):
            if RANK[target] > RANK[part]:
                offences.append(f"{path.relative_to(CORE)} imports {target}")
    assert not offences, offences


def test_the_rule_sees_an_upward_import(tmp_path):
    """The check above can fail: an imaging module importing from hemnma is caught."""
    fake = CORE / "imaging" / "_probe_upward.py"
    fake.write_text("from ..hemnma.alignment import Aligner\n")
    try:
        assert list(_core_imports(fake)) == ["hemnma"]
    finally:
        fake.unlink()


def _protocol_imports(source: str):
    """The ``protocol_*`` modules of continuousflex_dl.protocols that ``source`` imports."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 or module.startswith("continuousflex_dl.protocols"):
                parts = module.split(".")[-1:] if module else []
                for name in parts + [a.name for a in node.names]:
                    if name.startswith("protocol_"):
                        yield name


def test_no_protocol_imports_another_protocol():
    """Shared protocol code lives in protocols/base.py, convert/ or core, never in another protocol."""
    protocols = CORE.parent / "protocols"
    offences = [f"{path.name} imports {name}" for path in sorted(protocols.glob("protocol_*.py"))
                for name in _protocol_imports(path.read_text())]
    assert not offences, offences
    # The check can fail: the import protocol_cluster had (issue 30) is caught.
    assert list(_protocol_imports("from .protocol_trajectory import fill_atom_structs\n")) == ["protocol_trajectory"]
    assert list(_protocol_imports("from continuousflex_dl.protocols.protocol_align import SCORE_ATTR\n")) == [
        "protocol_align"]
