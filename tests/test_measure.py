"""Tests of fitting.measure: classical particle measurement on synthetic ground truth.

Synthetic images are discs with known (log-normal) diameters, some touching, drawn with
skimage.draw, blurred, with noise and a background gradient, in the three polarities.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import draw, morphology

from fitting.measure import (
    edge_crest_shift,
    foreground_mask,
    granulometry_diameter,
    measure_particles,
    pattern_spectrum,
    split_touching,
    valid_region,
)
from fitting.measure.overlay import overlay_outlines



# ----------------------------------------------------------------------------------------
# Synthetic scenes
# ----------------------------------------------------------------------------------------
def _place_discs(rng, shape, n, gmean, gsd, gap=1.0, touching_pairs=3):
    """Random non-overlapping discs (log-normal diameters), plus a few touching pairs."""
    H, W = shape
    discs = []
    tries = 0
    while len(discs) < n and tries < 20000:
        tries += 1
        d = float(np.exp(rng.normal(math.log(gmean), math.log(gsd))))
        y, x = rng.uniform(0, H), rng.uniform(0, W)
        if all(math.hypot(y - yy, x - xx) >= 0.5 * (d + dd) + gap for yy, xx, dd in discs):
            discs.append((y, x, d))
    # Touching pairs: a new disc tangent to an existing interior one.
    k = 0
    for y, x, d in list(discs):
        if k >= touching_pairs:
            break
        d2 = float(np.exp(rng.normal(math.log(gmean), math.log(gsd))))
        a = rng.uniform(0, 2 * math.pi)
        y2, x2 = y + 0.5 * (d + d2) * math.sin(a), x + 0.5 * (d + d2) * math.cos(a)
        if not (d2 < y2 < H - d2 and d2 < x2 < W - d2):
            continue
        others = [o for o in discs if o != (y, x, d)]
        if all(math.hypot(y2 - yy, x2 - xx) >= 0.5 * (d2 + dd) + gap for yy, xx, dd in others):
            discs.append((y2, x2, d2))
            k += 1
    return discs


def _render(shape, discs, kind, rng, *, noise=0.02, blur=1.0, gradient=0.15, rim=2.0):
    """Gray image + true particle mask for discs drawn as bright, dark or outline (ring)."""
    H, W = shape
    yy, xx = np.mgrid[0:H, 0:W]
    bg = 0.5 + gradient * (xx / W - 0.5) + 0.5 * gradient * (yy / H - 0.5)
    img = bg.copy()
    truth = np.zeros(shape, bool)
    for y, x, d in discs:
        r = 0.5 * d
        rr, cc = draw.disk((y, x), r, shape=shape)
        truth[rr, cc] = True
        if kind == "bright":
            img[rr, cc] = bg[rr, cc] + 0.3
        elif kind == "dark":
            img[rr, cc] = bg[rr, cc] - 0.3
        elif kind == "outline":
            # A thin dark rim centred on the droplet edge, interior like the background.
            dist = np.hypot(yy - y, xx - x)
            ring = np.abs(dist - r) <= 0.5 * rim
            img[ring] = bg[ring] - 0.3
    img = ndi.gaussian_filter(img, blur) + rng.normal(0, noise, shape)
    return np.clip(img, 0, 1).astype(np.float32), truth


def _n_inside(discs, shape):
    H, W = shape
    return sum(1 for y, x, d in discs
               if y - d / 2 > 0 and x - d / 2 > 0 and y + d / 2 < H and x + d / 2 < W)


def _true_stats(discs, shape, margin=1.0):
    """Geometric mean diameter of the discs not cut by the frame."""
    H, W = shape
    inside = [d for y, x, d in discs
              if y - d / 2 > margin and x - d / 2 > margin
              and y + d / 2 < H - margin and x + d / 2 < W - margin]
    return float(np.exp(np.mean(np.log(inside))))


# ----------------------------------------------------------------------------------------
# Sizes, coverage, polarity
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bright", "dark", "outline"])
def test_discs_size_coverage_polarity(kind):
    rng = np.random.default_rng({"bright": 1, "dark": 2, "outline": 3}[kind])
    shape = (320, 320)
    discs = _place_discs(rng, shape, 45, gmean=22.0, gsd=1.25)
    img, truth = _render(shape, discs, kind, rng)
    m = measure_particles(img)
    assert m.polarity == kind
    true_gm = _true_stats(discs, shape)
    assert m.method == "watershed"
    assert m.gmean_px == pytest.approx(true_gm, rel=0.15)
    assert m.coverage == pytest.approx(truth.mean(), abs=0.05)
    # Rims cut by the frame enclose nothing and are dropped, so outline droplets are
    # counted only when whole.
    n_true = len(discs) if kind != "outline" else _n_inside(discs, shape)
    assert m.count == pytest.approx(n_true, abs=max(3, 0.1 * n_true))
    assert m.gsd >= 1.0
    assert m.shape["class"] == "round"
    assert m.labels.shape == img.shape and m.labels.dtype == np.int32
    assert 0.5 < m.confidence["polarity"] <= 1.0
    # Flat discs and thin droplet rims have no bright edge crest to move in to.
    assert m.diagnostics["edge_crest_px"] == 0


def _edge_brightened(shape, discs, rng, *, supersample=4, noise=0.02, blur=0.8):
    """SEM-like bright discs: secondary-electron yield ~ 1/cos of the surface tilt, so each
    sphere is brightest on its silhouette; supersampled, averaged, blurred, clipped."""
    H, W = shape
    k = supersample
    yy, xx = (np.mgrid[0:H * k, 0:W * k] + 0.5) / k
    img = np.full((H * k, W * k), 0.1)
    truth = np.zeros(shape, bool)
    for y, x, d in discs:
        r = 0.5 * d
        rho2 = ((yy - y) ** 2 + (xx - x) ** 2) / r ** 2
        inside = rho2 < 1.0
        cos = np.sqrt(np.clip(1.0 - rho2[inside], 1e-4, 1.0))
        img[inside] = 0.35 * (1.0 + 0.6 * (np.minimum(1.0 / cos, 10.0) ** 1.2 - 1.0))
        rr, cc = draw.disk((y, x), r, shape=shape)
        truth[rr, cc] = True
    img = img.reshape(H, k, W, k).mean(axis=(1, 3))
    img = ndi.gaussian_filter(img, blur) + rng.normal(0, noise, shape)
    return np.clip(img, 0, 1).astype(np.float32), truth


def test_edge_brightened_discs_end_on_their_bright_crest():
    """The steepest descent outside an SEM edge crest lies outside the particle: the mask
    moves in to the crest, so size and coverage match the silhouettes."""
    rng = np.random.default_rng(7)
    shape = (320, 320)
    discs = _place_discs(rng, shape, 40, gmean=24.0, gsd=1.2, gap=2.0, touching_pairs=0)
    img, truth = _edge_brightened(shape, discs, rng)
    m = measure_particles(img)
    assert m.polarity == "bright"
    assert m.diagnostics["edge_crest_px"] >= 1
    assert m.gmean_px == pytest.approx(_true_stats(discs, shape), rel=0.06)
    assert m.coverage == pytest.approx(truth.mean(), abs=0.03)


def test_blobs_brightest_at_their_centre_have_no_edge_crest():
    """Dark-field blobs (brightest in the middle) and flat discs keep their outlines; the
    edge-brightened discs' mask, widened by two pixels, moves in by at least one."""
    rng = np.random.default_rng(8)
    shape = (320, 320)
    discs = _place_discs(rng, shape, 40, gmean=24.0, gsd=1.2, gap=6.0, touching_pairs=0)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    blobs = np.full(shape, 0.1)
    for y, x, d in discs:
        blobs += 0.6 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * (0.3 * d) ** 2))
    _, truth = _render(shape, discs, "bright", rng)
    wide = ndi.binary_dilation(truth, iterations=2)
    valid = np.ones(shape, bool)
    assert edge_crest_shift(blobs, wide, valid, 0.1) == 0
    flat = np.where(truth, 0.6, 0.1)
    assert edge_crest_shift(ndi.gaussian_filter(flat, 1.0), wide, valid, 0.1) == 0
    rim, _ = _edge_brightened(shape, discs, rng, noise=0.0)
    assert edge_crest_shift(rim, wide, valid, 0.1) >= 1


