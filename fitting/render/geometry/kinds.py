"""The registry of geometry kinds with their parameter specs, and :func:`generate_layout`.
"""
from __future__ import annotations

import time

import numpy as np

from fitting.core.errors import LibraryError
from fitting.render.geometry.agglomerates import (
    _gen_agglomerates,
)
from fitting.render.geometry.convex import _gen_crystals, _gen_polyhedra
from fitting.render.geometry.layout import GeometryKind, GeometryParam, ParticleLayout
from fitting.render.geometry.mixture import MIXTURE_PARAMS, add_second_population
from fitting.render.geometry.rods import _gen_rods
from fitting.render.geometry.spheres import _gen_ellipsoids, _gen_spheres

__all__ = ["GEOMETRY_KINDS", "generate_layout", "validate_geometry_params"]


_P = GeometryParam
_SIZE = _P(3.0, 150.0, 20.0, "px", "geometric mean volume-equivalent diameter")
_GSD = _P(1.0, 2.0, 1.2, "", "geometric standard deviation of the log-normal size distribution")
_COV = _P(0.02, 0.6, 0.3, "", "projected area fraction of the field covered by particles")
_ELONG = _P(1.0, 3.0, 1.3, "", "stretch of the particle along one axis")
_ROUND = _P(0.0, 0.5, 0.1, "", "edge rounding: Minkowski radius as a fraction of the particle radius")

GEOMETRY_KINDS: dict[str, GeometryKind] = {
    "spheres": GeometryKind("spheres", "monolayer of log-normally sized beads, no interpenetration", {
        "size_mean": _SIZE._replace(description="geometric mean diameter"),
        "size_gsd": _GSD,
        "coverage": _COV._replace(min=0.002, max=0.75, description="projected area fraction, sparse to dense monolayer"),
        "squash": _P(0.5, 1.0, 1.0, "", "height/width ratio of slightly flattened beads (1 = spheres)"),
        "layers": _P(1.0, 4.0, 1.0, "", "layers of a settled pile: each a monolayer at `coverage`, dropped "
                                         "onto the ones below (1 = monolayer; rounded)"),
        "bumps": _P(0.0, 0.3, 0.0, "", "lumps on the surface and outline, as a fraction of the radius (0 = smooth)"),
    }, _gen_spheres),
    "agglomerates": GeometryKind("agglomerates", "3-D fractal aggregates of sintered spherical primaries", {
        "fractal_dim": _P(1.5, 2.8, 1.8, "", "target mass fractal dimension (tunable particle-cluster growth)"),
        "primary_count": _P(3.0, 200.0, 30.0, "", "mean number of primaries per agglomerate"),
        "count_gsd": _P(1.0, 2.5, 1.5, "", "geometric std of the number of primaries per agglomerate"),
        "primary_size": _P(3.0, 60.0, 10.0, "px", "geometric mean primary diameter"),
        "size_gsd": _P(1.0, 1.6, 1.1, "", "geometric std of primary diameters"),
        "overlap": _P(0.0, 0.5, 0.1, "", "sintering: neighbour distance = (1 - overlap) (r1 + r2)"),
        "coverage": _COV._replace(default=0.25, description="projected area fraction of the field"),
    }, _gen_agglomerates),
    "polyhedra": GeometryKind("polyhedra", "irregular angular powder: random convex polyhedra resting on a face", {
        "size_mean": _SIZE, "size_gsd": _GSD, "coverage": _COV._replace(max=0.65), "elongation": _ELONG, "roundness": _ROUND,
        "facets": _P(6.0, 40.0, 14.0, "", "number of hull points (more = rounder, more facets)"),
    }, _gen_polyhedra),
    "crystals": GeometryKind("crystals", "faceted crystals: cube-cuboctahedron-octahedron series and hexagonal prisms", {
        "size_mean": _SIZE, "size_gsd": _GSD, "coverage": _COV._replace(max=0.65),
        "habit": _P(0.0, 1.0, 0.0, "", "cubic habit: 0 cube, 0.25 truncated cube, 0.5 cuboctahedron, 1 octahedron"),
        "hex_fraction": _P(0.0, 1.0, 0.0, "", "fraction of hexagonal prisms/plates instead of cubic crystals"),
        "hex_aspect": _P(0.1, 3.0, 0.4, "", "hexagonal prism height / width across flats (<0.5 plates)"),
        "elongation": _ELONG._replace(default=1.0),
        "roundness": _ROUND._replace(default=0.05),
        "irregularity": _P(0.0, 0.3, 0.08, "", "random relative shift of each face plane"),
    }, _gen_crystals),
    "ellipsoids": GeometryKind("ellipsoids", "ellipsoids lying flat with random in-plane orientation", {
        "size_mean": _SIZE, "size_gsd": _GSD, "coverage": _COV._replace(max=0.65),
        "aspect": _P(1.0, 4.0, 2.0, "", "long / short in-plane axis"),
        "flatness": _P(0.3, 1.0, 1.0, "", "vertical / short in-plane axis"),
        "alignment": _P(0.0, 1.0, 0.0, "", "in-plane orientation order: 0 random, 1 all parallel"),
    }, _gen_ellipsoids),
    "rods": GeometryKind("rods", "capsules or flat-ended hexagonal prisms lying flat", {
        "length_mean": _P(6.0, 400.0, 60.0, "px", "geometric mean tip-to-tip length"),
        "diameter": _P(2.0, 80.0, 12.0, "px", "geometric mean diameter (length is at least 1.05 diameters)"),
        "size_gsd": _GSD._replace(description="geometric std of lengths (diameters use 1 + (gsd - 1) / 2)"),
        "end_shape": _P(0.0, 1.0, 0.0, "", "fraction of flat-ended hexagonal prisms (0 = all capsules)"),
        "alignment": _P(0.0, 1.0, 0.0, "", "in-plane orientation order: 0 random, 1 all parallel"),
        "coverage": _COV._replace(default=0.25),
    }, _gen_rods),
}
# Every kind may carry a second population of spheres (0 coverage = none).
for _kind_spec in GEOMETRY_KINDS.values():
    _kind_spec.params.update(MIXTURE_PARAMS)


