"""A bulk set as detector training data: gray images, instance masks with each particle's true
centre and radius, and the two maps the detector learns (foreground and a centre map)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from fitting.core.errors import MatfitError


#: A particle's centre (row, column; pixel centres at integers) and radius, in pixels.
Disk = tuple[float, float, float]


def load_training_set(folder: str | Path, indices: list[int] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, list[dict[int, Disk]]]:
    """Images, instance masks and each instance's true centre and radius of a bulk set written by
    :func:`fitting.output.bulk.render_dataset`.

    Parameters
    ----------
    folder : path
        The set's folder (``images/``, ``masks/``, ``meta/``).
    indices : list of int, optional
        Which images (default: every finished one, in order).

    Returns
    -------
    images : (N, H, W) float32 in [0, 1]
    labels : (N, H, W) int32 instance ids (0 = substrate)
    disks : list of {instance id: (row, column, radius)}
        The whole particle's projected centre and radius (from the sidecars), also where
        neighbours hide part of it; only for instances of one particle.
    """
    import cv2
    import orjson

    from fitting.output.bulk.files import is_finished, paths_for
    folder = Path(folder)
    if indices is None:
        indices = sorted(int(p.stem) for p in (folder / "images").glob("*.png") if is_finished(folder, int(p.stem)))
    if not indices:
        raise MatfitError(f"no finished images in {folder}", hint="render the set first (matfit bulk)")
    images, labels, disks = [], [], []
    for i in indices:
        p = paths_for(folder, i)
        img = cv2.imread(str(p["image"]), cv2.IMREAD_UNCHANGED)
        lab = cv2.imread(str(p["mask"]), cv2.IMREAD_UNCHANGED)
        if img is None or lab is None:
            raise MatfitError(f"image {i} of {folder} cannot be read", hint="delete it; a re-run renders it again")
        images.append(img.astype(np.float32) / (65535.0 if img.dtype == np.uint16 else 255.0))
        labels.append(lab.astype(np.int32))
        meta = orjson.loads(p["meta"].read_bytes())
        disks.append({int(r["instance_id"]): (float(r["centre_y"]) - 0.5, float(r["centre_x"]) - 0.5,
                                              float(r["radius_px"]))
                      for r in meta.get("instances", []) if "radius_px" in r})
    return np.stack(images), np.stack(labels), disks


def centre_map(labels: np.ndarray, disks: dict[int, Disk] | None = None) -> np.ndarray:
    """A cone on each particle: ``1 - distance to its centre / its radius`` (at least 0), the
    largest of overlapping cones, inside the particles only (0 on the substrate).

    Centre and radius are ``disks[id]`` (the whole particle's, also where neighbours hide part
    of it) or else the instance's centroid and equivalent-circle radius. Two particles whose
    centres lie ``d`` apart meet at ``1 - d / 2r``, so cores above 0.5 stay apart even where
    primaries overlap by half."""
    lab = np.asarray(labels)
    out = np.zeros(lab.shape, np.float32)
    h, w = lab.shape
    for k, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        if disks and k in disks:
            cy, cx, r = disks[k]
        else:
            ys, xs = np.nonzero(lab[sl] == k)
            cy, cx, r = ys.mean() + sl[0].start, xs.mean() + sl[1].start, float(np.sqrt(len(ys) / np.pi))
        r = max(float(r), 1.0)
        y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, h)
        x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, w)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        cone = (1.0 - np.hypot(yy - cy, xx - cx) / r).astype(np.float32)
        # a cone belongs to its own particle and the particles over it, never to the substrate
        np.maximum(out[y0:y1, x0:x1], cone, out=out[y0:y1, x0:x1])
    out[lab == 0] = 0.0
    return np.clip(out, 0.0, 1.0)


def detector_targets(labels: np.ndarray, disks: list[dict[int, Disk]] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Foreground (N, H, W) float32 0/1 and :func:`centre_map` of each mask in ``labels``."""
    lab = np.asarray(labels)
    fg = (lab > 0).astype(np.float32)
    disks = disks or [None] * len(lab)
    centre = np.stack([centre_map(m, d) for m, d in zip(lab, disks)])
    return fg, centre