@pytest.mark.parametrize("cores", [1, 2])
def test_dark_discs_around_a_bright_core_are_bright_field_colloids(cores):
    """A dark disc whose centre is brighter than the background (a refracting sphere in bright
    field whose dark ring outweighs its core) is measured as "outline", the whole disc being the
    particle; dark particles around several bright holes (a network around bright islands)
    stay "dark"."""
    rng = np.random.default_rng(11)
    shape = (320, 320)
    discs = _place_discs(rng, shape, 30, gmean=20.0, gsd=1.15, touching_pairs=0)
    img, truth = _render(shape, discs, "dark", rng)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    for y, x, d in discs:
        offsets = [(0.0, 0.0)] if cores == 1 else [(0.0, -0.22 * d), (0.0, 0.22 * d)]
        for dy, dx in offsets:
            core = np.hypot(yy - y - dy, xx - x - dx) <= (0.2 if cores == 1 else 0.12) * d
            img[core] = 0.9
    m = measure_particles(img)
    if cores == 1:
        assert m.polarity == "outline"
        assert m.gmean_px == pytest.approx(_true_stats(discs, shape), rel=0.15)
        assert m.coverage == pytest.approx(truth.mean(), abs=0.05)
    else:
        assert m.polarity == "dark"


def test_sizes_reported_in_input_pixels_for_large_images():
    # A large image with large particles is measured downsampled; sizes stay in input px.
    rng = np.random.default_rng(7)
    shape = (1400, 1400)
    discs = _place_discs(rng, shape, 40, gmean=110.0, gsd=1.2, gap=4.0, touching_pairs=0)
    img, truth = _render(shape, discs, "dark", rng, blur=2.0)
    m = measure_particles(img)
    assert m.diagnostics["scale"] < 1.0
    assert m.gmean_px == pytest.approx(_true_stats(discs, shape), rel=0.15)
    assert m.labels.shape == shape
    assert m.coverage == pytest.approx(truth.mean(), abs=0.05)


