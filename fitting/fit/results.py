"""What a fit returns: the refined candidates and the overall result."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Candidate:
    material_id: str
    scale: int
    x_initial: np.ndarray
    distance_initial: float
    x_final: np.ndarray | None = None
    distance_final: float | None = None
    history: list[float] = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0
    stopped: str = ""
    predictor: str = "defaults"
    backtracks: int = 0
    # Measured structure of the final render against the reference's (fitting.fit.structure).
    structure_terms: dict | None = None
    structure_distance: float = 0.0
    # distance_final relative to its scale's ranking median x (1 + final_structure_weight x structure_distance)
    score: float | None = None
    # The classifier's probability of this material, when it weighed the final score.
    classifier_probability: float | None = None
    # The measurement of x_initial's render on the judged field, when settle_geometry made it.
    initial_measurement: Any = field(default=None, repr=False, compare=False)
    # The ring-profile term (fitting.fit.appearance) included in its distances, if any.
    appearance: Any = field(default=None, repr=False, compare=False)

    @property
    def gained(self) -> bool:
        """Whether refinement lowered the distance at all (False: the initial guess is the result)."""
        return self.distance_final is not None and self.distance_final < self.distance_initial - 1e-6

    def summary(self) -> dict:
        return {"material": self.material_id, "scale": self.scale, "distance_initial": self.distance_initial,
                "distance_final": self.distance_final, "refinement_gained": self.gained,
                "structure_distance": round(self.structure_distance, 4),
                "structure_terms": ({k: round(v, 3) for k, v in self.structure_terms.items()}
                                    if self.structure_terms else None),
                "score": self.score, "classifier_probability": self.classifier_probability,
                "iterations": self.iterations, "backtracks": self.backtracks,
                "seconds": round(self.seconds, 2), "stopped": self.stopped, "initial_guess": self.predictor}


@dataclass
class FitResult:
    recipe: Any
    candidates: list[Candidate]
    ranking: list[dict]
    best: Candidate
    timings: dict[str, float]
    reference: dict
    preview: np.ndarray              # best render (size x size, float [0,1])
    reference_tile: np.ndarray       # the reference at the chosen scale, centre tile
    # The whole reference field at the working scale and a render of the same pixel size and
    # scale (for side-by-sides a user can trust); None when the fit did not make them.
    reference_field: np.ndarray | None = None
    render_field: np.ndarray | None = None
    imaging: dict | None = None      # fitting.measure.instrument.ImagingGuess.to_dict()
    measured: dict | None = None     # the reference's particles (reference px, nm when known)
    fitted: dict | None = None       # the result's particles, measured on its render, same units
    classifier: dict | None = None   # the material classifier's choice and top probabilities

    def summary(self) -> dict:
        return {"candidates": [c.summary() for c in self.candidates], "best": self.best.material_id,
                "metrics": {"distance_initial": self.best.distance_initial,
                            "distance_final": self.best.distance_final,
                            "improvement": (self.best.distance_initial - (self.best.distance_final or 0.0)),
                            "refinement_gained": self.best.gained,
                            "scale": self.best.scale},
                "imaging": self.imaging, "classifier": self.classifier, "measured": self.measured, "fitted": self.fitted,
                "ranking": self.ranking, "timings": self.timings}
