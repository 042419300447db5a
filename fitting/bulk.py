"""Bulk rendering of labelled training sets (images, instance masks, COCO) from a recipe.

One recipe fixes the material, its parameter values and the imaging model; every image of a set
is a new draw of the geometry from the recipe's distributions (size, coverage, agglomeration):
image ``i`` of a set with seed ``S`` uses ``layout_seed = S * 100000 + i`` and its own render
seed (:func:`seeds_for`), so any image can be re-rendered alone and the set does not depend on
how it was split between processes or machines.

Output folder (see :data:`LAYOUT`)::

    OUT/
      images/000000.png      8-bit gray render
      masks/000000.png       16-bit instance ids 0..K (0 = substrate), no antialiasing: the particle most of the
                             pixel's render samples hit
      meta/000000.json       per-image sidecar: seeds, COCO annotations (RLE), particle features
      annotations.json       COCO instances file of every finished image (rebuilt from meta/)
      particles.csv          one row per instance of every finished image (rebuilt from meta/)
      dataset.json           recipe and settings of the set; a resumed run must match them

An image is finished when its PNG, its mask and its sidecar exist; a re-run skips finished
images. Every file is written atomically (temporary file + ``os.replace``), the sidecar last, so
an interruption at any moment leaves either a finished image or files that are re-rendered.
``annotations.json``/``particles.csv`` are rebuilt from the sidecars at the end of every run,
including interrupted and failed ones, so they always describe exactly the images present.

COCO specifics: image ``id`` = index + 1, ``file_name`` relative to ``images/`` (pass that folder
as the image root, e.g. to torchvision's ``CocoDetection``), one category ``particle``,
``iscrowd`` 0, segmentations as *uncompressed* RLE (``counts`` a list of ints), which pycocotools,
detectron2 and torchvision's detection references all read (the references cannot read
compressed string RLE; ``rle="compressed"`` writes that instead).

Instances: per agglomerate by default (``instances="cluster"``): one mask per carbon-black
aggregate or sintered cluster, which is what an instance-segmentation model for such materials
is trained to find (primaries fused by necks are not separable objects in a micrograph, and
annotators label aggregates). ``"primary"`` gives one instance per primary particle. For
materials of single particles both are the same. Instances that are not visible in the image are
dropped; the ids that remain are relabelled 1..K in the order of the layout's ids.

Parallelism: a local process pool (default one process per core, each with one render thread;
``workers=1`` renders in the calling process, which is also the default when a GPU renders), or a Dask distributed cluster (``scheduler=``
address): tasks are chunks of image indices, the worker function imports ``fitting`` and
renders, and **workers write the files themselves into the output folder, which must therefore
be one shared folder (e.g. NFS) mounted at the same path on every worker and on the submitting
machine**. This is checked before rendering. Workers need the same matfit installation and
material library. A Dask worker process renders one image at a time; with ``nthreads > 1`` its
Mitsuba uses that many threads (``MATFIT_THREADS`` overrides); prefer ``--nthreads 1`` and one
worker process per core.
"""
from __future__ import annotations

import contextlib
import csv
import gc
import hashlib
import io
import json
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .errors import MatfitError
from .events import CancelToken, EventSink, FitEvent, null_sink

FORMAT = "matfit-bulk/1"
LAYOUT = {"images": "images", "masks": "masks", "meta": "meta"}
COCO_FILE = "annotations.json"
CSV_FILE = "particles.csv"
MANIFEST_FILE = "dataset.json"
SEED_STRIDE = 100_000           # layout_seed = seed * SEED_STRIDE + index
CATEGORY = {"id": 1, "name": "particle", "supercategory": "particle"}
INSTANCE_MODES = ("cluster", "primary")
# Surface-texture realisations per set: the node graph is evaluated for this many texture
# seeds per worker and image i uses variant texture_seed(seed, render_seed % N).  Each image
# still gets a new geometry draw and new render noise, so the texture under every particle
# differs from image to image; what repeats is only the field-sized noise realisation.  The
# graph evaluation was 11 % of a 512 px image's time (64 of 575 ms); 0 = a new texture per image.
DEFAULT_TEXTURE_VARIANTS = 8
JOB_KEYS = ("material_id", "content_hash", "values", "size", "spp", "seed", "instances", "texture_variants")
CSV_COLUMNS = ["image", "image_id", "instance_id", "area_px", "eq_diameter_mask_px", "eq_diameter_3d_px",
               "centroid_x", "centroid_y", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "touches_border",
               "n_primaries"]


