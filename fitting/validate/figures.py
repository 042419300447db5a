"""The validation's picture of diameter distributions (PIL only: no plotting library)."""
from __future__ import annotations

import numpy as np


def diameter_histogram_png(series, bins: np.ndarray, *, width: int = 720, height: int = 360) -> np.ndarray:
    """Diameter histograms as outlined step curves on one logarithmic axis, each normalised to
    its own total (samples of different counts compare by shape).

    Parameters
    ----------
    series : list of (label, diameters, (r, g, b))
    bins : array of bin edges (px), increasing
    width, height : int
        Picture size.

    Returns
    -------
    (height, width, 3) uint8
    """
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (width, height), (30, 30, 34))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 54, width - 12, 14 + 16 * len(series), height - 34
    edges = np.log(np.asarray(bins, np.float64))
    shares = []
    for _label, d, _c in series:
        h = np.histogram(np.asarray(d, np.float64), bins=bins)[0].astype(np.float64)
        shares.append(h / h.sum() if h.sum() else h)
    top_share = max([float(s.max()) for s in shares if s.size] + [1e-9])

    def xp(e: float) -> float:
        return left + (right - left) * (e - edges[0]) / max(edges[-1] - edges[0], 1e-9)

    def yp(v: float) -> float:
        return bottom - (bottom - top) * v / top_share
    draw.line([(left, bottom), (right, bottom)], fill=(150, 150, 155))
    draw.line([(left, top), (left, bottom)], fill=(150, 150, 155))
    for v in _ticks(float(bins[0]), float(bins[-1])):
        x = xp(np.log(v))
        draw.line([(x, bottom), (x, bottom + 4)], fill=(150, 150, 155))
        draw.text((x - 10, bottom + 6), f"{v:g}", fill=(190, 190, 195))
    draw.text((right - 170, height - 16), "diameter (reference px, log)", fill=(190, 190, 195))
    draw.text((6, top - 4), f"{top_share:.2f}", fill=(190, 190, 195))
    draw.text((6, bottom - 10), "0", fill=(190, 190, 195))
    for i, ((label, d, color), s) in enumerate(zip(series, shares)):
        pts = []
        for k, v in enumerate(s):
            pts += [(xp(edges[k]), yp(v)), (xp(edges[k + 1]), yp(v))]
        if pts:
            draw.line([(pts[0][0], bottom)] + pts + [(pts[-1][0], bottom)], fill=tuple(color), width=2)
        draw.text((left + 8, 4 + 16 * i), f"{label} ({len(np.asarray(d))})", fill=tuple(color))
    return np.asarray(img)


def _ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 values between ``lo`` and ``hi``."""
    out = []
    k = int(np.floor(np.log10(max(lo, 1e-9))))
    while 10.0 ** k <= hi:
        for m in (1, 2, 5):
            v = m * 10.0 ** k
            if lo <= v <= hi:
                out.append(v)
        k += 1
    return out
