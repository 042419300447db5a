"""Procedural particle layouts as triangle meshes (numpy only, no Mitsuba import).

Conventions (docs/ARCHITECTURE.md): one world unit = one pixel of the working render; the field
is ``[0, size] x [0, size]`` in x/y, z up, the substrate is the plane z = 0 (not part of the
mesh), the orthographic camera looks down -z.

Every kind runs the same pipeline: draw particles until their footprint area reaches
``coverage`` of an extended periodic domain (the field plus a margin as wide as the largest
particle, so the density stays uniform up to the field border); pack the footprints without
overlap (``packing``); build the meshes of the kept particles from cached templates
(``meshes``). One module per kind: ``spheres``, ``rods``, ``convex``, ``agglomerates``; the
registry is ``kinds``.
"""
from fitting.render.geometry.agglomerates import fractal_dimension_estimate, grow_aggregate
from fitting.render.geometry.kinds import GEOMETRY_KINDS, generate_layout, validate_geometry_params
from fitting.render.geometry.layout import GeometryKind, GeometryParam, InstanceGroup, ParticleLayout

__all__ = [
    "GEOMETRY_KINDS", "GeometryKind", "GeometryParam", "InstanceGroup", "ParticleLayout",
    "fractal_dimension_estimate", "generate_layout", "grow_aggregate", "validate_geometry_params",
]