def test_watershed_separates_two_touching_discs():
    mask = np.zeros((80, 120), bool)
    for cx in (40, 70):  # d = 30, centres 30 apart: tangent discs
        rr, cc = draw.disk((40, cx), 15, shape=mask.shape)
        mask[rr, cc] = True
    labels = split_touching(mask, 3.0)
    assert labels.max() == 2
    areas = np.bincount(labels.ravel())[1:]
    assert np.allclose(2 * np.sqrt(areas / np.pi), 30, rtol=0.1)
    # ... and does not split a single disc or an ellipse.
    one = np.zeros((80, 120), bool)
    rr, cc = draw.ellipse(40, 60, 15, 35, shape=one.shape)
    one[rr, cc] = True
    assert split_touching(one, 3.0).max() == 1


def test_touching_discs_in_an_image():
    rng = np.random.default_rng(11)
    img, _ = _render((100, 140), [(50, 50, 30), (50, 80, 30)], "bright", rng)
    m = measure_particles(img)
    assert m.count == 2
    assert m.median_px == pytest.approx(30, rel=0.12)


def _chains(rng, shape, d, n_chains=6, beads=14):
    """Branched random-walk chains of overlapping discs (carbon-black-like agglomerates)."""
    H, W = shape
    discs = []
    for _ in range(n_chains):
        y, x = rng.uniform(0.2 * H, 0.8 * H), rng.uniform(0.2 * W, 0.8 * W)
        a = rng.uniform(0, 2 * math.pi)
        pts = [(y, x)]
        for _ in range(beads):
            py, px = pts[int(rng.integers(len(pts)))] if rng.random() < 0.3 else pts[-1]
            a += rng.normal(0, 0.7)
            ny, nx = py + 0.85 * d * math.sin(a), px + 0.85 * d * math.cos(a)
            if d < ny < H - d and d < nx < W - d:
                pts.append((ny, nx))
        discs += [(py, px, d * float(np.exp(rng.normal(0, 0.08)))) for py, px in pts]
    return discs


