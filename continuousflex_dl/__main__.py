"""Command line: ``python -m continuousflex_dl <command> ...`` (also ``continuousflex-dl``).

Commands:
  demo        the whole pipeline on adenylate kinase in a Scipion project
  nma         normal modes of a PDB/mmCIF file into a folder of mode files
  align-chunk one chunk of a HEMNMA alignment job folder (what the alignment protocol runs per chunk)
  predict-chunk  one chunk of a DeepHEMNMA prediction job folder (what the prediction protocol runs per chunk)
  train-worker   a DeepHEMNMA training job folder on N data-parallel processes (DDP)
  gui         the Scipion GUI on a project: gui [PROJECT folder or name] (none: project manager)
"""
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main
        return demo_main(rest)
    if command == "gui":
        from .gui import main as gui_main
        return gui_main(rest)
    if command == "nma":
        from .cli import nma_main
        return nma_main(rest)
    if command == "align-chunk":
        from .cli import align_chunk_main
        return align_chunk_main(rest)
    if command == "predict-chunk":
        from .cli import predict_chunk_main
        return predict_chunk_main(rest)
    if command == "train-worker":
        from .cli import train_worker_main
        return train_worker_main(rest)
    print(f"Unknown command {command!r}.\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
