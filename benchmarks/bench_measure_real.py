"""Classical particle measurement (fitting.measure) on the real reference micrographs.

For every image in labels.json: load it with Pillow as gray float in [0, 1], build the
valid mask with ``valid_region`` (data bar, round-aperture surround), run
``measure_particles`` and compare the measured median diameter with the labelled typical
diameter (``diameter_px``, original pixels). Nothing here depends on the file names.

    .venv/bin/python benchmarks/bench_measure_real.py \
        [--images ../shared/reference-images] [--out benchmarks/results/measure_real.json] \
        [--overlays /tmp/measure_overlays]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitting.measure import measure_particles, valid_region  # noqa: E402
from fitting.measure.overlay import overlay_outlines  # noqa: E402

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "reference-images"


def load_gray(path: Path) -> np.ndarray:
    """Any Pillow image (8/16-bit, palette, RGB(A)) as gray float32 in [0, 1]."""
    im = Image.open(path)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / max(hi - lo, 1e-9)
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default=str(DEFAULT_IMAGES),
                    help="folder with the micrographs and labels.json")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "measure_real.json"))
    ap.add_argument("--overlays", default="/tmp/measure_overlays",
                    help="folder for outline overlays (empty string: none)")
    ap.add_argument("--tolerance", type=float, default=0.2, help="relative tolerance")
    args = ap.parse_args()

    folder = Path(args.images)
    labels = json.loads((folder / "labels.json").read_text())["images"]
    if args.overlays:
        os.makedirs(args.overlays, exist_ok=True)
    rows = {}
    for name in sorted(labels):
        lab = labels[name]
        gray = load_gray(folder / name)
        t0 = time.perf_counter()
        valid = valid_region(gray)
        t1 = time.perf_counter()
        m = measure_particles(gray, valid)
        t2 = time.perf_counter()
        d_lab = float(lab["diameter_px"])
        ratio = None if m.median_px is None else float(m.median_px) / d_lab
        within = ratio is not None and abs(ratio - 1.0) <= args.tolerance
        rows[name] = {
            "imaging": lab.get("imaging"),
            "shape_hw": list(gray.shape),
            "valid_fraction": float(valid.mean()),
            "polarity": m.polarity,
            "method": m.method,
            "count": m.count,
            "n_measured": m.diagnostics.get("n_measured"),
            "median_px": m.median_px,
            "gmean_px": m.gmean_px,
            "gsd": m.gsd,
            "coverage": m.coverage,
            "shape_class": m.shape["class"],
            "shape": m.to_dict()["shape"],
            "confidence": m.to_dict()["confidence"],
            "diagnostics": m.to_dict()["diagnostics"],
            "label_diameter_px": d_lab,
            "ratio": ratio,
            "within20": bool(within),
            "seconds": t2 - t1,
            "seconds_valid_region": t1 - t0,
        }
        print(f"{name[:44]:44s} {m.polarity:7s} {m.method:12s} n={m.count:4d} "
              f"med={m.median_px or 0:7.1f} label={d_lab:6.1f} ratio={ratio or 0:5.2f} "
              f"{'ok ' if within else 'BAD'} cov={m.coverage:.2f} {str(m.shape['class']):9s} "
              f"{t2 - t1:5.2f}s", flush=True)
        if args.overlays:
            rgb = overlay_outlines(gray, m.labels, valid=valid,
                                   thickness=max(1, int(round(max(gray.shape) / 1000))))
            Image.fromarray(rgb).save(Path(args.overlays) / (Path(name).stem + ".png"))
    n_ok = sum(r["within20"] for r in rows.values())
    summary = {
        "images": len(rows),
        "within_tolerance": n_ok,
        "fraction_within": n_ok / max(len(rows), 1),
        "tolerance": args.tolerance,
        "max_seconds": max(r["seconds"] for r in rows.values()),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count()},
    }
    print(f"within +-{args.tolerance:.0%}: {n_ok}/{len(rows)}; "
          f"slowest {summary['max_seconds']:.2f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "images": rows}, indent=1))


if __name__ == "__main__":
    main()
