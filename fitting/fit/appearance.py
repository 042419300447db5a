"""The particles' look as a distance: the reference's ring profile (fitting.measure.appearance)
against a render's, differentiable in the render.

The texture descriptor of a sparse field describes mostly background: refinement then moves the
particles' appearance freely (a bright core in a dark ring became a dark disc). The ring profile
sees only the particles and their surroundings.
"""
from __future__ import annotations

import numpy as np
import torch

from fitting.measure.appearance import MIN_ZONE_PIXELS, particle_profile, profile_zones
from fitting.measure.particles import resize_labels

__all__ = ["AppearanceTerm", "reference_profile", "PROFILE_MAX_COVERAGE", "PROFILE_MIN_COUNT"]

#: Above this measured coverage the particles are no longer the minority phase: which phase is
#: particle is the measurement's least certain call there, and a profile taken around the wrong
#: phase would steer the look the wrong way.
PROFILE_MAX_COVERAGE = 0.5
#: Fewer measured particles than this give no reference profile.
PROFILE_MIN_COUNT = 3


def reference_profile(measurement, work: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray | None:
    """The reference's ring profile on its working image.

    Parameters
    ----------
    measurement : ParticleMeasurement
        Of the reference at full resolution; its labels are resampled to ``work``'s shape.
    work : (H, W) array
        The reference at the working scale, gray in [0, 1].
    valid : (H, W) bool array, optional
        The working image's valid pixels.

    Returns
    -------
    (Z,) float array or None
        Mean gray per zone (NaN for empty zones); None where the measurement holds too few
        particles or covers more than :data:`PROFILE_MAX_COVERAGE` of the field.
    """
    if measurement is None or measurement.count < PROFILE_MIN_COUNT or \
            measurement.coverage > PROFILE_MAX_COVERAGE:
        return None
    labels = resize_labels(measurement.labels, work.shape[:2])
    return particle_profile(work, profile_zones(labels, valid))


class AppearanceTerm:
    """Weighted mean absolute difference between a render's ring profile and the reference's.

    The zones come from one render of the candidate (its particles as the reference's were
    found: by measurement, else the scene's instance masks); refinement leaves the geometry
    alone, so they hold for every render of it at the same layout.

    Parameters
    ----------
    target : (Z,) array
        The reference's profile (:func:`reference_profile`).
    zones : (Z, H, W) bool array
        The render's zones (:func:`fitting.measure.appearance.profile_zones`).
    weight : float
        Multiplies the distance (gray levels) before it is added to the descriptor distance.
    """

    def __init__(self, target: np.ndarray, zones: np.ndarray, weight: float) -> None:
        counts = zones.reshape(len(zones), -1).sum(axis=1)
        keep = np.isfinite(target) & (counts >= MIN_ZONE_PIXELS)
        z = zones[keep].reshape(int(keep.sum()), -1).astype(np.float32)
        self.zones = torch.as_tensor(z / np.maximum(z.sum(axis=1, keepdims=True), 1.0))
        self.target = torch.as_tensor(np.asarray(target)[keep], dtype=torch.float32)
        self.weight = float(weight)
        self.reference = np.asarray(target, dtype=np.float64)

    @property
    def usable(self) -> bool:
        return self.target.numel() >= 2 and self.weight > 0

    def profile(self, img: torch.Tensor) -> torch.Tensor:
        """The render's mean gray per kept zone (differentiable)."""
        return self.zones @ img.reshape(-1)

    def distance(self, img: torch.Tensor) -> torch.Tensor:
        """``weight`` x the mean absolute profile difference (differentiable)."""
        return self.weight * (self.profile(img) - self.target).abs().mean()

    @classmethod
    def for_candidate(cls, scene, x: np.ndarray, target: np.ndarray | None, weight: float,
                      seed: int) -> "AppearanceTerm | None":
        """The term for the candidate ``x`` of ``scene``; None without a reference profile,
        with weight 0, or when the render's zones leave fewer than two comparable zones."""
        if target is None or weight <= 0:
            return None
        from fitting.fit.candidates import measure_render
        img = scene.render_numpy(x, seed=seed)
        labels = measure_render(img).labels
        if labels is None or not np.any(labels):
            labels = scene.instance_mask(x)
        zones = profile_zones(labels)
        if zones is None:
            return None
        term = cls(target, zones, weight)
        return term if term.usable else None
