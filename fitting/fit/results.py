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

    def summary(self) -> dict:
        return {"material": self.material_id, "scale": self.scale, "distance_initial": self.distance_initial,
                "distance_final": self.distance_final, "iterations": self.iterations,
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

    def summary(self) -> dict:
        return {"candidates": [c.summary() for c in self.candidates], "best": self.best.material_id,
                "metrics": {"distance_initial": self.best.distance_initial,
                            "distance_final": self.best.distance_final,
                            "improvement": (self.best.distance_initial - (self.best.distance_final or 0.0)),
                            "scale": self.best.scale},
                "ranking": self.ranking, "timings": self.timings}
