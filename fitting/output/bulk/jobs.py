"""The job description of a bulk set (picklable, sent to pool and Dask workers) and the per-image
render function each worker runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fitting.core.errors import MatfitError
from fitting.output.bulk.files import (
    FORMAT,
    LAYOUT,
    MANIFEST_FILE,
    _save_png,
    _write_json,
    _write_text,
    is_finished,
    long_lived_heap_frozen,
    paths_for,
)
from fitting.output.bulk.labels import INSTANCE_MODES, instance_records, relabel

SEED_STRIDE = 100_000           # layout_seed = seed * SEED_STRIDE + index
# Surface-texture realisations per set: the node graph is evaluated for this many texture
# seeds per worker and image i uses variant texture_seed(seed, render_seed % N).  Each image
# still gets a new geometry draw and new render noise, so the texture under every particle
# differs from image to image; what repeats is only the field-sized noise realisation, and the
# graph evaluation is no longer paid per image (docs/decisions.md, "Shared surface-texture
# variants"); 0 = a new texture per image.
DEFAULT_TEXTURE_VARIANTS = 8
JOB_KEYS = ("material_id", "content_hash", "values", "size", "spp", "seed", "instances", "texture_variants")


def seeds_for(seed: int, index: int) -> tuple[int, int]:
    """(layout_seed, render_seed) of image ``index`` of a set with seed ``seed``."""
    layout_seed = int(seed) * SEED_STRIDE + int(index)
    render_seed = int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index), 0xB0C5]).generate_state(1)[0])
    return layout_seed, render_seed & 0x7FFFFFFF


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


_STATE: dict[str, Any] = {}
_TEXTURE_CACHE_BYTES = 1 << 30
_RENDER_LOCK = threading.Lock()    # one render at a time per process (Dask threads share it)


def _worker_scene(job: dict):
    key = job_key(job)
    if _STATE.get("key") != key:
        import torch

        from fitting.core.runtime import init_mitsuba
        from fitting.materials.library import get_material
        from fitting.materials.scene import MaterialScene, RenderSettings
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

    from fitting.render.tracing import SceneRenderer
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


def _dask_chunk(job: dict, indices: list[int], out_dir: str, stop_file: str | None = None) -> list[dict]:
    """Dask task: render a chunk of indices (skipping finished ones) into the shared folder."""
    import sys
    if "fitting.core.runtime" not in sys.modules or sys.modules["fitting.core.runtime"].runtime_info() is None:
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


def _pool_init(device: str) -> None:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent decides how to stop
    os.environ["MATFIT_THREADS"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    from fitting.core.runtime import init_mitsuba
    init_mitsuba(device, threads=1)






def _check_manifest(out: Path, job: dict, recipe_dict: dict) -> dict:
    from fitting.materials.recipe import matfit_version
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
