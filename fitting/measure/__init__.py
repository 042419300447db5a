"""Classical particle measurement on real micrographs (numpy / scipy / scikit-image only).

Measures a reference image the way a microscopist would: flatten the background, threshold,
split touching particles, and report the typical particle size, coverage, polarity and shape.
"""
from fitting.measure.particles import (
    ParticleMeasurement,
    edge_crest_shift,
    estimate_background,
    foreground_mask,
    granulometry_diameter,
    grey_granulometry,
    measure_particles,
    pattern_spectrum,
    split_touching,
    valid_region,
)

__all__ = [
    "ParticleMeasurement",
    "edge_crest_shift",
    "estimate_background",
    "foreground_mask",
    "granulometry_diameter",
    "grey_granulometry",
    "measure_particles",
    "pattern_spectrum",
    "split_touching",
    "valid_region",
]