def _write_text(path, text: str) -> None:
    from .recipe import atomic_write_text
    atomic_write_text(path, text)


def _write_json(path, obj) -> None:
    """Compact JSON + newline, atomically. orjson: the sidecars and the set's annotations.json
    hold every RLE run; stdlib json took 1.6 ms per 512 px image and ~4 ms per image for the
    set files, orjson a fifth of that."""
    from .recipe import atomic_write_bytes
    atomic_write_bytes(path, orjson.dumps(obj) + b"\n")


# The set's PNGs are encoded with OpenCV (libpng) using one fixed filter ("up": each row minus
# the row above) and zlib's run-length strategy at level 1. Pillow tries all five PNG filters on
# every row and keeps the best, which none of its options turns off; rendered images carry shot
# noise that no filter or LZ77 match finder compresses much. Measured on this machine (512 px,
# one thread): image 2.3 ms vs 6.5-8.4 ms with Pillow (level 1, Z_RLE), 204 vs 203 kB; 16-bit
# mask 1.2 ms vs 3.1-5 ms, 13.7 vs 12.1 kB. Pixel values are identical (lossless either way).
PNG_PARAMS = ("IMWRITE_PNG_COMPRESSION", 1, "IMWRITE_PNG_STRATEGY", "IMWRITE_PNG_STRATEGY_RLE",
              "IMWRITE_PNG_FILTER", "IMWRITE_PNG_FILTER_UP")


def png_bytes(arr: np.ndarray) -> bytes:
    """PNG file bytes of a gray image: float in [0, 1] (stored as 8 bit), uint8 or uint16."""
    import cv2
    from .recipe import png_pixels
    a = png_pixels(arr)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D gray image, got shape {a.shape}")
    params = [v if isinstance(v, int) else getattr(cv2, v) for v in PNG_PARAMS]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(a), params)
    if not ok:
        raise MatfitError("OpenCV could not encode a PNG", hint="reinstall opencv-python-headless (./install.sh)")
    return buf.tobytes()


def _save_png(path, arr: np.ndarray) -> None:
    from .recipe import atomic_write_bytes
    atomic_write_bytes(path, png_bytes(arr))


def seeds_for(seed: int, index: int) -> tuple[int, int]:
    """(layout_seed, render_seed) of image ``index`` of a set with seed ``seed``."""
    layout_seed = int(seed) * SEED_STRIDE + int(index)
    render_seed = int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index), 0xB0C5]).generate_state(1)[0])
    return layout_seed, render_seed & 0x7FFFFFFF


def stem(index: int) -> str:
    return f"{int(index):06d}"


def paths_for(out_dir: str | os.PathLike, index: int) -> dict[str, Path]:
    out = Path(out_dir)
    s = stem(index)
    return {"image": out / LAYOUT["images"] / f"{s}.png", "mask": out / LAYOUT["masks"] / f"{s}.png",
            "meta": out / LAYOUT["meta"] / f"{s}.json"}


def is_finished(out_dir, index: int) -> bool:
    return all(p.is_file() for p in paths_for(out_dir, index).values())


