"""Outlier removal in amplitude space by Mahalanobis distance."""
import numpy as np
from pwem.objects import SetOfParticlesFlex
from pyworkflow.protocol import params

from .. import convert
from ..core.landscape.analysis import mahalanobis_distances, outlier_mask
from .base import FlexDLProtBase

DISTANCE_ATTR = "_cfdlMahalanobis"


class FlexDLProtOutliers(FlexDLProtBase):
    """Keep the particles whose amplitudes are not outliers (Mahalanobis distance).

    DeepHEMNMA (Hamitouche & Jonic 2022) removed about 10% of the HEMNMA results before
    training. Each kept particle stores its distance (in standard deviations, σ)."""
    _label = "remove outliers"
    _possibleOutputs = {"outputParticles": SetOfParticlesFlex}

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticlesFlex",
                      label="Particles with amplitudes", important=True,
                      help="Output of the HEMNMA alignment (or any set with amplitudes of this plugin).")
        form.addParam("criterion", params.EnumParam, choices=["fraction", "threshold"], default=0,
                      display=params.EnumParam.DISPLAY_HLIST, label="Remove by",
                      help="fraction: remove the given fraction with the largest distances. "
                           "threshold: remove particles farther than a distance.")
        form.addParam("fraction", params.FloatParam, default=0.1, condition="criterion == 0",
                      validators=[params.Range(0, 0.9)], label="Fraction to remove",
                      help="0.1 removes the 10% of the particles farthest from the centre of the amplitude "
                           "distribution (Mahalanobis distance), as in DeepHEMNMA (Hamitouche & Jonic 2022).")
        form.addParam("threshold", params.FloatParam, default=3.0, condition="criterion == 1",
                      validators=[params.Positive], label="Distance threshold (σ)",
                      help="Mahalanobis distance above which a particle is removed, in standard deviations (σ) "
                           "of the amplitude distribution, its correlations between modes taken into account: "
                           "3 keeps about 97% of Gaussian amplitudes of 3 modes.")
        form.addParam("maxUncertainty", params.FloatParam, default=0.0, validators=[params.GE(0)],
                      label="Largest amplitude uncertainty (Å, 0 = off)",
                      help="Also remove particles whose amplitudes are uncertain: those with a standard "
                           "deviation above this many Å on any mode (HEMNMA's alignment of this plugin gives "
                           "one per particle and mode). 0 (the default): do not use the uncertainty.")
        form.addParam("minReliability", params.FloatParam, default=0.0, validators=[params.Range(0, 1)],
                      label="Smallest pose reliability (0-1, 0 = off)",
                      help="Also remove particles whose pose is probably wrong: those with a pose reliability "
                           "(the calibrated probability that HEMNMA's pose is within 10°, stored per particle "
                           f"as {convert.RELIABILITY_ATTR}) below this value; 0.5 keeps the particles more "
                           "likely right than wrong. 0: do not use the reliability.")
        form.addParam("robust", params.BooleanParam, default=True, label="Robust estimate?",
                      help="Estimate the centre and covariance from the most central 75% of the particles "
                           "(a cluster of outliers cannot pull them).")

    def _insertAllSteps(self):
        self._insertFunctionStep(self.removeOutliersStep, needsGPU=False)

    def _flagged(self, values, limit: float, n: int, above: bool, what: str, unit: str, missing: str) -> np.ndarray:
        """Particles (n,) bool whose ``values`` (n,) lie above (``above``) or below ``limit``; none
        when ``limit`` is 0 (off). ValueError ``missing`` when the limit is set but the particles
        carry no values; the run log counts the particles flagged."""
        if limit <= 0:
            return np.zeros(n, dtype=bool)
        if values is None:
            raise ValueError(missing)
        flagged = values > limit if above else values < limit
        self.info(f"{int(flagged.sum())} particles have {what} {'above' if above else 'below'} {limit:g}{unit}")
        return flagged

    def removeOutliersStep(self):
        particles = self.inputParticles.get()
        arrays = convert.read_particles(particles, need_amplitudes=True)
        distances = mahalanobis_distances(arrays.amplitudes, robust=self.robust.get())
        if self.criterion.get() == 0:
            keep = outlier_mask(distances, fraction=self.fraction.get())
        else:
            keep = outlier_mask(distances, threshold=self.threshold.get())
        std = arrays.amplitude_std
        uncertain = self._flagged(None if std is None else std.max(1), self.maxUncertainty.get(), len(keep),
                                  above=True, what="an amplitude uncertainty", unit=" Å",
                                  missing=f"The particles carry no amplitude uncertainty ({convert.ZFLEX_STD_ATTR}): "
                                          f"use the output of this plugin's HEMNMA alignment, or set the largest "
                                          f"uncertainty to 0.")
        unreliable = self._flagged(arrays.reliability, self.minReliability.get(), len(keep), above=False,
                                   what="a pose reliability", unit="",
                                   missing=f"The particles carry no pose reliability ({convert.RELIABILITY_ATTR}): "
                                           f"use the output of this plugin's HEMNMA alignment (with its calibration "
                                           f"on), or set the smallest reliability to 0.")
        keep &= ~uncertain & ~unreliable
        np.savez(self._getExtraPath("distances.npz"), ids=arrays.ids, distances=distances, keep=keep,
                 uncertain=uncertain, unreliable=unreliable)
        if unreliable.all():
            raise ValueError(f"Every particle has a pose reliability below {self.minReliability.get():g} (the "
                             f"largest is {arrays.reliability.max():.3f}): lower the smallest reliability, or "
                             f"set it to 0.")
        if not keep.any():
            raise ValueError(f"No particle is within the distance threshold {self.threshold.get():g}: the "
                             f"smallest distance is {distances.min():.2f} (median {np.median(distances):.2f}). "
                             f"Raise the threshold (3 keeps about 97% of Gaussian amplitudes of 3 modes), or "
                             f"remove a fraction instead.")
        out = SetOfParticlesFlex(filename=self._getPath("particles_flex.sqlite"),
                                 progName=convert.FLEX_PROG_NAME)
        out.copyInfo(particles)
        kept_ids = set(arrays.ids[keep].tolist())
        by_id = dict(zip(arrays.ids.tolist(), distances))
        for p in particles.iterItems(orderBy="id"):
            if p.getObjId() in kept_ids:
                q = p.clone()
                setattr(q, DISTANCE_ATTR, convert.pwobj.Float(float(by_id[p.getObjId()])))
                out.append(q)
        self.info(f"Kept {keep.sum()} of {len(keep)} particles")
        self._defineOutputs(outputParticles=out)
        self._defineSourceRelation(self.inputParticles, out)

    def _validate(self):
        particles = self.inputParticles.get()
        if particles is None:
            return ["Choose a set of particles with amplitudes."]
        if particles.getSize() < 10:
            return [f"{particles.getSize()} particles are too few to estimate a covariance."]
        return []

    def _summary(self):
        from ..reports import literal
        if not hasattr(self, "outputParticles"):
            return []
        d = np.load(self._getExtraPath("distances.npz"))
        lines = [f"Kept {int(d['keep'].sum())} of {len(d['keep'])} particles "
                 f"(largest kept Mahalanobis distance {d['distances'][d['keep']].max():.2f} σ, in standard "
                 f"deviations of the amplitude distribution; per particle in {literal(DISTANCE_ATTR)})."]
        if "uncertain" in d.files and d["uncertain"].any():
            lines.append(f"{int(d['uncertain'].sum())} particles removed for an amplitude uncertainty above "
                         f"{self.maxUncertainty.get():g} Å.")
        if "unreliable" in d.files and d["unreliable"].any():
            lines.append(f"{int(d['unreliable'].sum())} particles removed for a pose reliability below "
                         f"{self.minReliability.get():g}.")
        return lines

    def _methods(self):
        return ["Particles with outlying normal-mode amplitudes (Mahalanobis distance) were removed, as "
                "in DeepHEMNMA [Hamitouche2022]."]
