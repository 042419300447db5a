"""Non-overlapping packing of 2-D particle footprints on an extended periodic domain.

Random sequential addition of shrunken footprints, largest first, in vectorised rounds (KD-tree
broad phase per size class), then growth back to full size with push-apart relaxation. Discs
are tested exactly; other shapes conservatively (capsule and a 24-direction discrete oriented
polytope), so separated footprints guarantee separated particles.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.spatial import cKDTree

from fitting.render.geometry.sampling import _wrap, _wrap_pos

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
