"""Instance labels of a rendered image: relabelling by cluster or primary, run-length encoding,
and per-instance records (area, diameters, bounding box).
"""
from __future__ import annotations

import math

import numpy as np

from fitting.core.errors import MatfitError

INSTANCE_MODES = ("cluster", "primary")


def relabel(pid: np.ndarray, layout, mode: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Particle ids per pixel -> instance ids 1..K (0 = substrate) and each instance's particle ids.

    ``mode="cluster"``: one instance per agglomerate (``layout.cluster``; single particles are
    their own cluster); ``"primary"``: one per particle. Invisible instances get no id.
    """
    n = int(len(layout.radii))
    pid = np.asarray(pid)
    if pid.size and (pid.min() < 0 or pid.max() > n):
        raise MatfitError(f"instance mask holds particle id {int(pid.max())} but the layout has {n} particles")
    cluster = getattr(layout, "cluster", None)
    if mode == "cluster" and cluster is not None and len(cluster) == n:
        cl = np.asarray(cluster, np.int64).copy()
        neg = cl < 0                                  # no cluster: a single particle
        cl[neg] = cl.max(initial=0) + 1 + np.arange(int(neg.sum()))
        uniq, first, inv = np.unique(cl, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")      # clusters in order of their first particle
        rank = np.empty(len(uniq), np.int64)
        rank[order] = np.arange(len(uniq))
        dense = rank[inv.ravel()] + 1
    else:
        dense = np.arange(1, n + 1, dtype=np.int64)
    key = np.concatenate([[0], dense])[pid]                  # group key per pixel, 0 = substrate
    hist = np.bincount(key.ravel(), minlength=int(dense.max(initial=0)) + 1)
    present = np.flatnonzero(hist[1:]) + 1                   # visible groups, ascending
    lut = np.zeros(hist.size, np.int32)
    lut[present] = np.arange(1, len(present) + 1)
    labels = lut[key]
    order = np.argsort(dense, kind="stable")                 # particle ids of each instance
    lo = np.searchsorted(dense[order], present, "left")
    hi = np.searchsorted(dense[order], present, "right")
    groups = [order[a:b] + 1 for a, b in zip(lo, hi)]
    return labels, groups


def label_runs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertical runs of the foreground of a label image, in COCO's column-major order.

    Returns (starts, ends, ids): flat column-major pixel indices [start, end) of every maximal run
    of one id > 0 *within one column*, grouped by id (ascending) and in raster order within an
    id. Every per-instance quantity (RLE, area, centroid, box) follows from these few thousand
    runs instead of passes over all pixels.
    """
    h, w = labels.shape
    n = h * w
    flat = np.ascontiguousarray(labels.T).ravel()
    brk = flat[1:] != flat[:-1]
    brk[h - 1::h] = True                                   # runs never cross a column boundary
    cuts = np.flatnonzero(brk) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [n]])
    ids = flat[starts]
    fg = ids > 0
    starts, ends, ids = starts[fg], ends[fg], ids[fg]
    order = np.argsort(ids, kind="stable")
    return starts[order], ends[order], ids[order]


def rle_counts_all(labels: np.ndarray, k: int, runs=None) -> list[list[int]]:
    """Uncompressed COCO RLE counts of the masks ``labels == 1 .. k`` in one pass.

    COCO RLE: column-major (Fortran) order, alternating runs of 0 and 1 starting with 0 (the
    first count may be 0), no trailing zero run of length 0. What ``pycocotools.mask.encode``
    compresses (checked in the tests), computed from the runs of the whole label image at once
    instead of one full-image mask per instance.
    """
    h, w = labels.shape
    n = h * w
    starts, ends, vals = label_runs(labels) if runs is None else runs
    # join runs of one id that continue from the bottom of a column to the top of the next
    if len(starts) > 1:
        joined = (starts[1:] == ends[:-1]) & (vals[1:] == vals[:-1])
        if joined.any():
            keep_start = np.concatenate([[True], ~joined])
            keep_end = np.concatenate([~joined, [True]])
            starts, ends, vals = starts[keep_start], ends[keep_end], vals[keep_start]
    bounds = np.searchsorted(vals, np.arange(1, k + 2))
    out = []
    for i in range(k):
        s, e = starts[bounds[i]:bounds[i + 1]], ends[bounds[i]:bounds[i + 1]]
        if len(s) == 0:                  # id absent: all zeros
            out.append([n])
            continue
        counts = np.empty(2 * len(s) + 1, np.int64)
        counts[0] = s[0]
        counts[2:-1:2] = s[1:] - e[:-1]
        counts[1::2] = e - s
        counts[-1] = n - e[-1]
        c = counts.tolist()
        if c[-1] == 0:
            c.pop()
        out.append(c)
    return out