# ----------------------------------------------------------------------------------------------
# job description (picklable; sent to pool and Dask workers)
# ----------------------------------------------------------------------------------------------
def make_job(recipe, size: int | None = None, spp: int | None = None, seed: int = 0,
             instances: str = "cluster", device: str = "auto",
             texture_variants: int = DEFAULT_TEXTURE_VARIANTS) -> dict:
    """Everything a worker needs to render images of a set, as plain JSON-able data."""
    if instances not in INSTANCE_MODES:
        raise MatfitError(f"unknown instance mode {instances!r}", hint="use 'cluster' or 'primary'")
    mat = recipe.material()
    size = int(size or recipe.render.get("size", 256))
    spp = int(spp or recipe.render.get("spp", 4))
    if not 16 <= size <= 4096:
        raise MatfitError(f"image size {size} outside 16..4096")
    if spp < 1:
        raise MatfitError(f"spp must be >= 1, got {spp}")
    if not 0 <= int(texture_variants) <= 4096:
        raise MatfitError(f"--texture-variants must be 0..4096, got {texture_variants}",
                          hint="0 evaluates a new surface texture for every image")
    # the hash of the material as it renders now (a recipe may carry an older one)
    return {"material_id": mat.id, "content_hash": mat.content_hash,
            "values": {s.name: float(recipe.values[s.name]) for s in mat.specs},
            "size": size, "spp": spp, "seed": int(seed), "instances": instances, "device": device,
            "texture_variants": int(texture_variants)}


def job_key(job: dict) -> str:
    keep = {k: job.get(k) for k in JOB_KEYS}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# per-process worker state and the per-image function
# ----------------------------------------------------------------------------------------------
_STATE: dict[str, Any] = {}
_TEXTURE_CACHE_BYTES = 1 << 30
_RENDER_LOCK = threading.Lock()    # one render at a time per process (Dask threads share it)


def _worker_scene(job: dict):
    key = job_key(job)
    if _STATE.get("key") != key:
        import torch
        from .library import get_material
        from .runtime import init_mitsuba
        from .scene import MaterialScene, RenderSettings
        init_mitsuba(job.get("device", "auto"))
        mat = get_material(job["material_id"])
        x = torch.tensor([s.to_normalized(job["values"][s.name]) for s in mat.specs], dtype=torch.float32)
        scene = MaterialScene(mat, RenderSettings(size=job["size"], spp=job["spp"], layout_seed=0))
        _STATE.clear()
        _STATE.update(key=key, scene=scene, parts=scene.split(x), material=mat, textures={})
    return _STATE["scene"], _STATE["parts"]


def texture_seed(seed: int, variant: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(variant), 0x7E47]).generate_state(1)[0]) & 0x7FFFFFFF


def texture_seed_for(job: dict, render_seed: int) -> int:
    """The seed of the surface texture of the image with ``render_seed``."""
    n = int(job.get("texture_variants", 0))
    return int(render_seed) if n <= 0 else texture_seed(job["seed"], int(render_seed) % n)


def _surface_maps(job: dict, scene, parts, render_seed: int):
    """The node graph's maps for an image: one of ``texture_variants`` cached realisations."""
    tseed = texture_seed_for(job, render_seed)
    if int(job.get("texture_variants", 0)) <= 0:
        return scene.maps(parts["graph"], tseed)
    return _banked_maps(scene, parts, tseed)


def _banked_maps(scene, parts, tseed: int):
    bank = _STATE["textures"]                  # keyed by texture seed
    if tseed not in bank:
        maps = scene.maps(parts["graph"], tseed)
        # bounded memory (a 4096 px set holds 320 MB per variant): drop the oldest variants;
        # a dropped one is re-evaluated identically when needed again
        while bank and (len(bank) + 1) * maps.numel() * maps.element_size() > _TEXTURE_CACHE_BYTES:
            bank.pop(next(iter(bank)))
        bank[tseed] = maps
    return bank[tseed]


def fill_texture_bank(job: dict) -> int:
    """Evaluate every surface-texture variant of the set in this process now: the one-off per
    worker that its first images would otherwise pay as each variant is first needed. Returns
    how many were evaluated (0 when all were cached or the set has no variants)."""
    scene, parts = _worker_scene(job)
    todo = [texture_seed(job["seed"], v) for v in range(int(job.get("texture_variants", 0)))]
    todo = [t for t in todo if t not in _STATE["textures"]]
    for tseed in todo:
        _banked_maps(scene, parts, tseed)
    return len(todo)


