"""Per-image comparison of two runs of ``bench_real.py``: result material, accepted or not,
fitted diameter against the label, distance and time, before and after a change.

    .venv/bin/python benchmarks/compare_real.py benchmarks/results/real_run6.json \
        benchmarks/results/real.json -o benchmarks/results/real_compare.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_real import SAME_LOOK, accepted_by_look  # noqa: E402


def load_rows(path: Path) -> dict[str, dict]:
    return {r["image"]: r for r in json.loads(path.read_text())["rows"]}


def labels() -> dict:
    from bench_real import REFERENCE_DIR
    return json.loads((REFERENCE_DIR / "labels.json").read_text())["images"]


def cell(r: dict | None, accept: set[str]) -> str:
    if r is None:
        return "- | - | - | -"
    d, lab = r.get("diameter_fitted_px"), r.get("diameter_label_px")
    ok = "yes" if r["result"] in accept else ("by look" if accepted_by_look(r["result"], accept) else "no")
    size = "-" if d is None else f"{d:.1f}" + (f" ({d / lab:.2f}x)" if lab else "")
    return f"{r['result']} | {ok} | {size} | {r['distance_final']:.3f}"


def compare(before: Path, after: Path) -> str:
    a, b = load_rows(before), load_rows(after)
    lab = labels()
    lines = [f"# Real set before / after: `{before.name}` -> `{after.name}`", "",
             "Accepted: the image's `accept` list names the result; by look: a newer material of the same "
             "look (`SAME_LOOK` in `bench_real.py`: " + ", ".join(f"{k} ~ {'/'.join(v)}" for k, v in SAME_LOOK.items())
             + "). Size: fitted median diameter (x label).", "",
             "| image | before: result | accepted | size | distance | after: result | accepted | size | distance |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(set(a) | set(b)):
        accept = set(lab.get(name, {}).get("accept", []))
        lines.append(f"| {name} | {cell(a.get(name), accept)} | {cell(b.get(name), accept)} |")
    for tag, rows in (("before", a), ("after", b)):
        n = len(rows)
        strict = sum(r["result"] in set(lab.get(k, {}).get("accept", [])) for k, r in rows.items())
        look = sum(accepted_by_look(r["result"], set(lab.get(k, {}).get("accept", []))) for k, r in rows.items())
        fitted = sum(bool(r.get("fitted_within_25")) for r in rows.values())
        secs = max(r["seconds"] for r in rows.values())
        lines.append(f"\n{tag}: result accepted {strict}/{n} ({look}/{n} by look), fitted diameter within 25 % "
                     f"{fitted}/{n}, longest fit {secs:.0f} s.")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("-o", "--out", type=Path)
    args = ap.parse_args()
    text = compare(args.before, args.after)
    if args.out:
        from fitting.core.files import atomic_write_text
        atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