def instance_records(labels: np.ndarray, groups: list[np.ndarray], layout) -> list[dict]:
    """COCO annotation fields + particle features of each instance of a label image.

    Segmentations are *uncompressed* RLE (``counts`` a list of ints): pycocotools' COCO(),
    detectron2 and torchvision's detection references (``frPyObjects``) all read that, while
    torchvision's references cannot read compressed RLE strings.
    """
    h, w = labels.shape
    k = len(groups)
    if k == 0:
        return []
    runs = label_runs(labels)
    starts, ends, ids = runs
    if len(ids) == 0 or ids[-1] > k or len(np.unique(ids)) != k:
        raise MatfitError(f"label image does not hold exactly the ids 1..{k}")
    length = (ends - starts).astype(np.float64)
    col = starts // h
    row0 = starts % h
    area = np.bincount(ids, weights=length, minlength=k + 1)
    cx = np.bincount(ids, weights=length * col, minlength=k + 1)
    cy = np.bincount(ids, weights=length * row0 + 0.5 * length * (length - 1), minlength=k + 1)
    first = np.searchsorted(ids, np.arange(1, k + 1))         # every id has >= 1 run
    bx0 = np.minimum.reduceat(col, first)
    bx1 = np.maximum.reduceat(col, first) + 1
    by0 = np.minimum.reduceat(row0, first)
    by1 = np.maximum.reduceat(row0 + (ends - starts), first)
    radii = np.asarray(layout.radii, np.float64)
    pops = getattr(layout, "populations", None)
    population = np.zeros(len(radii), np.int64) if pops is None else np.asarray(pops, np.int64)
    rles = rle_counts_all(labels, k, runs)
    # per-instance values as arrays, then plain Python lists: building ~150 dicts is the cost
    a_i = area[1:].astype(np.int64)
    x0s, x1s, y0s, y1s = bx0.tolist(), bx1.tolist(), by0.tolist(), by1.tolist()
    eq_mask = [round(v, 4) for v in (2.0 * np.sqrt(a_i / math.pi)).tolist()]
    members_all = np.concatenate(groups)
    vol = np.add.reduceat(radii[members_all - 1] ** 3, np.cumsum([0] + [len(g) for g in groups[:-1]]))
    eq_3d = [round(v, 4) for v in (2.0 * np.cbrt(vol)).tolist()]
    # the particle's own projected centre and radius (pixel-edge coordinates), for single
    # particles: where neighbours hide part of it, the mask's centroid is not its centre
    px_per_unit = w / float(layout.size) if getattr(layout, "size", 0) else 1.0
    centres = np.asarray(getattr(layout, "centers", np.zeros((0, 3))), np.float64)
    cxs = [round(v + 0.5, 4) for v in (cx[1:] / a_i).tolist()]
    cys = [round(v + 0.5, 4) for v in (cy[1:] / a_i).tolist()]
    size = [int(h), int(w)]
    out = []
    for i, (a, x0, x1, y0, y1, members) in enumerate(zip(a_i.tolist(), x0s, x1s, y0s, y1s, groups)):
        out.append({
            "instance_id": i + 1,
            "segmentation": {"size": list(size), "counts": rles[i]},
            "area": a,
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "iscrowd": 0,
            "category_id": CATEGORIES[int(population[members[0] - 1])]["id"],
            # features (pixel-edge coordinates like the bbox: pixel (r, c) covers [c, c+1) x [r, r+1))
            "eq_diameter_mask_px": eq_mask[i],
            # volume-equivalent diameter of the whole particle/agglomerate (overlaps not removed)
            "eq_diameter_3d_px": eq_3d[i],
            "centroid_x": cxs[i],
            "centroid_y": cys[i],
            "touches_border": x0 == 0 or y0 == 0 or x1 == w or y1 == h,
            "n_primaries": len(members),
            "particle_ids": members.tolist(),
        })
        if len(members) == 1 and len(centres):
            j = int(members[0]) - 1
            out[-1].update(centre_x=round(float(centres[j, 0]) * px_per_unit, 4),
                           centre_y=round((float(layout.size) - float(centres[j, 1])) * px_per_unit, 4),
                           radius_px=round(float(radii[j]) * px_per_unit, 4))
    return out


CATEGORY = {"id": 1, "name": "particle", "supercategory": "particle"}
#: COCO category of each population (index = ``layout.population``): a material's second
#: population (satellites, droplets between islands) is labelled apart from its main particles.
CATEGORIES = [CATEGORY, {"id": 2, "name": "second population", "supercategory": "particle"}]
