"""Rods: capsules or flat-ended hexagonal prisms lying flat.
"""
from __future__ import annotations

import math

import numpy as np

from fitting.render.geometry.layout import ParticleLayout
from fitting.render.geometry.meshes import (
    _SAGITTA_TOL,
    _capsule_template,
    _finish,
    _hex_prism_template,
    _MeshBuilder,
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