def test_branched_chains_use_granulometry():
    rng = np.random.default_rng(5)
    shape = (400, 400)
    discs = _chains(rng, shape, d=18.0)
    img, _ = _render(shape, discs, "dark", rng)
    m = measure_particles(img)
    assert m.polarity == "dark"
    assert m.diagnostics["branched"]
    assert m.method == "granulometry"
    assert m.shape["class"] == "branched"
    assert m.median_px == pytest.approx(18.0, rel=0.2)
    assert len(m.diameters_px) == m.diagnostics["n_measured"]


def test_granulometry_on_discs_and_pattern_spectrum():
    mask = np.zeros((200, 200), bool)
    for y, x in [(40, 40), (40, 120), (120, 40), (120, 120), (170, 170)]:
        rr, cc = draw.disk((y, x), 12, shape=mask.shape)
        mask[rr, cc] = True
    assert granulometry_diameter(mask) == pytest.approx(24.0, rel=0.1)
    assert granulometry_diameter(mask, weighting="area") == pytest.approx(24.0, rel=0.1)
    # The EDT openings agree with scikit-image's opening by a digital disc.
    rough = mask.copy()
    rough[38:42, 52:60] = True  # a thin spur that an opening removes
    for r in (2, 5, 8):
        ref = morphology.opening(rough, morphology.disk(r)).sum()
        assert pattern_spectrum(rough, [r])[0] == pytest.approx(ref, rel=0.05)
    assert pattern_spectrum(mask, [13.0])[0] == 0.0


# ----------------------------------------------------------------------------------------
# Output contract, empty images, valid region
# ----------------------------------------------------------------------------------------
def test_to_dict_json_and_nm_consistency():
    rng = np.random.default_rng(3)
    discs = _place_discs(rng, (200, 200), 15, gmean=20.0, gsd=1.2)
    img, _ = _render((200, 200), discs, "bright", rng)
    m = measure_particles(img)
    d = m.to_dict(pixel_size_nm=2.5)
    text = json.dumps(d)  # plain Python types only
    back = json.loads(text)
    for key in ("count", "diameter_px", "coverage", "shape", "polarity", "method",
                "confidence", "diameter_nm"):
        assert key in back
    assert back["diameter_nm"]["median"] == pytest.approx(2.5 * m.median_px)
    assert back["diameter_nm"]["gmean"] == pytest.approx(2.5 * back["diameter_px"]["gmean"])
    assert back["diameter_nm"]["gsd"] == back["diameter_px"]["gsd"]
    assert set(back["confidence"]) == {"count", "diameter", "coverage", "polarity", "shape"}
    assert all(0.0 <= v <= 1.0 for v in back["confidence"].values())
    assert "diameter_nm" not in m.to_dict()
    assert m.median_px == pytest.approx(float(np.median(m.diameters_px)))


@pytest.mark.parametrize("img", [np.full((128, 128), 0.5, np.float32),
                                 np.zeros((64, 64), np.float32),
                                 "noise"])
def test_empty_flat_or_noise_image(img):
    if isinstance(img, str):
        img = np.clip(0.5 + np.random.default_rng(0).normal(0, 0.03, (128, 128)), 0, 1)
    m = measure_particles(img)
    assert m.count == 0
    assert m.median_px is None and m.gmean_px is None and m.gsd is None
    assert m.diameters_px.size == 0
    assert m.coverage == 0.0
    assert all(v <= 0.1 for v in m.confidence.values())
    json.dumps(m.to_dict(pixel_size_nm=1.0))
    mask, pol, conf = foreground_mask(img)
    assert not mask.any()


def test_gradient_without_particles():
    yy, xx = np.mgrid[0:300, 0:300]
    img = 0.3 + 0.4 * xx / 300 + 0.1 * np.sin(yy / 60)
    img = img + np.random.default_rng(0).normal(0, 0.02, img.shape)
    m = measure_particles(img.astype(np.float32))
    assert m.count == 0 and m.median_px is None


