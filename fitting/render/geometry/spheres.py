"""Sphere and ellipsoid monolayers.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree

from fitting.render.geometry.layout import ParticleLayout
from fitting.render.geometry.meshes import (
    _add_bumpy_spheres,
    _add_spheres,
    _budget_levels,
    _finish,
    _MeshBuilder,
    _sphere_level,
    _sphere_template,
    _triangle_budget,
)
from fitting.render.geometry.packing import (
    _DOP_DIR,
    _coverage_info,
    _draw_until,
    _Footprints,
    _in_field,
    _pack,
)
from fitting.render.geometry.sampling import (
    _field_box,
    _lognormal,
    _lognormal_max,
    _rot_z,
)


def _gen_spheres(p: dict, size: int, rng: np.random.Generator) -> ParticleLayout:
    gm, gsd, cov, squash = p["size_mean"], p["size_gsd"], p["coverage"], p["squash"]
    layers = int(round(p.get("layers", 1.0)))
    rmax = 0.5 * _lognormal_max(gm, gsd)
    box, off = _field_box(size, rmax)
    est = math.pi / 4 * gm * gm * math.exp(2 * math.log(gsd) ** 2)

    def draw(n):
        d = _lognormal(rng, gm, gsd, n)
        return {"d": d, "area": math.pi / 4 * d * d}

    xyz, radii = np.zeros((0, 3)), np.zeros(0)
    info: dict = {}
    for layer in range(layers):
        dr = _draw_until(draw, cov * box * box, est)
        r = dr["d"] / 2
        fp = _Footprints.discs(r)
        pos, keep, fp, stats = _pack(fp, box, rng)
        if layer == 0:
            info = {**stats, **_coverage_info(fp, keep, box, cov)}
        sel = np.flatnonzero(keep & _in_field(pos, fp, off, size))
        z = settled_heights(pos[sel], r[sel], xyz, radii, squash)
        xyz = np.r_[xyz, np.c_[pos[sel], z]]
        radii = np.r_[radii, r[sel]]
    info["layers"] = layers
    centers = xyz - np.array([off, off, 0.0])
    lv = _budget_levels(_sphere_level(radii), _triangle_budget(size))
    mb = _MeshBuilder()
    pids = np.arange(1, len(radii) + 1)
    if p.get("bumps", 0.0) > 0:
        _add_bumpy_spheres(mb, centers, radii, pids, lv, p["bumps"], rng)
    else:
        _add_spheres(mb, centers, radii, pids, lv, zscale=squash)
    return _finish("spheres", size, mb, centers, radii * squash ** (1 / 3), rng, info)


def settled_heights(xy: np.ndarray, r: np.ndarray, below_xyz: np.ndarray, below_r: np.ndarray,
                    squash: float = 1.0) -> np.ndarray:
    """Centre heights of beads dropped straight down at ``xy`` onto the beads ``below``.

    Each bead stops on the highest bead it meets on its way down, or on the substrate
    (height ``r * squash``); beads of one layer are packed apart, so they never meet each other.

    Parameters
    ----------
    xy : (n,2) drop positions; r : (n,) radii.
    below_xyz : (m,3) centres and below_r : (m,) radii of the beads already settled.
    squash : height/width ratio of the beads (contact heights scale with it).

    Returns the (n,) centre heights.
    """
    z = np.asarray(r, float) * squash
    if len(below_r) == 0 or len(r) == 0:
        return z
    tree = cKDTree(below_xyz[:, :2])
    reach = np.asarray(r) + float(below_r.max())
    for i, near in enumerate(tree.query_ball_point(xy, reach)):
        if not near:
            continue
        near = np.asarray(near)
        d2 = ((below_xyz[near, :2] - xy[i]) ** 2).sum(1)
        gap = (r[i] + below_r[near]) ** 2 - d2
        ok = gap > 0
        if ok.any():
            z[i] = max(z[i], float((below_xyz[near[ok], 2] + squash * np.sqrt(gap[ok])).max()))
    return z


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
