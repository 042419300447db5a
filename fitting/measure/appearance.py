"""What the particles look like: the mean gray level in rings around each particle's outline.

In a sparse field the texture descriptor describes mostly background, so it cannot tell a bright
core in a dark ring from a dark disc in a bright halo; the ring profile can. Distances are
measured from the particle outline (inside negative, outside positive) in units of the typical
particle radius, so the profile compares particles of any size, round or not.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["PROFILE_EDGES", "BACKGROUND_FROM", "profile_zones", "particle_profile"]

#: Ring edges in units of the median particle radius, measured from the outline (negative
#: inside): core, inner body, inside rim, outside rim, halo, near surroundings.
PROFILE_EDGES = (-np.inf, -0.6, -0.3, 0.0, 0.3, 0.6, 1.0)
#: Pixels at least this many radii outside every particle are background, the profile's last zone.
BACKGROUND_FROM = 1.5
#: A zone with fewer pixels than this is left out of a profile (its mean would be noise).
MIN_ZONE_PIXELS = 12


def _median_radius(labels: np.ndarray) -> float | None:
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    if areas.size == 0:
        return None
    return float(np.sqrt(np.median(areas) / np.pi))


def profile_zones(labels, valid=None, *, edges=PROFILE_EDGES, background_from: float = BACKGROUND_FROM,
                  radius: float | None = None) -> np.ndarray | None:
    """Zone masks of the particle profile.

    Parameters
    ----------
    labels : (H, W) int array
        Particle instances (0 = background), measured or the truth of a render.
    valid : (H, W) bool array, optional
        Pixels that count (aperture and data bar excluded).
    edges : sequence of float
        Ring edges in units of ``radius``, signed distance from the outline (negative inside).
    background_from : float
        Pixels at least this many radii outside every particle form the last zone.
    radius : float, optional
        The unit of distance in pixels; default the median equivalent radius of the labels.

    Returns
    -------
    (len(edges), H, W) bool array or None
        One mask per ring (``len(edges) - 1``) and the background last; None without particles.
    """
    lab = np.asarray(labels)
    fg = lab > 0
    if not fg.any():
        return None
    r = _median_radius(lab) if radius is None else float(radius)
    if not r or r <= 0:
        return None
    # Distance between pixel centres and the outline, half a pixel on either side of it.
    inside = ndi.distance_transform_edt(fg) - 0.5
    outside = ndi.distance_transform_edt(~fg) - 0.5
    t = np.where(fg, -inside, outside) / r
    ok = np.ones_like(fg) if valid is None else np.asarray(valid, bool)
    zones = [ok & (t >= lo) & (t < hi) for lo, hi in zip(edges[:-1], edges[1:])]
    zones.append(ok & (t >= background_from))
    return np.stack(zones)


def particle_profile(gray, zones: np.ndarray | None, *, min_pixels: int = MIN_ZONE_PIXELS) -> np.ndarray | None:
    """Mean gray level in each zone of :func:`profile_zones`.

    Parameters
    ----------
    gray : (H, W) array_like
        Gray image in [0, 1], the same shape as the zones.
    zones : (Z, H, W) bool array or None
        From :func:`profile_zones`.
    min_pixels : int
        Zones with fewer pixels give NaN.

    Returns
    -------
    (Z,) float array or None
        NaN where a zone is (nearly) empty; None without zones.
    """
    if zones is None:
        return None
    g = np.asarray(gray, dtype=np.float64)
    n = zones.reshape(len(zones), -1).sum(axis=1)
    s = zones.reshape(len(zones), -1).astype(np.float64) @ g.ravel()
    return np.where(n >= min_pixels, s / np.maximum(n, 1), np.nan)

