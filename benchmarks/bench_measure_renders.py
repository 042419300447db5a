"""Particle measurement on renders, against the truth of their instance masks.

For every library material and a few layouts: render its default recipe (256 px), measure the
render with ``fitting.measure.measure_particles`` exactly as a reference is measured, and compare
with the truth: the geometric mean equivalent diameter of the instance mask's whole particles
(for agglomerates: of the primaries, ``2 r`` of each primary with a visible pixel) and the
mask's coverage. Targets (issue "Real micrographs"): gmean within +-15 %, coverage within +-0.05.

    python benchmarks/bench_measure_renders.py --out benchmarks/results/measure_renders.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def mask_truth(scene, x, layout_seed: int) -> dict:
    """Geometric mean diameter and coverage of a render's instance mask (the truth)."""
    from skimage import measure
    parts = scene.split(__import__("torch").as_tensor(np.asarray(x, np.float32)))
    renderer = scene.renderer(parts["geometry"], layout_seed)
    ids = renderer.instance_mask()
    layout = renderer.layout
    coverage = float((ids > 0).mean())
    if scene.material.geometry_kind == "agglomerates":
        seen = np.unique(ids[ids > 0]) - 1
        d = 2.0 * np.asarray(layout.radii)[seen]
    else:
        lab = ids.astype(np.int32)
        border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])).tolist())
        d = np.array([p.equivalent_diameter_area for p in measure.regionprops(lab) if p.label not in border])
    d = d[d > 0]
    gmean = float(np.exp(np.mean(np.log(d)))) if d.size else None
    return {"gmean": gmean, "coverage": coverage, "n": int(d.size)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/measure_renders.json")
    ap.add_argument("--layouts", type=int, default=3)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--materials", help="comma-separated ids (default: all)")
    args = ap.parse_args(argv)
    from fitting.core.runtime import init_mitsuba
    from fitting.materials.library import load_library
    from fitting.materials.scene import MaterialScene, RenderSettings
    from fitting.measure.particles import measure_particles
    init_mitsuba("cpu")
    lib = load_library()
    ids = args.materials.split(",") if args.materials else list(lib)
    rows = []
    for mid in ids:
        mat = lib[mid]
        x = mat.default_vector()
        for k in range(args.layouts):
            seed = 1000 + k
            scene = MaterialScene(mat, RenderSettings(size=args.size, spp=4, layout_seed=seed))
            img = scene.render_numpy(x, seed=seed)
            truth = mask_truth(scene, x, seed)
            t0 = time.perf_counter()
            m = measure_particles(np.clip(img, 0, 1))
            dt = time.perf_counter() - t0
            ratio = None if (m.gmean_px is None or not truth["gmean"]) else m.gmean_px / truth["gmean"]
            row = {"material": mid, "layout_seed": seed, "truth_gmean": truth["gmean"], "truth_n": truth["n"],
                   "truth_coverage": truth["coverage"], "gmean": m.gmean_px, "median": m.median_px,
                   "coverage": m.coverage, "count": m.count, "polarity": m.polarity, "method": m.method,
                   "shape": m.shape.get("class"), "gmean_ratio": ratio,
                   "gmean_within_15": ratio is not None and abs(ratio - 1) <= 0.15,
                   "coverage_error": m.coverage - truth["coverage"],
                   "coverage_within_005": abs(m.coverage - truth["coverage"]) <= 0.05, "seconds": dt}
            rows.append(row)
            print(f"{mid:28s} seed {seed}: gmean {m.gmean_px or float('nan'):6.1f} vs {truth['gmean'] or float('nan'):6.1f} "
                  f"(x{ratio or float('nan'):.2f})  coverage {m.coverage:.3f} vs {truth['coverage']:.3f}  "
                  f"{m.method}, {m.polarity}, {dt:.2f} s", flush=True)
    ok_d = sum(r["gmean_within_15"] for r in rows)
    ok_c = sum(r["coverage_within_005"] for r in rows)
    summary = {"renders": len(rows), "gmean_within_15": ok_d, "coverage_within_005": ok_c,
               "median_abs_log_ratio": float(np.median([abs(math.log(r["gmean_ratio"])) for r in rows
                                                         if r["gmean_ratio"]])) if rows else None}
    print(json.dumps(summary))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "rows": rows, "size": args.size}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
