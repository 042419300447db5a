"""Particle-cluster aggregation kernel (Filippov et al. 2000), compiled with numba.

The growth is sequential by nature (every primary depends on all before it), so in numpy it
spent its time in small-array calls per primary; compiled, it is a small part of a layout. It
draws from the caller's ``rng`` in the same order and keeps the arithmetic order of the numpy
implementation it replaced, so a seed gives the same placements up to rounding
(docs/decisions.md, "Aggregate growth compiled with numba").

``cache=True``: compiled once per installation (~6 s) into ``__pycache__``, then loaded in ~0.2 s.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np


@nb.njit(cache=True)
def _clear_of(x0, x1, x2, pos, dj, k):
    """True when the point (x0, x1, x2) keeps at least the contact distance ``dj[q]`` (less a
    1e-6 relative tolerance) from each of the first ``k`` primaries."""
    for q in range(k):
        dx = x0 - pos[q, 0]
        dy = x1 - pos[q, 1]
        dz = x2 - pos[q, 2]
        if math.sqrt(dx * dx + dy * dy + dz * dz) < dj[q] * (1 - 1e-6):
            return False
    return True


@nb.njit(cache=True)
def grow_centres(radii, df, overlap, rng, kf):
    """Centres (n,3) of an aggregate of primaries with ``radii``, about its centre of mass.

    Each new primary touches one member (neighbour distance (1-overlap)*(r1+r2)), overlaps no
    other beyond that, and sits at the distance Gamma from the centre of mass that keeps the
    mass-weighted radius of gyration on Rg = a (M / (kf m)) ** (1/Df). Candidate points lie on
    the circles |x - cm| = Gamma, |x - p_j| = d_j (12 members x 8 angles, then 48 x 16); if
    none is free, random contact points near Gamma; the last resort goes outward from the
    farthest member.
    """
    n = len(radii)
    pos = np.zeros((n, 3))
    if n == 1:
        return pos
    m = radii ** 3
    mbar = m.mean()
    a = mbar ** (1 / 3) * (1 - overlap)
    scale = 1 - overlap
    v = rng.standard_normal(3)
    nv = math.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])
    nv = max(nv, 1e-300)
    for c in range(3):
        pos[1, c] = v[c] / nv * scale * (radii[0] + radii[1])
    Msum = m[0] + m[1]
    S1 = np.empty(3)
    for c in range(3):
        S1[c] = m[0] * pos[0, c] + m[1] * pos[1, c]
    S2 = m[0] * (pos[0, 0] ** 2 + pos[0, 1] ** 2 + pos[0, 2] ** 2) + m[1] * (pos[1, 0] ** 2 + pos[1, 1] ** 2 + pos[1, 2] ** 2)
    Dj = np.empty(n)
    dj = np.empty(n)
    rel = np.empty((n, 3))
    for k in range(2, n):
        cm0, cm1, cm2 = S1[0] / Msum, S1[1] / Msum, S1[2] / Msum
        rg2 = S2 / Msum - (cm0 * cm0 + cm1 * cm1 + cm2 * cm2)
        mk = m[k]
        Mn = Msum + mk
        rgt = a * (Mn / (kf * mbar)) ** (1 / df)
        g2 = Mn / (mk * Msum) * (Mn * rgt ** 2 - Msum * max(rg2, 0.0))
        gamma = math.sqrt(max(g2, 0.0))
        ncand = 0
        cand = np.empty(k, np.int64)
        for j in range(k):
            dj[j] = scale * (radii[j] + radii[k])
            rel[j, 0] = pos[j, 0] - cm0
            rel[j, 1] = pos[j, 1] - cm1
            rel[j, 2] = pos[j, 2] - cm2
            Dj[j] = math.sqrt(rel[j, 0] * rel[j, 0] + rel[j, 1] * rel[j, 1] + rel[j, 2] * rel[j, 2])
            if (Dj[j] + dj[j] >= gamma) and (abs(Dj[j] - dj[j]) <= gamma) and (Dj[j] > 1e-9):
                cand[ncand] = j
                ncand += 1
        found = False
        x0 = x1 = x2 = 0.0
        for attempt in range(2):
            n_c = 12 if attempt == 0 else 48
            n_a = 8 if attempt == 0 else 16
            if found or ncand == 0 or gamma <= 0:
                break
            if ncand <= n_c:
                sel = cand[:ncand].copy()
            else:
                sel = cand[rng.integers(0, ncand, n_c)]
            ns = len(sel)
            ph = rng.random((ns, n_a)) * 2 * np.pi
            for si in range(ns):
                if found:
                    break
                j = sel[si]
                D = Dj[j]
                d = dj[j]
                e0 = rel[j, 0] / D
                e1 = rel[j, 1] / D
                e2 = rel[j, 2] / D
                t = (D * D + gamma * gamma - d * d) / (2 * D)
                rr = math.sqrt(max(gamma * gamma - t * t, 0.0))
                if abs(e0) < 0.9:
                    u0, u1, u2 = 0.0, e2, -e1
                else:
                    u0, u1, u2 = -e2, 0.0, e0
                un = math.sqrt(u0 * u0 + u1 * u1 + u2 * u2)
                u0 /= un
                u1 /= un
                u2 /= un
                w0 = e1 * u2 - e2 * u1
                w1 = e2 * u0 - e0 * u2
                w2 = e0 * u1 - e1 * u0
                for ai in range(n_a):
                    c = math.cos(ph[si, ai])
                    s = math.sin(ph[si, ai])
                    X0 = cm0 + t * e0 + rr * (c * u0 + s * w0)
                    X1 = cm1 + t * e1 + rr * (c * u1 + s * w1)
                    X2 = cm2 + t * e2 + rr * (c * u2 + s * w2)
                    if _clear_of(X0, X1, X2, pos, dj, k):
                        found = True
                        x0, x1, x2 = X0, X1, X2
                        break
        tries = 0
        while not found:
            n_try = 64 * (tries + 1)
            jj = rng.integers(0, k, n_try)
            g = rng.standard_normal((n_try, 3))
            best = -1
            besterr = 1e300
            bx0 = bx1 = bx2 = 0.0
            for b in range(n_try):
                j = jj[b]
                gn = max(math.sqrt(g[b, 0] ** 2 + g[b, 1] ** 2 + g[b, 2] ** 2), 1e-300)
                X0 = pos[j, 0] + dj[j] * (g[b, 0] / gn)
                X1 = pos[j, 1] + dj[j] * (g[b, 1] / gn)
                X2 = pos[j, 2] + dj[j] * (g[b, 2] / gn)
                if _clear_of(X0, X1, X2, pos, dj, k):
                    err = abs(math.sqrt((X0 - cm0) ** 2 + (X1 - cm1) ** 2 + (X2 - cm2) ** 2) - gamma)
                    if err < besterr:
                        besterr = err
                        best = b
                        bx0, bx1, bx2 = X0, X1, X2
            if best >= 0:
                found = True
                x0, x1, x2 = bx0, bx1, bx2
            tries += 1
            if tries > 6 and not found:
                far = 0
                for q in range(k):
                    if Dj[q] > Dj[far]:
                        far = q
                if Dj[far] > 1e-9:
                    x0 = pos[far, 0] + dj[far] * rel[far, 0] / Dj[far]
                    x1 = pos[far, 1] + dj[far] * rel[far, 1] / Dj[far]
                    x2 = pos[far, 2] + dj[far] * rel[far, 2] / Dj[far]
                else:
                    x0 = pos[far, 0] + dj[far]
                    x1 = pos[far, 1]
                    x2 = pos[far, 2]
                found = True
        pos[k, 0] = x0
        pos[k, 1] = x1
        pos[k, 2] = x2
        Msum = Mn
        S1[0] += mk * x0
        S1[1] += mk * x1
        S1[2] += mk * x2
        S2 = S2 + mk * (x0 * x0 + x1 * x1 + x2 * x2)
    out = np.empty((n, 3))
    for i in range(n):
        for c in range(3):
            out[i, c] = pos[i, c] - S1[c] / Msum
    return out
