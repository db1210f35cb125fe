"""bench/gpu_check.sh, the one prepared GPU run (issue 29), end to end on the CPU at its tiny size."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ["cuda_tests", "table1", "table2", "hemnma_speed", "reconstruction_speed"]


def sections(text: str) -> dict[str, str]:
    """The figures file's '## name' sections: name -> body."""
    parts = re.split(r"^## (\w+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_tiny_run_writes_every_section_with_numbers(tmp_path):
    out = tmp_path / "figures.txt"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    t0 = time.time()
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--tiny", str(out)], env=env,
                         capture_output=True, text=True, timeout=600)
    seconds = time.time() - t0
    assert run.returncode == 0, run.stderr[-2000:]
    text = out.read_text()
    found = sections(text)
    assert list(found) == SECTIONS, text
    for name in SECTIONS:
        assert re.search(rf"^{name}: ok$", found[name], flags=re.M), f"{name} did not finish:\n{found[name]}"
    number = r"-?\d+\.\d+"
    assert re.search(r"\d+ passed", found["cuda_tests"])
    # Table I: the hardest row, both columns (truth-trained MAE, simulated-stream MAE) as numbers.
    row = [ln for ln in found["table1"].splitlines() if ln.startswith("| random | random | yes |")]
    assert len(row) == 1, found["table1"]
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    mae, paper, sim = float(cells[6]), float(cells[8]), float(cells[9])
    assert paper == 27.60 and mae > 0 and sim > 0
    # Table II: HEMNMA before and after outlier removal, and both networks, each with an MAE.
    for label in ["HEMNMA, all", "HEMNMA, 10 % outliers removed", "DeepHEMNMA trained on HEMNMA",
                  "DeepHEMNMA, simulated stream then fine-tuned"]:
        assert re.search(rf"^\| {re.escape(label)}.*\| {number} \|", found["table2"], flags=re.M), label
    assert float(re.search(rf'"images_per_s": ({number})', found["hemnma_speed"]).group(1)) > 0
    assert float(re.search(rf'"particles_per_s": ({number})', found["reconstruction_speed"]).group(1)) > 0
    assert re.search(r"^total: \d+ s$", text, flags=re.M)
    print(f"tiny gpu_check: {seconds:.0f} s")


def test_failing_and_slow_parts_are_reported_and_the_next_parts_run(tmp_path):
    """A part that fails is written as FAILED, one past its limit as TIMED OUT; neither stops the
    parts after it."""
    out = tmp_path / "figures.txt"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT),
               GPU_CHECK_TABLE1="--no-such-option", GPU_CHECK_TABLE2="--no-such-option",
               GPU_CHECK_SKIP="cuda_tests", GPU_CHECK_LIMITS="hemnma_speed=1")
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--tiny", str(out)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    found = sections(out.read_text())
    assert re.search(r"^table1: FAILED \(exit 2", found["table1"], flags=re.M), found["table1"]
    assert re.search(r"^table2: FAILED \(exit 2", found["table2"], flags=re.M)
    assert re.search(r"^hemnma_speed: TIMED OUT after 1 s", found["hemnma_speed"], flags=re.M)
    assert re.search(r"^cuda_tests: skipped", found["cuda_tests"], flags=re.M)
    assert re.search(r"^reconstruction_speed: ok$", found["reconstruction_speed"], flags=re.M)
