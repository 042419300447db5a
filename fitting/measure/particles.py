"""Measure particles on a real micrograph the way a microscopist would.

The pipeline is classical (numpy, scipy and scikit-image only), so every number can be
traced back to a morphological operation:

1. ``valid_region``         -- drop an instrument data bar and the black surround of a round
                               aperture (simple; callers may pass their own mask).
2. ``estimate_background``  -- a smooth large-scale background over the valid pixels, so
                               uneven illumination does not move the threshold.
3. ``foreground_mask``      -- automatic polarity ("bright", "dark", or "outline" for
                               ring-shaped rims), noise-aware thresholds and a marker
                               watershed on the gradient that puts the boundary on the edge;
                               ``edge_crest_shift`` moves edge-brightened (SEM) outlines in to
                               the bright crest at the silhouette.
4. ``split_touching``       -- distance transform + watershed from scale-free h-maxima.
5. ``granulometry_diameter`` -- pattern spectrum of openings by discs: the primary size when
                               particles merge into branched chains.
6. ``measure_particles``    -- all of the above at an automatically chosen working scale
                               (sizes are reported in input pixels), the choice between the
                               watershed and the granulometry size, shape and confidences.
                               Dense piles without any visible background (the whole field
                               is particles) are sized by a grey-level granulometry instead.

Sizes are equivalent-circle diameters (ECD, ``2 * sqrt(area / pi)``) unless noted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from scipy import stats
from skimage import feature, filters, measure, morphology, segmentation, transform

__all__ = [
    "ParticleMeasurement",
    "valid_region",
    "estimate_background",
    "foreground_mask",
    "split_touching",
    "pattern_spectrum",
    "granulometry_diameter",
    "grey_granulometry",
    "edge_crest_shift",
    "measure_particles",
]

#: Longest side of the first (coarse) working image, used to find the particle scale.
FIRST_PASS_SIDE = 512
#: Typical particle diameter (working pixels) the final working scale aims for: necks
#: between touching particles and rims survive, and the work stays fast.
TARGET_DIAMETER_PX = 30.0
#: Upper bound on the pixels of the final working image (speed).
MAX_WORK_PIXELS = 1.3e6
#: Relative neck constriction, in log distance-transform units, that splits two touching
#: particles: exp(-0.1) = 0.90, a neck narrower than ~90 % of the smaller particle's
#: inscribed radius separates them (two equal discs whose centres are more than ~0.45
#: diameters apart). Applied to log(1 + DT) of a 1-px-smoothed DT, so pixel noise on
#: small particles does not reach it.
SPLIT_LOG_H = 0.1
#: Sure background lies below max(BG_SIGMA * noise, BG_CONTRAST * particle contrast)...
BG_SIGMA = 2.0
BG_CONTRAST = 0.2
#: ... sure particle above min(Otsu, FG_SIGMA * noise).
FG_SIGMA = 8.0
#: Particles must stand this many noise sigmas above the background.
MIN_SNR = 3.0
#: Area-weighted solidity of the connected components below which (with several
#: watershed instances per component) the particles form branched agglomerates.
BRANCHED_SOLIDITY = 0.7
BRANCHED_INSTANCES = 3.0
BRANCHED_MAX_COVERAGE = 0.5
#: Median major/minor axis ratio above which particles are rods or needles.
ELONGATED = 2.0
#: Number-weighted granulometry ignores sizes below this fraction of the area-weighted
#: median (boundary slivers; see ``_number_weights``).
GRAN_FLOOR = 0.4
#: Rings (working pixels from the mask's edge) searched for a bright edge crest, and the
#: crest's lead over the particle interior, as a share of the crest's height over the
#: background, that marks an edge-brightened silhouette (SEM).
CREST_RINGS = 4
CREST_LEAD = 0.1
#: Share of the crest's height below which an outer ring lies mostly outside the particles:
#: the pixels just outside a silhouette still read 0.5-0.65 of the crest (blur and clipped
#: partial pixels), those just inside 0.9-1 (calibrated on the library's SEM renders,
#: ``benchmarks/bench_measure_renders.py``).
CREST_SHARE = 0.75
#: A deeper ring brighter than the crest by more than this share of its height means the
#: particles brighten toward their centre: no edge crest.
CREST_TOLERANCE = 0.03
#: Area share of a dark particle phase in particles with a core brighter than the background
#: above which the particles are bright-field colloids ("outline"), however thick their ring.
CORED_SHARE = 0.5


# ----------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------
def _f(x):
    """Plain Python float (or None) for JSON."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class ParticleMeasurement:
    """What ``measure_particles`` found on one image.

    Attributes
    ----------
    count : int
        Particles found (separated instances, border-touching ones included).
    diameters_px : ndarray of float
        Equivalent-circle diameters of the measured (not border-cut) particles, in input
        pixels. With ``method == "granulometry"`` these are the number-weighted pattern
        spectrum quantiles (a deterministic pseudo-sample, not individual particles).
    median_px, gmean_px : float or None
        Median and geometric mean diameter (input pixels); None when nothing was measured.
    gsd : float or None
        Geometric standard deviation (>= 1) of the diameters.
    coverage : float
        Projected area fraction of the valid pixels covered by particles.
    polarity : str
        "bright", "dark" or "outline" (ring-shaped rims, hole-filled into particles).
    shape : dict
        ``{"circularity", "solidity", "elongation", "class"}``: medians over measured
        particles, class one of "round", "faceted", "elongated", "branched".
    method : str
        "watershed" (per-instance sizes) or "granulometry" (pattern spectrum sizes).
    confidence : dict
        ``{"count", "diameter", "coverage", "polarity", "shape"}`` in [0, 1]; see
        ``measure_particles`` for how each is derived.
    labels : ndarray of int32
        Instance labels (0 = background), same shape as the input image.
    diagnostics : dict
        The measurable quantities the confidences and the method choice were derived from.
    """

    count: int
    diameters_px: np.ndarray
    median_px: float | None
    gmean_px: float | None
    gsd: float | None
    coverage: float
    polarity: str
    shape: dict
    method: str
    confidence: dict
    labels: np.ndarray
    diagnostics: dict = field(default_factory=dict)

    def to_dict(self, pixel_size_nm: float | None = None) -> dict:
        """JSON-ready summary (plain Python types only).

        Parameters
        ----------
        pixel_size_nm : float, optional
            Input pixel size. When given, ``diameter_nm`` is added (the GSD is scale-free
            and therefore the same as in pixels).

        Returns
        -------
        dict
            ``count``, ``diameter_px`` {median, gmean, gsd}, ``coverage``, ``shape``,
            ``polarity``, ``method``, ``confidence``, ``diagnostics`` and, optionally,
            ``diameter_nm``.
        """
        out = {
            "count": int(self.count),
            "diameter_px": {"median": _f(self.median_px), "gmean": _f(self.gmean_px),
                            "gsd": _f(self.gsd)},
            "coverage": float(self.coverage),
            "shape": {k: (v if isinstance(v, str) else _f(v)) for k, v in self.shape.items()},
            "polarity": str(self.polarity),
            "method": str(self.method),
            "confidence": {k: float(v) for k, v in self.confidence.items()},
            "diagnostics": {k: (v if isinstance(v, (str, bool)) or v is None else
                                (int(v) if isinstance(v, (int, np.integer)) else _f(v)))
                            for k, v in self.diagnostics.items()},
        }
        if pixel_size_nm is not None:
            p = float(pixel_size_nm)
            out["diameter_nm"] = {
                "median": None if self.median_px is None else float(self.median_px) * p,
                "gmean": None if self.gmean_px is None else float(self.gmean_px) * p,
                "gsd": _f(self.gsd),
            }
        return out


