"""A subset of particles chosen in the amplitude landscape: a region drawn in a 2-D view
(the landscape viewer's lasso or box), or a list of particle ids."""
import json
import re

import numpy as np
from pwem.objects import SetOfParticlesFlex
from pyworkflow.protocol import params

from .. import convert
from ..core.landscape.selection import (LinearView, format_ids, format_polygon, mode_view, parse_ids,
                                        parse_polygon, pca_view, select)
from .base import FlexDLProtBase

SELECT_REGION, SELECT_IDS = 0, 1
AXES_MODES, AXES_PCA = 0, 1


def parse_view_modes(text: str) -> list:
    """The mode numbers of 'Modes (x, y)' in their order ('9 7' -> [9, 7]; '' -> [])."""
    words = [w for w in re.split(r"[\s,;]+", str(text or "").strip()) if w]
    if not all(w.isdigit() for w in words) or len(words) not in (0, 2):
        raise ValueError(f"Give two mode numbers for the view (x and y), e.g. '7 9'; got {text!r}.")
    return [int(w) for w in words]


class FlexDLProtSubset(FlexDLProtBase):
    """Keep the particles inside a region of the amplitude landscape (or given by their ids).

    The landscape viewer fills this form from a lasso or a box drawn on the point cloud
    and runs it, so the selection is recorded in the project and can be repeated. The output
    feeds reconstruction, training, trajectories and exports like any set with amplitudes."""
    _label = "landscape subset"
    _possibleOutputs = {"outputParticles": SetOfParticlesFlex}

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticlesFlex",
                      label="Particles with amplitudes", important=True,
                      help="Output of the HEMNMA alignment, DeepHEMNMA prediction, synthesis or any "
                           "subset of them.")
        form.addParam("selectBy", params.EnumParam, choices=["region of the landscape", "particle ids"],
                      default=SELECT_REGION, display=params.EnumParam.DISPLAY_HLIST, label="Select by",
                      help="region: the particles whose amplitudes fall inside a polygon drawn in a 2-D "
                           "view (two modes, or the first two principal components). particle ids: the "
                           "particles with the listed ids.")
        form.addParam("viewAxes", params.EnumParam, choices=["two modes", "principal components"],
                      default=AXES_MODES, condition=f"selectBy == {SELECT_REGION}",
                      display=params.EnumParam.DISPLAY_HLIST, label="Axes of the view",
                      help="two modes: the region is drawn on the amplitudes of two modes (Å). principal "
                           "components: on the first two principal components (Å) of the amplitudes.")
        form.addParam("viewModes", params.StringParam, default="",
                      condition=f"selectBy == {SELECT_REGION} and viewAxes == {AXES_MODES}",
                      label="Modes (x, y)",
                      help="The mode numbers of the horizontal and vertical axes, e.g. '7 9'. Empty: the "
                           "first two modes of the particles.")
        form.addParam("pcaView", params.StringParam, default="",
                      condition=f"selectBy == {SELECT_REGION} and viewAxes == {AXES_PCA}",
                      expertLevel=params.LEVEL_ADVANCED, label="Principal axes",
                      help="The projection the region was drawn in, written 'origin ; axis 1 ; axis 2', "
                           "each one number per mode (Å for the origin, unit vectors for the axes); the "
                           "viewer fills it with the components of the sets it showed. Empty: the first "
                           "two principal components of these particles.")
        form.addParam("polygon", params.StringParam, default="", condition=f"selectBy == {SELECT_REGION}",
                      label="Region (Å)",
                      help="The polygon's vertices 'x y, x y, x y, ...' in Å along the view's axes (at "
                           "least three; a box is its four corners). Particles inside are kept.")
        form.addParam("particleIds", params.StringParam, default="", condition=f"selectBy == {SELECT_IDS}",
                      label="Particle ids",
                      help="Ids and ranges of the particles to keep, e.g. '1-20 25 30-32'.")

    def _insertAllSteps(self):
        self._insertFunctionStep(self.selectStep, needsGPU=False)

    # ------------------------------------------------------------------ the selection
    def _view(self, arrays) -> LinearView:
        numbers = arrays.amplitude_modes()
        if self.viewAxes.get() == AXES_PCA:
            text = (self.pcaView.get() or "").strip()
            return LinearView.from_text(text) if text else pca_view(arrays.amplitudes)
        shown = parse_view_modes(self.viewModes.get()) or numbers[:2]
        return mode_view(numbers, shown)

    def selectedMask(self, arrays) -> np.ndarray:
        """(M,) bool over ``arrays`` (convert.ParticleArrays, id order): the particles kept."""
        if self.selectBy.get() == SELECT_IDS:
            wanted = parse_ids(self.particleIds.get())
            missing = np.setdiff1d(wanted, arrays.ids)
            if len(missing):
                raise ValueError(f"{len(missing)} of the ids are not in the input set (first: "
                                 f"{missing[:5].tolist()}): check the ids or the input set.")
            return np.isin(arrays.ids, wanted)
        return select(arrays.amplitudes, self._view(arrays), parse_polygon(self.polygon.get()))

    def selectStep(self):
        particles = self.inputParticles.get()
        arrays = convert.read_particles(particles, need_amplitudes=True)
        keep = self.selectedMask(arrays)
        if not keep.any():
            raise ValueError("No particle is inside the region: draw it around some points of the "
                             "landscape, or check the modes of the view.")
        record = {"ids": format_ids(arrays.ids[keep]), "n_input": int(len(keep)), "n_kept": int(keep.sum())}
        if self.selectBy.get() == SELECT_REGION:
            view = self._view(arrays)
            record.update(view=view.to_text(), labels=list(view.labels),
                          polygon=format_polygon(parse_polygon(self.polygon.get())))
        with open(self._getExtraPath("selection.json"), "w") as f:
            json.dump(record, f, indent=1)
        out = SetOfParticlesFlex(filename=self._getPath("particles_flex.sqlite"), progName=convert.FLEX_PROG_NAME)
        out.copyInfo(particles)
        kept = set(arrays.ids[keep].tolist())
        for p in particles.iterItems(orderBy="id"):
            if p.getObjId() in kept:
                out.append(p.clone())
        self.info(f"Kept {len(kept)} of {len(keep)} particles")
        self._defineOutputs(outputParticles=out)
        self._defineSourceRelation(self.inputParticles, out)

    # ------------------------------------------------------------------ form and reports
    def _validate(self):
        errors = []
        if self.inputParticles.get() is None:
            return ["Choose a set of particles with amplitudes."]
        try:
            if self.selectBy.get() == SELECT_IDS:
                if not len(parse_ids(self.particleIds.get())):
                    errors.append("Write the ids of the particles to keep, e.g. '1-20 25'.")
            else:
                parse_polygon(self.polygon.get())
                if self.viewAxes.get() == AXES_MODES:
                    parse_view_modes(self.viewModes.get())
                elif (self.pcaView.get() or "").strip():
                    LinearView.from_text(self.pcaView.get())
        except ValueError as exc:
            errors.append(str(exc))
        return errors

    def _record(self) -> dict:
        try:
            with open(self._getExtraPath("selection.json")) as f:
                return json.load(f)
        except OSError:
            return {}

    def _summary(self):
        record = self._record()
        if not record or not hasattr(self, "outputParticles"):
            return []
        lines = [f"Kept {record['n_kept']} of {record['n_input']} particles."]
        if "polygon" in record:
            x, y = record["labels"]
            n = len(parse_polygon(record["polygon"]))
            lines.append(f"Inside a region of {n} vertices drawn on {x} against {y}.")
        else:
            lines.append(f"Particle ids {record['ids'][:200]}.")
        return lines

    def _methods(self):
        record = self._record()
        if not record:
            return []
        how = ("inside a region of the normal-mode amplitude landscape" if "polygon" in record
               else "by their ids")
        return [f"A subset of {record['n_kept']} of {record['n_input']} particles was selected {how}."]