def render_index(job: dict, index: int, out_dir: str | os.PathLike) -> dict:
    """Render image ``index`` of the set and write its image, mask and sidecar (atomically).

    Returns a small summary (index, instances, per-stage seconds). Safe to call in any process
    that can import fitting; the result only depends on (job, index).
    """
    with _RENDER_LOCK, long_lived_heap_frozen():
        return _render_index(job, int(index), Path(out_dir))


def _render_index(job: dict, index: int, out: Path) -> dict:
    import torch
    from .render import SceneRenderer
    t = {}
    t0 = time.perf_counter()
    scene, parts = _worker_scene(job)
    layout_seed, render_seed = seeds_for(job["seed"], index)
    size = job["size"]
    with torch.no_grad():
        ta = time.perf_counter()
        layout = scene.layout_for(parts["geometry"], layout_seed)
        tb = time.perf_counter()
        r = SceneRenderer(layout, scene.model, size, job["spp"])
        tc = time.perf_counter()
        maps = _surface_maps(job, scene, parts, render_seed)
        td = time.perf_counter()
        img = r.render(maps, parts["shade"], render_seed, trace_params=parts["trace"])
        te = time.perf_counter()
        img = scene.model.post(img, parts["post"], render_seed, noise=True).detach().cpu().numpy()
        tf = time.perf_counter()
        pid = r.sample_mask()
        tg = time.perf_counter()
    labels, groups = relabel(pid, layout, job["instances"])
    records = instance_records(labels, groups, layout)
    th = time.perf_counter()
    if labels.max(initial=0) > 65535:
        raise MatfitError(f"image {index} has {int(labels.max())} instances, more than a 16-bit mask holds",
                          hint="render smaller images or use --instances cluster")
    p = paths_for(out, index)
    _save_png(p["image"], img)
    _save_png(p["mask"], labels.astype(np.uint16))
    side = {"format": FORMAT, "index": index, "file_name": p["image"].name,
            "image": f"{LAYOUT['images']}/{p['image'].name}", "mask": f"{LAYOUT['masks']}/{p['mask'].name}",
            "width": size, "height": size, "layout_seed": layout_seed, "render_seed": render_seed,
            "texture_seed": texture_seed_for(job, render_seed),
            "instances_mode": job["instances"], "job": job_key(job), "n_particles": int(len(layout.radii)),
            "instances": records}
    _write_json(p["meta"], side)
    ti = time.perf_counter()
    t.update(setup=ta - t0, layout=tb - ta, scene=tc - tb, graph=td - tc, render=te - td, post=tf - te,
             mask=tg - tf, labels=th - tg, write=ti - th, total=ti - t0)
    return {"index": index, "instances": len(records), "seconds": t}


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
    rles = rle_counts_all(labels, k, runs)
    # per-instance values as arrays, then plain Python lists: building ~150 dicts is the cost
    a_i = area[1:].astype(np.int64)
    x0s, x1s, y0s, y1s = bx0.tolist(), bx1.tolist(), by0.tolist(), by1.tolist()
    eq_mask = [round(v, 4) for v in (2.0 * np.sqrt(a_i / math.pi)).tolist()]
    members_all = np.concatenate(groups)
    vol = np.add.reduceat(radii[members_all - 1] ** 3, np.cumsum([0] + [len(g) for g in groups[:-1]]))
    eq_3d = [round(v, 4) for v in (2.0 * np.cbrt(vol)).tolist()]
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
            "category_id": CATEGORY["id"],
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
    return out