# ----------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------
def _as_gray(gray) -> np.ndarray:
    """Float32 gray image in [0, 1] (integer images are scaled by their dtype's maximum)."""
    g = np.asarray(gray)
    if g.dtype == bool:
        g = g.astype(np.float32)
    elif np.issubdtype(g.dtype, np.integer):
        g = g.astype(np.float32) / float(np.iinfo(g.dtype).max)
    if g.ndim == 3:  # tolerate RGB(A): luminance of the first three channels
        g = g[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if g.ndim != 2:
        raise ValueError(f"expected a 2-D gray image, got shape {g.shape}")
    g = g.astype(np.float32, copy=False)
    if not np.isfinite(g).all():
        g = np.nan_to_num(g, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(g, 0.0, 1.0)


def _as_valid(valid, shape) -> np.ndarray:
    if valid is None:
        return np.ones(shape, bool)
    v = np.asarray(valid, bool)
    if v.shape != shape:
        raise ValueError(f"valid mask shape {v.shape} != image shape {shape}")
    return v


# ----------------------------------------------------------------------------------------
# Valid region (data bar, round aperture)
# ----------------------------------------------------------------------------------------
def _bottom_bar_top(q: np.ndarray, flat_fraction: float) -> int | None:
    """First row of a flat instrument data bar at the bottom, or None."""
    h, w = q.shape
    # Per-row histogram (256 levels); a row is "flat" when one level (+-2, for JPEG noise)
    # holds most of its pixels, which real image content never does but a bar with text does.
    hist = np.bincount((np.arange(h)[:, None] * 256 + q).ravel(), minlength=h * 256)
    hist = ndi.uniform_filter1d(hist.reshape(h, 256).astype(np.float32), 5, axis=1) * 5
    flat = hist.max(axis=1) / w >= flat_fraction
    if not flat[-1]:
        return None
    top = h - 1
    while top > 0 and flat[top - 1]:
        top -= 1
    height = h - top
    if height < max(4, 0.01 * h) or height > 0.3 * h:
        return None
    return top


def _aperture(g: np.ndarray, dark_margin: float) -> np.ndarray | None:
    """Inside of a round aperture with a black surround, or None if there is none."""
    dark = g <= g.min() + dark_margin
    # The surround is the dark phase connected to the image frame ...
    lab = measure.label(dark, connectivity=1)
    frame = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    frame = frame[frame > 0]
    if frame.size == 0:
        return None
    surround = np.isin(lab, frame)
    frac = surround.mean()
    if not 0.03 <= frac <= 0.7:
        return None
    # ... and what it encloses must be one convex blob (a disc or a polygonal iris). A black
    # SEM background also touches the frame, but its complement (the particles) is not convex.
    inside = ndi.binary_fill_holes(~surround)
    lab_in = measure.label(inside)
    if lab_in.max() == 0:
        return None
    props = max(measure.regionprops(lab_in), key=lambda p: p.area)
    if props.solidity < 0.95 or props.area < 0.3 * g.size:
        return None
    if float(np.std(g[surround])) > 0.03:  # a real aperture surround is flat black
        return None
    return lab_in == props.label


def valid_region(gray, *, flat_fraction: float = 0.5, dark_margin: float = 0.04,
                 erode_px: int = 2) -> np.ndarray:
    """Pixels that show the sample: no data bar at the bottom, no black aperture surround.

    Deliberately simple; the application has its own detectors.

    Parameters
    ----------
    gray : (H, W) array_like
        Gray image in [0, 1].
    flat_fraction : float
        A bottom row belongs to a data bar when one gray level (+-2/255) covers at least
        this fraction of it; the bar is the contiguous run of such rows at the bottom
        (1 % to 30 % of the height).
    dark_margin : float
        Surround pixels are at most ``min + dark_margin``.
    erode_px : int
        Erosion of the aperture inside, to drop the blurred rim.

    Returns
    -------
    valid : (H, W) ndarray of bool
        True where the image shows the sample.
    """
    g = _as_gray(gray)
    valid = np.ones(g.shape, bool)
    q = np.clip(np.round(g * 255), 0, 255).astype(np.int64)
    top = _bottom_bar_top(q, flat_fraction)
    if top is not None:
        valid[top:] = False
    rows = top if top is not None else g.shape[0]
    inside = _aperture(g[:rows], dark_margin)
    if inside is not None:
        if erode_px > 0:
            inside = ndi.binary_erosion(inside, iterations=erode_px)
        valid[:rows] &= inside
    return valid


# ----------------------------------------------------------------------------------------
# Background and threshold
# ----------------------------------------------------------------------------------------
def estimate_background(gray, valid=None, *, sigma_px: float | None = None,
                        exclude=None) -> np.ndarray:
    """Smooth large-scale background by a normalised Gaussian over the valid pixels.

    Parameters
    ----------
    gray : (H, W) array_like
        Gray image.
    valid : (H, W) bool array, optional
        Pixels that may contribute (invalid pixels get an extrapolated value).
    sigma_px : float, optional
        Gaussian width; default a quarter of the longest side, so it follows vignetting and
        uneven illumination but not individual particles.
    exclude : (H, W) bool array, optional
        Further pixels not to use (e.g. the particles, once known), so the estimate is the
        level of the background phase itself.

    Returns
    -------
    background : (H, W) ndarray of float32
    """
    g = np.asarray(gray, np.float32)
    w = _as_valid(valid, g.shape).astype(np.float32)
    if exclude is not None:
        w = w * ~np.asarray(exclude, bool)
    if w.sum() < 1:
        return np.full(g.shape, float(np.median(g)), np.float32)
    if sigma_px is None:
        sigma_px = max(g.shape) / 4.0
    # The Gaussian is wide, so it runs on a coarse grid (<= 128 px) and is interpolated
    # back: the same smooth background at a fraction of the cost.
    k = max(1.0, max(g.shape) / 128.0)
    small = tuple(max(2, int(round(n / k))) for n in g.shape)
    num = transform.resize(g * w, small, order=1, anti_aliasing=k > 1)
    den = transform.resize(w, small, order=1, anti_aliasing=k > 1)
    num = ndi.gaussian_filter(num, sigma_px / k, mode="reflect")
    den = ndi.gaussian_filter(den, sigma_px / k, mode="reflect")
    fallback = float(np.sum(g * w) / w.sum())
    bg = np.where(den > 1e-4, num / np.maximum(den, 1e-4), fallback)
    return transform.resize(bg, g.shape, order=1).astype(np.float32)


def _histogram_mode(v: np.ndarray) -> float:
    """Location of the highest peak of a smoothed histogram (the background level)."""
    lo, hi = np.percentile(v, [0.5, 99.5])
    if hi <= lo:
        return float(lo)
    hist, edges = np.histogram(v, 256, (lo, hi))
    hist = ndi.gaussian_filter1d(hist.astype(np.float64), 2)
    i = int(np.argmax(hist))
    return float(0.5 * (edges[i] + edges[i + 1]))


def _remove_small(mask: np.ndarray, max_area: float) -> np.ndarray:
    """Drop connected components of at most ``max_area`` pixels (scikit-image >= 0.22)."""
    n = max(1, int(max_area))
    try:
        return morphology.remove_small_objects(mask, max_size=n)
    except TypeError:  # scikit-image < 0.26 names it min_size (strictly smaller)
        return morphology.remove_small_objects(mask, min_size=n + 1)


def _fill_interiors(rim: np.ndarray, min_area: float, filled: np.ndarray | None = None) -> np.ndarray:
    """Enclosed interiors (holes) of a mask, without the specks below ``min_area``
    (``filled``: the mask with its holes filled, when the caller has it already)."""
    holes = (ndi.binary_fill_holes(rim) if filled is None else filled) & ~rim
    if holes.any():
        holes = _remove_small(holes, min_area)
    return holes


def _bbox(mask: np.ndarray, pad: int):
    """Slices of the bounding box of ``mask`` grown by ``pad`` (None if empty)."""
    rr = np.flatnonzero(mask.any(axis=1))
    cc = np.flatnonzero(mask.any(axis=0))
    if rr.size == 0:
        return None
    return (slice(max(rr[0] - pad, 0), min(rr[-1] + pad + 1, mask.shape[0])),
            slice(max(cc[0] - pad, 0), min(cc[-1] + pad + 1, mask.shape[1])))


def _is_structured(g: np.ndarray, valid: np.ndarray) -> bool:
    """True when the image has contrast at particle-like scales above the pixel noise.

    A band-pass (Gaussian 2 px minus Gaussian 8 px) ignores smooth illumination gradients;
    white noise keeps only ~15 % of its high-pass standard deviation in that band, while
    particle and grain edges keep most of theirs.
    """
    if valid.sum() < 16:
        return False
    g8 = ndi.gaussian_filter(g, 8.0)
    band = (ndi.gaussian_filter(g, 2.0) - g8)[valid]
    high = (g - g8)[valid]
    return float(band.std()) > 0.01 and float(band.std()) > 0.5 * float(high.std())


def _foreground(g: np.ndarray, valid: np.ndarray, polarity: str,
                min_diameter_px: float) -> dict:
    """Threshold + polarity at the given scale; returns the mask and the diagnostics."""
    if polarity not in ("auto", "bright", "dark", "outline"):
        raise ValueError(f"polarity must be auto, bright, dark or outline, not {polarity!r}")
    out = {"mask": np.zeros(g.shape, bool),
           "polarity": "bright" if polarity in ("auto", "outline") else polarity,
           "polarity_conf": 0.0, "separability": 0.0, "contrast_snr": 0.0,
           "structured": False, "sign": 1.0, "signal": None}
    if valid.sum() < 16:
        return out
    # A light blur first: shot noise (TEM, SEM) would otherwise speckle the mask.
    gs = ndi.gaussian_filter(g, 1.0)
    d = gs - estimate_background(gs, valid)
    out["structured"] = _is_structured(g, valid)
    dv = d[valid]
    if float(dv.std()) < 1e-4:
        return out
    t = float(filters.threshold_otsu(dv))
    mode = _histogram_mode(dv)
    skew = float(stats.skew(dv))
    # Polarity: the background is the histogram mode (the most common level) and the
    # particles are the Otsu class that does not contain it. The skewness (particles are
    # the histogram's tail) is an independent second cue, used for the confidence.
    mode_side = "bright" if mode < t else "dark"
    skew_side = "bright" if skew > 0 else "dark"
    side = mode_side if polarity in ("auto", "outline") else polarity
    sign = 1.0 if side == "bright" else -1.0
    pol_conf = min(1.0, abs(t - mode) / (float(dv.std()) + 1e-9))
    pol_conf *= 1.0 if skew_side == mode_side else 0.5
    # Background again, from the background phase only: particles no longer pull it
    # towards their own level (matters where particles crowd one part of the field).
    p0 = (sign * d > sign * t) & valid
    excl = ndi.binary_dilation(p0, iterations=2)
    if (valid & ~excl).sum() >= 0.1 * valid.sum():
        d = gs - estimate_background(gs, valid, exclude=excl)
    s = sign * d
    sv = s[valid]
    t2 = float(filters.threshold_otsu(sv))
    lo_cls, hi_cls = sv[sv <= t2], sv[sv > t2]
    out.update(polarity=side, polarity_conf=float(pol_conf), sign=sign, signal=s)
    if lo_cls.size == 0 or hi_cls.size == 0:
        return out
    # Otsu's separability: between-class variance / total variance, 0 (noise) .. 1 (binary).
    w0, w1 = lo_cls.size / sv.size, hi_cls.size / sv.size
    sep = float(w0 * w1 * (hi_cls.mean() - lo_cls.mean()) ** 2 / (sv.var() + 1e-12))
    # Background level and noise: the histogram mode and the spread of its far side (away
    # from the particles), which particles cannot contaminate.
    bmode = _histogram_mode(sv)
    far = sv[sv < bmode]
    sigma_b = max(float(1.4826 * np.median(bmode - far)) if far.size else 0.0, 1e-4)
    contrast = float(np.median(hi_cls)) - bmode
    snr = contrast / sigma_b
    out.update(separability=sep, contrast_snr=float(snr), sigma_b=sigma_b)
    if snr < MIN_SNR:
        # No background phase stands out of the noise: a flat or pure-noise image, or a
        # dense pile that fills the whole field (handled by the caller).
        out["separability"] = 0.0
        return out
    # Marker-controlled watershed on the gradient magnitude: sure background and sure
    # particle pixels are markers, the pixels in between go to whichever side reaches them
    # first climbing the gradient, i.e. the boundary sits on the steepest edge (half
    # contrast for blurred edges, the outline for sharp ones, faint particle rims kept).
    lo_t = bmode + max(BG_SIGMA * sigma_b, BG_CONTRAST * contrast)
    hi_t = max(min(t2, bmode + FG_SIGMA * sigma_b), lo_t)
    bgm = (s < lo_t) | ~valid
    fgm = (s > hi_t) & valid
    mask = np.zeros(g.shape, bool)
    # Only the undecided pixels and a rim of background seeds take part (speed): deep
    # background cannot be reached by the particle seeds anyway.
    active = ndi.binary_dilation(~bgm, iterations=2)
    box = _bbox(active, 1)
    if box is not None and fgm.any():
        markers = np.zeros(g.shape, np.int32)[box]
        markers[bgm[box]] = 1
        markers[fgm[box]] = 2
        elev = filters.sobel(s[box])
        mask[box] = segmentation.watershed(elev, markers, mask=active[box]) == 2
    mask &= valid
    min_area = math.pi / 4 * min_diameter_px ** 2
    mask = _remove_small(mask, 0.5 * min_area)
    result_pol = side
    # Ring-shaped particles: either the particle phase itself is rims around large
    # interiors (emulsion droplets: thin dark rims), or the opposite tail forms rings that
    # enclose the particle phase and outweigh it (bright-field colloids: bright core in a
    # dark diffraction ring; a thin bright Fresnel halo around dark TEM particles is far
    # smaller than the particles and does not count), or dark discs hold bright cores
    # (the same colloids where the ring outweighs the core).
    brighter = s < bmode - 4.0 * sigma_b       # the opposite tail: brighter than the background
    filled_p = ndi.binary_fill_holes(mask)
    holes_p = _fill_interiors(mask, min_area, filled_p)
    opp = _remove_small(brighter & valid, 0.25 * min_area)
    holes_o = _fill_interiors(opp, min_area)
    n_mask, n_opp = int(mask.sum()), int(opp.sum())
    rim_self = n_mask > 0 and holes_p.sum() >= 0.6 * n_mask
    rim_opp = (n_mask > 0 and n_opp >= n_mask and holes_o.sum() >= 0.25 * n_opp
               and (holes_o & mask).sum() >= 0.5 * n_mask)
    rim_core = (n_mask > 0 and side == "dark" and not (rim_self or rim_opp)
                and _cored_share(mask, filled_p, brighter) >= CORED_SHARE)
    rim_width = 0.0
    if polarity == "outline" or (polarity == "auto" and (rim_self or rim_opp or rim_core)):
        result_pol = "outline"
        if rim_core:
            # Dark disc around a bright core (a colloid whose dark ring outweighs its core):
            # the particle is the whole disc, ring and core together.
            mask = filled_p & valid
        elif rim_opp and not rim_self:
            # Bright core in a dark ring (bright-field colloid): the ring lies outside the
            # particle, which ends where the ring starts. The ring is taken at half its own
            # depth so the slowly decaying outer halo does not widen it.
            depth = bmode - float(np.percentile(s[opp], 10))
            rims = (s < bmode - 0.5 * depth) & opp
            mask = (ndi.binary_fill_holes(rims | mask) & ~rims) & valid
        elif holes_p.any():
            # Thin rims around a background-like interior (emulsion droplet): the edge is
            # the middle of the rim, so the filled outline shrinks by half the rim width
            # (width = 2 area / perimeter for a thin closed band).
            rims = mask
            filled = filled_p & valid
            rim_width = 2.0 * float(rims.sum()) / max(measure.perimeter(rims), 1.0)
            mask = filled & (ndi.distance_transform_edt(filled) > 0.5 * rim_width)
            # Open arcs (rims cut by the frame or the invalid region, broken rims) enclose
            # nothing; a watershed would chop them into spurious small particles, so they
            # are dropped (cut droplets are then not counted).
            lab = measure.label(mask)
            closed = np.unique(lab[filled & ~rims])
            mask = np.isin(lab, closed[closed > 0])
        mask = _remove_small(mask, 0.5 * min_area)
    crest_shift = 0
    # Only bright particles: a darker band at the edge of dark particles is bright-field
    # refraction (droplets), whose outer edge is the particle's edge.
    if result_pol == "bright":
        background = sign * _background_level(g, valid, mask)
        # The mask is as it was when its holes were filled: only outlines change it above.
        crest_shift = edge_crest_shift(sign * g, mask, valid, background, filled=filled_p)
        if crest_shift:
            mask = _remove_small(mask & (ndi.distance_transform_edt(mask) > crest_shift),
                                 0.5 * min_area)
    out.update(mask=mask, polarity=result_pol, rim_width=rim_width, crest_shift=crest_shift,
               rim_self=bool(rim_self), rim_opp=bool(rim_opp), rim_core=bool(rim_core))
    return out


def _background_level(g: np.ndarray, valid: np.ndarray, mask: np.ndarray) -> float:
    """Median gray level of the background pixels (valid, two pixels clear of the mask)."""
    bg = valid & ~ndi.binary_dilation(mask, iterations=2)
    return float(np.median(g[bg])) if bg.any() else float(np.median(g[valid]))


def edge_crest_shift(signal: np.ndarray, mask: np.ndarray, valid: np.ndarray,
                     background: float, *, rings: int = CREST_RINGS,
                     lead: float = CREST_LEAD, share: float = CREST_SHARE,
                     filled: np.ndarray | None = None) -> int:
    """Pixels between a mask's outer edge and the silhouette of edge-brightened particles.

    SEM edges are brightest at the silhouette (secondary-electron yield grows toward grazing
    incidence), and blur spreads that crest outward, so the steepest descent to the
    background, where the mask's edge lies, falls outside the particle. The particles'
    rings are counted inward from the mask's edge; when the brightest of the first
    ``rings`` stands above the interior (an edge crest), the rings that stay below
    ``share`` of the crest's height over the background lie mostly outside the particles.

    Parameters
    ----------
    signal : (H, W) ndarray
        Gray levels with the particles' sign (particles above the background).
    mask : (H, W) bool ndarray
        Particle mask whose edge sits on the steepest descent.
    valid : (H, W) bool ndarray
        Pixels to use.
    background : float
        Background level of ``signal``.
    rings : int
        Rings searched for the crest.
    lead : float
        Lead of the crest over the interior, as a share of its height over the background.
    share : float
        Share of the crest's height below which an outer ring is outside the particles.
    filled : (H, W) bool ndarray, optional
        ``mask`` with its holes filled, when the caller has it already.

    Returns
    -------
    int
        Number of outer rings to remove; 0 when the particles have no edge crest.
    """
    inside = ndi.distance_transform_edt(ndi.binary_fill_holes(mask) if filled is None else filled)
    ring = np.ceil(inside).astype(np.int64)
    sel = mask & valid
    counts = np.bincount(ring[sel], minlength=rings + 4)
    if counts[1:rings + 3].min() < 50:
        return 0
    sums = np.bincount(ring[sel], weights=signal[sel], minlength=rings + 4)
    heights = sums[1:rings + 3] / counts[1:rings + 3] - background
    deep = sel & (ring > rings + 2)
    if deep.sum() < 50:
        return 0
    interior = float(signal[deep].mean()) - background
    k = int(np.argmax(heights[:rings]))
    crest = float(heights[k])
    if crest <= 0 or crest - interior < lead * crest:
        return 0
    # A crest: no ring further in is clearly brighter (else the particles brighten toward
    # their centre, as dark-field blobs do).
    if float(heights[k + 1:].max()) > (1.0 + CREST_TOLERANCE) * crest:
        return 0
    outside = heights[:k] < share * crest
    return int(np.argmin(outside)) if not outside.all() else k


def _cored_share(mask: np.ndarray, filled: np.ndarray, brighter: np.ndarray) -> float:
    """Share of a dark particle phase's area in particles that each enclose one core brighter
    than the background (``brighter``): refracting spheres in bright field focus light into
    their centre, whereas absorbing (TEM) particles are nowhere brighter than their film. A dark
    network around many bright holes (a substrate between bright islands) is not such a
    particle: it holds several cores, and they fill most of it. ``filled``: ``mask`` with its
    holes filled."""
    cores = filled & ~mask & brighter
    if not cores.any():
        return 0.0
    lab = measure.label(filled)
    core_lab = measure.label(cores)
    owner = ndi.maximum(lab, core_lab, index=np.arange(1, core_lab.max() + 1)).astype(np.int64)
    n_cores = np.bincount(owner, minlength=lab.max() + 1)
    core_area = np.bincount(lab[cores], minlength=lab.max() + 1)
    area = np.bincount(lab.ravel(), minlength=lab.max() + 1)
    single = (n_cores == 1) & (core_area <= 0.5 * area)
    single[0] = False
    return float(single[lab[mask]].mean())


def foreground_mask(gray, valid=None, polarity: str = "auto",
                    min_diameter_px: float = 3.0) -> tuple[np.ndarray, str, float]:
    """Particle mask with automatic polarity.

    The background is flattened (``estimate_background``), its level and noise are taken
    from the histogram mode and the mode's far side; pixels clearly above the background
    (Otsu, or 8 sigma) seed the particles, pixels within ``max(2 sigma, 20 % of the
    particle contrast)`` seed the background, and a watershed on the gradient magnitude
    assigns the rest, so boundaries follow the edges.

    Parameters
    ----------
    gray : (H, W) array_like
        Gray image in [0, 1].
    valid : (H, W) bool array, optional
        False marks pixels to ignore (data bar, aperture surround).
    polarity : {"auto", "bright", "dark", "outline"}
        "auto" takes the histogram mode as the background and the other Otsu class as the
        particles, and detects ring-shaped rims ("outline"), which are filled.
    min_diameter_px : float
        Smaller specks are dropped.

    Returns
    -------
    mask : (H, W) ndarray of bool
        Empty when no particle phase stands ``MIN_SNR`` noise sigmas out of the background.
    polarity : str
        The polarity used ("bright", "dark" or "outline").
    confidence : float
        Polarity confidence in [0, 1]: distance between the background mode and the Otsu
        threshold in standard deviations (capped at 1), halved when the histogram skewness
        points the other way.
    """
    g = _as_gray(gray)
    r = _foreground(g, _as_valid(valid, g.shape), polarity, min_diameter_px)
    return r["mask"], r["polarity"], r["polarity_conf"]


def _clean_mask(mask: np.ndarray, min_diameter_px: float) -> np.ndarray:
    """Fill pits and dark centres inside particles but keep real gaps in agglomerates."""
    filled = ndi.binary_fill_holes(mask)
    holes = filled & ~mask
    if not holes.any():
        return mask
    lab = measure.label(filled)
    hl = measure.label(holes)
    # A hole belongs to the particle when it is small compared with the blob around it
    # (texture pits, diffraction spots), or when the blob is convex: a convex outline with
    # a hole is one particle with a dark centre, whereas the loops of a branched
    # agglomerate enclose real background.
    hole_area = np.bincount(hl.ravel())
    blob_area = np.bincount(lab.ravel())
    blob_sol = np.ones(lab.max() + 1)
    for p in measure.regionprops(lab):
        blob_sol[p.label] = p.solidity
    owner = ndi.maximum(lab, hl, index=np.arange(1, hl.max() + 1)).astype(int)
    small = hole_area[1:] < np.maximum(0.15 * blob_area[owner], math.pi / 4 * min_diameter_px ** 2)
    convex = blob_sol[owner] >= 0.9
    fill = np.concatenate([[False], small | convex])[hl]
    return mask | fill


# ----------------------------------------------------------------------------------------
# Instances
# ----------------------------------------------------------------------------------------
def split_touching(mask, min_diameter_px: float = 3.0, *, h: float = SPLIT_LOG_H) -> np.ndarray:
    """Split touching particles: distance transform + marker watershed.

    Markers are the h-maxima of ``log(1 + DT)``: a fixed ``h`` on the logarithm is a fixed
    *relative* neck constriction, so small and large particles are split alike and bumps
    on a large particle do not over-segment it.

    Parameters
    ----------
    mask : (H, W) bool array
        Particle mask.
    min_diameter_px : float
        Markers whose inscribed diameter is below half of this are ignored.
    h : float
        Required log-depth of the neck between two particles (default ``SPLIT_LOG_H``).

    Returns
    -------
    labels : (H, W) ndarray of int32
        Instance labels, 0 = background; every connected component gets at least one label.
    """
    mask = np.asarray(mask, bool)
    labels = np.zeros(mask.shape, np.int32)
    box = _bbox(mask, 2)
    if box is None:
        return labels
    m = mask[box]
    dist = ndi.distance_transform_edt(m)
    # A slight smoothing removes the one-pixel maxima of jagged digital outlines.
    dist_s = ndi.gaussian_filter(dist, 1.0) * m
    peaks = morphology.h_maxima(np.log1p(dist_s), h).astype(bool)
    peaks &= dist_s >= 0.25 * min_diameter_px
    markers = measure.label(peaks)
    lab = segmentation.watershed(-dist_s, markers, mask=m)
    # Components without a marker (smaller than h or min_diameter) keep their own label.
    missing = m & (lab == 0)
    if missing.any():
        extra = measure.label(missing)
        lab = np.where(missing, extra + lab.max(), lab)
    labels[box] = lab
    return labels


# ----------------------------------------------------------------------------------------
# Granulometry
# ----------------------------------------------------------------------------------------
def _openings(mask: np.ndarray, radii):
    """Yield the openings of ``mask`` by Euclidean discs of increasing radius.

    The opening by a disc of radius r is the dilation by that disc of the erosion by it;
    both are thresholds of Euclidean distance transforms (the erosion is ``DT > r``, the
    dilation is ``EDT(not eroded) <= r``): exact for Euclidean discs, one EDT per radius.
    """
    dt = ndi.distance_transform_edt(mask)
    for r in radii:
        core = dt > r
        if not core.any():
            yield np.zeros_like(mask)
        else:
            yield ndi.distance_transform_edt(~core) <= r


def pattern_spectrum(mask, radii) -> np.ndarray:
    """Area left after openings by Euclidean discs of the given radii.

    Parameters
    ----------
    mask : (H, W) bool array
    radii : sequence of float
        Increasing disc radii in pixels.

    Returns
    -------
    area : ndarray of float
        Foreground area (pixels) after each opening; ``-diff(area)`` is the pattern
        spectrum (the area removed per size step).
    """
    m = np.asarray(mask, bool)
    box = _bbox(m, int(math.ceil(max(radii))) + 2)
    if box is None:
        return np.zeros(len(radii))
    m = np.pad(m[box], 1)  # a background frame so that the EDT sees an outside
    return np.array([float(o.sum()) for o in _openings(m, radii)])


def _granulometry(mask: np.ndarray, min_diameter_px: float,
                  typical_px: float | None = None) -> dict | None:
    """Pattern spectrum of a mask: bin diameters (2 r) and area removed per bin."""
    m = np.asarray(mask, bool)
    if m.sum() < math.pi / 4 * min_diameter_px ** 2:
        return None
    # Openings by large discs are costly; a coarser grid that keeps >= 6 px per typical
    # radius gives the same spectrum.
    f = max(1, int((typical_px or 0.0) / 12.0))
    if f > 1:
        h, w = (m.shape[0] // f) * f, (m.shape[1] // f) * f
        m = m[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3)) >= 0.5
    box = _bbox(m, 2)
    if box is None:
        return None
    m = np.pad(m[box], 1)
    dt_max = float(ndi.distance_transform_edt(m).max())
    r_lo = max(1.0, 0.5 * min_diameter_px / f)
    if dt_max <= r_lo:
        return None
    # Unit steps where the digital grid resolves them, ~10 % steps above.
    radii = np.arange(r_lo, min(8.0, dt_max + 1.0), 1.0)
    if dt_max + 1.0 > 8.0:
        n = max(2, int(math.ceil(math.log((dt_max + 1.0) / 8.0) / math.log(1.1))) + 1)
        radii = np.concatenate([radii, np.geomspace(8.0, dt_max + 1.0, n)])
    radii = np.unique(np.round(radii, 2))
    area = np.array([float(m.sum())] + [float(o.sum()) for o in _openings(m, radii)])
    removed = np.clip(-np.diff(area), 0, None)
    # What vanishes between the discs of radius r_(i-1) and r_i had an inscribed radius in
    # that interval; the bin centre is its size.
    lower = np.concatenate([[max(r_lo - 1.0, 0.5)], radii[:-1]])
    diam = (lower + radii) * f
    if removed.sum() <= 0:
        return None
    return {"diameters": diam, "area": removed * f * f}


def _weighted_quantile(x: np.ndarray, w: np.ndarray, q) -> np.ndarray:
    o = np.argsort(x)
    x, w = np.asarray(x, float)[o], np.asarray(w, float)[o]
    c = np.cumsum(w) - 0.5 * w
    return np.interp(np.asarray(q) * w.sum(), c, x)


def _number_weights(gran: dict) -> tuple[np.ndarray, np.ndarray]:
    """Number-weighted size distribution from a pattern spectrum.

    The area removed at diameter D is D^2-weighted, so dividing by D^2 gives particle
    numbers. Boundary roughness and the cusps between overlapping particles are removed
    at small radii as thin slivers, which this division would turn into many small
    "particles"; sizes below ``GRAN_FLOOR`` times the area-weighted median are therefore
    dropped. For a log-normal population with GSD 1.5 the floor lies 1.4 sigma below the
    number median (8 % of the particles lost, median +2 %); broader populations lose more.
    """
    d, a = gran["diameters"], gran["area"]
    floor = GRAN_FLOOR * float(_weighted_quantile(d, a, 0.5))
    keep = (d >= floor) & (a > 0)
    return d[keep], a[keep] / d[keep] ** 2


def granulometry_diameter(mask, min_diameter_px: float = 3.0, *,
                          weighting: str = "number") -> float | None:
    """Typical particle diameter from the pattern spectrum of openings by discs.

    In chains and piles of primaries a connected component is many particles, but an
    opening by a disc wider than a primary removes it: the area lost per disc radius (the
    pattern spectrum) is a size distribution that needs no segmentation.

    Parameters
    ----------
    mask : (H, W) bool array
    min_diameter_px : float
        Smallest size considered (finer structure is boundary roughness).
    weighting : {"number", "area"}
        "number": area removed at diameter D divided by D^2, sizes below ``GRAN_FLOOR``
        times the area-weighted median dropped (slivers, see ``_number_weights``); "area":
        the plain area-weighted spectrum.

    Returns
    -------
    diameter : float or None
        Weighted median diameter (pixels); None for an empty mask.
    """
    if weighting not in ("number", "area"):
        raise ValueError("weighting must be 'number' or 'area'")
    gran = _granulometry(np.asarray(mask, bool), min_diameter_px)
    if gran is None:
        return None
    d, w = _number_weights(gran) if weighting == "number" else (gran["diameters"], gran["area"])
    return float(_weighted_quantile(d, w, 0.5)) if w.sum() > 0 else None


def grey_granulometry(signal, valid=None, *, max_radius_px: int | None = None) -> dict | None:
    """Grey-level granulometry: volume removed by grey openings with growing discs.

    For a dense pile without visible background no binary mask exists, but each grain is
    a bright dome (after the polarity sign is applied): an opening by a disc wider than the
    grain flattens it. The intensity volume removed per radius is an area-weighted size
    distribution of the grains.

    Parameters
    ----------
    signal : (H, W) array_like
        Image with the particles bright (multiply by -1 for dark particles).
    valid : (H, W) bool array, optional
        Only these pixels count; invalid ones are set to the minimum.
    max_radius_px : int, optional
        Largest disc radius (default a fifth of the longest side).

    Returns
    -------
    dict or None
        ``diameters`` (2 r, working pixels) and ``volume`` removed per radius step.
    """
    x = np.asarray(signal, np.float32)
    v = _as_valid(valid, x.shape)
    if not v.any():
        return None
    x = np.where(v, x, float(x[v].min()))
    rmax = int(max_radius_px or max(2, max(x.shape) // 5))
    radii = np.arange(1, rmax + 1)
    vol = [float(x[v].sum())]
    for r in radii:
        # Large discs as a sequence of small footprints (scikit-image's decomposition):
        # the same opening up to the digital disc shape, at a fraction of the cost.
        fp = morphology.disk(int(r)) if r <= 8 else morphology.disk(int(r), decomposition="sequence")
        vol.append(float(morphology.opening(x, fp)[v].sum()))
    removed = np.clip(-np.diff(np.asarray(vol)), 0, None)
    if removed.sum() <= 0:
        return None
    # A digital disk(r) is 2r + 1 wide: a grain of width D survives disk(r - 1) and
    # vanishes under disk(r) when 2r - 1 <= D < 2r + 1, i.e. D ~ 2r.
    return {"diameters": 2.0 * radii.astype(float), "volume": removed}


# ----------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------
def _wstats(d, w=None):
    """(median, geometric mean, geometric standard deviation) of diameters."""
    d = np.asarray(d, float)
    if d.size == 0:
        return None, None, None
    w = np.ones_like(d) if w is None else np.asarray(w, float)
    if w.sum() <= 0:
        return None, None, None
    ld = np.log(d)
    mu = float(np.sum(w * ld) / w.sum())
    sd = float(np.sqrt(np.sum(w * (ld - mu) ** 2) / w.sum()))
    med = float(np.median(d)) if np.all(w == w[0]) else float(_weighted_quantile(d, w, 0.5))
    return med, math.exp(mu), max(1.0, math.exp(sd))


def _shape_class(circ: float, sol: float, elong: float, branched: bool) -> str:
    """Shape class from median descriptors (thresholds as a microscopist would judge)."""
    if branched:
        return "branched"        # chains / fractal agglomerates: low solidity
    if elong > ELONGATED:
        return "elongated"       # rods, needles, platelets seen edge-on
    if sol >= 0.9 and circ >= 0.85:
        return "round"           # spheres, droplets
    return "faceted"             # convex but with straight edges and corners


def edge_zone(valid: np.ndarray) -> np.ndarray:
    """Image frame plus the 1-px rim of the invalid region: particles touching it are cut."""
    edge = ndi.binary_dilation(~valid) if not valid.all() else np.zeros(valid.shape, bool)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    return edge


def _measure_mask(mask: np.ndarray, valid: np.ndarray, min_d: float) -> dict:
    """Instances of a mask and their size and shape descriptors (working pixels)."""
    labels = split_touching(mask, min_d)
    cut = set(np.unique(labels[edge_zone(valid)]).tolist()) - {0}
    props = measure.regionprops(labels)
    tiny = [p.label for p in props if p.equivalent_diameter_area < min_d and p.label not in cut]
    if tiny:
        labels[np.isin(labels, tiny)] = 0
    tiny = set(tiny)
    keep = [p for p in props if p.label not in cut and p.label not in tiny]
    ecd = np.array([p.equivalent_diameter_area for p in keep], float)
    # Circularity with the Crofton perimeter (less biased than pixel-edge counting on
    # small objects); capped at 1 for the digitisation error of tiny discs.
    circ = np.array([min(1.0, 4 * math.pi * p.area / max(p.perimeter_crofton, 1e-9) ** 2)
                     for p in keep], float)
    sol = np.array([p.solidity for p in keep], float)
    elong = np.array([p.axis_major_length / max(p.axis_minor_length, 1.0) for p in keep], float)
    # Agglomerate morphology from the connected components before splitting: branched
    # chains have a low solidity and hold several watershed instances each.
    fg = labels > 0
    comp = measure.label(fg)
    comp_sol, inst_per_comp = 1.0, 0.0
    if comp.max() > 0:
        cprops = measure.regionprops(comp)
        carea = np.array([p.area for p in cprops], float)
        csol = np.array([p.solidity for p in cprops], float)
        pairs = np.unique(comp[fg].astype(np.int64) * (labels.max() + 1) + labels[fg])
        ninst = np.bincount(pairs // (labels.max() + 1), minlength=comp.max() + 1)[1:]
        comp_sol = float(np.sum(carea * csol) / carea.sum())
        inst_per_comp = float(np.sum(carea * ninst) / carea.sum())
    return {"labels": labels, "count": len(props) - len(tiny), "n_cut": len(cut),
            "ecd": ecd, "circ": circ, "sol": sol, "elong": elong,
            "comp_solidity": comp_sol, "inst_per_comp": inst_per_comp}


def _measure_at_scale(g: np.ndarray, valid: np.ndarray, polarity: str, min_d: float) -> dict:
    fg = _foreground(g, valid, polarity, min_d)
    mask = _clean_mask(fg["mask"], min_d)
    r = _measure_mask(mask, valid, min_d)
    mask = r["labels"] > 0
    r["coverage"] = float(mask[valid].mean()) if valid.any() else 0.0
    typical = float(np.median(r["ecd"])) if r["ecd"].size else None
    r["gran"] = _granulometry(mask, min_d, typical)
    r["fg"] = fg
    return r


def _measure_dense(fg: dict, valid: np.ndarray, min_d: float) -> dict:
    """Dense pile without visible background: grey granulometry + dome watershed."""
    s = fg["signal"]
    # The grey openings run on a coarse grid (longest side 256): grains of a pile that
    # fills the field are large, and the cost grows with radius x pixels.
    k = max(1.0, max(s.shape) / 256.0)
    small = tuple(max(8, int(round(n / k))) for n in s.shape)
    xs = transform.resize(s, small, order=1, anti_aliasing=k > 1)
    vs = transform.resize(valid.astype(np.float32), small, order=0) > 0.5
    gg = grey_granulometry(ndi.gaussian_filter(xs, 1.0), vs)
    if gg is None:
        return {}
    diam = gg["diameters"] * k
    med, gm, gsd = _wstats(diam, gg["volume"])
    # Instances for the count and the overlay: one per dome of the signal smoothed at the
    # grain scale, grown by a watershed down the slopes.
    sm = ndi.gaussian_filter(s, max(1.0, med / 8.0))
    peaks = feature.peak_local_max(sm, min_distance=max(2, int(med / 3.0)),
                                   labels=valid.astype(np.int32), exclude_border=False)
    markers = np.zeros(s.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = segmentation.watershed(-sm, markers, mask=valid).astype(np.int32)
    cut = set(np.unique(labels[edge_zone(valid)]).tolist()) - {0}
    props = [p for p in measure.regionprops(labels) if p.label not in cut]
    return {"labels": labels, "count": int(labels.max()), "n_cut": len(cut),
            "n_measured": len(props), "diam": diam, "weights": gg["volume"],
            "median": med, "gmean": gm, "gsd": gsd,
            "circ": np.array([min(1.0, 4 * math.pi * p.area / max(p.perimeter_crofton, 1e-9) ** 2)
                              for p in props], float),
            "sol": np.array([p.solidity for p in props], float),
            "elong": np.array([p.axis_major_length / max(p.axis_minor_length, 1.0)
                               for p in props], float)}


def _resize_gray(g, valid, s):
    if s == 1.0:
        return g, valid
    shape = tuple(max(8, int(round(n * s))) for n in g.shape)
    gw = transform.resize(g, shape, order=1, anti_aliasing=s < 1, preserve_range=True)
    vw = transform.resize(valid.astype(np.float32), shape, order=1, anti_aliasing=False) > 0.99
    return gw.astype(np.float32), vw


def resize_labels(lab: np.ndarray, shape) -> np.ndarray:
    """Nearest-neighbour resize of a label image to ``shape`` (no new or blended labels)."""
    ri = np.minimum(((np.arange(shape[0]) + 0.5) * lab.shape[0] / shape[0]).astype(int),
                    lab.shape[0] - 1)
    ci = np.minimum(((np.arange(shape[1]) + 0.5) * lab.shape[1] / shape[1]).astype(int),
                    lab.shape[1] - 1)
    return lab[np.ix_(ri, ci)].astype(np.int32)


def _typical_diameter(r: dict) -> float | None:
    """Working-pixel diameter that sets the final working scale (watershed median, else
    the granulometry median)."""
    if r["ecd"].size:
        return float(np.median(r["ecd"]))
    if r["gran"] is not None:
        d, w = _number_weights(r["gran"])
        if w.sum() > 0:
            return float(_weighted_quantile(d, w, 0.5))
    return None


def measure_particles(gray, valid=None, *, polarity: str = "auto",
                      min_diameter_px: float = 3.0, method: str = "auto") -> ParticleMeasurement:
    """Measure count, size distribution, coverage, polarity and shape of the particles.

    Parameters
    ----------
    gray : (H, W) array_like
        Gray image, float in [0, 1] (RGB is converted to luminance).
    valid : (H, W) bool array, optional
        False excludes pixels (data bar, aperture surround) from everything; particles cut
        by the invalid region are counted but not measured, like those cut by the frame.
    polarity : {"auto", "bright", "dark", "outline"}
        Particle contrast; "auto" decides from the histogram (see ``foreground_mask``).
    min_diameter_px : float
        Smallest particle diameter (input pixels) that is measured.
    method : {"auto", "watershed", "granulometry"}
        How the size is estimated; "auto" chooses (see Notes). Forcing the method another
        image was measured with makes two measurements comparable (a fit measures its renders
        with the reference's method).

    Returns
    -------
    ParticleMeasurement
        Sizes in input pixels.

    Notes
    -----
    A first pass on a coarse copy (longest side ``FIRST_PASS_SIDE``) finds the particle
    scale; the final pass runs where the typical particle is ``TARGET_DIAMETER_PX`` wide
    (never above the input resolution, at most ``MAX_WORK_PIXELS``).

    ``method`` is "granulometry" when the connected components are branched agglomerates
    (area-weighted solidity < ``BRANCHED_SOLIDITY`` with at least ``BRANCHED_INSTANCES``
    watershed instances each): one component is then many primaries and the
    pattern-spectrum size (``granulometry_diameter``, number-weighted) replaces the
    per-instance sizes. When no background phase stands out of the noise but the image is
    structured, the field is one dense pile: sizes come from ``grey_granulometry``
    (area-weighted), coverage is 1 and confidences are capped at 0.5.

    Confidences (all in [0, 1]; ``n`` measured particles, ``sep`` Otsu separability, i.e.
    between-class / total variance of the flattened image):

    * ``count``: ``(1 - exp(-n / 10)) * sqrt(1 - cut / count) * sep``.
    * ``diameter``: ``agreement * (1 - exp(-n / 10)) * sqrt(sep)``, with
      ``agreement = max(0, 1 - |ln(d_watershed / d_granulometry)| / ln 2)``.
    * ``coverage``: ``sep``.
    * ``polarity``: from ``foreground_mask``.
    * ``shape``: ``(1 - exp(-n / 10)) * sqrt(sep)``.
    """
    g = _as_gray(gray)
    v = _as_valid(valid, g.shape)
    H, W = g.shape
    s = min(1.0, FIRST_PASS_SIDE / max(H, W))
    min_d = lambda sc: max(2.0, min_diameter_px * sc)  # noqa: E731
    gw, vw = _resize_gray(g, v, s)
    r = _measure_at_scale(gw, vw, polarity, min_d(s))
    fg = r["fg"]
    dense = (not r["ecd"].size and r["gran"] is None and fg["structured"]
             and fg["signal"] is not None and fg["contrast_snr"] < MIN_SNR)
    if not dense:
        typ = _typical_diameter(r)
        if typ is not None:
            s2 = s * TARGET_DIAMETER_PX / typ
            s2 = min(1.0, s2, math.sqrt(MAX_WORK_PIXELS / (H * W)))
            s2 = max(s2, 64.0 / max(H, W))
            if abs(math.log(s2 / s)) > math.log(1.25):
                s = s2
                gw, vw = _resize_gray(g, v, s)
                r = _measure_at_scale(gw, vw, polarity, min_d(s))
                fg = r["fg"]
    inv = 1.0 / s
    sep = float(fg["separability"])
    diag = {"scale": s, "separability": sep, "contrast_snr": float(fg["contrast_snr"]),
            "dense_pile": bool(dense)}

    if dense:
        dr = _measure_dense(fg, vw, min_d(s))
    if dense and dr:
        n = int(dr["n_measured"])
        count = int(dr["count"])
        med, gm, gsd = dr["median"] * inv, dr["gmean"] * inv, dr["gsd"]
        k = max(1, n)
        diam = _weighted_quantile(dr["diam"] * inv, dr["weights"], (np.arange(k) + 0.5) / k)
        circ, sol, el = dr["circ"], dr["sol"], dr["elong"]
        nfac = 1.0 - math.exp(-n / 10.0)
        conf = {"count": 0.3 * nfac, "diameter": 0.5 * nfac, "coverage": 0.5,
                "polarity": 0.5 * float(fg["polarity_conf"]), "shape": 0.3 * nfac}
        labels, coverage, method, branched = dr["labels"], 1.0, "granulometry", False
        diag.update(n_measured=n, n_border_cut=int(dr["n_cut"]), watershed_median_px=None,
                    granulometry_median_px=med)
        polarity_out = fg["polarity"]
    else:
        ecd = r["ecd"] * inv
        n = int(ecd.size)
        count = int(r["count"])
        ws_med = float(np.median(ecd)) if n else None
        gr_med, gd, gwt = None, None, None
        if r["gran"] is not None:
            gd, gwt = _number_weights(r["gran"])
            gd = gd * inv
            if gwt.sum() > 0:
                gr_med = float(_weighted_quantile(gd, gwt, 0.5))
        # Low solidity means branching only in a sparse field; where particles cover most
        # of it, components merge by crowding (a packed powder), not by branching.
        # Rods crossing each other make low-solidity components too, but their instances
        # are elongated, whereas chains split into roundish primaries.
        elongated = bool(r["elong"].size) and float(np.median(r["elong"])) > ELONGATED
        branched = (r["comp_solidity"] < BRANCHED_SOLIDITY and not elongated
                    and r["inst_per_comp"] >= BRANCHED_INSTANCES
                    and r["coverage"] < BRANCHED_MAX_COVERAGE)
        if method not in ("auto", "watershed", "granulometry"):
            raise ValueError(f"method must be auto, watershed or granulometry, not {method!r}")
        if method == "auto":
            method = "granulometry" if gr_med is not None and (branched or n == 0) else "watershed"
        elif method == "granulometry" and gr_med is None:
            method = "watershed"
        elif method == "watershed" and n == 0 and gr_med is not None:
            method = "granulometry"
        if method == "granulometry":
            med, gm, gsd = _wstats(gd, gwt)
            k = max(1, n)
            diam = _weighted_quantile(gd, gwt, (np.arange(k) + 0.5) / k)
        else:
            med, gm, gsd = _wstats(ecd)
            diam = ecd
        circ, sol, el = r["circ"], r["sol"], r["elong"]
        nfac = 1.0 - math.exp(-n / 10.0)
        agreement = (max(0.0, 1.0 - abs(math.log(ws_med / gr_med)) / math.log(2.0))
                     if ws_med and gr_med else 0.0)
        conf = {"count": nfac * math.sqrt(max(0.0, 1.0 - r["n_cut"] / max(count, 1))) * sep,
                "diameter": agreement * nfac * math.sqrt(sep),
                "coverage": sep if count else 0.0,
                "polarity": float(fg["polarity_conf"]) if count else 0.0,
                "shape": nfac * math.sqrt(sep)}
        labels, coverage = r["labels"], float(r["coverage"])
        diag.update(n_measured=n, n_border_cut=int(r["n_cut"]), watershed_median_px=ws_med,
                    granulometry_median_px=gr_med,
                    component_solidity=float(r["comp_solidity"]),
                    instances_per_component=float(r["inst_per_comp"]),
                    rim_width_px=float(fg.get("rim_width", 0.0)) * inv,
                    edge_crest_px=float(fg.get("crest_shift", 0)) * inv)
        polarity_out = fg["polarity"]
        if not count:
            med = gm = gsd = None
            diam = np.zeros(0)
    if circ.size:
        c_m, s_m, e_m = float(np.median(circ)), float(np.median(sol)), float(np.median(el))
        cls = _shape_class(c_m, s_m, e_m, branched)
    else:
        c_m = s_m = e_m = None
        cls = "branched" if branched else None
    diag["branched"] = bool(branched)
    conf = {key: float(min(1.0, max(0.0, c))) for key, c in conf.items()}
    if s != 1.0:
        labels = resize_labels(labels, (H, W))
    return ParticleMeasurement(
        count=count, diameters_px=np.asarray(diam, float), median_px=med, gmean_px=gm,
        gsd=gsd, coverage=coverage, polarity=polarity_out,
        shape={"circularity": c_m, "solidity": s_m, "elongation": e_m, "class": cls},
        method=method, confidence=conf, labels=labels.astype(np.int32), diagnostics=diag)
