"""Data types of a particle layout: instance groups of shared meshes and the layout itself.

Conventions (docs/ARCHITECTURE.md): one world unit = one pixel of the working render, field
``[0, size]^2`` in x/y, z up, substrate plane z = 0.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np

from fitting.core.errors import LibraryError
from fitting.render.geometry.raster import _rasterize_top


@dataclass
class InstanceGroup:
    """k particles that are affine images of one mesh: world = matrices[j] @ [template; 1]."""

    vertices: np.ndarray        # (V,3) float32 template positions (centred)
    normals: np.ndarray         # (V,3) float32 template shading normals
    faces: np.ndarray           # (F,3) int32
    matrices: np.ndarray        # (k,3,4) float32 template -> world
    pids: np.ndarray            # (k,) int32 particle ids
    face_start: int             # first face of this group in the merged soup
    face_count: int             # k * F


@dataclass
class ParticleLayout:
    """A particle field as one triangle soup; faces map to particle ids 1..N (0 = substrate).

    The soup (``vertices``, ``normals``, ``faces``, ``face_particle``) is built on first use:
    a renderer of instanced particles never needs it, and expanding it costs time per image in
    bulk (docs/decisions.md, "Lazy triangle soup").
    """

    soup: "Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]" = field(repr=False)
    n_triangles: int            # faces in the soup
    z_max: float                # highest vertex z (the soup's, exactly)
    centers: np.ndarray         # (N,3) float32
    radii: np.ndarray           # (N,) float32 volume-equivalent sphere radius
    attributes: np.ndarray      # (N,) float32 uniform [0,1) per particle
    cluster: np.ndarray         # (N,) int32 agglomerate id (== particle id for single particles)
    size: float                 # field side in world units
    kind: str
    info: dict = field(default_factory=dict)   # target/achieved coverage, counts, timings
    # The same particles as affine copies of shared meshes, for the renderer: a Mitsuba scene
    # of instances builds its BVH much faster than one of the merged soup (Embree's
    # high-quality build is per triangle, the instance level per particle; docs/decisions.md,
    # "Instanced particles").  Faces not covered by any group (``loose_faces``) are rendered
    # as one merged mesh.  Empty = merged only.
    instances: list["InstanceGroup"] = field(default_factory=list)
    loose_faces: np.ndarray | None = None      # (L,) face indices outside every instance group
    # (N,) int8 population of each particle: 0 = the material's main particles, 1 = its second
    # population (see :mod:`fitting.render.geometry.mixture`). None = all main.
    population: np.ndarray | None = None

    @property
    def populations(self) -> np.ndarray:
        """(N,) int8 population per particle (zeros where the layout has a single population)."""
        if self.population is None:
            return np.zeros(self.n_particles, np.int8)
        return np.asarray(self.population, np.int8)

    @property
    def n_particles(self) -> int:
        return int(len(self.radii))

    @functools.cached_property
    def _mesh(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.soup()

    @property
    def vertices(self) -> np.ndarray:
        """(V,3) float32."""
        return self._mesh[0]

    @property
    def normals(self) -> np.ndarray:
        """(V,3) float32 unit per-vertex shading normals."""
        return self._mesh[1]

    @property
    def faces(self) -> np.ndarray:
        """(F,3) int32, counter-clockwise seen from outside."""
        return self._mesh[2]

    @property
    def face_particle(self) -> np.ndarray:
        """(F,) int32 particle id 1..N."""
        return self._mesh[3]

    def top_view(self, resolution: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Z-buffered top view of the field.

        Returns ``(height, particle_id, normal)``: (R,R) float32 height (0 on the substrate),
        (R,R) int32 particle id (0 = substrate) and (R,R,3) float32 interpolated normals.
        Row 0 is y = size (image convention), column 0 is x = 0.
        """
        res = int(resolution)
        zbuf, fid, bary = _rasterize_top(self.vertices, self.faces, float(self.size), res)
        hit = fid >= 0
        height = np.where(hit, zbuf, 0.0).astype(np.float32)
        pid = np.zeros((res, res), np.int32)
        pid[hit] = self.face_particle[fid[hit]]
        nrm = np.zeros((res, res, 3), np.float32)
        nrm[..., 2] = 1.0
        if hit.any():
            tri = self.faces[fid[hit]]
            n = (self.normals[tri] * bary[hit][:, :, None]).sum(1)
            n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
            nrm[hit] = n
        return height, pid, nrm

    def projected_coverage(self, resolution: int = 256) -> float:
        """Fraction of the field covered by particles in top view (pixel-centre sampling)."""
        res = int(resolution)
        _, fid, _ = _rasterize_top(self.vertices, self.faces, float(self.size), res, want_bary=False)
        return float((fid >= 0).mean())


class GeometryParam(NamedTuple):
    """One physical parameter of a geometry kind: ``(min, max, default, unit, description)``."""

    min: float
    max: float
    default: float
    unit: str
    description: str


@dataclass(frozen=True)
class GeometryKind:
    name: str
    description: str
    params: dict[str, GeometryParam]
    generator: Callable[[dict[str, float], int, np.random.Generator], ParticleLayout]

    def defaults(self) -> dict[str, float]:
        return {k: p.default for k, p in self.params.items()}

    def validate(self, params: dict[str, float] | None) -> dict[str, float]:
        """Fill defaults, reject unknown names and out-of-range values (LibraryError)."""
        out = self.defaults()
        for key, value in (params or {}).items():
            if key not in self.params:
                raise LibraryError(
                    f"geometry '{self.name}' has no parameter '{key}'",
                    hint="known parameters: " + ", ".join(sorted(self.params)))
            spec = self.params[key]
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise LibraryError(f"geometry parameter {self.name}.{key} must be a number, got {value!r}",
                                   hint=f"use a value in [{spec.min}, {spec.max}] {spec.unit}".rstrip())
            v = float(value)
            tol = 1e-9 * max(1.0, abs(spec.max - spec.min))
            if not math.isfinite(v) or v < spec.min - tol or v > spec.max + tol:
                raise LibraryError(
                    f"geometry parameter {self.name}.{key} = {value!r} is outside "
                    f"[{spec.min}, {spec.max}] {spec.unit}".rstrip(),
                    hint=f"{key}: {spec.description}")
            out[key] = min(max(v, spec.min), spec.max)
        return out
