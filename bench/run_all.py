"""Run every speed/memory benchmark with its defaults and collect the output in
bench/results/speed_report.md (machine, date and each script's figures).

    python bench/run_all.py [--only nma synthesis ...]
"""
import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {
    "nma": ["bench_nma.py", "--atoms", "100000", "--modes", "20"],
    "synthesis": ["bench_synthesis.py"],
    "alignment": ["bench_alignment.py", "--n", "50", "--size", "128", "--snr", "0.1", "--defocus-um", "0.5"],
    "align_chunk": ["bench_align_chunk.py"],
    "network": ["bench_network.py"],
    "pseudoatoms": ["bench_pseudoatoms.py"],
    "landscape": ["bench_landscape.py"],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHES), default=None)
    args = ap.parse_args()
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    lines = ["# Speed and memory report", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPU cores, {device}, torch {torch.__version__}", ""]
    for name in args.only or BENCHES:
        script, *rest = BENCHES[name]
        t0 = time.time()
        run = subprocess.run([sys.executable, str(HERE / script), *rest], capture_output=True, text=True)
        lines += [f"## {name}", "", f"`python bench/{script} {' '.join(rest)}` "
                  f"({time.time() - t0:.0f} s, exit {run.returncode})", "", "```",
                  (run.stdout + (run.stderr if run.returncode else "")).strip(), "```", ""]
        print("\n".join(lines[-6:]), flush=True)
    out = HERE / "results" / "speed_report.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"Written to {out}")


if __name__ == "__main__":
    main()
