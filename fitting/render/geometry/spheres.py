"""Sphere and ellipsoid monolayers.
"""
from __future__ import annotations

import math

import numpy as np

from fitting.render.geometry.layout import ParticleLayout
from fitting.render.geometry.meshes import (
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
