"""Does a fitted recipe train a detector that measures the real particles? (`matfit validate`)

Two parts, each optional:

* ``held-out``: for every library material (its default parameters, 256 px renders), render a
  set, train the detector, and score it on held-out renders (precision and recall at IoU 0.5,
  geometric-mean diameter against the instance masks'). Answers "can the detector learn this
  material at all?", apart from any fit.
* ``real``: for every labelled real micrograph with a ``diameter_px``, start from the recipe
  that ``bench_real.py`` fitted with default settings (``benchmarks/results/fits_real/*.recipe.json``),
  run ``validate_recipe`` and compare the detected median diameter with the label (±15 %),
  beside the classical measurement's and the fit's. Time per stage is recorded (render, train,
  detect).

    python benchmarks/bench_validate.py real --count 200 --steps 1200
    python benchmarks/bench_validate.py held-out --count 60 --steps 400

Writes ``benchmarks/results/validate_<part>.json`` and ``.md``; detections and histograms in
``benchmarks/results/validate_real/``.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE_DIR = ROOT.parent / "shared" / "reference-images"
RESULTS = ROOT / "benchmarks" / "results"


def within(value, label, tol):
    if value is None or not label:
        return None
    return bool(abs(value / label - 1.0) <= tol)


def settings_from(args):
    from fitting.validate.run import ValidationSettings
    from fitting.validate.training import TrainingSettings
    return ValidationSettings(count=args.count, seed=args.seed, training=TrainingSettings(steps=args.steps))


def run_real(args) -> tuple[list[dict], str]:
    from fitting.validate.run import validate_recipe
    labels = json.loads((REFERENCE_DIR / "labels.json").read_text())["images"]
    rows = []
    # The committed figures belong to the committed results: a run written elsewhere (--out)
    # puts its figures beside its JSON.
    pics = RESULTS / "validate_real" if not args.out else Path(args.out).with_suffix("")
    pics.mkdir(parents=True, exist_ok=True)
    wanted = [w for w in (args.images or "").split(",") if w]
    for name, label in labels.items():
        if wanted and not any(w in name for w in wanted) or not label.get("diameter_px"):
            continue
        recipe = RESULTS / "fits_real" / (Path(name).stem + ".recipe.json")
        if not recipe.is_file():
            print(f"--- {name}: no fitted recipe ({recipe}); run bench_real.py first", flush=True)
            continue
        print(f"--- {name}", flush=True)
        work = Path(tempfile.mkdtemp(prefix="validate-"))
        t0 = time.time()
        try:
            rep = validate_recipe(recipe, REFERENCE_DIR / name, work, settings_from(args))
        finally:
            seconds = time.time() - t0
        stem = Path(name).stem
        shutil.copyfile(work / "detections.png", pics / f"{stem}.detections.png")
        shutil.copyfile(work / "histogram.png", pics / f"{stem}.histogram.png")
        shutil.rmtree(work, ignore_errors=True)
        d, m, f = rep.detected, rep.measured or {}, rep.fitted or {}
        label_d = float(label["diameter_px"])
        row = {"image": name, "material": rep.material, "accepted": rep.material in label.get("accept", []),
               "diameter_label_px": label_d,
               "detected_median_px": d["median"], "detected_count": d["count"], "detected_gsd": d["gsd"],
               "detected_within_15": within(d["median"], label_d, 0.15),
               "measured_median_px": m.get("median"), "measured_within_15": within(m.get("median"), label_d, 0.15),
               "fitted_median_px": f.get("median"), "fitted_within_15": within(f.get("median"), label_d, 0.15),
               "held_out_precision": rep.held_out["precision"], "held_out_recall": rep.held_out["recall"],
               "timings": rep.timings, "seconds": round(seconds, 1),
               "detections_png": f"{pics.name}/{stem}.detections.png"}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("material", "diameter_label_px", "detected_median_px",
                                              "detected_within_15", "held_out_precision", "held_out_recall",
                                              "seconds")}), flush=True)
    return rows, markdown_real(rows, args)


def run_held_out(args) -> tuple[list[dict], str]:
    from fitting.materials.library import load_library
    from fitting.materials.recipe import Recipe
    from fitting.output.bulk import render_dataset
    from fitting.validate.run import held_out_count, held_out_scores
    from fitting.validate.trainset import load_training_set
    from fitting.validate.training import train_detector
    rows = []
    s = settings_from(args)
    for mid, mat in load_library().items():
        if args.materials and mid not in args.materials.split(","):
            continue
        print(f"--- {mid}", flush=True)
        work = Path(tempfile.mkdtemp(prefix="validate-"))
        rec = Recipe.from_vector(mat, mat.default_vector(), render={"size": 256, "spp": 4, "layout_seed": 0})
        t0 = time.time()
        render_dataset(rec, work / "renders", s.count, seed=s.seed, instances="primary")
        images, labels, disks = load_training_set(work / "renders", list(range(s.count)))
        t1 = time.time()
        n_held = held_out_count(s)
        det = train_detector(images[:-n_held], labels[:-n_held], s.training, disks=disks[:-n_held])
        t2 = time.time()
        h = held_out_scores(det, images[-n_held:], labels[-n_held:])
        t3 = time.time()
        shutil.rmtree(work, ignore_errors=True)
        rows.append({"material": mid, "geometry": mat.geometry_kind, **h,
                     "timings": {"render": t1 - t0, "train": t2 - t1, "detect": t3 - t2},
                     "seconds": round(t3 - t0, 1)})
        print(json.dumps({k: rows[-1][k] for k in ("material", "precision", "recall", "gmean_error", "seconds")}),
              flush=True)
    return rows, markdown_held_out(rows, args)


def _f(v, fmt=".2f"):
    return "-" if v is None else format(v, fmt)


def _yn(v):
    return "-" if v is None else ("yes" if v else "no")


def markdown_real(rows, args) -> str:
    n = len(rows)
    lines = [f"# `matfit validate` on the labelled real micrographs ({args.count} renders, {args.steps} steps)", "",
             _meta_line(args), "",
             "| image | recipe material (accepted) | label d | detected median (±15 %) | classical (±15 %) "
             "| fit (±15 %) | detected count, GSD | held-out P / R | render / train / detect s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["timings"]
        lines.append(f"| {r['image']} | {r['material']} ({_yn(r['accepted'])}) | {_f(r['diameter_label_px'], '.1f')} "
                     f"| {_f(r['detected_median_px'], '.1f')} ({_yn(r['detected_within_15'])}) "
                     f"| {_f(r['measured_median_px'], '.1f')} ({_yn(r['measured_within_15'])}) "
                     f"| {_f(r['fitted_median_px'], '.1f')} ({_yn(r['fitted_within_15'])}) "
                     f"| {r['detected_count']}, {_f(r['detected_gsd'])} "
                     f"| {_f(r['held_out_precision'])} / {_f(r['held_out_recall'])} "
                     f"| {t.get('render', 0):.0f} / {t.get('train', 0):.0f} / {t.get('detect', 0):.0f} |")
    k = sum(bool(r["detected_within_15"]) for r in rows)
    km = sum(bool(r["measured_within_15"]) for r in rows)
    kf = sum(bool(r["fitted_within_15"]) for r in rows)
    lines += ["", f"Detected median diameter within ±15 % of the label: **{k}/{n}** (classical measurement "
              f"{km}/{n}, fit {kf}/{n}, same tolerance).", ""]
    return "\n".join(lines)


def markdown_held_out(rows, args) -> str:
    lines = [f"# Detector on held-out renders of each material ({args.count} renders, {args.steps} steps)", "",
             _meta_line(args), "",
             "| material | geometry | precision | recall | gmean error | render / train / detect s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        t = r["timings"]
        lines.append(f"| {r['material']} | {r['geometry']} | {_f(r['precision'])} | {_f(r['recall'])} "
                     f"| {_f(None if r['gmean_error'] is None else 100 * r['gmean_error'], '+.0f')} % "
                     f"| {t.get('render', 0):.0f} / {t.get('train', 0):.0f} / {t.get('detect', 0):.0f} |")
    ok = sum(r["precision"] >= 0.9 and r["recall"] >= 0.9 for r in rows)
    lines += ["", f"Precision and recall both ≥ 0.9: {ok}/{len(rows)} materials.", ""]
    return "\n".join(lines)


def _meta_line(args) -> str:
    import os
    return (f"Run {time.strftime('%Y-%m-%d %H:%M')} on {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores; command: `python benchmarks/bench_validate.py {' '.join(sys.argv[1:])}`.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("real", "held-out"))
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", help="real: substring filter on file names (comma-separated: any of them)")
    ap.add_argument("--materials", help="held-out: comma-separated material ids")
    ap.add_argument("--out", help="JSON to write (default benchmarks/results/validate_<part>.json)")
    args = ap.parse_args(argv)
    rows, md = run_real(args) if args.part == "real" else run_held_out(args)
    out = Path(args.out) if args.out else RESULTS / f"validate_{args.part.replace('-', '_')}.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "count": args.count, "steps": args.steps,
                               "rows": rows}, indent=1, default=float))
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
