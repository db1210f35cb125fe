"""Time of the export for other tools (continuousflex_dl.convert.export.export_particles: Xmipp images.xmd,
RELION 3.1 star with the stack linked, cryoDRGN z.pkl) on a SetOfParticlesFlex of ``--n``
particles (one 8 px MRC stack, random poses, one CTF, 3 amplitudes, a HEMNMA score).
Prints and (``--out``) writes as JSON the seconds to build the set and to export it.

Example: python bench/bench_export.py --n 10000
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from continuousflex_dl.scipion_env import configure_scipion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="particles")
    parser.add_argument("--out", help="JSON file of the numbers")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bench-export-")
    configure_scipion(Path(folder) / "scipion")

    import mrcfile
    import numpy as np
    from pwem.objects import CTFModel, ParticleFlex, SetOfParticlesFlex, Transform

    from continuousflex_dl import convert
    from continuousflex_dl.convert import export as convert_export
    from continuousflex_dl.core.imaging.geometry import pose_to_scipion_matrix

    n, rng = args.n, np.random.default_rng(0)
    stack = os.path.join(folder, "particles.mrcs")
    with mrcfile.new(stack) as mrc:
        mrc.set_data(np.zeros((n, 8, 8), np.float32))
    parts = SetOfParticlesFlex(filename=os.path.join(folder, "particles.sqlite"))
    parts.setSamplingRate(1.3)
    parts.setHasCTF(True)
    parts.setAlignmentProj()
    parts.setFlexInfo(convert.flex_info([7, 8, 9], convert.SOURCE_HEMNMA))
    matrices = pose_to_scipion_matrix(rng.uniform(0, 90, (n, 3)), rng.normal(size=(n, 2)))
    start = time.perf_counter()
    for i in range(n):
        p = ParticleFlex(progName=convert.FLEX_PROG_NAME)
        p.setLocation(i + 1, stack)
        p.setTransform(Transform(matrices[i]))
        p.setCTF(CTFModel(defocusU=1e4, defocusV=9e3, defocusAngle=3.0))
        p.setZFlex(rng.normal(scale=100, size=3).tolist())
        parts.append(p)
    parts.write()
    built = time.perf_counter()
    convert_export.export_particles(parts, folder, cost=np.full(n, 0.5))
    done = time.perf_counter()
    result = {"particles": n, "build_s": round(built - start, 2), "export_s": round(done - built, 2),
              "export_ms_per_particle": round((done - built) / n * 1e3, 3)}
    shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
