"""Procedural particle layouts as triangle meshes (numpy only, no Mitsuba import).

Conventions (docs/ARCHITECTURE.md): one world unit = one pixel of the working render; the
field is ``[0, size] x [0, size]`` in x/y, z up, the substrate is the plane z = 0 (not part of
the mesh), the orthographic camera looks down -z.

Every kind runs the same pipeline:

1. Draw particles (sizes, shapes, rest orientations) until their footprint area reaches
   ``coverage`` x the area of an *extended periodic domain*: the field plus, on each side, a
   margin as wide as the largest possible particle.  Packing on that torus and then keeping the
   particles whose footprint touches the field gives a density that is uniform right up to the
   field border (particles cross it; nothing is duplicated) and no visible seam.
2. Pack the 2-D footprints without overlap: random sequential addition, largest first,
   vectorised in rounds (KD-tree broad phase per size class) of *shrunken* footprints, then grow
   them back to full size with push-apart relaxation, then drop the few particles that still
   overlap.  Footprints are tested exactly for discs (spheres) and conservatively for other
   shapes (capsule AND 24-direction discrete oriented polytope), so separated footprints
   guarantee separated particles.  Agglomerates instead are placed rigidly by 3-D
   primary-primary tests (their projections may interleave, their primaries may not touch).
3. Build the meshes of the kept particles by instancing cached templates (icospheres, convex or
   Minkowski-rounded polyhedra, capsules, hexagonal prisms), with a level of detail chosen from
   the on-screen size and a global triangle budget.

Public API: :class:`ParticleLayout`, :data:`GEOMETRY_KINDS`, :func:`generate_layout`,
:func:`validate_geometry_params`, :func:`grow_aggregate`, :func:`fractal_dimension_estimate`.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
from scipy.spatial import ConvexHull, HalfspaceIntersection, cKDTree

from .errors import LibraryError

__all__ = [
    "GEOMETRY_KINDS", "GeometryKind", "GeometryParam", "ParticleLayout", "fractal_dimension_estimate",
    "generate_layout", "grow_aggregate", "validate_geometry_params",
]

#: Triangles allowed for a 512 x 512 field (scaled with the field area for larger fields).
TRIANGLE_BUDGET_512 = 400_000
#: Largest silhouette deviation (px) a tessellation may have before more detail is used.
_SAGITTA_TOL = 0.25

# --------------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------------


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
    a renderer of instanced particles never needs it (a 512 px carbon-black field has ~78k
    instanced vertices, 5-6 ms to expand, transform and normalise per image in bulk).
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
    # of instances builds its BVH ~10-50x faster than one of the merged soup (Embree's
    # high-quality build is per triangle, the instance level per particle).  Faces not covered
    # by any group (``loose_faces``) are rendered as one merged mesh.  Empty = merged only.
    instances: list["InstanceGroup"] = field(default_factory=list)
    loose_faces: np.ndarray | None = None      # (L,) face indices outside every instance group

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


# --------------------------------------------------------------------------------------------
# Small numeric helpers
# --------------------------------------------------------------------------------------------


def _lognormal(rng: np.random.Generator, gmean: float, gsd: float, n: int, clip: float = 3.0) -> np.ndarray:
    """Log-normal draws (geometric mean, geometric std), truncated at +-clip sigma by resampling."""
    s = math.log(max(gsd, 1.0))
    z = rng.standard_normal(n)
    if s > 0:
        bad = np.abs(z) > clip
        while bad.any():
            z[bad] = rng.standard_normal(int(bad.sum()))
            bad = np.abs(z) > clip
    return gmean * np.exp(s * z)


def _lognormal_max(gmean: float, gsd: float, clip: float = 3.0) -> float:
    return gmean * math.exp(clip * math.log(max(gsd, 1.0)))


def _random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n,3,3) uniformly distributed rotation matrices (random unit quaternions)."""
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], 1)


def _rot_z(theta: np.ndarray) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    o, z = np.ones_like(c), np.zeros_like(c)
    return np.stack([np.stack([c, -s, z], -1), np.stack([s, c, z], -1), np.stack([z, z, o], -1)], 1)


def _rot_align(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,3,3) rotations taking unit vectors a (n,3) onto the unit vector b (3,)."""
    a = np.atleast_2d(a) / np.linalg.norm(np.atleast_2d(a), axis=1, keepdims=True)
    v = np.cross(a, b[None, :])
    c = a @ b
    vx = np.zeros((len(a), 3, 3))
    vx[:, 0, 1], vx[:, 0, 2], vx[:, 1, 2] = -v[:, 2], v[:, 1], -v[:, 0]
    vx[:, 1, 0], vx[:, 2, 0], vx[:, 2, 1] = v[:, 2], -v[:, 1], v[:, 0]
    anti = c < -1 + 1e-9
    k = 1.0 / np.where(anti, 1.0, 1.0 + c)
    R = np.eye(3)[None] + vx + (vx @ vx) * k[:, None, None]
    if anti.any():   # 180 degrees about any axis perpendicular to a
        for i in np.flatnonzero(anti):
            p = np.cross(a[i], [1.0, 0, 0])
            if np.linalg.norm(p) < 1e-6:
                p = np.cross(a[i], [0, 1.0, 0])
            p /= np.linalg.norm(p)
            R[i] = 2 * np.outer(p, p) - np.eye(3)
    return R


def _wrap(d: np.ndarray, box) -> np.ndarray:
    return d - box * np.round(d / box)


def _wrap_pos(p: np.ndarray, box: float) -> np.ndarray:
    p = np.mod(p, box)
    p[p >= box] = 0.0
    return p


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-300)


def _triangle_budget(size: float) -> int:
    return int(TRIANGLE_BUDGET_512 * max(1.0, (size / 512.0) ** 2))


def _field_box(size: float, bmax: float) -> tuple[float, float]:
    """(box, offset): periodic packing domain and the field's offset inside it."""
    margin = bmax + 1.0
    box = max(size + 2 * margin, 4.2 * bmax)
    return box, 0.5 * (box - size)


# --------------------------------------------------------------------------------------------
# Mesh templates
# --------------------------------------------------------------------------------------------

_TRIS_PER_LEVEL = {-2: 12, -1: 16, 0: 24, 1: 80, 2: 320, 3: 1280, 4: 5120}


def _orient_faces(v: np.ndarray, f: np.ndarray, outward: np.ndarray) -> np.ndarray:
    """Flip faces whose geometric normal disagrees with the given outward directions (F,3)."""
    cr = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    flip = (cr * outward).sum(1) < 0
    f = f.copy()
    f[flip] = f[flip][:, ::-1]
    return f


