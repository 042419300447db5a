"""`matfit bulk` (labelled training sets from a recipe) and `matfit score` (FID/KID vs a micrograph)."""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from fitting.core.events import CancelToken


def _print_score(score, as_json: bool) -> None:
    if as_json:
        return
    sys.stdout.write(score.text() + "\n")
    sys.stdout.flush()


def cmd_bulk(args) -> int:
    from fitting.output.bulk.run import render_dataset
    from fitting.cli.progress import EventProgress
    from fitting.materials.recipe import Recipe
    rec = Recipe.load(args.recipe)            # a bad path fails here, before anything starts
    for n in rec.notes:
        print(f"note: {n}", file=sys.stderr)
    cancel = CancelToken()

    def on_sigint(signum, frame):  # first Ctrl-C: finish the images in flight, write the set files
        cancel.cancel()
        print("\nmatfit: stopping after the images in flight (Ctrl-C again to abort); "
              "run the same command again to resume", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        res = render_dataset(rec, args.out, args.count, size=args.size, spp=args.spp, seed=args.seed,
                             workers=args.workers, scheduler=args.scheduler, instances=args.instances,
                             device=args.device, chunk_size=args.chunk_size, reference=args.reference, rle=args.rle,
                             score_crops=args.score_crops, texture_variants=args.texture_variants,
                             on_event=None if args.quiet else EventProgress("bulk", total=args.count, unit="img"), cancel=cancel)
    finally:
        signal.signal(signal.SIGINT, old)
    if args.json:
        sys.stdout.write(json.dumps(res.to_dict(), indent=2, default=str) + "\n")
    print(f"{res.images} images with {res.annotations} instances in {res.out_dir} "
          f"({res.rendered} rendered, {res.skipped} already there, {res.seconds:.1f} s, "
          f"{res.backend} x{res.workers})", file=sys.stderr)
    if res.cancelled:
        print("matfit: cancelled; annotations.json matches the finished images", file=sys.stderr)
        return 130
    if res.score is not None:
        _print_score(res.score, args.json)
    return 0


def cmd_score(args) -> int:
    from fitting.describe.quality import score_folder
    scale = args.working_scale
    if scale is None:
        scale = 512
        man = Path(args.synthetic) / "dataset.json"
        try:
            rec = json.loads(man.read_text(encoding="utf-8")).get("recipe") or {}
            scale = int((rec.get("reference") or {}).get("working_scale") or 512)
        except (OSError, ValueError, TypeError):
            pass
    s = score_folder(args.reference, args.synthetic, working_scale=scale, crops=args.crops,
                     crop_range=(args.crop_min, args.crop_max), seed=args.seed, backbone=args.backbone,
                     layer=args.layer)
    if args.json:
        sys.stdout.write(json.dumps(s.to_dict(), indent=2) + "\n")
    else:
        _print_score(s, False)
    return 0


def register(sub) -> None:
    b = sub.add_parser("bulk", help="render a labelled training set (images, instance masks, COCO) from a recipe",
                       description="Render COUNT images, each a new geometry draw of the recipe, with 16-bit "
                                   "instance masks, per-image JSON sidecars, a COCO annotations.json and "
                                   "particles.csv. Re-running resumes. With --scheduler the output folder "
                                   "must be shared (same path) by every Dask worker.")
    b.add_argument("recipe")
    b.add_argument("--count", "-n", type=int, required=True, help="number of images")
    b.add_argument("--out", "-o", required=True, help="output folder (created; resumed if it holds the set)")
    b.add_argument("--size", type=int, help="image side in px (default: the recipe's)")
    b.add_argument("--spp", type=int, help="samples per pixel (default: the recipe's)")
    b.add_argument("--seed", type=int, default=0, help="set seed: image i uses layout seed SEED*100000+i")
    b.add_argument("--workers", type=int,
                   help="local processes (default: all cores, 1 on a GPU; 1 = render in this process)")
    b.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler address (tcp://host:8786)")
    b.add_argument("--instances", choices=["cluster", "primary"], default="cluster",
                   help="one instance per agglomerate (default) or per primary particle")
    b.add_argument("--rle", choices=["uncompressed", "compressed"], default="uncompressed",
                   help="segmentation format in annotations.json (torchvision's references need uncompressed)")
    b.add_argument("--chunk-size", type=int, help="images per Dask task (default: automatic)")
    b.add_argument("--reference", metavar="IMAGE", help="score the set against this micrograph (FID/KID)")
    b.add_argument("--score-crops", type=int, default=100, help="crops per side for --reference (default 100)")
    b.add_argument("--texture-variants", type=int, default=8, metavar="N",
                   help="surface-texture realisations shared by the set; every image still gets a new "
                        "geometry draw and render noise (default 8; 0 = a new texture per image)")
    b.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bulk)

    s = sub.add_parser("score", help="FID and KID between crops of a micrograph and a synthetic set")
    s.add_argument("reference")
    s.add_argument("synthetic", help="folder of images (a `matfit bulk` output folder)")
    s.add_argument("--crops", type=int, default=100, help="crops per side (default 100)")
    s.add_argument("--crop-min", type=int, default=128)
    s.add_argument("--crop-max", type=int, default=256)
    s.add_argument("--working-scale", type=int,
                   help="longer side of the reference's working image (default: the set's recipe, else 512)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--backbone", default="vgg16-hed")
    s.add_argument("--layer", default="relu4_3", help="trunk layer whose pooled features are compared")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_score)
