"""Fit quality and speed on synthetic targets and on the real reference micrographs.

    .venv/bin/python benchmarks/bench_fit.py synthetic [--count 30] [--budget 45]
    .venv/bin/python benchmarks/bench_fit.py real [--budget 120] [--refs ../shared/reference-images]
    .venv/bin/python benchmarks/bench_fit.py speed

synthetic: targets rendered from `matfit sample`-style recipes (materials round-robin, random
  parameters around the defaults, target layout/render seeds different from the fit's) at
  512 px; reports the share whose true material is ranked 1st and in the top 3, the
  normalised parameter error (mean |x - x_true| over the refinable parameters of the true
  material, when it was a candidate) of the initial guess vs the refined result, the
  descriptor distance initial vs refined, and the time per fit.
real: every reference image: descriptor distance of the fit vs the best library default
  (each material at its defaults, no tone matching) vs the initial guess alone, plus a
  side-by-side PNG (reference | fit) per image in results/fits/.
speed: seconds per refinement iteration, split into graph, render, descriptor forward and
  backward.
ablation: refinement with and without the gray-level term on targets of known parameters
  (true material and geometry given): justifies the loss terms by measurement.
Results go to benchmarks/results/fit_<mode>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    from fitting.core.runtime import runtime_info
    info = runtime_info()
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "variant": info.variant if info else None,
            "threads": info.threads if info else None, "load_average_at_end": os.getloadavg()}


def fit_overrides(args) -> dict:
    """The FitOptions that --loss-crop / --screen set (synthetic and real); the rest default."""
    given = {"loss_crop": args.loss_crop, "screen": args.screen}
    return {k: v for k, v in given.items() if v is not None}


def synthetic(args) -> dict:
    from fitting.describe.descriptor import TextureDescriptor
    from fitting.reference.loading import load_reference
    from fitting.materials.library import load_library
    from fitting.fit.options import FitOptions
    from fitting.fit.pipeline import fit_reference
    from fitting.fit.target import ReferenceTarget
    from fitting.fit.refine import evaluate_distance
    from fitting.core.files import atomic_save_png
    from fitting.materials.scene import MaterialScene, RenderSettings
    lib = load_library()
    ids = sorted(lib)
    tmp = RESULTS / "synthetic_targets"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    desc = TextureDescriptor()
    for i in range(args.start, args.start + args.count):
        mid = ids[i % len(ids)]
        mat = lib[mid]
        rng = np.random.default_rng(1000 + i)
        x_true = mat.random_vector(rng)
        scene = MaterialScene(mat, RenderSettings(size=512, spp=8, layout_seed=50_000 + i))
        img = scene.render_numpy(x_true, seed=70_000 + i)
        path = tmp / f"target_{i:02d}_{mid}.png"
        atomic_save_png(path, img)
        opts = FitOptions(budget_s=args.budget, seed=i, iterations=args.iterations, **fit_overrides(args))
        # The floor: the same yardstick for the TRUE parameters (the target's own recipe,
        # rendered with the fit's layout and eval seeds, compared at the target's pixel scale).
        # Two layouts of one recipe are never at distance 0, so this is what a perfect fit scores.
        ref = load_reference(path)
        floor_target = ReferenceTarget(ref, desc, (512,), opts.size)
        floor_scene = MaterialScene(mat, RenderSettings(size=opts.size, spp=opts.spp, layout_seed=opts.seed))
        floor = evaluate_distance(floor_scene, x_true, desc, floor_target.by_scale[512]["descriptor"])
        t0 = time.time()
        res = fit_reference(ref, opts)
        dt = time.time() - t0
        ranked = [r["material"] for r in res.ranking]
        by_prediction = [r["material"] for r in sorted(res.ranking, key=lambda r: r["distance"])]
        # The true material can be left out of the ranking altogether (an instrument cue that
        # restricts the candidates to another kind): it then counts as ranked last.
        row = {"target": path.name, "material": mid,
               "rank_of_true": ranked.index(mid) + 1 if mid in ranked else len(lib) + 1,
               "rank_of_true_before_screening": by_prediction.index(mid) + 1 if mid in by_prediction else len(lib) + 1,
               "true_material_ranked": mid in ranked, "imaging": res.imaging,
               "ranking_top5": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                                 if k in ("material", "distance", "distance_screened")} for r in res.ranking[:5]],
               "best": res.best.material_id, "seconds": round(dt, 1),
               "timings": {k: round(v, 1) for k, v in res.timings.items()},
               "distance_initial": res.best.distance_initial, "distance_final": res.best.distance_final,
               "distance_true_params": floor, "best_scale": res.best.scale,
               "best_iterations": res.best.iterations, "best_stopped": res.best.stopped,
               "candidates": [c.summary() for c in res.candidates]}
        true_c = next((c for c in res.candidates if c.material_id == mid), None)
        if true_c is not None:
            m = mat.refine_mask()
            row["param_error_initial"] = float(np.abs(true_c.x_initial - x_true)[m].mean())
            row["param_error_refined"] = float(np.abs(true_c.x_final - x_true)[m].mean())
            row["true_distance_initial"] = true_c.distance_initial
            row["true_distance_final"] = true_c.distance_final
        rows.append(row)
        print(json.dumps(row), flush=True)
        path.unlink()
    with_true = [r for r in rows if "param_error_initial" in r]
    summary = {
        "targets": len(rows),
        "true_material_top1": sum(r["rank_of_true"] == 1 for r in rows) / len(rows),
        "true_material_top3": sum(r["rank_of_true"] <= 3 for r in rows) / len(rows),
        "true_material_top3_before_screening": sum(r["rank_of_true_before_screening"] <= 3 for r in rows) / len(rows),
        "true_material_top5_before_screening": sum(r["rank_of_true_before_screening"] <= 5 for r in rows) / len(rows),
        "best_is_true": sum(r["best"] == r["material"] for r in rows) / len(rows),
        "param_error_initial_mean": statistics.mean(r["param_error_initial"] for r in with_true) if with_true else None,
        "param_error_refined_mean": statistics.mean(r["param_error_refined"] for r in with_true) if with_true else None,
        "distance_initial_mean": statistics.mean(r["distance_initial"] for r in rows),
        "distance_final_mean": statistics.mean(r["distance_final"] for r in rows),
        "distance_initial_median": statistics.median(r["distance_initial"] for r in rows),
        "distance_final_median": statistics.median(r["distance_final"] for r in rows),
        "distance_true_params_median": statistics.median(r["distance_true_params"] for r in rows),
        "final_over_initial_median": statistics.median(r["distance_final"] / r["distance_initial"] for r in rows),
        # Two layouts of one recipe are never at distance 0 (distance_true_params): the share of
        # the prediction's excess over that floor that refinement removed (targets with excess).
        "gap_to_floor_closed_median": statistics.median(
            (r["distance_initial"] - r["distance_final"]) / (r["distance_initial"] - r["distance_true_params"])
            for r in rows if r["distance_initial"] > r["distance_true_params"] + 1e-6),
        "refined_candidates_improved": sum(r["distance_final"] < r["distance_initial"] - 1e-9 for r in rows) / len(rows),
        "iterations_of_best_median": statistics.median(r["best_iterations"] for r in rows),
        "seconds_per_fit_mean": statistics.mean(r["seconds"] for r in rows),
        "seconds_per_fit_max": max(r["seconds"] for r in rows),
        "fits_over_budget_plus_10pct": sum(r["seconds"] > 1.1 * args.budget for r in rows),
    }
    return {"mode": "synthetic", "budget_s": args.budget, "loss_crop": opts.loss_crop,
            "screen_loss_crop": opts.screen_loss_crop, "screen": opts.screen, "summary": summary, "rows": rows}


def real(args) -> dict:
    from fitting.describe.descriptor import TextureDescriptor, descriptor_distance
    from fitting.reference.loading import load_reference
    from fitting.materials.library import load_library
    from fitting.fit.options import FitOptions
    from fitting.fit.pipeline import fit_reference
    from fitting.fit.target import ReferenceTarget
    from fitting.core.files import atomic_save_png
    from fitting.materials.scene import MaterialScene, RenderSettings
    refs = sorted(p for p in Path(args.refs).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif"))
    lib = load_library()
    desc = TextureDescriptor()
    (RESULTS / "fits").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in refs:
        ref = load_reference(p)
        opts = FitOptions(budget_s=args.budget, seed=0, iterations=args.iterations, **fit_overrides(args))
        target = ReferenceTarget(ref, desc, opts.scales, opts.size)
        defaults = {}
        for mid, mat in lib.items():
            scene = MaterialScene(mat, RenderSettings(size=opts.size, spp=opts.spp, layout_seed=0))
            with torch.no_grad():
                dv = desc.describe(scene.render(torch.as_tensor(mat.default_vector()), seed=1001)[None, None])
            defaults[mid] = min(float(descriptor_distance(dv, target.by_scale[s]["descriptor"]).mean())
                                for s in target.scales)
        t0 = time.time()
        res = fit_reference(ref, opts)
        dt = time.time() - t0
        side = np.concatenate([res.reference_tile, np.ones((opts.size, 4), np.float32), res.preview], axis=1)
        png = RESULTS / "fits" / f"{p.stem}.png"
        atomic_save_png(png, side)
        best_default = min(defaults, key=defaults.get)
        row = {"reference": p.name, "best": res.best.material_id, "scale": res.best.scale,
               "distance_fit": res.best.distance_final, "distance_initial_guess": res.best.distance_initial,
               "best_default_material": best_default, "distance_best_default": defaults[best_default],
               "fit_beats_best_default": res.best.distance_final < defaults[best_default],
               "fit_beats_initial_guess": res.best.distance_final < res.best.distance_initial,
               "top3": [c.summary() for c in res.candidates], "seconds": round(dt, 1),
               "side_by_side": str(png.relative_to(ROOT))}
        rows.append(row)
        print(json.dumps({k: row[k] for k in row if k != "top3"}), flush=True)
    return {"mode": "real", "budget_s": args.budget, "rows": rows}


def speed(args) -> dict:
    """Seconds per refinement iteration as ``refine`` runs it, split into stages.

    ``whole_render``: the descriptor loss on the whole 256 px render (``FitOptions.loss_crop``
    1, the final refinement's default); ``crop128``: on a random 128 px crop of it at native
    pixel scale (``screen_loss_crop`` 0.5, the screening's default). Each in
    float32 and with the VGG pass in bfloat16 (``FitOptions.loss_precision``; "auto" picks it on
    CPUs with bfloat16 instructions): keys ending in ``_bf16``.
    """
    from fitting.describe.descriptor import TextureDescriptor, descriptor_distance
    from fitting.materials.library import load_library
    from fitting.materials.scene import MaterialScene, RenderSettings
    desc = TextureDescriptor()
    out = {}
    from fitting.fit.refine import describe_in
    from fitting.core.runtime import cpu_has_fast_bf16
    out["cpu_has_fast_bf16"] = cpu_has_fast_bf16()
    for key, crop, bf16 in (("whole_render", 0, False), ("crop128", 128, False),     # loss_crop 1, 0.5
                            ("whole_render_bf16", 0, True), ("crop128_bf16", 128, True)):
        out[key] = {}
        ldesc = TextureDescriptor(work_size=crop) if crop else desc
        rng = np.random.default_rng(0)
        for mid in ("sem_sintered_agglomerates", "tem_carbon_black", "optical_emulsion_droplets"):
            mat = load_library()[mid]
            scene = MaterialScene(mat, RenderSettings(size=256, spp=4, layout_seed=0))
            x0 = torch.as_tensor(mat.default_vector())
            ref = scene.render(x0, seed=99).detach()
            target = ldesc.describe_reference(ref.numpy()) if crop else desc.describe(ref[None, None])
            t = {"graph": [], "render": [], "descriptor_forward": [], "backward": [], "total": []}
            for it in range(args.repeats + 2):
                x = x0.clone().requires_grad_(True)
                a = time.perf_counter()
                parts = scene.split(x)
                maps = scene.maps(parts["graph"], it)
                b = time.perf_counter()
                r = scene.renderer(parts["geometry"])
                img = scene.model.post(r.render(maps, parts["shade"], it, parts["trace"]), parts["post"], it)
                float(img.detach().mean())
                c = time.perf_counter()
                if crop:
                    y0, x0_ = (int(v) for v in rng.integers(0, 256 - crop + 1, size=2))
                    img = img[y0:y0 + crop, x0_:x0_ + crop]
                seen = describe_in(ldesc, img[None, None], "bfloat16" if bf16 else "float32")
                loss = descriptor_distance(seen, target).mean()
                d = time.perf_counter()
                loss.backward()
                e = time.perf_counter()
                if it >= 2:  # warm
                    for k, v in zip(t, (b - a, c - b, d - c, e - d, e - a)):
                        t[k].append(v)
            row = {k: round(statistics.median(v), 4) for k, v in t.items()}
            row["iterations_per_s"] = round(1.0 / row["total"], 2)
            out[key][mid] = row
            print(key, mid, row, flush=True)
    return {"mode": "speed", "size": 256, "spp": 4, "load_average_at_start": os.getloadavg(), "materials": out}


def ablation(args) -> dict:
    """Refinement with and without the gray-level distribution term, true material given.

    Same targets, same starting point (defaults + tone/noise matching), same iterations;
    reports the final descriptor distance, the gray-level error (mean |quantile difference|)
    and the normalised parameter error against the hidden truth.
    """
    from fitting.describe.descriptor import TextureDescriptor
    from fitting.core.events import CancelToken, null_sink
    from fitting.reference.loading import load_reference
    from fitting.materials.library import load_library
    from fitting.fit.results import Candidate
    from fitting.fit.options import FitOptions
    from fitting.fit.target import ReferenceTarget, sorted_pixels
    from fitting.fit.candidates import match_noise, match_tone
    from fitting.fit.refine import refine
    from fitting.core.files import atomic_save_png
    from fitting.materials.scene import MaterialScene, RenderSettings
    lib = load_library()
    desc = TextureDescriptor()
    ids = ["sem_sintered_agglomerates", "tem_carbon_black", "optical_emulsion_droplets", "sem_faceted_crystals",
           "sem_polystyrene_spheres", "tem_metal_nanoparticles"][:args.count]
    rows = []
    tmp = RESULTS / "ablation_targets"
    tmp.mkdir(parents=True, exist_ok=True)
    for i, mid in enumerate(ids):
        mat = lib[mid]
        x_true = mat.random_vector(np.random.default_rng(2000 + i))
        img = MaterialScene(mat, RenderSettings(size=512, spp=8, layout_seed=90_000 + i)).render_numpy(x_true, seed=3)
        path = tmp / f"{mid}.png"
        atomic_save_png(path, img)
        ref = load_reference(path)
        target = ReferenceTarget(ref, desc, (512,), 256)
        tgt = target.by_scale[512]
        scene = MaterialScene(mat, RenderSettings(size=256, spp=4, layout_seed=0))
        x0 = x_true.copy()
        # start: true geometry (isolates the loss), other parameters at defaults + matching
        d = mat.default_vector()
        m = mat.refine_mask()
        x0[m] = d[m]
        x0 = match_noise(mat, x0, target.noise)
        x0, _ = match_tone(scene, x0, tgt["quantiles"], seed=17)
        for w in (0.0, 1.0):
            opts = FitOptions(iterations=args.iterations, hist_weight=w, seed=i, patience=10_000)
            cand = Candidate(material_id=mid, scale=512, x_initial=x0.copy(), distance_initial=float("nan"))
            refine(scene, tgt, desc, cand, opts, 1e9, null_sink, CancelToken(), 0, 1)
            with torch.no_grad():
                out = scene.render(torch.as_tensor(cand.x_final), seed=1001)
            hist = float((sorted_pixels(out) - tgt["quantiles"]).abs().mean())
            rows.append({"material": mid, "hist_weight": w, "distance_initial": cand.distance_initial,
                         "distance_final": cand.distance_final, "gray_level_error": hist,
                         "param_error": float(np.abs(cand.x_final - x_true)[m].mean()),
                         "param_error_start": float(np.abs(x0 - x_true)[m].mean())})
            print(json.dumps(rows[-1]), flush=True)
        path.unlink()
    summary = {}
    for w in (0.0, 1.0):
        sel = [r for r in rows if r["hist_weight"] == w]
        summary[f"hist_weight={w}"] = {k: statistics.mean(r[k] for r in sel)
                                       for k in ("distance_final", "gray_level_error", "param_error")}
    return {"mode": "ablation", "iterations": args.iterations, "summary": summary, "rows": rows}


def crop(args) -> dict:
    """The refinement loss on a random 128 px crop (loss_crop 0.5) vs on the whole 256 px render
    (loss_crop 1), same time budget.

    True material and geometry given (isolates the refinement), the other parameters start at
    the defaults + tone/noise matching; each arm refines for ``--refine-budget`` seconds with
    early stopping as in a fit. Reported: the full-render descriptor distance (the fit's
    yardstick, ``evaluate_distance``) before and after, the iterations done, the parameter error.
    """
    from fitting.describe.descriptor import TextureDescriptor
    from fitting.core.events import CancelToken, null_sink
    from fitting.reference.loading import load_reference
    from fitting.materials.library import load_library
    from fitting.fit.results import Candidate
    from fitting.fit.options import FitOptions
    from fitting.fit.target import ReferenceTarget
    from fitting.fit.candidates import match_noise, match_tone
    from fitting.fit.refine import refine
    from fitting.core.files import atomic_save_png
    from fitting.materials.scene import MaterialScene, RenderSettings
    lib = load_library()
    desc = TextureDescriptor()
    ids = sorted(lib)
    arms = (1.0, 0.5)          # FitOptions.loss_crop: whole render, 128 px crop of 256
    rows = []
    tmp = RESULTS / "crop_targets"
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(args.count):
        mid = ids[i % len(ids)]
        mat = lib[mid]
        x_true = mat.random_vector(np.random.default_rng(4000 + i))
        img = MaterialScene(mat, RenderSettings(size=512, spp=8, layout_seed=95_000 + i)).render_numpy(x_true, seed=5)
        path = tmp / f"{mid}_{i}.png"
        atomic_save_png(path, img)
        ref = load_reference(path)
        target = ReferenceTarget(ref, desc, (512,), 256)
        tgt = target.by_scale[512]
        scene = MaterialScene(mat, RenderSettings(size=256, spp=4, layout_seed=0))
        m = mat.refine_mask()
        x0 = x_true.copy()
        x0[m] = mat.default_vector()[m]
        x0 = match_noise(mat, x0, target.noise)
        x0, _ = match_tone(scene, x0, tgt["quantiles"], seed=17)
        for c in arms:
            opts = FitOptions(loss_crop=c, seed=i, iterations=10_000)
            cand = Candidate(material_id=mid, scale=512, x_initial=x0.copy(), distance_initial=float("nan"))
            t0 = time.time()
            refine(scene, tgt, desc, cand, opts, args.refine_budget, null_sink, CancelToken(), 0, 1)
            rows.append({"target": i, "material": mid, "loss_crop": c, "distance_initial": cand.distance_initial,
                         "distance_final": cand.distance_final, "iterations": cand.iterations,
                         "stopped": cand.stopped, "seconds": round(time.time() - t0, 2),
                         "param_error_start": float(np.abs(x0 - x_true)[m].mean()),
                         "param_error": float(np.abs(cand.x_final - x_true)[m].mean())})
            print(json.dumps(rows[-1]), flush=True)
        path.unlink()
    summary = {}
    for c in arms:
        sel = [r for r in rows if r["loss_crop"] == c]
        summary[f"loss_crop={c}"] = {
            "distance_final_median": statistics.median(r["distance_final"] for r in sel),
            "final_over_initial_median": statistics.median(r["distance_final"] / r["distance_initial"] for r in sel),
            "iterations_median": statistics.median(r["iterations"] for r in sel),
            "param_error_mean": statistics.mean(r["param_error"] for r in sel)}
    wins = sum(a["distance_final"] < b["distance_final"] for a, b in zip(rows[1::2], rows[0::2]))
    summary["crop_better_on"] = f"{wins}/{len(rows) // 2}"
    return {"mode": "crop", "refine_budget_s": args.refine_budget, "summary": summary, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["synthetic", "real", "speed", "ablation", "crop"])
    ap.add_argument("--count", type=int, default=30)
    ap.add_argument("--start", type=int, default=0, help="synthetic: index of the first target")
    ap.add_argument("--budget", type=float, default=60.0)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--refine-budget", type=float, default=11.0, help="crop: seconds per refinement")
    ap.add_argument("--refs", default=str(ROOT.parent / "shared" / "reference-images"))
    ap.add_argument("--loss-crop", type=float, default=None,
                    help="synthetic/real: FitOptions.loss_crop (default: FitOptions' default)")
    ap.add_argument("--screen", type=int, default=None,
                    help="synthetic/real: FitOptions.screen, materials screened before the top 3 (0 = off)")
    ap.add_argument("--out", help="result file (default results/fit_<mode>.json)")
    args = ap.parse_args()
    from fitting.core.runtime import init_mitsuba
    init_mitsuba()
    res = {"synthetic": synthetic, "real": real, "speed": speed, "ablation": ablation, "crop": crop}[args.mode](args)
    res["machine"] = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"fit_{args.mode}.json"
    out.write_text(json.dumps(res, indent=2, default=float) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
