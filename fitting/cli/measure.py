"""`matfit measure`: a technician's particle size distribution of a micrograph, without a fit."""
from __future__ import annotations

import json
import sys


def measure_image(path: str, *, imaging: str = "auto", pixel_size_nm: float | None = None,
                  polarity: str = "auto") -> tuple[dict, object, object]:
    """Measure a micrograph's particles. Returns (JSON-ready summary, reference, measurement).

    The summary holds ``count``, ``diameter_px`` {median, gmean, gsd}, ``coverage``, ``shape``,
    ``polarity``, ``imaging`` (kind and the cue that decided), ``pixel_size_nm`` (typed, else
    from the file's tags, else null) and ``diameter_nm`` when the pixel size is known.
    """
    from fitting.measure.instrument import guess_imaging_of
    from fitting.measure.particles import measure_particles
    from fitting.reference.loading import load_reference
    ref = load_reference(path)
    m = measure_particles(ref.cropped, ref.cropped_mask, polarity=polarity)
    px = pixel_size_nm if pixel_size_nm is not None else ref.pixel_size_nm
    guess = guess_imaging_of(ref, m, imaging)
    d = m.to_dict(pixel_size_nm=px)
    d.pop("diagnostics", None)
    summary = {"image": str(path), **d, "imaging": guess.to_dict(),
               "pixel_size_nm": None if px is None else float(px),
               "pixel_size_source": ("user" if pixel_size_nm is not None else
                                     "file tags" if ref.pixel_size_nm is not None else None),
               "region": {"crop_box": [int(v) for v in ref.crop_box], "data_bar": bool(ref.bar_detected),
                          "aperture": ref.valid_mask is not None}}
    if px is None:
        summary["diameter_nm"] = None
    return summary, ref, m


def cmd_measure(args) -> int:
    summary, ref, m = measure_image(args.image, imaging=args.imaging, pixel_size_nm=args.pixel_size,
                                    polarity=args.polarity)
    if args.overlay:
        from fitting.core.files import atomic_save_png
        from fitting.measure.overlay import overlay_outlines
        rgb = overlay_outlines(ref.cropped, m.labels, valid=ref.cropped_mask, thickness=2)
        atomic_save_png(args.overlay, rgb)
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return 0
    d = summary["diameter_px"]

    def f(v, fmt=".1f"):
        return "?" if v is None else format(v, fmt)
    print(f"{summary['count']} particles ({summary['polarity']} on the background, {summary['shape'].get('class')})")
    print(f"diameter: median {f(d['median'])} px, geometric mean {f(d['gmean'])} px, GSD {f(d['gsd'], '.2f')}"
          + (f"  ({f(summary['diameter_nm']['gmean'])} nm geometric mean)" if summary.get("diameter_nm") else ""))
    print(f"coverage: {summary['coverage']:.3f}")
    print(f"instrument: {summary['imaging']['reason']}")
    print("confidence: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["confidence"].items()))
    if args.overlay:
        print(f"outlines written to {args.overlay}", file=sys.stderr)
    return 0


def register(sub) -> None:
    m = sub.add_parser("measure", help="measure particle count, size distribution, coverage and shape (no fit)")
    m.add_argument("image")
    m.add_argument("--json", action="store_true", help="print the measurement as JSON")
    m.add_argument("--overlay", metavar="PNG", help="write the measured particles outlined on the image")
    m.add_argument("--pixel-size", type=float, metavar="NM", help="pixel size in nm (default: from the file's tags)")
    m.add_argument("--imaging", choices=("auto", "sem", "tem", "optical"), default="auto")
    m.add_argument("--polarity", choices=("auto", "bright", "dark", "outline"), default="auto",
                   help="particles brighter or darker than the background, or ring outlines (default auto)")
    m.set_defaults(func=cmd_measure)
