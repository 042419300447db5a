"""Evaluation table of the shipped predictors, from each material's predictor.json.

    .venv/bin/python benchmarks/predictor_table.py   ->  benchmarks/results/predictors.md

Held-out normalised mean absolute error per parameter group (parameters normalised to
[0, 1]), against predicting the training mean. Lower is better; a ratio below 1 means the
network learned something from the descriptor.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from fitting.materials.library import load_library
    from fitting.fit.predictor import predictor_status
    groups = ("surface", "geometry", "lighting", "imaging")
    lines = ["# Predictor evaluation (held-out split)", "",
             "Normalised MAE of the network / of predicting the mean; `ratio` = network / mean.", "",
             "| material | status | samples | backbone | " + " | ".join(groups) + " | all (ratio) |",
             "|---|---|---|---|" + "---|" * len(groups) + "---|"]
    best_params = []
    for mid, mat in load_library().items():
        meta_path = mat.folder / "predictor.json"
        if not meta_path.exists():
            lines.append(f"| {mid} | missing | | | " + " | ".join("" for _ in groups) + " | |")
            continue
        m = json.loads(meta_path.read_text())
        cells = []
        for g in groups:
            pg = m["per_group"].get(g)
            cells.append(f"{pg['mae']:.3f} / {pg['mean_baseline']:.3f}" if pg else "")
        ratio = m["heldout_mae"] / m["heldout_mean_baseline"]
        lines.append(f"| {mid} | {predictor_status(mat)} | {m['samples']} | {m['backbone']} | " + " | ".join(cells)
                     + f" | {m['heldout_mae']:.3f} / {m['heldout_mean_baseline']:.3f} ({ratio:.2f}) |")
        for name, p in m["per_parameter"].items():
            if p["mean_baseline"] > 0:
                best_params.append((p["mae"] / p["mean_baseline"], mid, name))
    best_params.sort()
    lines += ["", "Best-predicted parameters (MAE / mean-predictor MAE):", ""]
    lines += [f"- {mid}.{name}: {r:.2f}" for r, mid, name in best_params[:12]]
    lines += ["", "Worst-predicted parameters:", ""]
    lines += [f"- {mid}.{name}: {r:.2f}" for r, mid, name in best_params[-8:]]
    out = Path(__file__).parent / "results" / "predictors.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