@functools.lru_cache(maxsize=None)
def _unit_sphere(level: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit icosphere of the given subdivision level: (V,3) float64, (F,3) int64.

    Rotated so that a vertex sits exactly at the south pole (the mesh touches z = -1)."""
    t = (1 + 5 ** 0.5) / 2
    v = np.array([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t], [0, -1, -t],
                  [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], float)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v = v @ _rot_align(v[6], np.array([0, 0, -1.0]))[0].T
    f = np.array([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4],
                  [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8],
                  [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]])
    f = _orient_faces(v, f, v[f].mean(1))
    for _ in range(level):
        e = np.sort(np.stack([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]], 1).reshape(-1, 2), axis=1)
        uniq, inv = np.unique(e, axis=0, return_inverse=True)
        mid = _normalize(v[uniq[:, 0]] + v[uniq[:, 1]])
        m = (len(v) + inv.reshape(-1)).reshape(-1, 3)
        a, b, c = f.T
        ab, bc, ca = m.T
        f = np.concatenate([np.stack([a, ab, ca], 1), np.stack([b, bc, ab], 1),
                            np.stack([c, ca, bc], 1), np.stack([ab, bc, ca], 1)])
        v = np.concatenate([v, mid])
    f = _orient_faces(v, f, v[f].mean(1))
    v.setflags(write=False)
    f.setflags(write=False)
    return v, f


@functools.lru_cache(maxsize=None)
def _sphere_template(level: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sphere mesh for instancing: (positions, unit normals, faces).

    Levels 1..4 are icospheres; the cheap levels 0, -1, -2 are bicones with a 12- / 8- / 6-gon
    equator (24 / 16 / 12 triangles), which keep far more of the top-view disc than an icosahedron.
    Positions are widened in x/y so the top-view silhouette has exactly the disc's area (a
    polygon inscribed in the circle would under-cover: -6.5 % at level 1).  The widening is
    3.4 % / 0.8 % / 0.2 % at levels 1 / 2 / 3, i.e. at most ~0.22 px at the radii those levels
    are chosen for (the sagitta tolerance), and 2-10 % for the bicones used on tiny or
    budget-limited particles, so touching neighbours may overlap by a fraction of a pixel at
    mesh level; the packing itself (centres, radii) never interpenetrates.  A vertex sits at
    the south pole so the particle touches the substrate exactly."""
    if level >= 1:
        v, f = _unit_sphere(level)
        v = v.copy()
    else:
        k = {0: 12, -1: 8}.get(level, 6)
        a = 2 * np.pi * np.arange(k) / k
        v = np.r_[[[0, 0, -1.0], [0, 0, 1.0]], np.c_[np.cos(a), np.sin(a), np.zeros(k)]]
        j = np.arange(k)
        f = np.r_[np.c_[np.zeros(k, int), 2 + (j + 1) % k, 2 + j], np.c_[np.ones(k, int), 2 + j, 2 + (j + 1) % k]]
        f = _orient_faces(v, f, v[f].mean(1))
    hull = ConvexHull(v[:, :2])
    scale = math.sqrt(math.pi / hull.volume)       # 2-D hull "volume" is its area
    p = v * np.array([scale, scale, 1.0])
    for arr in (p, v, f):
        arr.setflags(write=False)
    return p, v, f


def _sphere_level(r: np.ndarray) -> np.ndarray:
    """Icosphere level keeping the silhouette sagitta r*theta^2/8 under the tolerance."""
    r = np.asarray(r, float)
    lv = np.ceil(np.log2(1.1 * np.sqrt(np.maximum(r, 1e-9) / (8 * _SAGITTA_TOL)))).astype(int)
    return np.clip(lv, 0, 4)


def _budget_levels(levels: np.ndarray, budget: int, extra: int = 0) -> np.ndarray:
    """Lower sphere levels, biggest triangle contributor first, until the budget holds."""
    lv = levels.copy()
    table = np.array([_TRIS_PER_LEVEL[x] for x in range(-2, 5)])
    while True:
        tris = table[lv + 2]
        if tris.sum() + extra <= budget or lv.max() <= -2:
            return lv
        contrib = {L: tris[lv == L].sum() for L in np.unique(lv) if L > -2}
        worst = max(contrib, key=contrib.get)
        lv[lv == worst] -= 1


@functools.lru_cache(maxsize=None)
def _capsule_template(n_theta: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit capsule along x: returns (normals (V,3), side (V,) -1/+1 hemisphere, faces).

    Position of a vertex for a capsule with half cylinder length hl and radius r:
    ``n * r + side * hl * x``.  n_theta is a multiple of 4 so a vertex touches the floor."""
    n_lat = max(2, n_theta // 4)
    th = 2 * np.pi * np.arange(n_theta) / n_theta
    rings = [(-1, -np.pi / 2 + np.pi / 2 * k / n_lat) for k in range(1, n_lat + 1)]
    rings += [(+1, np.pi / 2 * k / n_lat) for k in range(0, n_lat)]
    nrm = [np.array([[-1.0, 0, 0]])]
    side = [np.array([-1.0])]
    for s, phi in rings:
        nrm.append(np.stack([np.full(n_theta, np.sin(phi)), np.cos(phi) * np.cos(th),
                             np.cos(phi) * np.sin(th)], 1))
        side.append(np.full(n_theta, float(s)))
    nrm.append(np.array([[1.0, 0, 0]]))
    side.append(np.array([1.0]))
    nrm = np.concatenate(nrm)
    side = np.concatenate(side)
    nr = len(rings)
    ring0 = 1 + n_theta * np.arange(nr)
    j = np.arange(n_theta)
    jn = (j + 1) % n_theta
    faces = [np.stack([np.zeros(n_theta, int), ring0[0] + jn, ring0[0] + j], 1)]
    for k in range(nr - 1):
        a, b = ring0[k], ring0[k + 1]
        faces.append(np.stack([a + j, a + jn, b + jn], 1))
        faces.append(np.stack([a + j, b + jn, b + j], 1))
    last = len(nrm) - 1
    faces.append(np.stack([ring0[-1] + j, ring0[-1] + jn, np.full(n_theta, last)], 1))
    faces = np.concatenate(faces)
    pos = nrm * 1.0 + side[:, None] * np.array([0.5, 0, 0])   # any hl > 0 to orient
    faces = _orient_faces(pos, faces, nrm[faces].sum(1))
    return nrm, side, faces


@functools.lru_cache(maxsize=None)
def _hex_prism_template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat-shaded hexagonal prism along x, apothem 1 (a side face down), length 2 (x in [-1,1])."""
    ang = np.pi / 2 + np.pi / 6 + np.pi / 3 * np.arange(6)    # vertices; faces at -90 deg (down)
    R = 1 / np.cos(np.pi / 6)
    ring = np.stack([R * np.cos(ang), R * np.sin(ang)], 1)   # (y, z)
    v, n, f = [], [], []
    for k in range(6):   # side faces
        p, q = ring[k], ring[(k + 1) % 6]
        mid = _normalize((p + q)[None])[0]
        quad = np.array([[-1, p[0], p[1]], [1, p[0], p[1]], [1, q[0], q[1]], [-1, q[0], q[1]]])
        base = len(v) * 4
        v.append(quad)
        n.append(np.repeat([[0, mid[0], mid[1]]], 4, 0))
        f += [[base, base + 1, base + 2], [base, base + 2, base + 3]]
    verts = np.concatenate(v)
    norms = np.concatenate(n)
    faces = list(f)
    for s in (-1, 1):   # end caps
        base = len(verts)
        verts = np.concatenate([verts, np.c_[np.full(6, float(s)), ring]])
        norms = np.concatenate([norms, np.repeat([[s, 0, 0]], 6, 0).astype(float)])
        faces += [[base, base + k, base + k + 1] for k in range(1, 5)]
    faces = np.array(faces)
    faces = _orient_faces(verts, faces, norms[faces].sum(1))
    return verts, norms, faces


# An instance is used only when every vertex of the group is reproduced to this fraction of the
# group's extent (float32 round-off of the einsum products is ~1e-7) and every normal within
# ~0.5 degrees; anything else (capsules of varying length) stays in the merged soup.
_AFFINE_TOL = 1e-4
_NORMAL_COS_TOL = 0.99996


def _affine_group(v: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """If every instance ``v[j]`` is an affine image of ``v[0]`` (normals transformed by the
    inverse transpose, as a renderer does), return (centred template, template normals,
    (k,3,4) matrices); otherwise None."""
    k, V = v.shape[:2]
    v = v.astype(np.float64)
    tv = v[0] - v[0].mean(0)
    H = np.c_[tv, np.ones(V)]                                   # (V,4)
    if np.linalg.matrix_rank(H) < 4:
        return None                                              # flat template: affine map not unique
    P = np.linalg.pinv(H)                                        # (4,V)
    # batched matmuls (BLAS) rather than einsum: this check runs for every layout of a bulk set
    MT = P @ v                                                   # (k,4,3): v[j] = H @ MT[j]
    resid = np.abs(H @ MT - v).max()
    extent = float((v.max(axis=(0, 1)) - v.min(axis=(0, 1))).max()) + 1e-9
    if not np.isfinite(resid) or resid > _AFFINE_TOL * max(extent, float(np.abs(v).max())):
        return None
    M = np.transpose(MT, (0, 2, 1))                              # (k,3,4)
    B = M[:, :, :3]
    if np.any(np.abs(np.linalg.det(B)) < 1e-12):
        return None
    tn = _normalize(n[0].astype(np.float64))
    pred = _normalize(tn @ np.linalg.inv(B))                     # (k,V,3): B^-T n, row vectors
    if np.any((pred * _normalize(n.astype(np.float64))).sum(-1) < _NORMAL_COS_TOL):
        return None
    return tv.astype(np.float32), tn.astype(np.float32), M.astype(np.float32)


class _MeshBuilder:
    """Collects particle meshes into one soup plus instance groups for the renderer.

    Each ``add`` is a group of k particles sharing a face list. Their world-space soup
    (vertices, normals, faces, particle ids) is only materialised by :meth:`build`, which the
    layout calls on first use of its soup; an ``expand`` callable defers even the world
    vertices of instanced groups."""

    def __init__(self) -> None:
        self.parts: list[tuple] = []      # (expand() -> (v, n) of shape (k,V,3), tf, pids, face offset)
        self.groups: list[InstanceGroup] = []
        self.nv = 0
        self.nf = 0
        self.z_max = -np.inf

    def add(self, v: np.ndarray, n: np.ndarray, tf: np.ndarray, pids: np.ndarray,
            transforms: np.ndarray | None = None, expand=None, z_max: float | None = None) -> None:
        """v, n: (k,V,3) instance vertices/normals; tf (F,3) template faces; pids (k,).

        ``transforms`` (k,3,4): the caller's exact affine maps from instance 0's centred
        vertices to each instance (normals by the inverse transpose) -- skips the least-squares
        detection of :func:`_affine_group` when the generator knows them by construction.
        With ``transforms``, ``v`` and ``n`` may hold instance 0 only (shape (1,V,3)) when
        ``expand()`` returns all k of them on demand and ``z_max`` is their highest z."""
        k = len(pids)
        if k == 0:
            return
        V = v.shape[1]
        if transforms is not None:
            affine = ((v[0] - v[0].mean(0)).astype(np.float32), _normalize(n[0].astype(np.float64)).astype(np.float32),
                      np.asarray(transforms, np.float32))
        else:
            affine = _affine_group(v, n)
        if affine is not None:
            tv, tn, M = affine
            self.groups.append(InstanceGroup(tv, tn, np.asarray(tf, np.int32), M, np.asarray(pids, np.int32),
                                             self.nf, k * len(tf)))
        if expand is None:
            if len(v) != k:
                raise ValueError(f"{len(v)} vertex sets for {k} particles and no expand()")
            expand = (lambda v=v, n=n: (v, n))
            z_max = float(v[..., 2].astype(np.float32).max())   # the soup's vertices are float32
        self.z_max = max(self.z_max, float(z_max))
        self.parts.append((expand, np.asarray(tf), np.asarray(pids, np.int32), self.nv))
        self.nv += k * V
        self.nf += k * len(tf)

    def build(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not self.parts:
            return (np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32),
                    np.zeros((0, 3), np.int32), np.zeros(0, np.int32))
        vs, ns, fs, ps = [], [], [], []
        for expand, tf, pids, nv in self.parts:
            v, n = expand()
            k, V = v.shape[:2]
            vs.append(v.reshape(-1, 3).astype(np.float32))
            ns.append(_normalize(n.reshape(-1, 3)).astype(np.float32))
            fs.append((tf[None, :, :] + (nv + V * np.arange(k))[:, None, None]).reshape(-1, 3).astype(np.int32))
            ps.append(np.repeat(pids, len(tf)))
        return np.concatenate(vs), np.concatenate(ns), np.concatenate(fs), np.concatenate(ps)

    def loose_faces(self) -> np.ndarray:
        covered = np.zeros(self.nf, bool)
        for g in self.groups:
            covered[g.face_start:g.face_start + g.face_count] = True
        return np.flatnonzero(~covered).astype(np.int64)


def _scaled_spheres(tp: np.ndarray, tn: np.ndarray, s: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World vertices and (unnormalised) normals of k spheres: template (V,3) scaled per axis by
    s (k,3) and moved to c (k,3); each sphere's rows depend on its own s and c only."""
    return tp[None] * s[:, None, :] + c[:, None, :], tn[None] / s[:, None, :]


def _add_spheres(mb: _MeshBuilder, centers: np.ndarray, radii: np.ndarray, pids: np.ndarray,
                 levels: np.ndarray, zscale: float = 1.0) -> None:
    for L in np.unique(levels):
        sel = np.flatnonzero(levels == L)
        tp, tn, tf = _sphere_template(int(L))
        s = np.repeat(radii[sel, None], 3, 1)
        s[:, 2] *= zscale
        c = centers[sel]
        expand = functools.partial(_scaled_spheres, tp, tn, s, c)
        if not np.all(s[0] > 0):                 # degenerate: let the builder detect groups
            v, n = expand()
            mb.add(v, n, tf, pids[sel])
            continue
        # instance j = (instance 0 centred) * s_j / s_0 + (template mean * s_j + c_j), exactly
        m = np.zeros((len(sel), 3, 4))
        m[:, [0, 1, 2], [0, 1, 2]] = s / s[:1]
        m[:, :, 3] = tp.mean(0)[None] * s + c
        # = the expanded soup's highest float32 z, exactly (same operations on the top vertex)
        z_top = float(np.float32((tp[:, 2].max() * s[:, 2] + c[:, 2]).max()))
        v0, n0 = _scaled_spheres(tp, tn, s[:1], c[:1])
        mb.add(v0, n0, tf, pids[sel], transforms=m, expand=expand, z_max=z_top)


# --------------------------------------------------------------------------------------------
# Top-view rasteriser (coverage, height maps)
# --------------------------------------------------------------------------------------------


def _raster_fragments(vertices, faces, size: float, res: int, chunk: int = 3_000_000):
    """Yield (flat pixel index, face index, b0, b1, b2, z) for every pixel centre covered by a
    front-facing (counter-clockwise from above) triangle.  Row 0 of the image is y = size."""
    if len(faces) == 0:
        return
    v = np.asarray(vertices, np.float64)
    tri = v[np.asarray(faces)]
    x, y = tri[:, :, 0] * (res / size) - 0.5, tri[:, :, 1] * (res / size) - 0.5
    det = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    x0 = np.maximum(np.ceil(x.min(1)), 0).astype(np.int64)
    x1 = np.minimum(np.floor(x.max(1)), res - 1).astype(np.int64)
    y0 = np.maximum(np.ceil(y.min(1)), 0).astype(np.int64)
    y1 = np.minimum(np.floor(y.max(1)), res - 1).astype(np.int64)
    nx, ny = np.maximum(x1 - x0 + 1, 0), np.maximum(y1 - y0 + 1, 0)
    cnt = np.where(det > 1e-12, nx * ny, 0)
    live = np.flatnonzero(cnt)
    cs = np.cumsum(cnt[live])
    a = 0
    while a < len(live):
        base = cs[a - 1] if a > 0 else 0
        b = max(int(np.searchsorted(cs, base + chunk, side="right")), a + 1)
        t = live[a:b]
        a = b
        c = cnt[t]
        ti = np.repeat(t, c)
        local = np.arange(len(ti)) - np.repeat(np.cumsum(c) - c, c)
        px = x0[ti] + local % nx[ti]
        py = y0[ti] + local // nx[ti]
        dx, dy = px - x[ti, 0], py - y[ti, 0]
        d = det[ti]
        b1 = (dx * (y[ti, 2] - y[ti, 0]) - (x[ti, 2] - x[ti, 0]) * dy) / d
        b2 = ((x[ti, 1] - x[ti, 0]) * dy - dx * (y[ti, 1] - y[ti, 0])) / d
        b0 = 1 - b1 - b2
        ins = (b0 >= -1e-9) & (b1 >= -1e-9) & (b2 >= -1e-9)
        ti, px, py, b0, b1, b2 = ti[ins], px[ins], py[ins], b0[ins], b1[ins], b2[ins]
        z = b0 * tri[ti, 0, 2] + b1 * tri[ti, 1, 2] + b2 * tri[ti, 2, 2]
        yield (res - 1 - py) * res + px, ti, b0, b1, b2, z


def _rasterize_top(vertices, faces, size: float, res: int, want_bary: bool = True):
    """Z-buffer front-facing triangles at pixel centres. Returns (zbuf, face id, barycentrics)."""
    zbuf = np.full(res * res, -np.inf)
    fid = np.full(res * res, -1, np.int64)
    bary = np.zeros((res * res, 3), np.float32) if want_bary else None
    frags = list(_raster_fragments(vertices, faces, size, res))
    for flat, _, _, _, _, z in frags:
        np.maximum.at(zbuf, flat, z)
    for flat, ti, b0, b1, b2, z in frags:
        win = z >= zbuf[flat]
        fid[flat[win]] = ti[win]
        if want_bary:
            bary[flat[win]] = np.stack([b0[win], b1[win], b2[win]], 1)
    return zbuf.reshape(res, res), fid.reshape(res, res), (bary.reshape(res, res, 3) if want_bary else None)


# --------------------------------------------------------------------------------------------
# 2-D footprints and packing
# --------------------------------------------------------------------------------------------

_K_DOP = 24
_DOP_DIR = np.stack([np.cos(2 * np.pi * np.arange(_K_DOP) / _K_DOP),
                     np.sin(2 * np.pi * np.arange(_K_DOP) / _K_DOP)], 1)


@dataclass
class _Footprints:
    """Per particle, relative to its reference point: a containing capsule, an optional
    24-direction support polygon (k-DOP), the bounding radius and the true footprint area."""

    area: np.ndarray
    brad: np.ndarray
    cap_off: np.ndarray
    cap_half: np.ndarray
    cap_rad: np.ndarray
    dop: np.ndarray | None = None
    # optional in-plane rotation during relaxation (elongated shapes with analytic footprints):
    theta: np.ndarray | None = None                 # current orientation
    k2: np.ndarray | None = None                    # squared radius of gyration (torque -> turn)
    builder: Callable[[np.ndarray], "_Footprints"] | None = None   # footprints for new angles

    @staticmethod
    def discs(r: np.ndarray) -> "_Footprints":
        r = np.asarray(r, float)
        z = np.zeros((len(r), 2))
        return _Footprints(np.pi * r * r, r.copy(), z, z.copy(), r.copy())

    def scaled(self, s: float) -> "_Footprints":
        """Shrunken copy (for the RSA phase); it does not rotate."""
        return _Footprints(self.area * s * s, self.brad * s, self.cap_off * s, self.cap_half * s,
                           self.cap_rad * s, None if self.dop is None else self.dop * s, self.theta)

    def rotated(self, theta: np.ndarray) -> "_Footprints":
        fp = self.builder(theta)
        fp.theta, fp.k2, fp.builder = theta, self.k2, self.builder
        return fp


def _footprints_from_points(pts: np.ndarray, rho: np.ndarray, area: np.ndarray) -> _Footprints:
    """Footprints of convex bodies conv(pts) (+) disc(rho): pts (N,m,2) relative to the reference."""
    N = len(pts)
    dop = np.empty((N, _K_DOP))
    cap_off, cap_half, cap_rad = np.empty((N, 2)), np.empty((N, 2)), np.empty(N)
    step = max(1, 2_000_000 // max(1, pts.shape[1] * _K_DOP))
    fr = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    for a in range(0, N, step):
        p = pts[a:a + step]
        h = np.einsum("nmc,kc->nkm", p, _DOP_DIR).max(2) + rho[a:a + step, None]
        dop[a:a + step] = h
        half = _K_DOP // 2
        k = np.argmax(h[:, :half] + h[:, half:], axis=1)
        ax = _DOP_DIR[k]
        pe = np.stack([-ax[:, 1], ax[:, 0]], 1)
        s = np.einsum("nmc,nc->nm", p, ax)
        t = np.einsum("nmc,nc->nm", p, pe)
        t0 = 0.5 * (t.max(1) + t.min(1))
        w = 0.5 * (t.max(1) - t.min(1))
        s0, s1 = s.min(1), s.max(1)
        mid = 0.5 * (s0 + s1)
        # candidate segments [s0+delta, s1-delta]; radius = farthest point + rho
        dl = np.minimum(fr[None, :] * w[:, None], 0.5 * (s1 - s0)[:, None])       # (n,5)
        lo, hi = s0[:, None] + dl, s1[:, None] - dl
        sc = np.clip(s[:, None, :], lo[:, :, None], hi[:, :, None])
        dist = np.sqrt((s[:, None, :] - sc) ** 2 + (t - t0[:, None])[:, None, :] ** 2).max(2)
        rad = dist + rho[a:a + step, None]
        hl = 0.5 * (hi - lo)
        capa = 4 * rad * hl + np.pi * rad * rad
        best = np.argmin(capa, 1)
        i = np.arange(len(p))
        cap_rad[a:a + step] = rad[i, best]
        cap_half[a:a + step] = ax * hl[i, best][:, None]
        cap_off[a:a + step] = ax * mid[:, None] + pe * t0[:, None]
    brad = np.sqrt((pts ** 2).sum(2)).max(1) + rho
    return _Footprints(np.asarray(area, float), brad, cap_off, cap_half, cap_rad, dop)


def _closest_seg_seg(p1, q1, p2, q2):
    """Closest points of segment pairs (vectorised, Ericson 5.1.9)."""
    d1, d2, r = q1 - p1, q2 - p2, p1 - p2
    a = (d1 * d1).sum(1)
    e = (d2 * d2).sum(1)
    f = (d2 * r).sum(1)
    c = (d1 * r).sum(1)
    b = (d1 * d2).sum(1)
    eps = 1e-12
    a_ok, e_ok = a > eps, e > eps
    a_s, e_s = np.where(a_ok, a, 1.0), np.where(e_ok, e, 1.0)
    denom = a * e - b * b
    gen = a_ok & e_ok & (denom > 1e-12 * a_s * e_s)
    s = np.where(gen, np.clip((b * f - c * e) / np.where(gen, denom, 1.0), 0, 1), 0.0)
    s = np.where(a_ok & ~e_ok, np.clip(-c / a_s, 0, 1), s)
    t = np.where(e_ok, (b * s + f) / e_s, 0.0)
    out = (t < 0) | (t > 1)
    t = np.clip(t, 0, 1)
    s = np.where(out & a_ok, np.clip((b * t - c) / a_s, 0, 1), s)
    return p1 + d1 * s[:, None], p2 + d2 * t[:, None]


def _pair_depth(fp: _Footprints, i: np.ndarray, j: np.ndarray, delta: np.ndarray, arms: bool = False):
    """Penetration depth (>0: overlap) and unit push direction for j (i pushed opposite).

    ``delta`` = reference of j minus reference of i (minimum image).  With ``arms`` also the
    contact points relative to each particle's reference (closest points of the capsules)."""
    if fp.dop is None and not fp.cap_half.any() and not fp.cap_off.any():    # discs
        d = np.hypot(delta[:, 0], delta[:, 1])
        small = d < 1e-9
        dirv = np.where(small[:, None], np.array([1.0, 0.0]), delta / np.where(small, 1.0, d)[:, None])
        depth = fp.cap_rad[i] + fp.cap_rad[j] - d
        return (depth, dirv, np.zeros_like(delta), np.zeros_like(delta)) if arms else (depth, dirv)
    oi, hi = fp.cap_off[i], fp.cap_half[i]
    oj, hj = fp.cap_off[j] + delta, fp.cap_half[j]
    c1, c2 = _closest_seg_seg(oi - hi, oi + hi, oj - hj, oj + hj)
    v = c2 - c1
    d = np.hypot(v[:, 0], v[:, 1])
    depth = fp.cap_rad[i] + fp.cap_rad[j] - d
    small = d < 1e-9
    dirv = v / np.where(small, 1.0, d)[:, None]
    if small.any():
        dd = delta[small]
        nd = np.hypot(dd[:, 0], dd[:, 1])
        alt = np.where(nd[:, None] > 1e-9, dd / np.maximum(nd, 1e-300)[:, None], np.array([1.0, 0.0]))
        dirv[small] = alt
    if fp.dop is not None:
        sel = np.flatnonzero(depth > 0)
        if sel.size:
            half = _K_DOP // 2
            hi_, hj_ = fp.dop[i[sel]], fp.dop[j[sel]]
            ds = delta[sel]
            proj = ds[:, :1] * _DOP_DIR[None, :half, 0] + ds[:, 1:] * _DOP_DIR[None, :half, 1]
            allv = np.empty((len(sel), _K_DOP))
            np.add(hi_[:, :half], hj_[:, half:], out=allv[:, :half])
            allv[:, :half] -= proj
            np.add(hj_[:, :half], hi_[:, half:], out=allv[:, half:])
            allv[:, half:] += proj
            k = allv.argmin(1)
            dd = allv[np.arange(len(sel)), k]
            better = dd < depth[sel]
            depth[sel] = np.where(better, dd, depth[sel])
            dirv[sel] = np.where(better[:, None], _DOP_DIR[k], dirv[sel])
    if arms:
        return depth, dirv, c1, c2 - delta
    return depth, dirv


def _kdtree(pos: np.ndarray, box) -> cKDTree:
    return cKDTree(pos, boxsize=box, balanced_tree=False, compact_nodes=False)


def _class_groups(b: np.ndarray, bmin: float) -> list[np.ndarray]:
    c = np.floor(np.log2(np.maximum(b / bmin, 1.0))).astype(np.int64)
    order = np.argsort(c, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(c[order])) + 1)


def _pairs(posA, bA, box, margin=0.0, posB=None, bB=None):
    """Pairs (ia, ib) with overlapping bounding circles (+margin) in the periodic box.

    Broad phase per size class (factor-2 bins) so polydisperse sets stay near O(N log N).
    Without posB: pairs inside A with ia < ib."""
    same = posB is None
    if same:
        posB, bB = posA, bA
    if len(posA) == 0 or len(posB) == 0 or (same and len(posA) < 2):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    bmin = max(min(bA.min(), bB.min()), 1e-9)
    gA = _class_groups(bA, bmin)
    gB = gA if same else _class_groups(bB, bmin)
    tA = [_kdtree(posA[g], box) for g in gA]
    tB = tA if same else [_kdtree(posB[g], box) for g in gB]
    out_i, out_j = [], []
    for a, (ga, ta) in enumerate(zip(gA, tA)):
        for c, (gb, tb) in enumerate(zip(gB, tB)):
            if same and c < a:
                continue
            r = bA[ga].max() + bB[gb].max() + margin
            if same and c == a:
                pr = ta.query_pairs(r, output_type="ndarray")
                out_i.append(ga[pr[:, 0]])
                out_j.append(ga[pr[:, 1]])
            else:
                sdm = ta.sparse_distance_matrix(tb, r, output_type="ndarray")
                out_i.append(ga[sdm["i"]])
                out_j.append(gb[sdm["j"]])
    i = np.concatenate(out_i).astype(np.int64)
    j = np.concatenate(out_j).astype(np.int64)
    if same:
        i, j = np.minimum(i, j), np.maximum(i, j)
    d = _wrap(posB[j] - posA[i], box)
    keep = (d * d).sum(1) < (bA[i] + bB[j] + margin) ** 2
    return i[keep], j[keep]


def _overlaps(pos, fp, box, i, j, arms: bool = False):
    """Depth and push direction (and contact arms) for candidate pairs; pairs whose bounding
    circles are apart get a negative depth without running the narrow phase."""
    delta = _wrap(pos[j] - pos[i], box)
    near = (delta * delta).sum(1) < (fp.brad[i] + fp.brad[j]) ** 2
    depth = np.full(len(i), -1.0)
    dirv = np.zeros((len(i), 2))
    ai, aj = np.zeros((len(i), 2)), np.zeros((len(i), 2))
    if near.any():
        k = np.flatnonzero(near)
        if arms:
            depth[k], dirv[k], ai[k], aj[k] = _pair_depth(fp, i[k], j[k], delta[k], arms=True)
        else:
            depth[k], dirv[k] = _pair_depth(fp, i[k], j[k], delta[k])
    return (depth, dirv, ai, aj) if arms else (depth, dirv)


def _rsa(fp: _Footprints, box: float, rng: np.random.Generator, max_rounds: int = 40,
         proposals: int = 3, pos: np.ndarray | None = None,
         placed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Random sequential addition, largest first, in vectorised rounds.

    Each round proposes positions for every unplaced particle; a proposal is kept if it misses
    all placed particles and every earlier (larger) candidate of the same round.  ``pos`` /
    ``placed`` continue from an existing placement (placed particles stay where they are)."""
    N = len(fp.area)
    pos = np.zeros((N, 2)) if pos is None else pos.copy()
    placed = np.zeros(N, bool) if placed is None else placed.copy()
    queue = np.argsort(-fp.area, kind="stable")
    queue = queue[~placed[queue]]
    stall = 0
    n_queue0 = len(queue)
    for _ in range(max_rounds):
        # stop when the rest is a small tail (the caller inserts it and relaxes) or on jamming
        if queue.size == 0 or (queue.size < 0.03 * n_queue0 and queue.size < 0.01 * N + 50):
            break
        T = 1 if not placed.any() else proposals
        prop = rng.random((len(queue), T, 2)) * box
        pidx = np.repeat(queue, T)
        ppos = _wrap_pos(prop.reshape(-1, 2), box)
        bad = np.zeros(len(pidx), bool)
        pl = np.flatnonzero(placed)
        if pl.size:
            ia, ib = _pairs(ppos, fp.brad[pidx], box, posB=pos[pl], bB=fp.brad[pl])
            if ia.size:
                depth, _ = _pair_depth(fp, pidx[ia], pl[ib], _wrap(pos[pl[ib]] - ppos[ia], box))
                bad[ia[depth > 0]] = True
        ok = ~bad.reshape(len(queue), T)
        has = ok.any(1)
        first = np.argmax(ok, 1)
        cand = queue[has]
        cpos = prop[has, first[has]]
        cpos = _wrap_pos(cpos, box)
        reject = np.zeros(len(cand), bool)
        if len(cand) > 1:
            ia, ib = _pairs(cpos, fp.brad[cand], box)
            if ia.size:
                depth, _ = _pair_depth(fp, cand[ia], cand[ib], _wrap(cpos[ib] - cpos[ia], box))
                reject[ib[depth > 0]] = True     # ib > ia: later in size order
        acc = cand[~reject]
        pos[acc] = cpos[~reject]
        placed[acc] = True
        rate = len(acc) / max(1, len(queue))
        queue = queue[~placed[queue]]
        stall = stall + 1 if rate < 0.02 else 0
        if stall >= 3:
            break
    return pos, placed


def _relax(pos, fp: _Footprints, box: float, max_iter: int, over: float = 1.9):
    """Push apart overlapping footprints: over-relaxed Jacobi projection, area-weighted (small
    particles move more), Verlet pair lists rebuilt when something moved more than the skin.
    Footprints with a ``builder`` also turn under the contact torques (elongated particles
    would otherwise jam at low density).  Returns (pos, fp, converged)."""
    N = len(pos)
    if N < 2:
        return pos, fp, True
    rot = fp.builder is not None
    skin = max(0.5 * float(np.median(fp.brad)), 1e-3)
    w = fp.area
    ref = pos.copy()
    i, j = _pairs(pos, fp.brad, box, margin=2 * skin)
    history = []
    for it in range(max_iter):
        if rot:
            depth, dirv, arm_i, arm_j = _overlaps(pos, fp, box, i, j, arms=True)
        else:
            depth, dirv = _overlaps(pos, fp, box, i, j)
        m = depth > 0
        if not m.any():
            return pos, fp, True
        history.append(float(depth[m].sum()))
        if it >= 60 and history[-1] > 0.9 * history[-31]:     # jammed: stop wasting time
            break
        ii, jj, dv = i[m], j[m], dirv[m]
        push = over * (depth[m] + 2e-3 * np.minimum(fp.brad[ii], fp.brad[jj]) + 1e-3)
        wi = w[jj] / (w[ii] + w[jj])
        wj = 1.0 - wi
        dx = np.empty((N, 2))
        for c in range(2):
            dx[:, c] = (np.bincount(jj, wj * push * dv[:, c], N) - np.bincount(ii, wi * push * dv[:, c], N))
        pos = _wrap_pos(pos + dx, box)
        if rot:
            fi, fj = -(wi * push)[:, None] * dv, (wj * push)[:, None] * dv
            ai, aj = arm_i[m], arm_j[m]
            tau = (np.bincount(ii, ai[:, 0] * fi[:, 1] - ai[:, 1] * fi[:, 0], N)
                   + np.bincount(jj, aj[:, 0] * fj[:, 1] - aj[:, 1] * fj[:, 0], N))
            fp = fp.rotated(fp.theta + np.clip(tau / fp.k2, -0.1, 0.1))
        moved = np.sum(_wrap(pos - ref, box) ** 2, 1)
        # a pair list with skin s stays complete while no particle moved more than s; a few
        # outliers moving further only delay convergence (the final check in _pack is exact)
        if np.quantile(moved, 0.995) > skin * skin or moved.max() > 9 * skin * skin:
            ref = pos.copy()
            i, j = _pairs(pos, fp.brad, box, margin=2 * skin)
    i, j = _pairs(pos, fp.brad, box)
    depth, _ = _overlaps(pos, fp, box, i, j)
    return pos, fp, not (depth > 0).any()


def _pack(fp: _Footprints, box: float, rng: np.random.Generator, rsa_limit: float = 0.38,
          final_iter: int = 300) -> tuple[np.ndarray, np.ndarray, _Footprints, dict]:
    """Place footprints on the periodic box without overlap.

    Returns (pos, keep mask, final footprints (orientations may have turned), stats)."""
    N = len(fp.area)
    stats: dict = {"n_drawn": N}
    if N == 0:
        return np.zeros((0, 2)), np.zeros(0, bool), fp, stats
    phi = fp.area.sum() / box ** 2
    s0 = min(1.0, math.sqrt(rsa_limit / max(phi, 1e-12)))
    pos, placed = _rsa(fp.scaled(s0), box, rng)
    nun = int((~placed).sum())
    if nun:
        pos[~placed] = rng.random((nun, 2)) * box
    stats["rsa_unplaced"] = nun
    if s0 < 1.0 or nun:
        pos, fp, ok = _relax(pos, fp, box, final_iter)
        if not ok:   # rare: finish gently without over-relaxation
            pos, fp, ok = _relax(pos, fp, box, final_iter // 2, over=1.0)
    keep = np.ones(N, bool)
    i, j = _pairs(pos, fp.brad, box)
    if i.size:
        depth, _ = _overlaps(pos, fp, box, i, j)
        bad = depth > 0
        if bad.any():
            bi, bj = i[bad], j[bad]
            drop = np.where(fp.area[bi] < fp.area[bj], bi, bj)
            keep[drop] = False
    stats["dropped_overlapping"] = int((~keep).sum())
    if not keep.all():     # put the dropped ones back where they fit, at full size
        pos, keep = _rsa(fp, box, rng, max_rounds=12, proposals=6, pos=pos, placed=keep)
        stats["dropped_overlapping"] = int((~keep).sum())
    return pos, keep, fp, stats


def _in_field(pos: np.ndarray, fp: _Footprints, offset: float, size: float, margin: float = 0.5) -> np.ndarray:
    """The footprint's bounding box reaches at least ``margin`` px into the field square."""
    c = pos + fp.cap_off
    ext = np.abs(fp.cap_half) + fp.cap_rad[:, None]
    lo, hi = c - ext, c + ext
    if fp.dop is not None:
        q = _K_DOP // 4
        lo = np.maximum(lo, pos - fp.dop[:, [2 * q, 3 * q]])
        hi = np.minimum(hi, pos + fp.dop[:, [0, q]])
    return np.all((hi > offset + margin) & (lo < offset + size - margin), axis=1)


def _draw_until(draw: Callable[[int], dict], target_area: float, est_area: float) -> dict:
    """Draw particle batches until their footprint areas ('area') reach target_area."""
    parts, total = [], 0.0
    n = int(target_area / max(est_area, 1e-9) * 1.05) + 8
    while total < target_area:
        d = draw(n)
        parts.append(d)
        a = d["area"]
        total += float(a.sum())
        n = int(max(0.0, target_area - total) / max(float(a.mean()), 1e-9) * 1.2) + 8
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    cum = np.cumsum(out["area"])
    n_keep = int(np.searchsorted(cum, target_area)) + 1
    if n_keep > 1 and abs(cum[n_keep - 2] - target_area) < abs(cum[n_keep - 1] - target_area):
        n_keep -= 1
    return {k: v[:n_keep] for k, v in out.items()}


def _coverage_info(fp: _Footprints, keep: np.ndarray, box: float, target: float) -> dict:
    return {"target_coverage": target, "coverage_estimate": float(fp.area[keep].sum() / box ** 2)}


# --------------------------------------------------------------------------------------------
# Layout assembly
# --------------------------------------------------------------------------------------------


def _finish(kind: str, size: float, mb: _MeshBuilder, centers, radii, rng, info: dict,
            cluster=None) -> ParticleLayout:
    N = len(radii)
    attributes = rng.random(N).astype(np.float32)
    clus = np.arange(1, N + 1, dtype=np.int32) if cluster is None else np.asarray(cluster, np.int32)
    info = dict(info)
    info["n_particles"] = N
    info["n_triangles"] = int(mb.nf)
    info["n_instances"] = int(sum(len(g.pids) for g in mb.groups))
    return ParticleLayout(mb.build, int(mb.nf), float(mb.z_max) if mb.nf else 0.0,
                          np.asarray(centers, np.float32).reshape(-1, 3),
                          np.asarray(radii, np.float32), attributes, clus, float(size), kind, info,
                          instances=list(mb.groups), loose_faces=mb.loose_faces())


# --------------------------------------------------------------------------------------------
# spheres
# --------------------------------------------------------------------------------------------


def _gen_spheres(p: dict, size: int, rng: np.random.Generator) -> ParticleLayout:
    gm, gsd, cov, squash = p["size_mean"], p["size_gsd"], p["coverage"], p["squash"]
    rmax = 0.5 * _lognormal_max(gm, gsd)
    box, off = _field_box(size, rmax)
    est = math.pi / 4 * gm * gm * math.exp(2 * math.log(gsd) ** 2)

    def draw(n):
        d = _lognormal(rng, gm, gsd, n)
        return {"d": d, "area": math.pi / 4 * d * d}

    dr = _draw_until(draw, cov * box * box, est)
    r = dr["d"] / 2
    fp = _Footprints.discs(r)
    pos, keep, fp, stats = _pack(fp, box, rng)
    info = {**stats, **_coverage_info(fp, keep, box, cov)}
    sel = np.flatnonzero(keep & _in_field(pos, fp, off, size))
    r = r[sel]
    centers = np.c_[pos[sel] - off, r * squash]
    lv = _budget_levels(_sphere_level(r), _triangle_budget(size))
    mb = _MeshBuilder()
    _add_spheres(mb, centers, r, np.arange(1, len(r) + 1), lv, zscale=squash)
    return _finish("spheres", size, mb, centers, r * squash ** (1 / 3), rng, info)


# --------------------------------------------------------------------------------------------
# ellipsoids
# --------------------------------------------------------------------------------------------


def _ellipse_footprints(a, b, theta) -> _Footprints:
    e1 = np.stack([np.cos(theta), np.sin(theta)], 1)
    e2 = np.stack([-e1[:, 1], e1[:, 0]], 1)
    u1 = e1 @ _DOP_DIR.T
    u2 = e2 @ _DOP_DIR.T
    dop = np.sqrt((a[:, None] * u1) ** 2 + (b[:, None] * u2) ** 2)
    return _Footprints(np.pi * a * b, a.copy(), np.zeros((len(a), 2)), e1 * (a - b)[:, None], b.copy(), dop)


def _gen_ellipsoids(p: dict, size: int, rng: np.random.Generator) -> ParticleLayout:
    gm, gsd, cov, asp, flat = p["size_mean"], p["size_gsd"], p["coverage"], p["aspect"], p["flatness"]
    k = (asp * flat) ** (1 / 3)          # r_eq = b * k ; a = asp*b ; c = flat*b

    def axes(d):
        b = 0.5 * d / k
        return asp * b, b, flat * b

    amax = axes(_lognormal_max(gm, gsd))[0]
    theta0 = rng.random() * np.pi
    box, off = _field_box(size, amax)
    est = math.pi * asp / k ** 2 * (gm / 2) ** 2 * math.exp(2 * math.log(gsd) ** 2)

    def draw(n):
        d = _lognormal(rng, gm, gsd, n)
        a, b, _ = axes(d)
        return {"d": d, "theta": theta0 + (1 - p["alignment"]) * np.pi * (rng.random(n) - 0.5),
                "area": np.pi * a * b}

    dr = _draw_until(draw, cov * box * box, est)
    a, b, c = axes(dr["d"])
    fp = _ellipse_footprints(a, b, dr["theta"])
    fp.theta, fp.k2, fp.builder = dr["theta"], 0.25 * (a * a + b * b), lambda th: _ellipse_footprints(a, b, th)
    pos, keep, fp, stats = _pack(fp, box, rng)
    info = {**stats, **_coverage_info(fp, keep, box, cov)}
    sel = np.flatnonzero(keep & _in_field(pos, fp, off, size))
    a, b, c, th = a[sel], b[sel], c[sel], fp.theta[sel]
    centers = np.c_[pos[sel] - off, c]
    lv = _budget_levels(_sphere_level(a), _triangle_budget(size))
    R = _rot_z(th)
    pids = np.arange(1, len(sel) + 1)
    mb = _MeshBuilder()
    for L in np.unique(lv):
        g = np.flatnonzero(lv == L)
        tp, tn, tf = _sphere_template(int(L))
        S = np.stack([a[g], b[g], c[g]], 1)
        v = np.einsum("nij,nvj->nvi", R[g], tp[None] * S[:, None, :]) + centers[g, None, :]
        n = np.einsum("nij,nvj->nvi", R[g], tn[None] / S[:, None, :])
        mb.add(v, n, tf, pids[g])
    info["semi_axes"] = np.stack([a, b, c], 1).astype(np.float32)     # per particle (long, short, vertical)
    info["orientation"] = np.mod(th, np.pi).astype(np.float32)        # long axis angle to +x
    return _finish("ellipsoids", size, mb, centers, 0.5 * dr["d"][sel], rng, info)


# --------------------------------------------------------------------------------------------
# rods
# --------------------------------------------------------------------------------------------


def _rod_footprints(L, r, theta, flat) -> _Footprints:
    e1 = np.stack([np.cos(theta), np.sin(theta)], 1)
    e2 = np.stack([-e1[:, 1], e1[:, 0]], 1)
    n = len(L)
    W = np.where(flat, r / np.cos(np.pi / 6), r)                   # half width in top view
    hl = 0.5 * L - r                                               # capsule half segment
    # flat-ended hexagonal prisms: rectangle 2W x L inside the capsule of radius W(1+e) whose
    # segment ends dl = W sqrt((1+e)^2 - 1) short of the rectangle ends; e minimises its area
    e = np.array([0.0, 0.03, 0.1, 0.25, 0.41])
    rad = W[:, None] * (1 + e)
    dl = np.minimum(W[:, None] * np.sqrt((1 + e) ** 2 - 1), 0.5 * L[:, None])
    best = np.argmin(4 * rad * (0.5 * L[:, None] - dl) + np.pi * rad * rad, axis=1)
    k = np.arange(n)
    cap_half_len = np.where(flat, 0.5 * L - dl[k, best], hl)
    cap_rad = np.where(flat, rad[k, best], r)
    u1 = np.abs(e1 @ _DOP_DIR.T)
    u2 = np.abs(e2 @ _DOP_DIR.T)
    dop_rect = 0.5 * L[:, None] * u1 + W[:, None] * u2
    dop_caps = hl[:, None] * u1 + r[:, None]
    dop = np.where(flat[:, None], dop_rect, dop_caps)
    area = np.where(flat, 2 * W * L, 2 * r * (L - 2 * r) + np.pi * r * r)
    brad = np.where(flat, np.hypot(0.5 * L, W), 0.5 * L)
    return _Footprints(area, brad, np.zeros((n, 2)), e1 * cap_half_len[:, None], cap_rad, dop)


def _gen_rods(p: dict, size: int, rng: np.random.Generator) -> ParticleLayout:
    lm, dm, gsd, es, cov = p["length_mean"], p["diameter"], p["size_gsd"], p["end_shape"], p["coverage"]
    dgsd = 1.0 + 0.5 * (gsd - 1.0)

    def dims(Ln, Dn):
        r = 0.5 * Dn
        return np.maximum(Ln, 1.05 * Dn), r

    Lmax = max(_lognormal_max(lm, gsd), 1.05 * _lognormal_max(dm, dgsd))
    box, off = _field_box(size, 0.5 * Lmax * 1.2 + _lognormal_max(dm, dgsd))
    est = max(lm, dm) * dm
    theta0 = rng.random() * np.pi

    def draw(n):
        L, r = dims(_lognormal(rng, lm, gsd, n), _lognormal(rng, dm, dgsd, n))
        flat = rng.random(n) < es
        W = np.where(flat, r / np.cos(np.pi / 6), r)
        area = np.where(flat, 2 * W * L, 2 * r * (L - 2 * r) + np.pi * r * r)
        theta = theta0 + (1 - p["alignment"]) * np.pi * (rng.random(n) - 0.5)
        return {"L": L, "r": r, "flat": flat, "theta": theta, "area": area}

    dr = _draw_until(draw, cov * box * box, est)
    fp = _rod_footprints(dr["L"], dr["r"], dr["theta"], dr["flat"])
    fp.theta, fp.k2 = dr["theta"], dr["L"] ** 2 / 12 + dr["r"] ** 2 / 4
    fp.builder = lambda th: _rod_footprints(dr["L"], dr["r"], th, dr["flat"])
    pos, keep, fp, stats = _pack(fp, box, rng)
    info = {**stats, **_coverage_info(fp, keep, box, cov)}
    sel = np.flatnonzero(keep & _in_field(pos, fp, off, size))
    L, r, flat, th = dr["L"][sel], dr["r"][sel], dr["flat"][sel], fp.theta[sel]
    centers = np.c_[pos[sel] - off, r]
    R = _rot_z(th)
    pids = np.arange(1, len(sel) + 1)
    # volume-equivalent radii
    vol = np.where(flat, 2 * math.sqrt(3) * r * r * L, np.pi * r * r * (L - 2 * r) + 4 / 3 * np.pi * r ** 3)
    req = np.cbrt(vol * 3 / (4 * np.pi))
    mb = _MeshBuilder()
    # hexagonal prisms (flat ends)
    g = np.flatnonzero(flat)
    if g.size:
        tv, tn, tf = _hex_prism_template()
        S = np.stack([0.5 * L[g], r[g], r[g]], 1)
        v = np.einsum("nij,nvj->nvi", R[g], tv[None] * S[:, None, :]) + centers[g, None, :]
        n = np.einsum("nij,nvj->nvi", R[g], np.broadcast_to(tn, (len(g),) + tn.shape))
        mb.add(v, n, tf, pids[g])
    # capsules: ring count from the radius; budget-limited
    g = np.flatnonzero(~flat)
    if g.size:
        need = np.pi / np.arccos(np.clip(1 - _SAGITTA_TOL / np.maximum(r[g], 1e-6), -1, 1))
        nth = np.clip(4 * np.ceil(need / 4), 8, 48).astype(int)
        budget = _triangle_budget(size) - 20 * int(flat.sum())
        while True:
            tris = sum(len(_capsule_template(int(k))[2]) * int((nth == k).sum()) for k in np.unique(nth))
            if tris <= budget or nth.max() <= 4:
                break
            nth[nth == nth.max()] -= 4
        for k in np.unique(nth):
            gg = g[nth == k]
            tn, side, tf = _capsule_template(int(k))
            hl = 0.5 * L[gg] - r[gg]
            loc = tn[None] * r[gg, None, None] + side[None, :, None] * hl[:, None, None] * np.array([1.0, 0, 0])
            v = np.einsum("nij,nvj->nvi", R[gg], loc) + centers[gg, None, :]
            n = np.einsum("nij,nvj->nvi", R[gg], np.broadcast_to(tn, (len(gg),) + tn.shape))
            mb.add(v, n, tf, pids[gg])
    return _finish("rods", size, mb, centers, req, rng, info)


# --------------------------------------------------------------------------------------------
# convex particles: random polyhedra and crystals (optionally Minkowski-rounded)
# --------------------------------------------------------------------------------------------


@dataclass
class _ConvexTemplate:
    pts: np.ndarray          # (m,3) core hull vertices, unit volume-equivalent radius, centroid at 0
    faces: np.ndarray        # (F,3) CCW outward
    fn: np.ndarray           # (F,3) face normals
    fa: np.ndarray           # (F,) face areas
    edges: np.ndarray        # (E,2) vertex ids
    edge_faces: np.ndarray   # (E,2) face ids
    rho: float               # Minkowski rounding radius
    rest_n: np.ndarray       # (G,3) stable resting face normals
    rest_p: np.ndarray       # (G,) probabilities
    rest_d: np.ndarray       # (G,) plane distance of those faces from the centroid
    meshes: dict = field(default_factory=dict)


def _hull_faces(pts: np.ndarray):
    hull = ConvexHull(pts)
    used = np.unique(hull.simplices)
    remap = -np.ones(len(pts), np.int64)
    remap[used] = np.arange(len(used))
    pts = pts[used]
    f = remap[hull.simplices]
    f = _orient_faces(pts, f, hull.equations[:, :3])
    return pts, f


def _edges_of(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    F = len(faces)
    de = np.stack([faces, np.roll(faces, -1, axis=1)], 2).reshape(-1, 2)     # directed edges
    fid = np.repeat(np.arange(F), 3)
    key = np.minimum(de[:, 0], de[:, 1]) * (faces.max() + 1) + np.maximum(de[:, 0], de[:, 1])
    o = np.argsort(key, kind="stable")
    ko = key[o]
    first = np.flatnonzero(np.r_[True, ko[1:] != ko[:-1]])
    cnt = np.diff(np.r_[first, len(ko)])
    good = first[cnt == 2]
    a, b = o[good], o[good + 1]
    return np.sort(de[a], axis=1), np.stack([fid[a], fid[b]], 1)


def _make_convex_template(core: np.ndarray, roundness: float) -> _ConvexTemplate:
    """Template from core points (any scale): hull, rounding, stable rest faces, unit r_eq."""
    pts, f = _hull_faces(np.asarray(core, float))
    # centroid and volume of the core (tetrahedra from an interior point)
    o = pts.mean(0)
    a, b, c = pts[f[:, 0]] - o, pts[f[:, 1]] - o, pts[f[:, 2]] - o
    tv = np.einsum("ij,ij->i", a, np.cross(b, c)) / 6
    V0 = tv.sum()
    cen = o + (tv[:, None] * (a + b + c) / 4).sum(0) / V0
    pts = pts - cen
    s = (3 * V0 / (4 * np.pi)) ** (1 / 3)
    pts = pts * (1 - roundness)
    rho = roundness * s
    cr = np.cross(pts[f[:, 1]] - pts[f[:, 0]], pts[f[:, 2]] - pts[f[:, 0]])
    fa = 0.5 * np.linalg.norm(cr, axis=1)
    fn = cr / np.maximum(2 * fa, 1e-300)[:, None]
    edges, ef = _edges_of(f)
    # Steiner formula: V = V0 + S*rho + M*rho^2 + 4/3 pi rho^3, M = 1/2 sum(len * exterior angle)
    V0 = V0 * (1 - roundness) ** 3
    S = fa.sum()
    ang = np.arccos(np.clip((fn[ef[:, 0]] * fn[ef[:, 1]]).sum(1), -1, 1))
    M = 0.5 * (np.linalg.norm(pts[edges[:, 0]] - pts[edges[:, 1]], axis=1) * ang).sum()
    V = V0 + S * rho + M * rho ** 2 + 4 / 3 * np.pi * rho ** 3
    k = (3 * V / (4 * np.pi)) ** (-1 / 3)
    pts, rho, fa = pts * k, rho * k, fa * k * k
    # stable rest faces: the centroid projects inside the face (coplanar triangles grouped)
    d = (fn * pts[f[:, 0]]).sum(1)
    q = fn * d[:, None]
    p0, p1, p2 = pts[f[:, 0]], pts[f[:, 1]], pts[f[:, 2]]
    e1, e2, w = p1 - p0, p2 - p0, q - p0
    d11, d12, d22 = (e1 * e1).sum(1), (e1 * e2).sum(1), (e2 * e2).sum(1)
    w1, w2 = (w * e1).sum(1), (w * e2).sum(1)
    den = np.maximum(d11 * d22 - d12 * d12, 1e-300)
    u = (d22 * w1 - d12 * w2) / den
    v = (d11 * w2 - d12 * w1) / den
    inside = (u >= -1e-7) & (v >= -1e-7) & (u + v <= 1 + 1e-7)
    key = np.round(fn, 5)
    _, gid = np.unique(key, axis=0, return_inverse=True)
    gid = gid.reshape(-1)
    G = gid.max() + 1
    garea = np.bincount(gid, fa, G)
    gstable = np.bincount(gid, inside.astype(float), G) > 0
    if not gstable.any():
        gstable[:] = True
    rep = np.zeros(G, np.int64)
    rep[gid] = np.arange(len(gid))
    gn = fn[rep]
    gd = d[rep]
    # resting probability: face area times a strong preference for a low centre of mass
    # (plates lie flat, elongated grains lie on their long side)
    w = np.where(gstable, garea * (gd[gstable].min() / gd) ** 4, 0.0)
    return _ConvexTemplate(pts, f, fn, fa, edges, ef, float(rho), gn[gstable], (w / w.sum())[gstable],
                           gd[gstable])


def _projected_area(t: _ConvexTemplate, views: np.ndarray) -> np.ndarray:
    """Footprint area of the rounded body viewed along each unit vector in views (G,3)."""
    A = 0.5 * np.abs(views @ t.fn.T) @ t.fa
    if t.rho <= 0:
        return A
    pert = views + 1e-6 * np.array([0.3178, 0.5621, 0.7634])
    sgn = (pert @ t.fn.T) > 0                                    # (G,F)
    sil = sgn[:, t.edge_faces[:, 0]] != sgn[:, t.edge_faces[:, 1]]
    e = t.pts[t.edges[:, 1]] - t.pts[t.edges[:, 0]]
    ez = views @ e.T
    plen = np.sqrt(np.maximum((e * e).sum(1)[None, :] - ez * ez, 0))
    P = (sil * plen).sum(1)
    return A + P * t.rho + np.pi * t.rho ** 2


def _convex_mesh(t: _ConvexTemplate, lod: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(V,3) vertices, (V,3) normals, (F,3) faces in template units; lod 0 = faceted."""
    if lod in t.meshes:
        return t.meshes[lod]
    if lod == 0 or t.rho <= 0:
        pts = t.pts
        if t.rho > 0:     # rounding below half a pixel: faceted core scaled up, still inside the body
            pts = pts * (1 + t.rho / float(np.sqrt((pts ** 2).sum(1)).max()))
        v = pts[t.faces].reshape(-1, 3)
        n = np.repeat(t.fn, 3, axis=0)
        f = np.arange(len(v)).reshape(-1, 3)
        out = (v, n, f)
    else:
        theta = {1: 1.0, 2: 0.55, 3: 0.28, 4: 0.14}[lod]
        dirs = _unit_sphere(lod - 1)[0]
        P = [t.pts[t.faces].reshape(-1, 3) + t.rho * np.repeat(t.fn, 3, 0)]
        N = [np.repeat(t.fn, 3, 0)]
        n1, n2 = t.fn[t.edge_faces[:, 0]], t.fn[t.edge_faces[:, 1]]
        ang = np.arccos(np.clip((n1 * n2).sum(1), -1, 1))
        k = np.maximum(np.ceil(ang / theta).astype(int) - 1, 0)
        k[ang < 1e-4] = 0
        if k.sum():
            e = np.repeat(np.arange(len(k)), k)
            s = (np.arange(len(e)) - np.repeat(np.cumsum(k) - k, k) + 1) / (k[e] + 1)
            om = ang[e]
            sw = np.sin(om)
            d = (np.sin((1 - s) * om)[:, None] * n1[e] + np.sin(s * om)[:, None] * n2[e]) / sw[:, None]
            d = _normalize(d)
            for end in (0, 1):
                P.append(t.pts[t.edges[e, end]] + t.rho * d)
                N.append(d)
        sup = np.argmax(dirs @ t.pts.T, axis=1)
        P.append(t.pts[sup] + t.rho * dirs)
        N.append(dirs)
        P, N = np.concatenate(P), np.concatenate(N)
        _, uniq = np.unique(np.round(P, 9), axis=0, return_index=True)
        P, N = P[uniq], N[uniq]
        hull = ConvexHull(P)
        used = np.unique(hull.simplices)
        remap = -np.ones(len(P), np.int64)
        remap[used] = np.arange(len(used))
        f = _orient_faces(P, hull.simplices, hull.equations[:, :3])
        out = (P[used], N[used], remap[f])
    t.meshes[lod] = out
    return out


def _convex_lod(rho_px: np.ndarray) -> np.ndarray:
    lod = np.full(len(rho_px), 4)
    lod[rho_px <= 25] = 3
    lod[rho_px <= 6.6] = 2
    lod[rho_px <= 2.0] = 1
    lod[rho_px < 0.5] = 0
    return lod


def _gen_convex(kind: str, templates: list[_ConvexTemplate], p: dict, size: int,
                rng: np.random.Generator) -> ParticleLayout:
    gm, gsd, cov = p["size_mean"], p["size_gsd"], p["coverage"]
    # flat table of (template, rest face) combinations
    tid, gix, prob = [], [], []
    for ti, t in enumerate(templates):
        tid += [ti] * len(t.rest_p)
        gix += list(range(len(t.rest_p)))
        prob += list(t.rest_p / len(templates))
    tid, gix, prob = np.array(tid), np.array(gix), np.array(prob)
    C = len(tid)
    mmax = max(len(t.pts) for t in templates)
    rests = [_rot_align(t.rest_n, np.array([0, 0, -1.0])) for t in templates]
    cR = np.empty((C, 3, 3))
    cxy = np.empty((C, mmax, 2))
    carea, czoff, crho, cbr = np.empty(C), np.empty(C), np.empty(C), np.empty(C)
    for ti, t in enumerate(templates):
        sel = np.flatnonzero(tid == ti)
        R = rests[ti]
        cR[sel] = R
        rp = np.einsum("gij,mj->gmi", R, t.pts)[:, :, :2]
        cxy[sel] = np.concatenate([rp, np.repeat(rp[:, :1], mmax - rp.shape[1], 1)], 1)
        carea[sel] = _projected_area(t, t.rest_n)
        czoff[sel] = t.rest_d + t.rho
        crho[sel] = t.rho
        cbr[sel] = np.sqrt((rp ** 2).sum(2)).max(1) + t.rho
    rmax = 0.5 * _lognormal_max(gm, gsd)
    box, off = _field_box(size, rmax * cbr.max())
    cdf = np.cumsum(prob)
    cdf /= cdf[-1]
    est = float((prob * carea).sum() / prob.sum()) * (gm / 2) ** 2 * math.exp(2 * math.log(gsd) ** 2)

    def draw(n):
        r = 0.5 * _lognormal(rng, gm, gsd, n)
        c = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), C - 1)
        return {"r": r, "c": c, "phi": rng.random(n) * 2 * np.pi, "area": carea[c] * r * r}

    dr = _draw_until(draw, cov * box * box, est)
    r, c, phi = dr["r"], dr["c"], dr["phi"]
    xy0 = cxy[c] * r[:, None, None]

    def footprints(th: np.ndarray) -> _Footprints:
        cs, sn = np.cos(th)[:, None], np.sin(th)[:, None]
        xy = np.stack([cs * xy0[..., 0] - sn * xy0[..., 1], sn * xy0[..., 0] + cs * xy0[..., 1]], -1)
        return _footprints_from_points(xy, crho[c] * r, dr["area"])

    fp = footprints(phi)
    if len(r) <= 5000:      # let elongated grains turn while pushed apart (cheap enough)
        fp.theta, fp.builder = phi, footprints
        fp.k2 = (xy0 ** 2).sum(2).mean(1) + (crho[c] * r) ** 2
    pos, keep, fp, stats = _pack(fp, box, rng)
    if fp.theta is not None:
        phi = fp.theta
    info = {**stats, **_coverage_info(fp, keep, box, cov)}
    sel = np.flatnonzero(keep & _in_field(pos, fp, off, size))
    r, c, phi = r[sel], c[sel], phi[sel]
    R = _rot_z(phi) @ cR[c]
    centers = np.c_[pos[sel] - off, czoff[c] * r]
    pids = np.arange(1, len(sel) + 1)
    t_of = tid[c]
    lod = _convex_lod(crho[c] * r)
    budget = _triangle_budget(size)
    while True:
        tris = 0
        for key in set(zip(t_of.tolist(), lod.tolist())):
            cnt = int(((t_of == key[0]) & (lod == key[1])).sum())
            tris += cnt * len(_convex_mesh(templates[key[0]], key[1])[2])
        if tris <= budget or lod.max() == 0:
            break
        lod[lod == lod.max()] -= 1
    mb = _MeshBuilder()
    for ti, L in sorted(set(zip(t_of.tolist(), lod.tolist()))):
        g = np.flatnonzero((t_of == ti) & (lod == L))
        tv, tn, tf = _convex_mesh(templates[ti], L)
        v = np.einsum("nij,vj->nvi", R[g], tv) * r[g, None, None] + centers[g, None, :]
        v[:, :, 2] -= v[:, :, 2].min(1, keepdims=True)      # coarse LODs sit exactly on z = 0 too
        n = np.einsum("nij,vj->nvi", R[g], tn)
        mb.add(v, n, tf, pids[g])
    info["n_templates"] = len(templates)
    return _finish(kind, size, mb, centers, r, rng, info)


def _n_templates(p: dict, size: int) -> int:
    est_n = p["coverage"] * size * size / (math.pi / 4 * p["size_mean"] ** 2)
    return int(np.clip(est_n, 8, 48))


def _gen_polyhedra(p: dict, size: int, rng: np.random.Generator) -> ParticleLayout:
    m = int(round(p["facets"]))
    templates = []
    for _ in range(_n_templates(p, size)):
        u = _normalize(rng.standard_normal((m, 3)))
        axes = np.array([p["elongation"], 1.0, 1.0]) * rng.uniform(0.85, 1.15, 3)
        templates.append(_make_convex_template(u * axes, p["roundness"]))
    return _gen_convex("polyhedra", templates, p, size, rng)


def _crystal_core(rng, habit: float, hexagonal: bool, hex_aspect: float, elongation: float,
                  irregularity: float) -> np.ndarray:
    if hexagonal:
        ang = np.pi / 3 * np.arange(6)
        nrm = np.r_[np.c_[np.cos(ang), np.sin(ang), np.zeros(6)], [[0, 0, 1.0], [0, 0, -1.0]]]
        dist = np.r_[np.ones(6), [hex_aspect, hex_aspect]]
    else:
        t = 3.0 - 2.0 * habit    # cube (3) -> cuboctahedron (2) -> octahedron (1)
        nrm, dist = [], []
        if t > 1.0 + 1e-3:
            nrm += [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]]
            dist += [1.0] * 6
        if t < 3.0 - 1e-3:
            s = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
            nrm += list(s / np.sqrt(3))
            dist += [min(t, 3.0) / np.sqrt(3)] * 8
        nrm, dist = np.array(nrm, float), np.array(dist, float)
    dist = dist * (1 + irregularity * rng.uniform(-1, 1, len(dist)))
    hs = HalfspaceIntersection(np.c_[nrm, -dist], np.zeros(3))
    pts = np.unique(np.round(hs.intersections, 9), axis=0)
    return pts * np.array([1.0, 1.0, elongation])


def _gen_crystals(p: dict, size: int, rng: np.random.Generator) -> ParticleLayout:
    K = _n_templates(p, size)
    n_hex = int(round(K * p["hex_fraction"]))
    templates = []
    for i in range(K):
        core = _crystal_core(rng, p["habit"], i < n_hex, p["hex_aspect"], p["elongation"], p["irregularity"])
        templates.append(_make_convex_template(core, p["roundness"]))
    return _gen_convex("crystals", templates, p, size, rng)


# --------------------------------------------------------------------------------------------
# agglomerates: tunable particle-cluster aggregation (Filippov et al. 2000)
# --------------------------------------------------------------------------------------------

_KF = 1.3   # fractal prefactor


def _grow(radii: np.ndarray, df: float, overlap: float, rng: np.random.Generator, kf: float = _KF) -> np.ndarray:
    """Centres of a particle-cluster aggregate about its centre of mass; primaries stay in
    growth order (see :func:`fitting.growth.grow_centres`, compiled)."""
    from .growth import grow_centres
    return grow_centres(np.ascontiguousarray(radii, np.float64), float(df), float(overlap), rng, float(kf))


def grow_aggregate(n_primaries: int, fractal_dim: float, *, primary_size: float = 10.0, size_gsd: float = 1.0,
                   overlap: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One aggregate (centres (n,3) about the centre of mass, radii (n,)), in growth order."""
    rng = np.random.default_rng(seed)
    radii = 0.5 * _lognormal(rng, primary_size, size_gsd, int(n_primaries))
    return _grow(radii, float(fractal_dim), float(overlap), rng), radii


def fractal_dimension_estimate(centers: np.ndarray, radii: np.ndarray, labels: np.ndarray | None = None) -> float:
    """Fractal dimension from the radius of gyration vs number of primaries.

    * ``labels`` None (one aggregate): fits log Rg(n) against log n over the growth prefixes
      n = max(6, N/8) .. N (primaries must be in growth order, as `grow_aggregate` and
      `generate_layout` store them; rotation does not matter).  Rg and n are mass (r^3)
      weighted.
    * ``labels`` given (several aggregates): ensemble fit of log N against log Rg over the
      aggregates with at least 5 primaries (order independent; needs a spread of sizes).
    Returns Df = d log N / d log Rg.
    """
    c = np.asarray(centers, float)
    r = np.asarray(radii, float)
    m = r ** 3
    mbar = m.mean()
    if labels is not None and len(np.unique(labels)) > 1:
        lab = np.asarray(labels)
        logN, logR = [], []
        for L in np.unique(lab):
            s = lab == L
            if s.sum() < 5:
                continue
            ms = m[s]
            cm = (ms[:, None] * c[s]).sum(0) / ms.sum()
            rg = math.sqrt((ms * ((c[s] - cm) ** 2).sum(1)).sum() / ms.sum())
            logN.append(math.log(ms.sum() / mbar))
            logR.append(math.log(rg))
        if len(logN) < 3 or np.ptp(logR) < 1e-6:
            return float("nan")
        return float(np.polyfit(logR, logN, 1)[0])
    n = len(c)
    if n < 8:
        return float("nan")
    M = np.cumsum(m)
    S1 = np.cumsum(m[:, None] * c, 0)
    S2 = np.cumsum(m * (c ** 2).sum(1))
    rg2 = S2 / M - ((S1 / M[:, None]) ** 2).sum(1)
    k = np.arange(max(6, n // 8), n + 1) - 1
    slope = np.polyfit(np.log(M[k] / mbar), 0.5 * np.log(np.maximum(rg2[k], 1e-300)), 1)[0]
    return float(1.0 / slope)


def _stamp_discs(grid: np.ndarray, xy: np.ndarray, r: np.ndarray, cell: float) -> None:
    G = grid.shape[0]
    if len(r) == 0:
        return
    R = int(math.ceil(r.max() / cell)) + 1
    o = np.arange(-R, R + 1)
    ox, oy = np.meshgrid(o, o)
    ox, oy = ox.ravel(), oy.ravel()
    step = max(1, 3_000_000 // len(ox))
    for a in range(0, len(r), step):
        x, y, rr = xy[a:a + step, 0], xy[a:a + step, 1], r[a:a + step]
        cx, cy = np.floor(x / cell).astype(np.int64), np.floor(y / cell).astype(np.int64)
        px, py = cx[:, None] + ox, cy[:, None] + oy
        ins = ((px + 0.5) * cell - x[:, None]) ** 2 + ((py + 0.5) * cell - y[:, None]) ** 2 <= rr[:, None] ** 2
        grid[py[ins] % G, px[ins] % G] = True


class _AggState:
    """Placed rigid agglomerates: local primaries q (rotated, resting, xy about the agglomerate
    reference), radii, owner index, and the xy offsets X of the agglomerates (periodic box)."""

    def __init__(self, box: float, rmax: float) -> None:
        self.box = box
        self.boxv = np.array([box, box, 1e7])
        self.rmax = rmax
        self.q = np.zeros((0, 3))
        self.r = np.zeros(0)
        self.owner = np.zeros(0, np.int64)
        self.X = np.zeros((0, 2))

    @property
    def n(self) -> int:
        return len(self.X)

    def world(self, X: np.ndarray | None = None) -> np.ndarray:
        W = self.q.copy()
        W[:, :2] = _wrap_pos(self.q[:, :2] + (self.X if X is None else X)[self.owner], self.box)
        return W

    def add(self, insts: list[tuple[np.ndarray, np.ndarray]], X: np.ndarray) -> None:
        if not insts:
            return
        nn = np.array([len(q) for q, _ in insts])
        self.q = np.concatenate([self.q] + [q for q, _ in insts])
        self.r = np.concatenate([self.r] + [r for _, r in insts])
        self.owner = np.concatenate([self.owner, self.n + np.repeat(np.arange(len(insts)), nn)])
        self.X = np.concatenate([self.X, _wrap_pos(np.asarray(X, float).reshape(-1, 2), self.box)])

    def stamp(self, grid: np.ndarray, cell: float, sel: np.ndarray | None = None) -> None:
        W = self.world()
        m = slice(None) if sel is None else sel[self.owner]
        _stamp_discs(grid, W[m, :2], self.r[m], cell)


def _gen_agglomerates(p: dict, size: int, rng: np.random.Generator) -> ParticleLayout:
    df, mc, ps, gsd = p["fractal_dim"], p["primary_count"], p["primary_size"], p["size_gsd"]
    ov, cov, cgsd = p["overlap"], p["coverage"], p["count_gsd"]
    t0 = time.perf_counter()
    # template pool (random rotations make reuse invisible); counts log-normal, mean primary_count
    n_tpl = int(np.clip(round(1500 / mc), 6, 24))
    s = math.log(cgsd)
    counts = np.clip(np.round(_lognormal(rng, mc / math.exp(0.5 * s * s), cgsd, n_tpl, clip=2.0)), 2, 4 * mc + 2)
    tpl_c, tpl_r = [], []
    for n in counts.astype(int):
        rr = 0.5 * _lognormal(rng, ps, gsd, int(n))
        tpl_r.append(rr)
        tpl_c.append(_grow(rr, df, ov, rng))
    t_grow = time.perf_counter() - t0
    ext = max(float(np.max(np.sqrt((c ** 2).sum(1)) + r)) for c, r in zip(tpl_c, tpl_r))
    box, off = _field_box(size, ext)
    rmax = max(float(r.max()) for r in tpl_r)
    st = _AggState(box, rmax)
    cell = max(box / 1536, 0.25 * ps)
    G = int(math.ceil(box / cell))
    cell = box / G
    grid = np.zeros((G, G), bool)
    a_est = float(np.mean([0.6 * np.pi * (r ** 2).sum() for r in tpl_r]))

    def instances(k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for ti, Rm in zip(rng.integers(0, n_tpl, k), _random_rotations(rng, k)):
            q = tpl_c[ti] @ Rm.T
            q[:, 2] -= (q[:, 2] - tpl_r[ti]).min()          # rest on the substrate
            out.append((q, tpl_r[ti]))
        return out

    # phase 1: random sequential addition in rounds, until the target or jamming
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    stall = 0
    for _ in range(60):
        cur = grid.mean()
        if cur >= cov * 0.995:
            break
        need = max(1, int(math.ceil((cov - cur) * box * box / max(a_est, 1e-9))))
        if len(pending) < need:
            pending += instances(need - len(pending))
        cands = pending[:need]
        T = 8
        nn = np.array([len(q) for q, _ in cands])
        Q = np.concatenate([q for q, _ in cands])
        QR = np.concatenate([rr for _, rr in cands])
        cid = np.repeat(np.arange(len(cands)), nn)
        # proposals: the agglomerate's centre of mass on a random still-uncovered grid cell
        free = np.flatnonzero(~grid.reshape(-1))
        pick_cell = free[rng.integers(0, len(free), (len(cands), T))] if len(free) else \
            rng.integers(0, G * G, (len(cands), T))
        off_xy = (np.stack([pick_cell % G, pick_cell // G], -1) + rng.random((len(cands), T, 2))) * cell
        bad = np.zeros((T, len(cands)), bool)
        if st.n:
            tp = _kdtree(st.world(), st.boxv)
            PP = np.repeat(Q[None], T, 0)
            PP[:, :, :2] += np.transpose(off_xy, (1, 0, 2))[:, cid, :]
            PP = PP.reshape(-1, 3)
            PP[:, :2] = _wrap_pos(PP[:, :2], box)
            prop = (np.arange(T)[:, None] * len(cands) + cid[None, :]).reshape(-1)
            sdm = _kdtree(PP, st.boxv).sparse_distance_matrix(tp, 2 * rmax, output_type="ndarray")
            hit = sdm["v"] < (np.tile(QR, T)[sdm["i"]] + st.r[sdm["j"]]) * (1 - 1e-9)
            bad.reshape(-1)[prop[sdm["i"][hit]]] = True
        okm = ~bad
        has = okm.any(0)
        first = np.argmax(okm, 0)
        reject = ~has
        pick = has[cid]
        Cp = Q[pick].copy()
        Cp[:, :2] = _wrap_pos(Cp[:, :2] + off_xy[cid[pick], first[cid[pick]]], box)
        Cr, Co = QR[pick], cid[pick]
        if has.sum() > 1:
            pr = _kdtree(Cp, st.boxv).query_pairs(2 * rmax, output_type="ndarray")
            if len(pr):
                o1, o2 = Co[pr[:, 0]], Co[pr[:, 1]]
                d = _wrap(Cp[pr[:, 1]] - Cp[pr[:, 0]], st.boxv)
                hit = (o1 != o2) & ((d * d).sum(1) < (Cr[pr[:, 0]] + Cr[pr[:, 1]]) ** 2 * (1 - 1e-9))
                reject[np.maximum(o1[hit], o2[hit])] = True
        acc = np.flatnonzero(~reject)
        if acc.size:
            before = grid.mean()
            n0 = st.n
            st.add([cands[i] for i in acc], off_xy[acc, first[acc]])
            sel = np.zeros(st.n, bool)
            sel[n0:] = True
            st.stamp(grid, cell, sel)
            gain = grid.mean() - before
            if acc.size >= 3 and gain > 0:
                a_est = gain * box * box / acc.size
        pending = pending[need:]          # rejected candidates come back with a new rotation
        stall = stall + 1 if acc.size < max(1, 0.03 * len(cands)) else 0
        if stall >= 2:
            break
    n_rsa = st.n
    cov_rsa = float(grid.mean())
    info = {"target_coverage": cov, "coverage_estimate": float(grid.mean()), "coverage_after_rsa": cov_rsa,
            "n_agglomerates_rsa": n_rsa, "n_agglomerates_drawn": st.n, "n_templates": n_tpl,
            "growth_s": t_grow, "placement_s": time.perf_counter() - t0 - t_grow}
    # keep agglomerates that touch the field; each is unwrapped around its reference point
    if st.n:
        ref_field = _wrap(st.X - off - 0.5 * size, box) + 0.5 * size
        world = ref_field[st.owner] + st.q[:, :2]
        touch = np.all((world + st.r[:, None] > 0) & (world - st.r[:, None] < size), axis=1)
        keep_agg = np.zeros(st.n, bool)
        keep_agg[st.owner[touch]] = True
        sel = keep_agg[st.owner]
        centers = np.c_[world[sel], st.q[sel, 2]]
        radii = st.r[sel]
        _, clus = np.unique(st.owner[sel], return_inverse=True)
        clus = clus.reshape(-1) + 1
    else:
        centers, radii, clus = np.zeros((0, 3)), np.zeros(0), np.zeros(0, int)
    lv = _budget_levels(_sphere_level(radii), _triangle_budget(size)) if len(radii) else np.zeros(0, int)
    mb = _MeshBuilder()
    _add_spheres(mb, centers, radii, np.arange(1, len(radii) + 1), lv)
    info["n_agglomerates"] = int(clus.max()) if len(clus) else 0
    return _finish("agglomerates", size, mb, centers, radii, rng, info, cluster=clus)


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

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
        "coverage": _COV._replace(max=0.75, description="projected area fraction, sparse to dense monolayer"),
        "squash": _P(0.5, 1.0, 1.0, "", "height/width ratio of slightly flattened beads (1 = spheres)"),
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
    layout.info["params"] = p
    layout.info["seconds"] = time.perf_counter() - t0
    return layout
