"""The science of continuousflex_dl: plain functions and dataclasses over numpy/torch arrays.

Never imports pyworkflow, pwem or tkinter (``tests/test_layers.py`` enforces it). The folders
follow the pipeline, and a stage imports only from the stages before it:

1. ``imaging``   — image files (MRC, STAR), CTF, Euler geometry, Gaussian projection, atomic
   structures, image sources and preprocessing;
2. ``modes``     — normal modes (ANM), the flexible reference (structure + modes), pseudoatoms
   of maps, particles synthesised along modes;
3. ``hemnma``    — HEMNMA: the alignment (a package: config, aligner and its stages, search,
   deformable model, image sizes, least squares, uncertainty), its image model, alignment jobs;
4. ``network``   — DeepHEMNMA: the ResNet regressor, training, the simulated stream,
   distributed training, prediction jobs;
5. ``landscape`` — the conformational space: analysis, trajectories and clusters, maps, files
   for other tools (Xmipp metadata, RELION 3.1 star, cryoDRGN latent).

``device`` (CPU/CUDA choice) and ``progress`` (the one signature of the progress callbacks of
long loops) serve every stage; ``chunks`` (chunked jobs and their files, which
read images through ``imaging``) serves the stages after ``imaging``.
"""

#: The stages in pipeline order; a module of one imports only from its own stage, earlier ones,
#: ``device`` and (from ``modes`` on) ``chunks``.
STAGES = ("imaging", "modes", "hemnma", "network", "landscape")