def _voronoi_pile(rng, size=400, n=100):
    """A dense pile: Voronoi grains with domed shading, thin dark gaps, no background."""
    from scipy.spatial import cKDTree
    pts = rng.uniform(0, size, (n, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    dist, idx = cKDTree(pts).query(np.c_[yy.ravel(), xx.ravel()], k=2)
    lab = idx[:, 0].reshape(size, size)
    gap = (dist[:, 1] - dist[:, 0]).reshape(size, size) < 2.0
    area = np.bincount(lab.ravel(), minlength=n)
    r = np.hypot(yy - pts[lab, 0], xx - pts[lab, 1]) / np.sqrt(area / np.pi)[lab]
    img = rng.uniform(0.45, 0.75, n)[lab] * (1 - 0.35 * r ** 2)
    img[gap] = 0.15
    img = ndi.gaussian_filter(img, 1.0) + rng.normal(0, 0.02, img.shape)
    ecd = 2 * np.sqrt(area / np.pi)
    return np.clip(img, 0, 1).astype(np.float32), float(np.median(np.repeat(ecd, area)))


def test_dense_pile_grey_granulometry():
    # No background phase: sized by the grey-level granulometry (area-weighted median).
    img, area_median = _voronoi_pile(np.random.default_rng(1))
    m = measure_particles(img, polarity="bright")
    assert m.diagnostics["dense_pile"]
    assert m.method == "granulometry" and m.coverage == 1.0
    assert m.median_px == pytest.approx(area_median, rel=0.2)
    assert m.count > 10 and m.labels.max() == m.count
    assert max(m.confidence.values()) <= 0.5


def test_invalid_region_is_excluded():
    # Particles under an invalid bar are ignored; those cut by it are counted, not measured.
    rng = np.random.default_rng(9)
    discs = [(40, 40, 24), (40, 110, 24), (100, 70, 24), (150, 40, 24), (150, 110, 24)]
    img, _ = _render((170, 160), discs, "bright", rng)
    valid = np.ones(img.shape, bool)
    valid[150:] = False  # cuts the two lowest discs in half
    img_bar = img.copy()
    img_bar[150:] = 1.0  # a white data bar
    m = measure_particles(img_bar, valid)
    assert m.diagnostics["n_measured"] == 3
    assert m.count == 5
    assert not m.labels[150:].any()
    assert m.median_px == pytest.approx(24, rel=0.12)


def test_valid_region_bar_and_aperture():
    rng = np.random.default_rng(4)
    img = np.clip(0.5 + rng.normal(0, 0.05, (300, 260)), 0, 1).astype(np.float32)
    img[270:] = 1.0
    img[280:290, 20:120:3] = 0.0  # "text" in the bar
    v = valid_region(img)
    assert not v[272:].any() and v[:265].all()
    yy, xx = np.mgrid[0:300, 0:300]
    ap = np.clip(0.4 + rng.normal(0, 0.05, (300, 300)), 0, 1).astype(np.float32)
    inside = np.hypot(yy - 150, xx - 150) < 140
    ap[~inside] = 0.01
    v = valid_region(ap)
    assert not v[~inside].any()
    assert v[inside].mean() > 0.9


def test_overlay_outlines():
    rng = np.random.default_rng(2)
    img, _ = _render((100, 140), [(50, 50, 30), (50, 80, 30)], "bright", rng)
    m = measure_particles(img)
    rgb = overlay_outlines(img, m.labels)
    assert rgb.shape == (100, 140, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == 255).sum() > 50


# ----------------------------------------------------------------------------------------
# A real image
# ----------------------------------------------------------------------------------------
def test_real_brightfield_colloids(reference_dir):
    path = reference_dir / "trackpy-examples__bf_0000.png"
    if not path.is_file():
        pytest.skip(f"real reference image not found at {path} (../shared/reference-images "
                    "beside the repository, or MATFIT_REFERENCE_IMAGES)")
    from PIL import Image
    gray = np.asarray(Image.open(path).convert("L"), np.float32) / 255.0
    m = measure_particles(gray)
    assert abs(m.count - 5) <= 1
    # The colloids are 2.12 um at 0.1519 um/px = 13.95 px.
    assert m.median_px == pytest.approx(13.95, rel=0.2)
