"""How the size of the judged field steadies the geometry correction of a fitted recipe.

For a saved recipe and its reference: render the recipe at its working scale on square fields
of the given sides (same pixel scale), measure each render as the fit does, and apply the
fit's geometry correction (``correct_geometry``) a few times, printing after each step the
size parameter, the measured median diameter and coverage, the structure terms and distance
against the reference, and the descriptor distance on the ranking render (fixed seeds).

A field that holds one or two aggregates measures a size and a coverage that swing with the
layout; one that holds several converges in a step (docs/decisions.md, "Fit: geometry settled
on the judged field").

    python benchmarks/bench_judge_field.py RECIPE.json --fields 512 832 --out results/judge_field.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def correction_steps(recipe_path: Path, fields: list[int], steps: int) -> dict:
    """The correction trajectory of ``recipe_path``'s geometry on each field side."""
    from fitting.core.runtime import init_mitsuba
    init_mitsuba()
    from fitting.fit.candidates import measure_render
    from fitting.fit.options import FitOptions
    from fitting.fit.pipeline import prepare_target
    from fitting.fit.refine import EVAL_SEEDS, evaluate_distance
    from fitting.fit.structure import correct_geometry, rendered_size_param, structure_distance, structure_terms
    from fitting.materials.recipe import Recipe
    from fitting.materials.scene import MaterialScene, RenderSettings
    from fitting.reference.loading import load_reference

    recipe = Recipe.load(recipe_path)
    mat = recipe.material()
    scale = int(recipe.reference["working_scale"])
    ref = load_reference(recipe.reference["path"])
    opts = FitOptions()
    prep = prepare_target(ref, opts, {mat.id: mat})
    if scale not in prep.structures:
        raise SystemExit(f"{recipe_path}: working scale {scale} is not among the measured scales {list(prep.structures)}")
    structure, tgt = prep.structures[scale], prep.target.by_scale[scale]
    scene = MaterialScene(mat, RenderSettings(size=opts.size, spp=opts.spp, layout_seed=opts.seed))
    out = {"recipe": str(recipe_path), "material": mat.id, "working_scale": scale,
           "reference_diameter_render_px": structure.diameter_render, "reference_coverage": structure.coverage,
           "fields": {}}
    for side in fields:
        field = MaterialScene(mat, dataclasses.replace(scene.settings, size=int(side)))
        x = recipe.vector(mat)
        rows = []
        for step in range(steps + 1):
            m = measure_render(field.render_numpy(x, seed=EVAL_SEEDS[0]))
            terms = structure_terms(structure, m)
            rows.append({"step": step, "size_param_px": rendered_size_param(mat, x),
                         "measured_median_px": m.median_px, "measured_coverage": m.coverage,
                         "terms": {k: round(v, 3) for k, v in terms.items()},
                         "structure_distance": structure_distance(terms, structure.weights),
                         "descriptor_distance": evaluate_distance(scene, x, prep.descriptor, tgt["descriptor"])})
            print(json.dumps({"field": side, **rows[-1]}), flush=True)
            x = correct_geometry(mat, x, structure, m)
        out["fields"][str(side)] = rows
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs="+", type=Path)
    ap.add_argument("--fields", type=int, nargs="+", default=[512, 832])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    result = {"command": "python benchmarks/bench_judge_field.py " + " ".join(sys.argv[1:]),
              "runs": [correction_steps(p, args.fields, args.steps) for p in args.recipes]}
    from fitting.core.files import atomic_write_text
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
