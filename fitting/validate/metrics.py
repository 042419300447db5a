"""How well detected instances match true ones, and how two size distributions compare."""
from __future__ import annotations

import math

import numpy as np


def match_instances(truth: np.ndarray, detected: np.ndarray, iou_threshold: float = 0.5) -> dict:
    """Precision and recall of ``detected`` instances against ``truth`` at an IoU threshold.

    Above IoU 0.5 an instance can overlap at most one instance of the other image that much,
    so matches are unique without an assignment step (the COCO convention at AP50).

    Parameters
    ----------
    truth, detected : (H, W) int arrays
        Instance labels, 0 = background.
    iou_threshold : float
        At least 0.5.

    Returns
    -------
    dict
        ``true_positives``, ``false_positives``, ``false_negatives``, ``precision``, ``recall``,
        ``f1``, ``mean_iou`` (of the matched pairs), ``truth_count``, ``detected_count``.
    """
    if iou_threshold < 0.5:
        raise ValueError("matching needs an IoU threshold of at least 0.5")
    t = np.asarray(truth).ravel().astype(np.int64)
    d = np.asarray(detected).ravel().astype(np.int64)
    if t.shape != d.shape:
        raise ValueError(f"label images differ in size: {np.shape(truth)} and {np.shape(detected)}")
    t_ids, t_inv = np.unique(t, return_inverse=True)
    d_ids, d_inv = np.unique(d, return_inverse=True)
    nt, nd = len(t_ids), len(d_ids)
    inter = np.bincount(t_inv * nd + d_inv, minlength=nt * nd).reshape(nt, nd).astype(np.float64)
    area_t, area_d = inter.sum(axis=1), inter.sum(axis=0)
    t_fg, d_fg = t_ids != 0, d_ids != 0
    inter = inter[t_fg][:, d_fg]
    union = area_t[t_fg][:, None] + area_d[d_fg][None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    matched = iou > iou_threshold if iou_threshold == 0.5 else iou >= iou_threshold
    tp = int(matched.any(axis=1).sum())
    n_truth, n_det = int(t_fg.sum()), int(d_fg.sum())
    precision = tp / n_det if n_det else (1.0 if n_truth == 0 else 0.0)
    recall = tp / n_truth if n_truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"true_positives": tp, "false_positives": n_det - tp, "false_negatives": n_truth - tp,
            "precision": precision, "recall": recall, "f1": f1,
            "mean_iou": float(iou[matched].mean()) if tp else None,
            "truth_count": n_truth, "detected_count": n_det}


def size_distribution(diameters, bins: np.ndarray | None = None) -> dict:
    """Count, median, geometric mean and geometric standard deviation of diameters, and their
    histogram over ``bins`` (edges) when given."""
    d = np.asarray(diameters, np.float64)
    d = d[np.isfinite(d) & (d > 0)]
    out = {"count": int(d.size), "median": None, "gmean": None, "gsd": None}
    if d.size:
        logs = np.log(d)
        out.update(median=float(np.median(d)), gmean=float(np.exp(logs.mean())),
                   gsd=float(np.exp(logs.std())) if d.size > 1 else 1.0)
    if bins is not None:
        out["histogram"] = {"edges": [float(v) for v in bins],
                            "counts": [int(v) for v in np.histogram(d, bins=bins)[0]]}
    return out


def common_bins(*samples, count: int = 16) -> np.ndarray:
    """``count`` logarithmic bins spanning every sample's diameters (so histograms compare)."""
    vals = np.concatenate([np.asarray(s, np.float64).ravel() for s in samples if len(s)] or [np.zeros(0)])
    vals = vals[np.isfinite(vals) & (vals > 0)]
    if vals.size == 0:
        return np.geomspace(1.0, 100.0, count + 1)
    lo, hi = float(vals.min()) / 1.05, float(vals.max()) * 1.05
    return np.geomspace(lo, max(hi, lo * 1.5), count + 1)


def js_divergence(a, b, bins: np.ndarray) -> float | None:
    """Jensen-Shannon divergence (base 2, 0 = same, 1 = disjoint) between the histograms of two
    diameter samples over the same ``bins`` (None when either is empty)."""
    from scipy.spatial.distance import jensenshannon
    ha = np.histogram(np.asarray(a, np.float64), bins=bins)[0].astype(np.float64)
    hb = np.histogram(np.asarray(b, np.float64), bins=bins)[0].astype(np.float64)
    if ha.sum() == 0 or hb.sum() == 0:
        return None
    return float(jensenshannon(ha, hb, base=2) ** 2)


def relative_error(value: float | None, truth: float | None) -> float | None:
    """``value / truth - 1`` (None when either is missing)."""
    if value is None or not truth or not math.isfinite(value):
        return None
    return float(value / truth - 1.0)