def _dask_chunk(job: dict, indices: list[int], out_dir: str, stop_file: str | None = None) -> list[dict]:
    """Dask task: render a chunk of indices (skipping finished ones) into the shared folder."""
    import sys
    if "fitting.runtime" not in sys.modules or sys.modules["fitting.runtime"].runtime_info() is None:
        threads = 1
        try:
            from distributed import get_worker
            threads = int(get_worker().state.nthreads)
        except Exception:
            pass
        os.environ.setdefault("MATFIT_THREADS", str(max(1, threads)))
        try:
            import torch
            torch.set_num_threads(int(os.environ["MATFIT_THREADS"]))
        except Exception:
            pass
    out = []
    for i in indices:
        if stop_file and os.path.exists(stop_file):
            break
        if is_finished(out_dir, i):
            out.append({"index": int(i), "skipped": True})
            continue
        out.append(render_index(job, i, out_dir))
    return out


def _probe_write(out_dir: str, name: str) -> str:
    import socket
    _write_text(Path(out_dir) / name, socket.gethostname())
    return socket.gethostname()


def _pool_init(device: str) -> None:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent decides how to stop
    os.environ["MATFIT_THREADS"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    from .runtime import init_mitsuba
    init_mitsuba(device, threads=1)


# ----------------------------------------------------------------------------------------------
# set-level files
# ----------------------------------------------------------------------------------------------
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
            "licenses": [], "images": images, "annotations": anns, "categories": [dict(CATEGORY)]}


def particle_rows(sidecars: list[dict]) -> list[list]:
    rows = []
    for d in sidecars:
        for a in d["instances"]:
            rows.append([d["file_name"], int(d["index"]) + 1, a["instance_id"], a["area"], a["eq_diameter_mask_px"],
                         a["eq_diameter_3d_px"], a["centroid_x"], a["centroid_y"], *a["bbox"],
                         int(a["touches_border"]), a["n_primaries"]])
    return rows


def write_set_files(out_dir, info: dict | None = None, rle: str = "uncompressed") -> tuple[int, int]:
    """Rebuild annotations.json and particles.csv from the sidecars (atomically).

    Returns (images, annotations).
    """
    with _gc_paused():
        return _write_set_files(Path(out_dir), info, rle)


