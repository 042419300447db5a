"""`matfit validate`: does the recipe train a detector that finds the reference's particles?"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from fitting.core.events import CancelToken


def cmd_validate(args) -> int:
    from fitting.cli.progress import EventProgress
    from fitting.materials.recipe import Recipe
    from fitting.validate.run import ValidationSettings, validate_recipe
    from fitting.validate.training import TrainingSettings
    recipe = Recipe.load(args.recipe)           # a bad path fails here, before anything starts
    out = args.output or str(Path(args.recipe).with_suffix("")) + "-validation"
    settings = ValidationSettings(count=args.count, size=args.size, seed=args.seed, workers=args.workers,
                                  training=TrainingSettings(steps=args.steps))
    cancel = CancelToken()

    def on_sigint(signum, frame):
        cancel.cancel()
        print("\nmatfit: stopping (Ctrl-C again to abort); run the same command again to resume",
              file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        report = validate_recipe(recipe, args.reference, out, settings, annotations=args.annotations,
                                 on_event=None if args.quiet else EventProgress("validate"), cancel=cancel)
    finally:
        signal.signal(signal.SIGINT, old)
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        return 0
    print(_text(report))
    return 0


def _text(r) -> str:
    def f(v, fmt=".1f"):
        return "?" if v is None else format(v, fmt)
    h, d = r.held_out, r.detected
    lines = [f"detector trained on {r.training['train_images']} renders of {r.material} "
             f"({r.training['steps']} steps, {f(r.training.get('seconds'), '.0f')} s)",
             f"held-out renders ({h['images']}): precision {h['precision']:.2f}, recall {h['recall']:.2f} at IoU 0.5",
             f"reference: {d['count']} particles measured ({d['instances']} found), median {f(d['median'])} px, "
             f"geometric mean {f(d['gmean'])} px, GSD {f(d['gsd'], '.2f')}"]
    for name, dist in (("classical measurement", r.measured), ("fit", r.fitted)):
        if dist:
            lines.append(f"{name}: median {f(dist.get('median'))} px, geometric mean {f(dist.get('gmean'))} px, "
                         f"GSD {f(dist.get('gsd'), '.2f')}")
    if r.annotations:
        a = r.annotations
        err = a.get("gmean_error")
        lines.append(f"against the annotations ({a['truth_count']} particles): precision {a['precision']:.2f}, "
                     f"recall {a['recall']:.2f} at IoU 0.5, geometric mean off by "
                     f"{f(None if err is None else 100 * err, '+.0f')} %, "
                     f"Jensen-Shannon divergence {f(a.get('js_divergence'), '.3f')}")
    lines.append(f"written to {r.out_dir} (detections.png, histogram.png, report.json)")
    return "\n".join(lines)


def register(sub) -> None:
    v = sub.add_parser("validate", help="train a particle detector on the recipe's renders and run it on the reference")
    v.add_argument("recipe", help="a fitted recipe JSON")
    v.add_argument("reference", help="the micrograph the recipe was fitted to")
    v.add_argument("-o", "--output", help="output folder (default: RECIPE-validation next to the recipe)")
    v.add_argument("--count", type=int, default=200, help="renders to train on, 10 %% held out (default 200)")
    v.add_argument("--size", type=int, help="render side in px (default: the recipe's)")
    v.add_argument("--steps", type=int, default=1200, help="training steps of 8 crops (default 1200)")
    v.add_argument("--annotations", metavar="FILE",
                   help="your labels of the reference (COCO JSON or 16-bit instance-mask PNG): adds precision/recall")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--workers", type=int, help="render processes (default: one per core)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=cmd_validate)
