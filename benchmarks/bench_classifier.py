"""The material classifier alone: does it name the right material for a target?

No rendering of candidates, no refinement: each target is measured and described the way a fit
does it (``prepare_target``: working scales from the measured particle size), and the library's
classifier (``material_library/classifier.pt``, `matfit train --classifier`) gives its
probabilities, restricted to the candidate materials as in a fit.

* ``synthetic``: the synthetic benchmark's targets (target i renders material i mod 17 with
  random parameters at 512 px, the seeds of ``bench_fit.py synthetic``); right = the material
  that rendered it.
* ``real``: the labelled real micrographs (``../shared/reference-images/labels.json``);
  right = a material the label accepts (and, separately, one of the same look, as in
  ``bench_real.py``).

    python benchmarks/bench_classifier.py synthetic --count 40
    python benchmarks/bench_classifier.py real

Writes ``benchmarks/results/classifier_<part>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
REFERENCE_DIR = ROOT.parent / "shared" / "reference-images"
RESULTS = ROOT / "benchmarks" / "results"


def classify_path(path: Path, lib: dict, clf, seed: int = 0) -> tuple[dict, list[int]]:
    from fitting.fit.classifier import classify_reference
    from fitting.fit.options import FitOptions
    from fitting.fit.pipeline import prepare_target
    from fitting.reference.loading import load_reference
    prep = prepare_target(load_reference(path), FitOptions(seed=seed), lib)
    p = classify_reference(clf, [prep.target.by_scale[s]["descriptor"] for s in prep.target.scales],
                           list(prep.library))
    return p, list(prep.target.scales)


def rank_of(order: list[str], accepted: set[str]) -> int | None:
    ranks = [order.index(m) + 1 for m in accepted if m in order]
    return min(ranks) if ranks else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("synthetic", "real"))
    ap.add_argument("--count", type=int, default=40, help="synthetic targets")
    args = ap.parse_args(argv)
    from bench_rank import make_target
    from bench_real import SAME_LOOK
    from fitting.core.runtime import init_mitsuba
    from fitting.fit.classifier import load_classifier
    from fitting.materials.library import library_dir, load_library
    init_mitsuba("cpu")
    lib = load_library()
    clf = load_classifier(lib, library_dir(), on_warning=print)
    if clf is None:
        print("no current material classifier: run `matfit train --classifier`", file=sys.stderr)
        return 2
    rows = []
    t_all = time.time()
    if args.part == "synthetic":
        folder = Path(tempfile.mkdtemp(prefix="classifier-targets-"))
        jobs = [make_target(lib, i, folder) + (i,) for i in range(args.count)]
    else:
        labels = json.loads((REFERENCE_DIR / "labels.json").read_text())["images"]
        jobs = [(None, REFERENCE_DIR / name, name) for name in labels]
    for mid, path, key in jobs:
        t0 = time.time()
        p, scales = classify_path(path, lib, clf, seed=key if isinstance(key, int) else 0)
        order = list(p)
        if args.part == "synthetic":
            accepted, same = {mid}, {mid}
        else:
            accepted = set(labels[key].get("accept", []))
            same = accepted | {m for m, looks in SAME_LOOK.items() if accepted & set(looks)}
        row = {"target": path.name, "material": mid, "accepted": sorted(accepted), "scales": scales,
               "top3": [[m, round(p[m], 4)] for m in order[:3]], "rank": rank_of(order, accepted),
               "probabilities": {m: round(v, 5) for m, v in p.items()},
               "rank_same_look": rank_of(order, same), "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(f"{path.name:<48} rank {row['rank']}  " + ", ".join(f"{m} {v:.2f}" for m, v in row["top3"]), flush=True)

    def share(key: str, k: int) -> int:
        return sum(1 for r in rows if r[key] is not None and r[key] <= k)
    summary = {"targets": len(rows), "top1": share("rank", 1), "top3": share("rank", 3),
               "top1_same_look": share("rank_same_look", 1), "top3_same_look": share("rank_same_look", 3),
               "seconds": round(time.time() - t_all, 1), "classifier": {k: clf.meta.get(k) for k in
                                                                         ("samples", "heldout_top1", "heldout_top3")}}
    cmd = "python benchmarks/bench_classifier.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {"command": cmd, "machine": f"{platform.machine()}, {platform.python_version()}", "summary": summary,
           "rows": rows}
    from fitting.core.files import atomic_write_text
    atomic_write_text(RESULTS / f"classifier_{args.part}.json", json.dumps(out, indent=1) + "\n")
    lines = [f"# Material classifier alone, {args.part} targets", "",
             f"Run {time.strftime('%Y-%m-%d %H:%M')}; command: `{cmd}`. Classifier: held-out top 1 "
             f"{clf.meta['heldout_top1']:.3f}, top 3 {clf.meta['heldout_top3']:.3f} on its own training renders "
             f"({sum(clf.meta['samples'].values())} samples).", "",
             "| target | right material | rank | classifier's top 3 |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {', '.join(r['accepted'])} | {r['rank']} | "
                     + ", ".join(f"{m} {v:.2f}" for m, v in r["top3"]) + " |")
    lines += ["", f"Right material first on {summary['top1']}/{len(rows)}, in the top 3 on {summary['top3']}/{len(rows)}"
              f" (counting a material of the same look: {summary['top1_same_look']} and {summary['top3_same_look']})."]
    atomic_write_text(RESULTS / f"classifier_{args.part}.md", "\n".join(lines) + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