@contextlib.contextmanager
def long_lived_heap_frozen():
    """Keep the cyclic garbage collector off every object that exists now (while an image renders).

    A render process holds ~340k long-lived Python objects (torch, Mitsuba, the job's scene and
    texture bank) that never become garbage, yet each full collection scans them all; what an
    image creates and drops is still collected as usual. Measured on carbon black at 512 px
    (24 images, one process): collections took 6.5 ms per image, 0.2 ms with the heap frozen.
    Freezing and unfreezing move whole lists (O(1)); a nested use keeps the outer freeze.
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
    collections over the whole heap -- 7 of 9 ms per image of ``write_set_files`` for a
    9-image set, and growing with the set."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


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


def _check_manifest(out: Path, job: dict, recipe_dict: dict) -> dict:
    from .recipe import matfit_version
    path = out / MANIFEST_FILE
    key = job_key(job)
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("job_key") not in (None, key):
            oj = old.get("job", {})
            diff = [k for k in JOB_KEYS if oj.get(k) != job.get(k)]
            raise MatfitError(f"{out} holds a set rendered with other settings ({', '.join(diff) or 'recipe'} "
                              "differ); resuming would mix two sets",
                              hint="choose another --out folder, or the same recipe/--size/--spp/--seed/--instances/"
                                   "--texture-variants")
        if old.get("job_key") == key:
            return old
    man = {"format": FORMAT, "job_key": key, "job": job, "recipe": recipe_dict, "layout": dict(LAYOUT),
           "seed_rule": f"layout_seed = seed * {SEED_STRIDE} + index; render_seed = seeds_for(seed, index)",
           "coco_info": {"material": job["material_id"], "matfit_version": matfit_version(),
                         "size": job["size"], "spp": job["spp"], "seed": job["seed"],
                         "instances": job["instances"], "texture_variants": job["texture_variants"]},
           "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out.mkdir(parents=True, exist_ok=True)
    _write_text(path, json.dumps(man, indent=2) + "\n")
    return man


# ----------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------
@dataclass
class DatasetResult:
    out_dir: str
    count: int
    rendered: int
    skipped: int
    images: int                # images in annotations.json (every finished image in the folder)
    annotations: int
    seconds: float
    workers: int
    backend: str               # "inline", "pool" or "dask"
    stage_seconds: dict[str, float] = field(default_factory=dict)   # mean per rendered image
    cancelled: bool = False
    score: Any = None

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        if self.score is not None and hasattr(self.score, "to_dict"):
            d["score"] = self.score.to_dict()
        return d


def default_workers(device: str = "auto") -> int:
    """All usable cores on CPU; one process when rendering on a GPU (processes would share it)."""
    from .runtime import cuda_device_name
    if device != "cpu" and os.environ.get("MATFIT_DEVICE", device).lower() != "cpu" and cuda_device_name():
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class _Progress:
    def __init__(self, sink: EventSink, total: int, done0: int) -> None:
        self.sink, self.total, self.done0 = sink, total, done0
        self.done = done0
        self.t0 = time.time()

    def step(self, n: int = 1, msg: str = "") -> None:
        self.done += n
        new = self.done - self.done0
        el = time.time() - self.t0
        eta = el / new * (self.total - self.done) if new > 0 else None
        self.sink(FitEvent("iteration", stage="bulk", progress=self.done / max(self.total, 1), eta_s=eta,
                           message=f"{self.done}/{self.total} images {msg}".rstrip(),
                           data={"done": self.done, "total": self.total}))


def render_dataset(recipe, out_dir: str | os.PathLike, count: int, *, size: int | None = None,
                   spp: int | None = None, seed: int = 0, workers: int | None = None,
                   scheduler=None, instances: str = "cluster", device: str = "auto",
                   chunk_size: int | None = None, reference: str | os.PathLike | None = None,
                   rle: str = "uncompressed", score_crops: int = 100,
                   texture_variants: int = DEFAULT_TEXTURE_VARIANTS, on_event: EventSink | None = None,
                   cancel: CancelToken | None = None) -> DatasetResult:
    """Render images 0..count-1 of a labelled set into ``out_dir`` (resuming a partial set).

    recipe: a :class:`~fitting.recipe.Recipe` or a path to one. workers: local processes
    (default: :func:`default_workers`; 1 renders in this process). scheduler: a Dask scheduler address
    (``tcp://host:8786``) or a ``distributed.Client``; then ``out_dir`` must be shared with the
    workers. reference: a micrograph to score the finished set against (FID/KID).
    rle: segmentation format of annotations.json (see :func:`build_coco`).
    texture_variants: surface-texture realisations shared by the set (0 = one per image).
    A CancelToken or Ctrl-C stops after the images in flight; the set files are rebuilt either way.
    """
    from .recipe import Recipe
    if not isinstance(recipe, Recipe):
        recipe = Recipe.load(recipe)
    count = int(count)
    if count < 1:
        raise MatfitError(f"--count must be >= 1, got {count}")
    if int(seed) < 0:
        raise MatfitError(f"--seed must be >= 0, got {seed}")
    if count > SEED_STRIDE:
        raise MatfitError(f"at most {SEED_STRIDE} images per seed (got {count})",
                          hint="render several sets with different --seed")
    sink = on_event or null_sink
    cancel = cancel or CancelToken()
    job = make_job(recipe, size, spp, seed, instances, device, texture_variants)
    if rle not in ("uncompressed", "compressed"):
        raise MatfitError(f"unknown RLE format {rle!r}", hint="use 'uncompressed' or 'compressed'")
    ref_work = None
    if reference is not None:      # a bad reference fails now, not after hours of rendering
        from .images import load_reference
        scale = int((recipe.reference or {}).get("working_scale") or 512)
        ref_work = load_reference(reference).working(max_side=scale)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise MatfitError(f"{out} exists and is not a folder")
    for sub in LAYOUT.values():
        (out / sub).mkdir(parents=True, exist_ok=True)
    man = _check_manifest(out, job, recipe.to_dict())
    remove_temporaries(out, stop_files=True)
    todo = [i for i in range(count) if not is_finished(out, i)]
    skipped = count - len(todo)
    t0 = time.time()
    prog = _Progress(sink, count, skipped)
    if skipped:
        sink(FitEvent("log", stage="bulk", message=f"{skipped} of {count} images already finished: skipped",
                      progress=skipped / count))
    if scheduler is not None:
        backend = "dask"
        nworkers = 0
    else:
        nworkers = int(workers) if workers else default_workers(device)
        nworkers = max(1, min(nworkers, len(todo) or 1))
        backend = "inline" if nworkers == 1 else "pool"
    results: list[dict] = []
    try:
        if todo:
            if backend == "inline":
                for i in todo:
                    if cancel.cancelled:
                        break
                    results.append(render_index(job, i, out))
                    prog.step()
            elif backend == "pool":
                results = _run_pool(job, todo, out, nworkers, device, prog, cancel)
            else:
                results, nworkers = _run_dask(job, todo, out, scheduler, chunk_size, prog, cancel)
    finally:
        remove_temporaries(out)
        n_img, n_ann = write_set_files(out, man.get("coco_info"), rle)
    rendered = [r for r in results if not r.get("skipped")]
    stages: dict[str, float] = {}
    for r in rendered:
        for k, v in r.get("seconds", {}).items():
            stages[k] = stages.get(k, 0.0) + v / len(rendered)
    missing = [i for i in range(count) if not is_finished(out, i)]
    res = DatasetResult(out_dir=str(out), count=count, rendered=len(rendered),
                        skipped=skipped + sum(1 for r in results if r.get("skipped")), images=n_img,
                        annotations=n_ann, seconds=time.time() - t0, workers=nworkers, backend=backend,
                        stage_seconds=stages, cancelled=bool(missing) and cancel.cancelled)
    if missing and not res.cancelled:
        raise MatfitError(f"{len(missing)} image(s) were not written (first: {stem(missing[0])})",
                          hint="run the same command again to render the missing images")
    if res.cancelled:
        sink(FitEvent("log", stage="bulk", message=f"stopped: {count - len(missing)} of {count} images finished; "
                      "run the same command again to resume", progress=(count - len(missing)) / count))
        return res
    sink(FitEvent("finished", stage="bulk", progress=1.0,
                  message=f"{count} images, {n_ann} instances in {res.seconds:.1f} s -> {out}"))
    if ref_work is not None:
        from .quality import score_folder
        sink(FitEvent("stage", stage="score", message=f"FID/KID against {reference}", progress=1.0))
        res.score = score_folder(ref_work, out, working_scale=scale, seed=int(seed), crops=int(score_crops))
    return res


def _sigint_ignored():
    """Context: SIGINT ignored in this process (main thread only), so that children spawned
    meanwhile start with it ignored too (an ignored signal stays ignored across exec); a Ctrl-C
    then reaches only the parent, which stops the pool cleanly."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def cm():
        try:
            old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:          # not the main thread: leave signals alone
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)
    return cm()


