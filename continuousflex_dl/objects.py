"""Scipion objects of this plugin."""
import os

import pyworkflow.object as pwobj
from pwem.objects import EMObject


class FlexDLModel(EMObject):
    """A trained DeepHEMNMA network: a model directory (weights, config.json, metrics.csv)
    plus what other protocols need to know without opening it."""

    def __init__(self, modelDir=None, **kwargs):
        EMObject.__init__(self, **kwargs)
        self._modelDir = pwobj.String(modelDir)
        self._modes = pwobj.CsvList(pType=int)
        self._imageSize = pwobj.Integer()
        self._pixelSize = pwobj.Float()
        self._predictsPose = pwobj.Boolean(False)

    def getModelDir(self) -> str:
        return self._modelDir.get()

    def setModelDir(self, path: str):
        self._modelDir.set(path)

    def getModes(self):
        return [int(m) for m in self._modes]

    def setModes(self, modes):
        self._modes.set([int(m) for m in modes])

    def getImageSize(self) -> int:
        return self._imageSize.get()

    def setImageSize(self, size: int):
        self._imageSize.set(int(size))

    def getPixelSize(self) -> float:
        return self._pixelSize.get()

    def setPixelSize(self, value: float):
        self._pixelSize.set(float(value))

    def predictsPose(self) -> bool:
        return bool(self._predictsPose.get())

    def setPredictsPose(self, value: bool):
        self._predictsPose.set(bool(value))

    def getFiles(self):
        folder = self.getModelDir()
        return {os.path.join(folder, f) for f in os.listdir(folder)} if folder and os.path.isdir(folder) else set()

    def __str__(self):
        return (f"{self.getClassName()} (modes {self.getModes()}, {self.getImageSize()} px, "
                f"{self.getPixelSize():g} Å/px)")
