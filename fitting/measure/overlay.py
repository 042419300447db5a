"""Overlay of measured particle outlines on the image, for checking a measurement by eye."""
from __future__ import annotations

import numpy as np
from skimage import segmentation

__all__ = ["overlay_outlines"]


def overlay_outlines(gray, labels, *, color=(255, 40, 40), cut_color=(40, 160, 255),
                     valid=None, thickness: int = 1) -> np.ndarray:
    """Draw instance outlines on a gray image.

    Parameters
    ----------
    gray : (H, W) array_like
        Gray image in [0, 1].
    labels : (H, W) int array
        Instance labels (0 = background), e.g. ``ParticleMeasurement.labels``.
    color : tuple of int
        RGB of the outlines of measured particles.
    cut_color : tuple of int
        RGB of the outlines of particles cut by the frame or the invalid region (counted
        but not measured); only distinguished when ``valid`` is given or a label touches
        the frame.
    valid : (H, W) bool array, optional
        Invalid pixels are dimmed, so the excluded region is visible.
    thickness : int
        Outline thickness in pixels (boundaries are dilated ``thickness - 1`` times).

    Returns
    -------
    rgb : (H, W, 3) ndarray of uint8
    """
    g = np.clip(np.asarray(gray, np.float32), 0, 1)
    lab = np.asarray(labels)
    if lab.shape != g.shape:
        raise ValueError(f"labels shape {lab.shape} != image shape {g.shape}")
    rgb = np.repeat((g * 255).astype(np.uint8)[..., None], 3, axis=2)
    if valid is not None:
        v = np.asarray(valid, bool)
        rgb[~v] = (rgb[~v] * 0.35).astype(np.uint8)
    from fitting.measure.particles import edge_zone
    edge = edge_zone(np.ones(g.shape, bool) if valid is None else np.asarray(valid, bool))
    cut = np.isin(lab, np.unique(lab[edge & (lab > 0)]))
    bound = segmentation.find_boundaries(lab, mode="inner") & (lab > 0)
    if thickness > 1:
        from scipy import ndimage as ndi
        grown = ndi.binary_dilation(bound, iterations=thickness - 1) & (lab > 0)
        bound = grown
    rgb[bound & ~cut] = color
    rgb[bound & cut] = cut_color
    return rgb