def _run_pool(job, todo, out, nworkers, device, prog, cancel) -> list[dict]:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool
    ctx = mp.get_context("spawn")   # never fork a process that may hold Dr.Jit/LLVM threads
    results: list[dict] = []
    ex = ProcessPoolExecutor(max_workers=nworkers, mp_context=ctx, initializer=_pool_init, initargs=(device,))
    pending = list(todo)
    running: set = set()
    try:
        with _sigint_ignored():     # the workers are spawned by these first submits
            while pending and len(running) < 2 * nworkers:
                running.add(ex.submit(render_index, job, pending.pop(0), str(out)))
        while pending or running:
            while pending and len(running) < 2 * nworkers and not cancel.cancelled:
                running.add(ex.submit(render_index, job, pending.pop(0), str(out)))
            if not running:
                break
            done, running = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in done:
                try:
                    results.append(f.result())
                except BrokenProcessPool:
                    raise MatfitError("a render worker process died (out of memory, or killed)",
                                      hint="run the same command again to resume; use fewer --workers "
                                           "if memory is short") from None
                prog.step()
            if cancel.cancelled:
                pending.clear()
        ex.shutdown(wait=True)
    except KeyboardInterrupt:
        # Ctrl-C that the caller did not turn into a cancel (the CLI's second one): stop now.
        # Killed workers leave at most temporary files (removed by the caller), never a final one.
        _kill_pool(ex)
        raise
    except BaseException:
        # an error: drop queued images, let the running ones finish their files
        pending.clear()
        for f in running:
            f.cancel()
        try:
            ex.shutdown(wait=True, cancel_futures=True)
        except KeyboardInterrupt:
            _kill_pool(ex)
        raise
    return results


