"""Fits of the labelled real micrographs with default settings, judged as a microscopist would.

For every image in ``../shared/reference-images/labels.json``: ``fit_reference`` with default
options (120 s budget unless ``--budget``), then per image: the imaging kind chosen (and the cue
that decided), the result material and whether the label accepts it, whether an accepted
material is among the three refined, the measured and the fitted particle diameter against the
label's ``diameter_px``, the time, and a side-by-side PNG (reference | fit, whole field at the
fit's pixel scale) with the measured particles outlined on the reference half.

    python benchmarks/bench_real.py                       # all images, 120 s each (~25 min)
    python benchmarks/bench_real.py --budget 60 --images CarbonBlack

Writes ``benchmarks/results/real.json``, ``real.md``, and per image in ``benchmarks/results/fits_real/``
the side-by-side PNG and the fitted recipe (``*.recipe.json``, read by ``bench_validate.py``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE_DIR = ROOT.parent / "shared" / "reference-images"


#: Materials added after labels.json was written, and the labelled materials whose look each
#: one shares (labels.json: "new materials of the same look count too"). A result counts as
#: accepted "by look" where the image accepts one of them; the strict count is kept beside it.
SAME_LOOK = {
    "optical_brightfield_colloids": ["optical_emulsion_droplets"],     # transparent beads in bright field
    "optical_darkfield_particles": ["optical_insitu_probe"],           # set aside (benchmarks/materials_set_aside)
    "optical_emulsion_polydisperse": ["optical_emulsion_droplets"],    # droplets with dark rims
    "sem_powder_pile": ["sem_carbonyl_iron", "sem_polystyrene_spheres"],  # smooth powder spheres, piled
    "sem_bumpy_spheres": ["sem_raspberry_spheres"],                    # lumpy spheres
    "tem_nanoparticle_monolayer": ["tem_metal_nanoparticles"],         # compact dark TEM particles
    "tem_large_crystals": ["tem_metal_nanoparticles"],
}


def accepted_by_look(material: str, accept: set[str]) -> bool:
    return material in accept or bool(accept & set(SAME_LOOK.get(material, [])))


def within(value, label, tol) -> bool | None:
    if value is None or not label:
        return None
    return bool(abs(value / label - 1.0) <= tol)


def fit_one(path: Path, label: dict, budget: float, out_png: Path, options: dict) -> dict:
    from fitting.core.files import atomic_save_png
    from fitting.fit.options import FitOptions
    from fitting.fit.pipeline import fit_reference
    from fitting.output.preview import side_by_side
    opts = FitOptions(budget_s=budget, **options)
    t0 = time.time()
    res = fit_reference(path, opts)
    seconds = time.time() - t0
    accept = set(label.get("accept", []))
    top = [c.material_id for c in res.candidates]
    d_label = label.get("diameter_px")
    measured = res.measured or {}
    fitted = res.fitted or {}
    row = {
        "image": path.name, "imaging_label": label.get("imaging"),
        "imaging": (res.imaging or {}).get("kind"), "imaging_kinds": (res.imaging or {}).get("kinds"),
        "imaging_cue": (res.imaging or {}).get("cue"), "imaging_reason": (res.imaging or {}).get("reason"),
        "imaging_right": label.get("imaging") in ((res.imaging or {}).get("kinds") or []) and
                         res.recipe.material().imaging == label.get("imaging"),
        "result": res.best.material_id, "result_accepted": res.best.material_id in accept,
        "top3": top, "accepted_in_top3": bool(accept & set(top)),
        "result_accepted_by_look": accepted_by_look(res.best.material_id, accept),
        "accepted_by_look_in_top3": any(accepted_by_look(m, accept) for m in top),
        "diameter_label_px": d_label,
        "diameter_measured_px": measured.get("median"), "diameter_fitted_px": fitted.get("median"),
        "measured_within_20": within(measured.get("median"), d_label, 0.20),
        "fitted_within_25": within(fitted.get("median"), d_label, 0.25),
        "count_measured": measured.get("count"), "count_fitted": fitted.get("count"),
        "coverage_measured": measured.get("coverage"), "coverage_fitted": fitted.get("coverage"),
        "distance_initial": res.best.distance_initial, "distance_final": res.best.distance_final,
        "refinement_gained": res.best.gained, "score": res.best.score,
        "working_scale": res.best.scale, "seconds": round(seconds, 1),
        "candidates": [c.summary() for c in res.candidates],
        "ranking": res.ranking[:6],
    }
    # The recipe itself, so that later steps (bench_validate.py) start from this very fit.
    recipe_path = out_png.with_suffix(".recipe.json")
    res.recipe.save(recipe_path)
    row["recipe"] = str(recipe_path.relative_to(ROOT)) if recipe_path.is_relative_to(ROOT) else str(recipe_path)
    if res.reference_field is not None:
        atomic_save_png(out_png, side_by_side(res.reference_field, res.render_field,
                                              labels=(f"reference {path.name}", f"fit: {res.best.material_id}"),
                                              max_width=1600))
        row["side_by_side"] = str(out_png.relative_to(ROOT)) if out_png.is_relative_to(ROOT) else str(out_png)
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    def f(v, fmt=".1f"):
        return "-" if v is None else format(v, fmt)

    def yn(v):
        return "-" if v is None else ("yes" if v else "no")
    n = len(rows)
    lines = [f"# Real micrographs, default settings ({meta['budget_s']:.0f} s budget)", "",
             f"Run {meta['date']} on {meta['machine']}; command: `{meta['command']}`.", "",
             "| image | instrument (cue) | result | accepted (by look) | accepted in top 3 (by look) | label d "
             "| measured d | fitted d | count meas/fit | coverage meas/fit | distance | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['image']} | {r['imaging'] or '/'.join(r['imaging_kinds'] or [])} ({r['imaging_cue']}) | {r['result']} "
            f"| {yn(r['result_accepted'])} ({yn(r.get('result_accepted_by_look'))}) "
            f"| {yn(r['accepted_in_top3'])} ({yn(r.get('accepted_by_look_in_top3'))}) | {f(r['diameter_label_px'])} "
            f"| {f(r['diameter_measured_px'])} ({yn(r['measured_within_20'])}) "
            f"| {f(r['diameter_fitted_px'])} ({yn(r['fitted_within_25'])}) "
            f"| {r['count_measured']}/{r['count_fitted']} | {f(r['coverage_measured'], '.2f')}/{f(r['coverage_fitted'], '.2f')} "
            f"| {f(r['distance_initial'], '.3f')} -> {f(r['distance_final'], '.3f')} | {f(r['seconds'], '.0f')} |")
    s = meta["summary"]
    lines += ["", f"Summary over {n} images: imaging kind right {s['imaging_right']}/{n}; result accepted "
              f"{s['result_accepted']}/{n}; accepted material in the top 3 {s['accepted_in_top3']}/{n}; measured "
              f"diameter within 20 % {s['measured_within_20']}/{n}; fitted diameter within 25 % "
              f"{s['fitted_within_25']}/{n}.",
              "", f"Counting a newer material of the same look as accepted (`SAME_LOOK` in `bench_real.py`): "
              f"result accepted {s.get('result_accepted_by_look', '-')}/{n}, in the top 3 "
              f"{s.get('accepted_by_look_in_top3', '-')}/{n}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=120.0)
    ap.add_argument("--images", help="substring filter on file names (comma-separated: any of them)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "real.json"))
    ap.add_argument("--png-dir", default=str(ROOT / "benchmarks" / "results" / "fits_real"))
    ap.add_argument("--no-measure", action="store_true", help="texture descriptor alone (the old fit)")
    ap.add_argument("--structure-weight", type=float)
    ap.add_argument("--appearance-weight", type=float, help="FitOptions.appearance_weight (0: no ring-profile term)")
    args = ap.parse_args(argv)
    from fitting.core.runtime import init_mitsuba
    info = init_mitsuba("auto")
    labels = json.loads((REFERENCE_DIR / "labels.json").read_text())["images"]
    wanted = [w for w in (args.images or "").split(",") if w]
    names = [n for n in labels if not wanted or any(w in n for w in wanted)]
    options = {"measure": not args.no_measure}
    if args.structure_weight is not None:
        options["structure_weight"] = args.structure_weight
    if args.appearance_weight is not None:
        options["appearance_weight"] = args.appearance_weight
    rows = []
    for name in names:
        print(f"--- {name}", flush=True)
        row = fit_one(REFERENCE_DIR / name, labels[name], args.budget,
                      Path(args.png_dir) / (Path(name).stem + ".png"), options)
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("result", "result_accepted", "accepted_in_top3", "imaging_kinds",
                                              "diameter_label_px", "diameter_measured_px", "diameter_fitted_px",
                                              "seconds")}), flush=True)
    summary = {k: sum(bool(r[k]) for r in rows) for k in
               ("imaging_right", "result_accepted", "accepted_in_top3", "measured_within_20", "fitted_within_25",
                "result_accepted_by_look", "accepted_by_look_in_top3")}
    summary["images"] = len(rows)
    import platform
    meta = {"budget_s": args.budget, "date": time.strftime("%Y-%m-%d %H:%M"), "options": options,
            "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, {info.variant}",
            "command": "python benchmarks/bench_real.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "summary": summary}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=float))
    out.with_suffix(".md").write_text(markdown(rows, meta))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
