"""Packaging for continuousflex_dl, a Scipion 3 plugin (pure Python, pip only)."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _version() -> str:
    for line in (HERE / "continuousflex_dl" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip("'\"")
    raise RuntimeError("__version__ not found")


setup(
    name="scipion-em-continuousflex-dl",
    version=_version(),
    description="Continuous conformational landscapes from cryo-EM particles: "
                "NMA, HEMNMA and DeepHEMNMA as a pure-Python Scipion 3 plugin",
    long_description=(HERE / "README.rst").read_text(),
    long_description_content_type="text/x-rst",
    license="GPLv3",
    python_requires=">=3.8",
    packages=find_packages(),
    include_package_data=True,
    package_data={"continuousflex_dl": ["protocols.conf", "templates/*.json.template"]},
    install_requires=[
        "scipion-pyworkflow>=3.11",
        "scipion-em>=3.11",
        "numpy>=1.24,<2",      # scipion-em pins numpy 1.26
        "scipy>=1.10",
        "torch==2.14.1",        # the pair this project is tested with
        "torchvision==0.29.1",
        "prody>=2.4",
        "mrcfile>=1.4",
        "matplotlib>=3.5",
        # Central-slice insertion of the 3-D reconstruction; 0.6.0 imports torch-ctf without
        # declaring it.
        "torch-fourier-slice==0.6.0",
        "torch-ctf==0.6.0",
    ],
    extras_require={
        # scipion-em-relion: its star converter is the client our pose convention is tested against.
        "test": ["pytest>=7", "scipion-em-relion==5.0.2"],
    },
    entry_points={
        "pyworkflow.plugin": ["continuousflex_dl = continuousflex_dl"],
        "console_scripts": ["continuousflex-dl = continuousflex_dl.__main__:main"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Bio-Informatics",
    ],
)