def _kill_pool(ex) -> None:
    procs = list((getattr(ex, "_processes", None) or {}).values())
    for p in procs:
        try:
            p.kill()
        except Exception:
            pass
    for p in procs:
        try:
            p.join(timeout=10)
        except Exception:
            pass
    ex.shutdown(wait=False, cancel_futures=True)


def _connect(scheduler):
    try:
        from distributed import Client
    except ImportError as e:
        raise MatfitError("--scheduler needs dask.distributed", hint='pip install "dask[distributed]"') from e
    if isinstance(scheduler, Client):
        return scheduler, False
    try:
        return Client(str(scheduler), timeout=30), True
    except (OSError, TimeoutError) as e:
        raise MatfitError(f"cannot reach the Dask scheduler at {scheduler}: {e}",
                          hint="start one with `dask scheduler` and workers with `dask worker ADDRESS "
                               "--nthreads 1`, then pass its tcp:// address") from None


def _run_dask(job, todo, out: Path, scheduler, chunk_size, prog, cancel) -> tuple[list[dict], int]:
    client, own = _connect(scheduler)
    results: list[dict] = []
    stop_file = str(out / f".stop-{uuid.uuid4().hex}")
    futures = []
    try:
        nworkers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})) if _accepts_n_workers()
                       else len(client.scheduler_info().get("workers", {})))
        probe = f".probe-{uuid.uuid4().hex}"
        host = client.submit(_probe_write, str(out), probe, pure=False).result(timeout=120)
        if not (out / probe).is_file():
            raise MatfitError(f"a Dask worker on {host} wrote into {out}, but this machine does not see the "
                              "file: the output folder is not shared",
                              hint="put --out on a filesystem mounted at the same path on every worker "
                                   "(NFS, Lustre, ...)")
        (out / probe).unlink()
        c = chunk_size or max(1, min(16, math.ceil(len(todo) / (4 * nworkers))))
        chunks = [todo[i:i + c] for i in range(0, len(todo), c)]
        futures = [client.submit(_dask_chunk, job, ch, str(out), stop_file, pure=False) for ch in chunks]
        remaining = list(futures)
        while remaining:
            if cancel.cancelled and not os.path.exists(stop_file):
                Path(stop_file).touch()       # workers stop between images
            done = [f for f in remaining if f.done()]
            if not done:
                time.sleep(0.1)
                continue
            remaining = [f for f in remaining if not f.done()]
            for f in done:
                part = f.result()
                results.extend(part)
                prog.step(len(part))
        return results, nworkers
    except KeyboardInterrupt:
        # Ctrl-C not turned into a cancel (the CLI's second one): stop at once. Images already
        # rendering on workers still finish (atomically); the next run lists them.
        Path(stop_file).touch()
        stop_file = None            # keep it: running chunks read it between images (removed next run)
        client.cancel(futures)
        raise
    except BaseException:
        # an error: stop workers between images (they check the stop file), let images in flight finish
        try:
            Path(stop_file).touch()
            from distributed import wait as dwait
            dwait(futures, timeout=600)
        except BaseException:
            client.cancel(futures)
        raise
    finally:
        if stop_file:
            try:
                os.unlink(stop_file)
            except OSError:
                pass
        if own:
            client.close()


def _accepts_n_workers() -> bool:
    import inspect
    from distributed import Client
    try:
        return "n_workers" in inspect.signature(Client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False
