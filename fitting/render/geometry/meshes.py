"""Mesh templates (icospheres, capsules, hexagonal prisms), the mesh builder that records affine
copies as instances, a top-view rasteriser, and the assembly of a finished layout.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from scipy.spatial import ConvexHull

from fitting.render.geometry.layout import InstanceGroup, ParticleLayout
from fitting.render.geometry.sampling import _normalize, _rot_align

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


#: Triangles allowed for a 512 x 512 field (scaled with the field area for larger fields).
TRIANGLE_BUDGET_512 = 400_000


#: Largest silhouette deviation (px) a tessellation may have before more detail is used.
_SAGITTA_TOL = 0.25


def _triangle_budget(size: float) -> int:
    return int(TRIANGLE_BUDGET_512 * max(1.0, (size / 512.0) ** 2))


#: Lumps per bumpy sphere, their angular radius (rad) and the number of distinct lumpy meshes.
_LUMPS = 14
_LUMP_WIDTH = 0.42
BUMPY_VARIANTS = 6


@functools.lru_cache(maxsize=64)
def _bumpy_sphere_template(level: int, amplitude: float, variant: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Icosphere with lumps in its surface and outline: (positions, unit normals, faces).

    Each vertex's radius is ``1 + amplitude * (h - mean h)``, ``h`` the height of the nearest of
    ``_LUMPS`` Gaussian lumps at random directions (``variant`` seeds them); the lowest vertex
    sits at z = -1 like a unit sphere's, so it rests on the substrate."""
    v, f = _unit_sphere(max(int(level), 2))
    rng = np.random.default_rng(int(variant))
    centres = _normalize(rng.standard_normal((_LUMPS, 3)))
    height = np.exp(-(1.0 - v @ centres.T) / (0.5 * _LUMP_WIDTH ** 2)).max(1)
    p = v * (1.0 + amplitude * (height - height.mean()))[:, None]
    p[:, 2] -= p[:, 2].min() + 1.0
    face_n = np.cross(p[f[:, 1]] - p[f[:, 0]], p[f[:, 2]] - p[f[:, 0]])      # area-weighted
    n = np.zeros_like(p)
    for k in range(3):
        np.add.at(n, f[:, k], face_n)
    n = _normalize(n)
    for arr in (p, n):
        arr.setflags(write=False)
    return p, n, f


def _rotated_spheres(tp, tn, rot, s, c):
    """World vertices and normals of k lumpy spheres: template rotated about z by ``rot`` (k,3,3),
    scaled uniformly by ``s`` (k,) and moved to ``c`` (k,3)."""
    v = np.einsum("kij,vj->kvi", rot, tp) * s[:, None, None] + c[:, None, :]
    return v, np.einsum("kij,vj->kvi", rot, tn)


def _add_bumpy_spheres(mb: _MeshBuilder, centers: np.ndarray, radii: np.ndarray, pids: np.ndarray,
                       levels: np.ndarray, amplitude: float, rng: np.random.Generator) -> None:
    """Lumpy spheres as instances of ``BUMPY_VARIANTS`` meshes per level, each turned about z at random."""
    from fitting.render.geometry.sampling import _rot_z
    amplitude = round(float(amplitude), 2)
    variant = rng.integers(0, BUMPY_VARIANTS, len(radii))
    theta = rng.random(len(radii)) * 2 * np.pi
    levels = np.maximum(levels, 2)
    for L in np.unique(levels):
        for var in range(BUMPY_VARIANTS):
            sel = np.flatnonzero((levels == L) & (variant == var))
            if sel.size == 0:
                continue
            tp, tn, tf = _bumpy_sphere_template(int(L), amplitude, var)
            rot, s, c = _rot_z(theta[sel]), radii[sel].astype(np.float64), centers[sel].astype(np.float64)
            # instance j = R_j (s_j / s_0) (instance 0 unrotated, centred) + R_j mean(tp) s_j + c_j
            m = np.zeros((len(sel), 3, 4))
            m[:, :, :3] = rot * (s / s[0])[:, None, None]
            m[:, :, 3] = np.einsum("kij,j->ki", rot, tp.mean(0)) * s[:, None] + c
            z_top = float(np.float32((tp[:, 2].max() * s + c[:, 2]).max()))
            v0 = tp[None] * s[0] + c[:1, None, :]
            mb.add(v0, tn[None], tf, pids[sel], transforms=m,
                   expand=functools.partial(_rotated_spheres, tp, tn, rot, s, c), z_max=z_top)
