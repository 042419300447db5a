"""Fractal agglomerates of sintered spherical primaries (tunable particle-cluster aggregation,
Filippov et al. 2000), placed rigidly by 3-D primary-primary tests.
"""
from __future__ import annotations

import math
import time

import numpy as np

from fitting.render.geometry.layout import ParticleLayout
from fitting.render.geometry.meshes import (
    _add_spheres,
    _budget_levels,
    _finish,
    _MeshBuilder,
    _sphere_level,
    _triangle_budget,
)
from fitting.render.geometry.packing import _kdtree
from fitting.render.geometry.sampling import (
    _field_box,
    _lognormal,
    _random_rotations,
    _wrap,
    _wrap_pos,
)

_KF = 1.3   # fractal prefactor


def _grow(radii: np.ndarray, df: float, overlap: float, rng: np.random.Generator, kf: float = _KF) -> np.ndarray:
    """Centres of a particle-cluster aggregate about its centre of mass; primaries stay in
    growth order (see :func:`fitting.render.geometry.growth.grow_centres`, compiled)."""
    from fitting.render.geometry.growth import grow_centres
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
