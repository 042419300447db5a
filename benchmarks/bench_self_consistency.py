"""Self-consistency of the structure terms on the synthetic targets.

For each synthetic benchmark target (``bench_fit.py synthetic``: material ``i mod 17`` at random
parameters, 512 px), the target is measured and described exactly as a fit does
(``prepare_target``); then the TRUE recipe is rendered as the fit renders a refined candidate
at each working scale (pixel quantities scaled to the working scale, the judged field of
``judge_field_scene``, the fit's layout and evaluation seeds) and measured against the target's
measurement (``structure_terms``). A perfect fit of the right material scores this structure
distance; where it is large, the structure terms penalise the true material itself (its render
measures differently from its own target: polarity or size method flipping between two images
of one recipe, a field too small for the particles), and no fit can choose it by structure.

    python benchmarks/bench_self_consistency.py --out benchmarks/results/self_consistency.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


def true_recipe_at_scale(material, x_true: np.ndarray, factor: float) -> np.ndarray:
    """``x_true`` with every parameter in pixels (sizes, blur) multiplied by ``factor`` (the
    working scale over the target's 512 px), clipped to the material's ranges."""
    x = np.asarray(x_true, np.float64).copy()
    for k, spec in enumerate(material.specs):
        if spec.unit == "px":
            x[k] = float(np.clip(spec.to_normalized(spec.to_physical(float(x[k])) * factor), 0.0, 1.0))
    return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=40)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "self_consistency.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_rank import make_target, target_recipe
    from fitting.core.files import atomic_write_text
    from fitting.core.runtime import init_mitsuba
    init_mitsuba("cpu")
    from fitting.fit.candidates import measure_render
    from fitting.fit.options import FitOptions
    from fitting.fit.pipeline import EVAL_SEEDS, judge_field_scene, prepare_target
    from fitting.fit.structure import structure_distance, structure_terms
    from fitting.materials.library import load_library
    from fitting.materials.scene import MaterialScene, RenderSettings
    from fitting.reference.loading import load_reference
    lib = load_library()
    targets = RESULTS / "synthetic_targets"
    targets.mkdir(parents=True, exist_ok=True)
    rows = []
    t_start = time.time()
    for i in range(args.start, args.start + args.count):
        # The same target as bench_fit.py synthetic renders (seeds included).
        mid, path = make_target(lib, i, targets)
        mat = lib[mid]
        x_true = target_recipe(lib, i)[1]
        opts = FitOptions(seed=i)
        prepared = prepare_target(load_reference(path), opts, lib)
        m0 = prepared.measurement
        row = {"target": path.name, "material": mid, "target_measured": {
            "count": m0.count, "median_px": m0.median_px, "coverage": m0.coverage, "polarity": m0.polarity,
            "shape": m0.shape.get("class"), "method": m0.method}, "scales": []}
        for s, st in prepared.structures.items():
            x = true_recipe_at_scale(mat, x_true, s / 512.0)
            scene = MaterialScene(mat, RenderSettings(size=opts.size, spp=opts.spp, layout_seed=opts.seed))
            field = judge_field_scene(scene, st)
            m = measure_render(field.render_numpy(x, seed=EVAL_SEEDS[0]))
            terms = structure_terms(st, m)
            row["scales"].append({
                "scale": s, "field_px": field.settings.size,
                "structure_distance": structure_distance(terms, st.weights), "terms": terms,
                "render_measured": {"count": m.count, "median_px": None if m.median_px is None else
                                    m.median_px / st.render_per_reference_px, "coverage": m.coverage,
                                    "polarity": m.polarity, "shape": m.shape.get("class"), "method": m.method}})
        rows.append(row)
        worst = max((c["structure_distance"] for c in row["scales"]), default=None)
        print(f"{i:2d} {mid:30s} scales {len(row['scales'])} worst structure distance "
              f"{'-' if worst is None else f'{worst:.2f}'}", flush=True)
    pairs = [c for r in rows for c in r["scales"]]
    summary = {"targets": len(rows), "target_scale_pairs": len(pairs),
               "unmeasurable_targets": sum(not r["scales"] for r in rows),
               "pairs_above_1": sum(c["structure_distance"] > 1.0 for c in pairs),
               "pairs_above_0_5": sum(c["structure_distance"] > 0.5 for c in pairs),
               "median_structure_distance": float(np.median([c["structure_distance"] for c in pairs])) if pairs else None,
               "seconds": round(time.time() - t_start, 1)}
    print(json.dumps(summary))
    atomic_write_text(Path(args.out), json.dumps({"command": "python benchmarks/bench_self_consistency.py "
                                                   + " ".join(argv or sys.argv[1:]),
                                                   "summary": summary, "rows": rows}, indent=1) + "\n")
    md = Path(args.out).with_suffix(".md")
    lines = ["# Self-consistency: the true recipe measured against its own target", "",
             "Command: `python benchmarks/bench_self_consistency.py`. The true recipe of each synthetic target, "
             "rendered as the fit renders a refined candidate at each working scale (judged field, the fit's seeds), "
             "measured against the target's measurement. A perfect fit of the right material has this structure "
             "distance; above 1 the structure terms rank the true material behind a merely similar one.", "",
             f"Targets {summary['targets']}, target-scale pairs {summary['target_scale_pairs']}; structure distance "
             f"above 1: {summary['pairs_above_1']}, above 0.5: {summary['pairs_above_0_5']}, median "
             f"{summary['median_structure_distance']:.2f}; targets without a usable measurement (no structure terms): "
             f"{summary['unmeasurable_targets']}.", "",
             "| target | target measured (n, median px, coverage, polarity, shape) | scale | structure distance | "
             "largest terms | true recipe's render measured |", "|---|---|---|---|---|---|"]
    for r in rows:
        t = r["target_measured"]
        tm = (f"{t['count']}, {t['median_px'] or 0:.1f}, {t['coverage']:.2f}, {t['polarity']}, {t['shape']}")
        if not r["scales"]:
            lines.append(f"| {r['target']} | {tm} | - | - | - | - |")
        for c in r["scales"]:
            big = ", ".join(f"{k} {v:.2f}" for k, v in sorted(c["terms"].items(), key=lambda kv: -kv[1]) if v > 0.1)
            rm = c["render_measured"]
            lines.append(f"| {r['target']} | {tm} | {c['scale']} | {c['structure_distance']:.2f} | {big or '-'} | "
                         f"{rm['count']}, {rm['median_px'] or 0:.1f}, {rm['coverage']:.2f}, {rm['polarity']}, "
                         f"{rm['shape']} |")
    atomic_write_text(md, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
