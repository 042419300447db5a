"""Throughput of `matfit bulk` against a bare Mitsuba render, and its scaling with workers.

For each material (library defaults, 512 x 512, the CLI's default 4 spp):

* pipeline: ``render_dataset(count=N, workers=1)`` in this process with one render thread (what
  one pool worker does): new layout, new Mitsuba scene, graph evaluation, render, post-processing,
  instance mask, labels/RLE/features and three atomic file writes per image, plus the set files;
* bare: ``SceneRenderer.render`` of an already built scene (same layout and maps, new seeds):
  the pure render cost (trace + Dr.Jit shading);
* ratio = pipeline images/s / bare images/s, and the mean seconds per stage of the pipeline;
* workers: the local process pool with 1 and 2 workers (each one render thread): wall-clock
  images/s including process start-up, and the steady rate between the first and last image.

    .venv/bin/python benchmarks/bench_bulk.py            # writes benchmarks/results/bulk.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ["MATFIT_THREADS"] = "1"        # "one worker" = one process with one render thread
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine_info() -> dict:
    import drjit as dr
    import mitsuba as mi
    import torch
    from fitting.runtime import runtime_info
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = runtime_info()
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_at_start": list(os.getloadavg()),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "mitsuba": mi.__version__, "drjit": dr.__version__, "variant": info.variant,
            "render_threads": info.threads, "torch_threads": torch.get_num_threads()}


def recipe_for(mid: str, size: int, spp: int):
    import numpy as np
    from fitting.library import get_material
    from fitting.recipe import Recipe
    mat = get_material(mid)
    x = np.array([s.to_normalized(s.default) for s in mat.specs], np.float32)
    return Recipe.from_vector(mat, x, render={"size": size, "spp": spp, "layout_seed": 0})


def bench_pipeline(rec, tmp: Path, count: int, seed: int) -> dict:
    from fitting.bulk import render_dataset
    render_dataset(rec, tmp / "warm", 1, workers=1, seed=seed + 1000)   # kernels, library, caches
    out = tmp / "pipeline"
    t0 = time.perf_counter()
    res = render_dataset(rec, out, count, workers=1, seed=seed)
    wall = time.perf_counter() - t0
    return {"images": count, "seconds": round(wall, 3), "images_per_s": round(count / wall, 4),
            "instances_per_image": round(res.annotations / count, 1),
            "stage_seconds_per_image": {k: round(v, 4) for k, v in res.stage_seconds.items()},
            "set_files_and_overhead_s_per_image": round(wall / count - res.stage_seconds.get("total", 0.0), 4)}


def bench_bare(rec, count: int, seed: int) -> dict:
    import torch
    from fitting.bulk import seeds_for
    from fitting.render import SceneRenderer
    from fitting.scene import MaterialScene, RenderSettings
    mat = rec.material()
    size, spp = int(rec.render["size"]), int(rec.render["spp"])
    scene = MaterialScene(mat, RenderSettings(size=size, spp=spp))
    parts = scene.split(torch.as_tensor(rec.vector(mat)))
    ls, rs = seeds_for(seed, 0)
    layout = scene.layout_for(parts["geometry"], ls)
    r = SceneRenderer(layout, scene.model, size, spp)
    with torch.no_grad():
        maps = scene.maps(parts["graph"], rs)
        r.render(maps, parts["shade"], rs, trace_params=parts["trace"])       # warm-up
        t0 = time.perf_counter()
        for k in range(count):
            r.render(maps, parts["shade"], rs + 1 + k, trace_params=parts["trace"])
        wall = time.perf_counter() - t0
    return {"images": count, "seconds": round(wall, 3), "images_per_s": round(count / wall, 4),
            "particles": int(layout.n_particles), "triangles": int(layout.n_triangles)}


def bench_pool(rec, tmp: Path, workers: int, count: int, seed: int) -> dict:
    from fitting.bulk import render_dataset
    times: list[float] = []
    t0 = time.perf_counter()
    res = render_dataset(rec, tmp / f"pool{workers}", count, workers=workers, seed=seed,
                         on_event=lambda ev: times.append(time.perf_counter()) if ev.kind == "iteration" else None)
    wall = time.perf_counter() - t0
    steady = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
    return {"workers": workers, "images": count, "backend": res.backend, "seconds": round(wall, 3),
            "images_per_s_wall": round(count / wall, 4), "startup_s": round(times[0] - t0, 3) if times else None,
            "images_per_s_steady": round(steady, 4) if steady else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--spp", type=int, default=4)
    ap.add_argument("--count", type=int, default=6, help="images per pipeline/bare measurement")
    ap.add_argument("--pool-count", type=int, default=8, help="images per worker-scaling measurement")
    ap.add_argument("--materials", default="sem_polystyrene_spheres,tem_carbon_black")
    ap.add_argument("--scaling-material", default="sem_polystyrene_spheres")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bulk.json"))
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(1)
    from fitting.runtime import init_mitsuba
    init_mitsuba("auto", threads=1)
    result = {"benchmark": "bulk", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info(),
              "settings": {"size": args.size, "spp": args.spp, "count": args.count,
                           "pool_count": args.pool_count, "render_threads_per_worker": 1},
              "materials": {}, "target_ratio": 0.8}
    tmp = Path(tempfile.mkdtemp(prefix="bench_bulk_"))
    try:
        for mid in args.materials.split(","):
            rec = recipe_for(mid, args.size, args.spp)
            pipe = bench_pipeline(rec, tmp / mid, args.count, seed=1)
            bare = bench_bare(rec, args.count, seed=1)
            ratio = pipe["images_per_s"] / bare["images_per_s"]
            st = pipe["stage_seconds_per_image"]
            entry = {"pipeline": pipe, "bare_render": bare, "ratio": round(ratio, 3)}
            entry["share_of_pipeline_time"] = {k: round(v / st["total"], 3) for k, v in st.items() if k != "total"}
            result["materials"][mid] = entry
            print(f"{mid}: pipeline {pipe['images_per_s']:.3f} img/s, bare render {bare['images_per_s']:.3f} "
                  f"img/s, ratio {ratio:.2f}; per image {st}", file=sys.stderr)
        rec = recipe_for(args.scaling_material, args.size, args.spp)
        p1 = bench_pool(rec, tmp / "scaling", 1, args.pool_count, seed=2)
        p2 = bench_pool(rec, tmp / "scaling", 2, args.pool_count, seed=3)
        # workers=1 renders in this process (no pool, nothing to start); workers=2 is a spawned
        # process pool, so its wall-clock figure includes starting 2 Python/torch/Mitsuba processes
        result["workers"] = {"material": args.scaling_material, "one": p1, "two": p2,
                             "speedup_wall": round(p2["images_per_s_wall"] / p1["images_per_s_wall"], 3),
                             "speedup_steady": round(p2["images_per_s_steady"] / p1["images_per_s_steady"], 3)
                             if p1["images_per_s_steady"] and p2["images_per_s_steady"] else None}
        print(f"workers: 1 -> 2: wall x{result['workers']['speedup_wall']}, steady "
              f"x{result['workers']['speedup_steady']}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["machine"]["load_avg_at_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
