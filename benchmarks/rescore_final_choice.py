"""Rescore the final choice among stored refined candidates with the classifier's probabilities.

Each synthetic benchmark row stores its three refined candidates (score, structure terms);
``classifier_synthetic.json`` (``bench_classifier.py synthetic``) stores the classifier's
probabilities of every target. This replays the final choice -- the kind-of-specimen rule, then
the lowest score -- with each candidate's score multiplied by ``1 + g x -ln p`` for several
weights ``g``, and with a tie-break (the most probable material among the candidates within a
fraction of the best score). Nothing is rendered; measuring and describing the real images
takes about half a minute.

    python benchmarks/rescore_final_choice.py -o benchmarks/results/final_choice_rescored.md

Approximations: the sparse-reference rule (structure first) is not replayed on the synthetic
rows, which do not store whether a reference was sparse (on the real set the fit's own
``is_sparse`` decides, from each image measured as the fit measures it today);
where a row has ``score_own_layout`` (the held-out experiment of run 14), that is the score
used. The real set's section reads ``real_run*.json`` and ``classifier_real.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = {
    "run 12": ["fit_synthetic_run12.json", "fit_synthetic_run12_targets20to39.json"],
    "run 13": ["fit_synthetic_run13.json", "fit_synthetic_run13_targets20to39.json"],
    "run 14 (held-out experiment, own-layout scores)": ["fit_synthetic_run14_heldout.json",
                                                        "fit_synthetic_run14_heldout_targets20to39.json"],
}
sys.path.insert(0, str(ROOT))


def candidates_of(row: dict) -> list:
    """The row's refined candidates as the fit's own :class:`Candidate` objects, scored as the
    final choice saw them before any classifier weight."""
    import numpy as np
    from fitting.fit.results import Candidate
    out = []
    for c in row["candidates"]:
        k = Candidate(c["material"], c["scale"], np.zeros(1), c["distance_initial"],
                      distance_final=c["distance_final"])
        k.structure_terms, k.structure_distance = c["structure_terms"], c["structure_distance"] or 0.0
        k.score = c["score_own_layout"] if c.get("score_own_layout") is not None else c["score"]
        out.append(k)
    return out


def choose_weighed(row: dict, p: dict[str, float] | None, g: float, sparse: bool = False,
                   margin: float | None = None) -> str:
    """The fit's final choice with the classifier's weight ``g`` (``p`` None: the stored scores
    are weighed already) and the kind-of-specimen margin (None: the fit's ``KIND_MARGIN``)."""
    from fitting.fit.pipeline import KIND_MARGIN, choose_result, weigh_by_classifier
    cands = candidates_of(row)
    if p is not None:
        for c in cands:
            weigh_by_classifier(c, p, g)
    return choose_result(cands, sparse=sparse,
                         kind_margin=KIND_MARGIN if margin is None else margin).material_id


def choose_tie_break(row: dict, p: dict[str, float], within: float) -> str:
    """The classifier's most probable material among the candidates of the reference's kind of
    specimen within ``within`` of the best score."""
    from fitting.fit.pipeline import same_kind_of_specimen
    cands = candidates_of(row)
    pool = [c for c in cands if same_kind_of_specimen(c)] or cands
    best = min(c.score for c in pool)
    near = [c for c in pool if c.score <= (1.0 + within) * best]
    return max(near, key=lambda c: p.get(c.material_id, 0.0)).material_id


#: Runs whose scores the classifier did not weigh yet.
REAL_RUNS = ["real_run12.json", "real_run13.json", "real_run14a.json"]
#: Runs whose stored scores are weighed by the classifier (g = 0.3) already.
WEIGHED_RUNS = {"run 14": ["fit_synthetic_run14.json", "fit_synthetic_run14_targets20to39.json"]}
WEIGHED_REAL_RUNS = ["real_run14.json"]
#: Kind-of-specimen margins replayed at g = 0.3 (inf: the rule overrides any score).
MARGINS = (math.inf, 3.0, 2.0, 1.5, 1.25, 1.0)


def real_set() -> dict | None:
    """What the real-set replays need: the labels, the classifier's probabilities
    (classifier_real.json) and, per image, its structure targets measured as the fit measures
    them today (``prepare_target``: measurement and descriptor, nothing rendered), from which
    :func:`is_sparse_row` decides the sparse rule as the fit does. None when a file is missing."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_real import REFERENCE_DIR
    from fitting.fit.options import FitOptions
    from fitting.fit.pipeline import prepare_target
    from fitting.materials.library import load_library
    from fitting.reference.loading import load_reference
    labels_path = REFERENCE_DIR / "labels.json"
    if not labels_path.exists() or not (RESULTS / "classifier_real.json").exists():
        return None
    labels = json.loads(labels_path.read_text())["images"]
    lib, opts = load_library(), FitOptions()
    structures = {name: prepare_target(load_reference(REFERENCE_DIR / name), opts, lib).structures
                  for name in labels if (REFERENCE_DIR / name).exists()}
    probs = {r["target"]: r["probabilities"]
             for r in json.loads((RESULTS / "classifier_real.json").read_text())["rows"]}
    return {"labels": labels, "probs": probs, "structures": structures, "size": opts.size}


def is_sparse_row(row: dict, real: dict) -> bool:
    """The fit's sparse rule for a stored real-set row: ``is_sparse`` over its refined
    candidates' working scales."""
    from fitting.fit.pipeline import is_sparse
    structures = real["structures"].get(row["image"])
    return bool(structures) and is_sparse(structures, [c["scale"] for c in row["candidates"]], real["size"])


def real_cells(path: Path, real: dict, settings, weighed: bool = False) -> list[str]:
    """``accepted / accepted by look`` of a stored real run for each ``(g, margin)`` in
    ``settings`` (``weighed``: the stored scores are weighed already)."""
    from bench_real import accepted_by_look
    rows = [r for r in json.loads(path.read_text())["rows"] if weighed or r["image"] in real["probs"]]
    cells = []
    for g, margin in settings:
        strict = look = 0
        for r in rows:
            m = choose_weighed(r, None if weighed else real["probs"][r["image"]], g,
                               sparse=is_sparse_row(r, real), margin=margin)
            accept = set(real["labels"][r["image"]]["accept"])
            strict += m in accept
            look += accepted_by_look(m, accept)
        cells.append(f"{strict} / {look}")
    return cells


def margin_section(probs: dict, real: dict | None) -> list[str]:
    """The kind-of-specimen margin (``choose_result``'s ``kind_margin``) replayed at g = 0.3 on
    the synthetic and real runs; margin 1 turns the rule off."""
    out = ["", "Kind-of-specimen margin at g = 0.3 (the rule: a candidate of the reference's kind beats a "
           "better score only within this factor of it; synthetic: result = true of 40; real: accepted / "
           "by look of 11):", "",
           "| candidates of | " + " | ".join(f"margin {m:g}" for m in MARGINS) + " |",
           "|---|" + "---|" * len(MARGINS)]
    synthetic = {**RUNS, **WEIGHED_RUNS}
    for name, files in synthetic.items():
        rows = [r for f in files if (RESULTS / f).exists()
                for r in json.loads((RESULTS / f).read_text())["rows"]]
        weighed = name in WEIGHED_RUNS
        rows = [r for r in rows if weighed or r["target"] in probs]
        if rows:
            cells = [sum(choose_weighed(r, None if weighed else probs[r["target"]], 0.3, margin=m)
                         == r["material"] for r in rows) for m in MARGINS]
            out.append(f"| {name} | " + " | ".join(map(str, cells)) + " |")
    if real is None:
        return out
    for f in REAL_RUNS + WEIGHED_REAL_RUNS:
        if (RESULTS / f).exists():
            cells = real_cells(RESULTS / f, real, [(0.3, m) for m in MARGINS], weighed=f in WEIGHED_REAL_RUNS)
            out.append(f"| {f} | " + " | ".join(cells) + " |")
    return out


def real_section(weights, real: dict | None) -> list[str]:
    """The same weights on the real set's stored candidates (classifier_real.json), accepted
    results strict and by look; a sparse reference (trackpy, in this set) keeps the sparse rule
    (measured structure first)."""
    if real is None:
        return []
    out = ["", "Real set (accepted / accepted by look, of 11; classifier_real.json):", "",
           "| candidates of | " + " | ".join(f"g = {g:g}" for g in weights) + " |",
           "|---|" + "---|" * len(weights)]
    for f in REAL_RUNS:
        if (RESULTS / f).exists():
            out.append(f"| {f} | " + " | ".join(real_cells(RESULTS / f, real, [(g, None) for g in weights])) + " |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", help="write the table here (Markdown) as well as to stdout")
    args = ap.parse_args(argv)
    from fitting.fit.pipeline import CLASSIFIER_FLOOR
    probs = {r["target"]: r["probabilities"]
             for r in json.loads((RESULTS / "classifier_synthetic.json").read_text())["rows"]}
    weights = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)
    ties = (0.05, 0.1, 0.2, 0.3, 0.5)
    lines = ["# Final choice rescored with the classifier (result = true material, of the targets)", "",
             "Command: `python benchmarks/rescore_final_choice.py`. Score x (1 + g x -ln p), p floored at "
             f"{CLASSIFIER_FLOOR:g} (`weigh_by_classifier`, then the fit's `choose_result`); tie-break: the classifier's most probable material among the candidates within "
             "the given fraction of the best score. The kind-of-specimen rule applies first in both (in the g columns "
             "within the fit's margin, `KIND_MARGIN`; in the tie columns without one).", "",
             "| candidates of | targets | " + " | ".join(f"g = {g:g}" for g in weights) + " | "
             + " | ".join(f"tie {t:g}" for t in ties) + " |",
             "|---|---|" + "---|" * (len(weights) + len(ties))]
    for name, files in RUNS.items():
        rows = []
        for f in files:
            path = RESULTS / f
            if path.exists():
                rows += json.loads(path.read_text())["rows"]
        rows = [r for r in rows if r["target"] in probs]
        if not rows:
            continue
        w = [sum(choose_weighed(r, probs[r["target"]], g) == r["material"] for r in rows)
             for g in weights]
        t = [sum(choose_tie_break(r, probs[r["target"]], x) == r["material"] for r in rows)
             for x in ties]
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(map(str, w)) + " | " + " | ".join(map(str, t)) + " |")
    real = real_set()
    lines += real_section(weights, real)
    lines += margin_section(probs, real)
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
