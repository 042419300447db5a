"""A user's own labels of the reference: a COCO instances file or a 16-bit instance-mask PNG,
returned as instance labels of the fitting region."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fitting.core.errors import MatfitError


def load_annotations(path: str | Path, reference) -> np.ndarray:
    """Instance labels (int32, 0 = background) of ``reference``'s fitting region (its
    ``cropped`` pixels) from a COCO instances JSON or an instance-mask PNG/TIFF.

    A mask may cover the whole image or only the fitting region. A COCO file's image is the
    one whose ``file_name`` has the reference's file name, or its only image; its size must be
    the reference's.

    Raises
    ------
    MatfitError
        When the file cannot be read, holds no annotations of this image, or has another size.
    """
    p = Path(path)
    if not p.is_file():
        raise MatfitError(f"annotation file {p} not found", hint="pass a COCO JSON or a 16-bit instance-mask PNG")
    full = _coco_labels(p, reference) if p.suffix.lower() == ".json" else _mask_labels(p)
    w, h = reference.original_size
    x0, y0, x1, y1 = reference.crop_box
    if full.shape == (h, w):
        return full[y0:y1, x0:x1].astype(np.int32)
    if full.shape == (y1 - y0, x1 - x0):
        return full.astype(np.int32)
    raise MatfitError(f"the annotations are {full.shape[1]}x{full.shape[0]} px but the reference is {w}x{h} "
                      f"(fitting region {x1 - x0}x{y1 - y0})",
                      hint="annotate the same image at its original size")


def _mask_labels(p: Path) -> np.ndarray:
    import cv2
    a = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    if a is None:
        raise MatfitError(f"{p} is not an image OpenCV can read", hint="save the mask as a 16-bit PNG")
    if a.ndim == 3:
        raise MatfitError(f"{p} has colour channels; an instance mask has one channel of instance ids",
                          hint="save it as a 16-bit gray PNG (0 = background, 1..K = particles)")
    if not np.issubdtype(a.dtype, np.integer):
        raise MatfitError(f"{p} holds {a.dtype} values, not instance ids", hint="save it as a 16-bit gray PNG")
    return a.astype(np.int32)


def _coco_labels(p: Path, reference) -> np.ndarray:
    from pycocotools import mask as mask_utils
    try:
        coco = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MatfitError(f"{p} is not a readable JSON file: {exc}", hint="pass a COCO instances file") from exc
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise MatfitError(f"{p} is not a COCO instances file (no 'images' and 'annotations')")
    name = Path(reference.path).name
    images = coco["images"]
    hit = [im for im in images if Path(str(im.get("file_name", ""))).name == name]
    if not hit and len(images) == 1:
        hit = images
    if not hit:
        raise MatfitError(f"{p} has no image named {name}", hint="pass the annotations of this micrograph")
    im = hit[0]
    h, w = int(im["height"]), int(im["width"])
    labels = np.zeros((h, w), np.int32)
    k = 0
    for a in coco["annotations"]:
        if a.get("image_id") != im["id"] or a.get("iscrowd", 0):
            continue
        seg = a.get("segmentation")
        if isinstance(seg, list):
            rles = mask_utils.frPyObjects(seg, h, w)
            m = mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles)
        elif isinstance(seg, dict):
            rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else seg
            m = mask_utils.decode(rle)
        else:
            continue
        k += 1
        labels[(m > 0) & (labels == 0)] = k
    if k == 0:
        raise MatfitError(f"{p} holds no instance segmentations of {name}")
    return labels
