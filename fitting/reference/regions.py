"""Regions of a micrograph that are not specimen: instrument data bars along the bottom and the
black surround of a round aperture.
"""
from __future__ import annotations

import math

import numpy as np

# --- data bar -----------------------------------------------------------------------------------

_BAR_SEARCH_FRACTION = 0.35  # data bars live in the bottom third; never look higher
_BAR_TOL = 5                 # gray levels (of 255) that count as "the same" flat value
_BAR_START_FLAT = 0.85       # the first bar row is (almost) all one value ...
_BAR_ABOVE_MAX = 0.5         # ... and that value is rare in the image rows just above it
_BAR_ROW_FLAT = 0.5          # a bar row (even one through text) is mostly background
_BAR_ROWS_FLAT = 0.8         # ... for most of the rows of the bar
_BAR_MEAN_FLAT = 0.7
_BAR_BG_SHARE = 0.6          # one background value dominates the whole bar


def detect_data_bar(gray: np.ndarray) -> int | None:
    """First row of an instrument data bar / scale-bar strip along the bottom, or None.

    A bar is a full-width block reaching the bottom edge whose rows are dominated by one flat
    (synthetic, noise-free) value, with text or lines on it, that starts abruptly: its first row
    is almost all one value and that value is rare in the image rows right above. Natural image
    content changes gradually from row to row, so smooth TEM backgrounds or the black rim
    under a round aperture are not taken for a bar. Only the bottom 35 % is searched.
    """
    g = np.asarray(gray)
    if g.ndim != 2:
        raise ValueError(f"detect_data_bar expects a 2-D gray image, got shape {g.shape}")
    h, w = g.shape
    min_bar = max(6, math.ceil(0.015 * h))
    top = max(4, int(h * (1.0 - _BAR_SEARCH_FRACTION)), MIN_SIDE)
    if w < 8 or h - top < min_bar:
        return None
    ctx = 4
    q = np.rint(np.clip(np.nan_to_num(g[top - ctx:], nan=0.0), 0.0, 1.0) * 255.0).astype(np.int64)
    n = q.shape[0]
    counts = np.bincount((np.arange(n)[:, None] * 256 + q).ravel(), minlength=n * 256)
    counts = counts.reshape(n, 256)
    win = _window_sum(counts, _BAR_TOL)          # win[r, v]: pixels of row r within tol of v
    flat = win.max(axis=1) / w                   # share of the row's most common (flat) value
    start_val = win.argmax(axis=1)

    # Suffix sums make every candidate's block statistics O(1) (or O(256)).
    is_flat = (flat >= _BAR_ROW_FLAT).astype(np.int64)
    suf_flat_rows = np.cumsum(is_flat[::-1])[::-1]
    suf_flat_sum = np.cumsum(flat[::-1])[::-1]
    suf_counts = np.cumsum(counts[::-1], axis=0)[::-1]

    for s in range(top, h - min_bar + 1):        # top-down: the first hit is the bar's first row
        i = s - top + ctx
        if flat[i] < _BAR_START_FLAT:
            continue
        v = start_val[i]
        # Abrupt start: rows s-4..s-2 (s-1 may be a blurred/JPEG transition row) lack value v.
        if (win[i - 4:i - 1, v] / w).max() > _BAR_ABOVE_MAX:
            continue
        rows = n - i
        if suf_flat_rows[i] < _BAR_ROWS_FLAT * rows or suf_flat_sum[i] < _BAR_MEAN_FLAT * rows:
            continue
        bg_share = _window_sum(suf_counts[i][None, :], _BAR_TOL).max() / (rows * w)
        if bg_share < _BAR_BG_SHARE:
            continue
        return int(s)
    return None


def _window_sum(counts: np.ndarray, tol: int) -> np.ndarray:
    """Sum of histogram counts over values v-tol..v+tol for every v (last axis)."""
    padded = np.pad(counts, ((0, 0), (tol + 1, tol)))
    cs = np.cumsum(padded, axis=1)
    return cs[:, 2 * tol + 1:] - cs[:, :-2 * tol - 1]


# --- round aperture --------------------------------------------------------------------------------

