"""Parameter specs: every material parameter's name, meaning, unit, range, default, group.

The optimiser and the predictors only ever see parameters normalised to [0, 1]; a spec maps
that to the physical value (linearly, or logarithmically for scale-like quantities such as
sizes, doses and densities, so equal steps mean equal ratios).
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

from fitting.core.errors import LibraryError

GROUPS = ("surface", "geometry", "lighting", "imaging")
TARGETS = ("graph", "geometry", "trace", "shade", "post")


@dataclass
class ParamSpec:
    name: str
    min: float
    max: float
    default: float
    group: str
    unit: str = ""
    description: str = ""
    scale: str = "linear"          # "linear" or "log"
    refine: bool = True            # may gradient refinement change it?
    target: str = ""               # filled in by the material: who consumes the value
    integer: bool = False

    def validate(self, source: str) -> None:
        where = f"{source}: parameter '{self.name}'"
        if not self.name or not self.name.replace("_", "").isalnum():
            raise LibraryError(f"{where}: name must be letters, digits and underscores")
        if self.group not in GROUPS:
            raise LibraryError(f"{where}: group '{self.group}' is not one of {', '.join(GROUPS)}")
        if not (math.isfinite(self.min) and math.isfinite(self.max) and self.min < self.max):
            raise LibraryError(f"{where}: needs finite min < max (got {self.min}, {self.max})")
        if not (self.min <= self.default <= self.max):
            raise LibraryError(f"{where}: default {self.default} outside [{self.min}, {self.max}]")
        if self.scale not in ("linear", "log"):
            raise LibraryError(f"{where}: scale must be 'linear' or 'log'")
        if self.scale == "log" and self.min <= 0:
            raise LibraryError(f"{where}: a log-scale parameter needs min > 0")
        if self.group == "geometry" and self.refine:
            raise LibraryError(f"{where}: geometry parameters are predicted or searched, "
                               "not refined by gradients: set \"refine\": false")

    # normalised <-> physical ------------------------------------------------------
    def to_physical(self, u):
        """u in [0,1] (float or tensor, differentiable) -> physical value."""
        torch = sys.modules.get("torch")  # lazy: the window uses specs without loading torch
        if torch is not None and isinstance(u, torch.Tensor):
            u = torch.clamp(u, 0.0, 1.0)
            if self.scale == "log":
                v = self.min * torch.exp(u * math.log(self.max / self.min))
            else:
                v = self.min + u * (self.max - self.min)
            return v
        u = min(max(float(u), 0.0), 1.0)
        if self.scale == "log":
            v = self.min * math.exp(u * math.log(self.max / self.min))
        else:
            v = self.min + u * (self.max - self.min)
        return float(round(v)) if self.integer else v

    def to_normalized(self, v: float) -> float:
        v = float(v)
        if self.scale == "log":
            return (math.log(v) - math.log(self.min)) / math.log(self.max / self.min)
        return (v - self.min) / (self.max - self.min)

    @property
    def default_normalized(self) -> float:
        return self.to_normalized(self.default)

    def to_dict(self) -> dict:
        d = asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "ParamSpec":
        if not isinstance(d, dict):
            raise LibraryError(f"{source}: each parameter must be an object, got {type(d).__name__}")
        missing = [k for k in ("name", "min", "max", "default", "group") if k not in d]
        if missing:
            raise LibraryError(f"{source}: parameter {d.get('name', '?')!r} lacks field(s) {', '.join(missing)}")
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra:
            raise LibraryError(f"{source}: parameter '{d['name']}' has unknown field(s) {', '.join(sorted(extra))}")
        try:
            spec = cls(**{**d, "min": float(d["min"]), "max": float(d["max"]), "default": float(d["default"])})
        except (TypeError, ValueError) as exc:
            raise LibraryError(f"{source}: parameter '{d['name']}': {exc}") from None
        spec.validate(source)
        return spec


@dataclass
class ParamVector:
    """A full normalised parameter vector of one material, with its specs (for reports)."""
    specs: list[ParamSpec]
    values: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def physical(self) -> dict[str, float]:
        return {s.name: s.to_physical(float(u)) for s, u in zip(self.specs, self.values)}
