"""Files of a bulk set: the folder layout, per-image paths, and PNG encoding.

PNGs are encoded with OpenCV using one fixed filter and zlib's run-length strategy: several
times faster than Pillow's adaptive filtering for noisy renders at the same size
(docs/decisions.md, "Bulk PNG encoding").
"""
from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path

import numpy as np
import orjson

from fitting.core.errors import MatfitError

FORMAT = "matfit-bulk/1"
LAYOUT = {"images": "images", "masks": "masks", "meta": "meta"}
COCO_FILE = "annotations.json"
CSV_FILE = "particles.csv"
MANIFEST_FILE = "dataset.json"


def _write_text(path, text: str) -> None:
    from fitting.core.files import atomic_write_text
    atomic_write_text(path, text)


def _write_json(path, obj) -> None:
    """Compact JSON + newline, atomically. orjson: the sidecars and the set's annotations.json
    hold every RLE run, which stdlib json serialises several times slower (docs/decisions.md,
    "orjson for sidecars and set files")."""
    from fitting.core.files import atomic_write_bytes
    atomic_write_bytes(path, orjson.dumps(obj) + b"\n")


# The set's PNGs are encoded with OpenCV (libpng) using one fixed filter ("up": each row minus
# the row above) and zlib's run-length strategy at level 1. Pillow tries all five PNG filters on
# every row and keeps the best, which none of its options turns off; rendered images carry shot
# noise that no filter or LZ77 match finder compresses much, so that search costs time for
# about the same file size (docs/decisions.md, "Bulk PNG encoding").
PNG_PARAMS = ("IMWRITE_PNG_COMPRESSION", 1, "IMWRITE_PNG_STRATEGY", "IMWRITE_PNG_STRATEGY_RLE",
              "IMWRITE_PNG_FILTER", "IMWRITE_PNG_FILTER_UP")


def png_bytes(arr: np.ndarray) -> bytes:
    """PNG file bytes of a gray image: float in [0, 1] (stored as 8 bit), uint8 or uint16."""
    import cv2

    from fitting.core.files import png_pixels
    a = png_pixels(arr)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D gray image, got shape {a.shape}")
    params = [v if isinstance(v, int) else getattr(cv2, v) for v in PNG_PARAMS]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(a), params)
    if not ok:
        raise MatfitError("OpenCV could not encode a PNG", hint="reinstall opencv-python-headless (./install.sh)")
    return buf.tobytes()


def _save_png(path, arr: np.ndarray) -> None:
    from fitting.core.files import atomic_write_bytes
    atomic_write_bytes(path, png_bytes(arr))


def stem(index: int) -> str:
    return f"{int(index):06d}"


def paths_for(out_dir: str | os.PathLike, index: int) -> dict[str, Path]:
    out = Path(out_dir)
    s = stem(index)
    return {"image": out / LAYOUT["images"] / f"{s}.png", "mask": out / LAYOUT["masks"] / f"{s}.png",
            "meta": out / LAYOUT["meta"] / f"{s}.json"}


def is_finished(out_dir, index: int) -> bool:
    return all(p.is_file() for p in paths_for(out_dir, index).values())


def _probe_write(out_dir: str, name: str) -> str:
    import socket
    _write_text(Path(out_dir) / name, socket.gethostname())
    return socket.gethostname()


@contextlib.contextmanager
def long_lived_heap_frozen():
    """Keep the cyclic garbage collector off every object that exists now (while an image renders).

    A render process holds ~340k long-lived Python objects (torch, Mitsuba, the job's scene and
    texture bank) that never become garbage, yet each full collection scans them all; what an
    image creates and drops is still collected as usual (docs/decisions.md, "Garbage collector
    during bulk rendering"). Freezing and unfreezing move whole lists (O(1)); a nested use keeps
    the outer freeze.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector: the set files hold every annotation's RLE runs as
    Python objects, which creates no cycles, but millions of allocations trigger full
    collections over the whole heap, most of ``write_set_files``' time and growing with the set
    (docs/decisions.md, "Garbage collector during bulk rendering")."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