def detect_aperture(gray: np.ndarray) -> np.ndarray | None:
    """Valid-pixel mask for an image seen through a round aperture with flat black surround.

    Returns a bool (H, W) mask that is False outside the aperture circle (shrunk by a small
    margin that drops the blurred rim), or None unless an aperture is clearly present: all four
    corners flat and dark at the same level, and the edge of that dark surround fits a circle.
    """
    from scipy import ndimage  # scipy is slow to import and only needed here

    g = np.asarray(gray, dtype=np.float32)
    if g.ndim != 2:
        raise ValueError(f"detect_aperture expects a 2-D gray image, got shape {g.shape}")
    h, w = g.shape
    if min(h, w) < 64:
        return None
    # Work at <= 1024 px: a circle fit does not need more, and huge images stay cheap.
    step = max(1, int(math.ceil(max(h, w) / 1024)))
    small = g[::step, ::step]
    sh, sw = small.shape

    # 1) all four corners flat and dark, at one level
    pc = max(3, int(0.02 * min(sh, sw)))
    corners = [small[:pc, :pc], small[:pc, -pc:], small[-pc:, :pc], small[-pc:, -pc:]]
    meds = np.array([float(np.median(c)) for c in corners])
    stds = np.array([float(c.std()) for c in corners])
    if meds.max() > 0.15 or stds.max() > 0.02 or meds.max() - meds.min() > 0.03:
        return None
    level = float(np.median(meds))
    tol = max(3.0 / 255.0, 4.0 * float(stds.max()))

    # 2) the surround: pixels at that level connected to a corner
    dark = np.abs(small - level) <= tol
    labels, _ = ndimage.label(dark)
    corner_labels = {labels[0, 0], labels[0, -1], labels[-1, 0], labels[-1, -1]} - {0}
    outside = np.isin(labels, list(corner_labels))
    out_frac = float(outside.mean())
    if not 0.02 <= out_frac <= 0.7:
        return None

    # 3) fit a circle to the surround's inner edge (not to the image border)
    inside = ~outside
    edge = outside & ndimage.binary_dilation(inside)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = False
    ys, xs = np.nonzero(edge)
    if xs.size < 50:
        return None
    xs = xs.astype(np.float64)
    ys = ys.astype(np.float64)
    keep = np.ones(xs.size, dtype=bool)
    for _ in range(3):  # trim outliers (dark specks touching the rim) and refit
        fit = _fit_circle(xs[keep], ys[keep])
        if fit is None:
            return None
        cx, cy, r = fit
        res = np.abs(np.hypot(xs - cx, ys - cy) - r)
        keep = res <= max(2.0, 3.0 * float(np.median(res[keep])) + 1.0)
    res_kept = res[keep]
    if (keep.mean() < 0.8 or float(np.median(res_kept)) > max(1.5, 0.01 * r)
            or r < 0.25 * min(sh, sw)):
        return None
    ang = np.arctan2(ys[keep] - cy, xs[keep] - cx)
    octants = np.unique(((ang + np.pi) / (np.pi / 4)).astype(int) % 8)
    if octants.size < 4:  # an arc in one corner could be anything; a circle shows all round
        return None

    # 4) the surround really is outside the circle, the inside is mostly image
    yy, xx = np.mgrid[0:sh, 0:sw]
    dist = np.hypot(xx - cx, yy - cy)
    outer = dist > r + 3
    if outer.any() and float(outside[outer].mean()) < 0.95:
        return None
    if float(dark[dist < r - 3].mean()) > 0.3:
        return None

    # mask at full resolution, circle shrunk by a margin that drops the blurred rim
    scale = float(step)
    cx_f, cy_f, r_f = (cx + 0.5) * scale - 0.5, (cy + 0.5) * scale - 0.5, r * scale
    margin = max(2.0, 0.01 * r_f)
    yy, xx = np.ogrid[0:h, 0:w]
    return ((xx - cx_f) ** 2 + (yy - cy_f) ** 2) <= (r_f - margin) ** 2


def _fit_circle(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float, float] | None:
    """Algebraic (Kasa) least-squares circle; works on partial arcs such as four corners."""
    if xs.size < 10:
        return None
    a = np.column_stack([xs, ys, np.ones_like(xs)])
    b = xs * xs + ys * ys
    try:
        sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    except np.linalg.LinAlgError:
        return None
    cx, cy = sol[0] / 2.0, sol[1] / 2.0
    r2 = sol[2] + cx * cx + cy * cy
    if not np.isfinite(r2) or r2 <= 0:
        return None
    return float(cx), float(cy), float(math.sqrt(r2))


MIN_SIDE = 16                      # smaller images (or crops) carry no usable texture
