"""Set-level files rebuilt from the per-image sidecars: COCO annotations and the particle table.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import orjson

from fitting.core.errors import MatfitError
from fitting.output.bulk.files import (
    COCO_FILE,
    CSV_FILE,
    FORMAT,
    LAYOUT,
    MANIFEST_FILE,
    _gc_paused,
    _write_json,
    _write_text,
    is_finished,
)
from fitting.output.bulk.labels import CATEGORIES

CSV_COLUMNS = ["image", "image_id", "instance_id", "area_px", "eq_diameter_mask_px", "eq_diameter_3d_px",
               "centroid_x", "centroid_y", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "touches_border",
               "n_primaries", "category_id"]


def read_sidecars(out_dir) -> list[dict]:
    """Sidecars of every finished image in the folder, by index."""
    out = Path(out_dir)
    meta = out / LAYOUT["meta"]
    res = []
    if not meta.is_dir():
        return res
    for p in sorted(meta.glob("*.json")):
        if p.name.startswith(".") or not p.stem.isdigit():
            continue
        idx = int(p.stem)
        if not is_finished(out, idx):
            continue
        try:
            d = orjson.loads(p.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if d.get("format") == FORMAT and d.get("index") == idx:
            res.append(d)
    return res


def build_coco(sidecars: list[dict], info: dict | None = None, rle: str = "uncompressed") -> dict:
    """COCO instances dict: image id = index + 1, annotation ids 1.. in image/instance order.

    rle: "uncompressed" (counts as int lists; every COCO reader incl. torchvision's references)
    or "compressed" (pycocotools' string counts; smaller, not readable by torchvision's references).
    """
    if rle not in ("uncompressed", "compressed"):
        raise MatfitError(f"unknown RLE format {rle!r}", hint="use 'uncompressed' or 'compressed'")
    if rle == "compressed":
        from pycocotools import mask as mask_utils
    images, anns = [], []
    aid = 0
    for d in sidecars:
        iid = int(d["index"]) + 1
        images.append({"id": iid, "file_name": d["file_name"], "width": d["width"], "height": d["height"],
                       "mask_file": d["mask"], "layout_seed": d["layout_seed"], "render_seed": d["render_seed"]})
        for a in d["instances"]:
            aid += 1
            seg = a["segmentation"]
            if rle == "compressed":
                c = mask_utils.frPyObjects(seg, *seg["size"])
                seg = {"size": seg["size"], "counts": c["counts"].decode("ascii")}
            anns.append({"id": aid, "image_id": iid, "category_id": a["category_id"], "segmentation": seg,
                         "area": a["area"], "bbox": a["bbox"], "iscrowd": a["iscrowd"],
                         "instance_id": a["instance_id"]})
    return {"info": dict(info or {}, description="matfit synthetic particle set",
                         images_folder=LAYOUT["images"]),
            "licenses": [], "images": images, "annotations": anns, "categories": used_categories(anns)}


def used_categories(annotations: list[dict]) -> list[dict]:
    """The COCO categories a set uses: ``particle`` always, ``second population`` when present."""
    used = {a["category_id"] for a in annotations} | {CATEGORIES[0]["id"]}
    return [dict(c) for c in CATEGORIES if c["id"] in used]


def particle_rows(sidecars: list[dict]) -> list[list]:
    rows = []
    for d in sidecars:
        for a in d["instances"]:
            rows.append([d["file_name"], int(d["index"]) + 1, a["instance_id"], a["area"], a["eq_diameter_mask_px"],
                         a["eq_diameter_3d_px"], a["centroid_x"], a["centroid_y"], *a["bbox"],
                         int(a["touches_border"]), a["n_primaries"], a.get("category_id", CATEGORIES[0]["id"])])
    return rows


def write_set_files(out_dir, info: dict | None = None, rle: str = "uncompressed") -> tuple[int, int]:
    """Rebuild annotations.json and particles.csv from the sidecars (atomically).

    Returns (images, annotations).
    """
    with _gc_paused():
        return _write_set_files(Path(out_dir), info, rle)


def _write_set_files(out: Path, info: dict | None, rle: str) -> tuple[int, int]:
    side = read_sidecars(out)
    if info is None:
        try:
            info = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8")).get("coco_info")
        except (OSError, json.JSONDecodeError):
            info = None
    coco = build_coco(side, info, rle)
    _write_json(out / COCO_FILE, coco)
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(CSV_COLUMNS)
    wr.writerows(particle_rows(side))
    _write_text(out / CSV_FILE, buf.getvalue())
    return len(coco["images"]), len(coco["annotations"])


def remove_temporaries(out_dir, stop_files: bool = False) -> int:
    """Delete temporary files left by killed writers (``.NAME.*.tmp`` of atomic_write_bytes),
    and with ``stop_files`` the stop/probe markers of an interrupted Dask run."""
    n = 0
    out = Path(out_dir)
    for d in [out] + [out / v for v in LAYOUT.values()]:
        if not d.is_dir():
            continue
        pats = [".*.tmp"] + ([".stop-*", ".probe-*"] if stop_files and d == out else [])
        for p in (q for pat in pats for q in d.glob(pat)):
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
    return n