def validate_geometry_params(kind: str, params: dict[str, float] | None) -> dict[str, float]:
    """Full, validated parameter dict for a kind (defaults filled in). Raises LibraryError."""
    return _kind(kind).validate(params)


def _kind(kind: str) -> GeometryKind:
    if kind not in GEOMETRY_KINDS:
        raise LibraryError(f"unknown geometry kind '{kind}'",
                           hint="available kinds: " + ", ".join(sorted(GEOMETRY_KINDS)))
    return GEOMETRY_KINDS[kind]


def generate_layout(kind: str, params: dict[str, float] | None, size: int, seed: int) -> ParticleLayout:
    """Generate a particle layout; deterministic per (kind, params, size, seed)."""
    spec = _kind(kind)
    p = spec.validate(params)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 8 <= int(size) <= 16384:
        raise LibraryError(f"geometry field size must be an integer in [8, 16384], got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise LibraryError(f"geometry seed must be an integer, got {seed!r}")
    t0 = time.perf_counter()
    # Few large agglomerates at low coverage can all land outside a small field; an empty
    # image is useless to a user, so redraw (deterministically) until something is visible.
    for attempt in range(8):
        rng = np.random.default_rng(int(seed) + 7_919_000 * attempt)
        layout = spec.generator(p, int(size), rng)
        if layout.n_particles > 0:
            break
    # Its own stream, so a material's main particles do not move when a second population is added.
    layout = add_second_population(layout, p, int(size), np.random.default_rng([int(seed) % 2**63, 2]))
    layout.info["params"] = p
    layout.info["seconds"] = time.perf_counter() - t0
    return layout
