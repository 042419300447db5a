"""Convex particles: random polyhedra and crystals, optionally Minkowski-rounded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import ConvexHull, HalfspaceIntersection

from fitting.render.geometry.layout import ParticleLayout
from fitting.render.geometry.meshes import (
    _finish,
    _MeshBuilder,
    _orient_faces,
    _triangle_budget,
    _unit_sphere,
)
from fitting.render.geometry.packing import (
    _coverage_info,
    _draw_until,
    _Footprints,
    _footprints_from_points,
    _in_field,
    _pack,
)
from fitting.render.geometry.sampling import (
    _field_box,
    _lognormal,
    _lognormal_max,
    _normalize,
    _rot_align,
    _rot_z,
)


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
