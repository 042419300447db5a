"""A top-view rasteriser of triangle meshes: coverage and height maps of a layout."""
from __future__ import annotations

import numpy as np


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
