"""Candidate ranking alone on synthetic targets: is the true material among the top 3?

The same targets as ``bench_fit.py synthetic`` (target i renders material i mod 11 with random
parameters at 512 px), but only the stages before refinement run: measure, instrument,
describe, rank. A ranking takes 15-25 s where a whole fit takes 50-120 s, so weights and
ranking variants can be compared on many targets. Every ranking entry (descriptor distance,
its scale baseline, each structure term) is written out, so that other weightings of the same
entries can be scored offline with ``--rescore``.

With ``--real`` the targets are the labelled real micrographs (``../shared/reference-images``,
default 120 s budget): "true" is then any material the label accepts.

    .venv/bin/python benchmarks/bench_rank.py [--count 30] [--budget 50] [--no-measure] [--out NAME]
    .venv/bin/python benchmarks/bench_rank.py --real [--budget 120]
    .venv/bin/python benchmarks/bench_rank.py --rescore benchmarks/results/rank_synthetic.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def target_recipe(lib: dict, i: int) -> tuple[str, np.ndarray]:
    """Material id and true parameters of target i of the synthetic benchmark (same seeds as
    bench_fit.py)."""
    ids = sorted(lib)
    mid = ids[i % len(ids)]
    return mid, lib[mid].random_vector(np.random.default_rng(1000 + i))


def make_target(lib: dict, i: int, folder: Path) -> tuple[str, Path]:
    """Target i of the synthetic benchmark (same seeds as bench_fit.py)."""
    from fitting.core.files import atomic_save_png
    from fitting.materials.scene import MaterialScene, RenderSettings
    mid, x_true = target_recipe(lib, i)
    mat = lib[mid]
    img = MaterialScene(mat, RenderSettings(size=512, spp=8, layout_seed=50_000 + i)).render_numpy(
        x_true, seed=70_000 + i)
    path = folder / f"target_{i:02d}_{mid}.png"
    atomic_save_png(path, img)
    return mid, path


def entry_row(e: dict) -> dict:
    keep = ("material", "scale", "start", "source", "descriptor_distance", "scale_baseline", "structure_distance",
            "distance")
    row = {k: (round(e[k], 5) if isinstance(e.get(k), float) else e.get(k)) for k in keep}
    row["structure_terms"] = {k: round(v, 3) for k, v in (e.get("structure_terms") or {}).items()}
    return row


def rank_target(path: Path, seed: int, budget: float, measure: bool) -> dict:
    from fitting.core.events import CancelToken, null_sink
    from fitting.fit.candidates import rank_materials
    from fitting.fit.options import FitOptions
    from fitting.fit.pipeline import prepare_target
    from fitting.materials.library import load_library
    from fitting.materials.scene import MaterialScene, RenderSettings
    from fitting.reference.loading import load_reference

    opts = FitOptions(budget_s=budget, seed=seed, measure=measure)
    t0 = time.time()
    ref = load_reference(path)
    prepared = prepare_target(ref, opts, load_library())
    lib = prepared.library
    scenes = {mid: MaterialScene(mat, RenderSettings(size=opts.size, spp=opts.spp, layout_seed=opts.seed))
              for mid, mat in lib.items()}
    entries: list[dict] = []       # every entry, not only each material's best: --rescore needs them
    ranking = rank_materials(lib, scenes, prepared.target, prepared.descriptor, opts, null_sink, CancelToken(),
                             search_deadline=t0 + 0.40 * opts.budget_s, structures=prepared.structures,
                             all_entries=entries)
    m = prepared.measurement
    return {"seconds": round(time.time() - t0, 1), "imaging": prepared.guess.to_dict(),
            "scales": prepared.target.scales,
            "measured": None if m is None else {"median_px": m.median_px, "coverage": m.coverage,
                                                "polarity": m.polarity, "shape": m.shape.get("class"),
                                                "ringed": m.diagnostics.get("ringed"),
                                                "confidence": {k: round(float(v), 3) for k, v in m.confidence.items()}},
            "ranking": [r["material"] for r in ranking],
            "entries": [entry_row(e) for e in entries]}


def rank_of(order: list[str], accepted: list[str], missing: int = 99) -> int:
    """1-based rank of the first accepted material in ``order``."""
    ranks = [order.index(m) + 1 for m in accepted if m in order]
    return min(ranks) if ranks else missing


def rescore(rows: list[dict], structure_weight: float, floor: float | None = None) -> dict:
    """Top-1 / top-3 of the true material when each entry is scored with another structure
    weight and confidence floor (None: the weights the run used, without confidences)."""
    from fitting.fit.structure import STRUCTURE_TERMS, confidence_weights
    top1 = top3 = 0
    for r in rows:
        conf = (r.get("measured") or {}).get("confidence")
        weights = STRUCTURE_TERMS if floor is None or conf is None else confidence_weights(conf, floor)
        best: dict[str, float] = {}
        for e in r["entries"]:
            s = sum(weights.get(k, 0.0) * v for k, v in e["structure_terms"].items())
            score = e["descriptor_distance"] / (e["scale_baseline"] or 1.0) * (1.0 + structure_weight * s)
            best[e["material"]] = min(best.get(e["material"], math.inf), score)
        order = sorted(best, key=best.get)
        rank = rank_of(order, r.get("accepted") or [r["material"]])
        top1 += rank == 1
        top3 += rank <= 3
    return {"top1": top1 / len(rows), "top3": top3 / len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=30)
    ap.add_argument("--only", default=None, help="comma-separated target indices (synthetic) or name parts (real)")
    ap.add_argument("--budget", type=float, default=None,
                    help="the fit budget whose 40 %% the ranking may use (default 50 s synthetic, 120 s real)")
    ap.add_argument("--real", action="store_true", help="rank the labelled real micrographs instead")
    ap.add_argument("--no-measure", action="store_true", help="descriptor-only ranking (fixed scales)")
    ap.add_argument("--out", default=None, help="result file name in benchmarks/results/")
    ap.add_argument("--rescore", type=Path, default=None, help="score a result file's entries with other weights")
    args = ap.parse_args()
    if args.rescore:
        rows = json.loads(args.rescore.read_text())["rows"]
        for floor in (None, 0.0, 0.25, 0.5):
            for sw in (0.0, 0.25, 0.5, 1.0, 2.0):
                print(f"confidence floor {floor} structure_weight {sw}: {rescore(rows, sw, floor)}")
        return
    from fitting.core.runtime import init_mitsuba, runtime_info
    from fitting.materials.library import load_library
    init_mitsuba()
    lib = load_library()
    budget = args.budget or (120.0 if args.real else 50.0)
    rows = []
    if args.real:
        refs = ROOT.parent / "shared" / "reference-images"
        labels = json.loads((refs / "labels.json").read_text())["images"]
        jobs = [(name, refs / name, label.get("accept", []), 0, None) for name, label in labels.items()
                if not args.only or any(part in name for part in args.only.split(","))]
    else:
        folder = RESULTS / "synthetic_targets"
        folder.mkdir(parents=True, exist_ok=True)
        jobs = []
        for i in range(args.count):
            if args.only and str(i) not in args.only.split(","):
                continue
            mid, path = make_target(lib, i, folder)
            jobs.append((path.name, path, [mid], i, path))
    for name, path, accepted, seed, temporary in jobs:
        row = {"target": name, "material": accepted[0] if len(accepted) == 1 else None, "accepted": accepted,
               **rank_target(path, seed, budget, not args.no_measure)}
        if temporary is not None:
            temporary.unlink()
        row["rank_of_true"] = rank_of(row["ranking"], accepted, len(lib) + 1)
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("target", "rank_of_true", "seconds")} |
                         {"top3": row["ranking"][:3], "imaging": row["imaging"]["cue"]}), flush=True)
    n = len(rows)
    info = runtime_info()
    summary = {"targets": n, "true_material_top1": sum(r["rank_of_true"] == 1 for r in rows) / n,
               "true_material_top3": sum(r["rank_of_true"] <= 3 for r in rows) / n,
               "seconds_mean": round(sum(r["seconds"] for r in rows) / n, 1)}
    out = {"command": "python benchmarks/bench_rank.py " + " ".join(sys.argv[1:]), "budget_s": budget,
           "measure": not args.no_measure, "summary": summary, "rows": rows,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "variant": info.variant if info else None}}
    name = args.out or ("rank_" + ("real" if args.real else "synthetic") + ("_no_measure" if args.no_measure else "")
                        + ".json")
    from fitting.core.files import atomic_write_text
    atomic_write_text(RESULTS / name, json.dumps(out, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
