"""`matfit train`: generate (cached, resumable) data sets and train per-material predictors."""
from __future__ import annotations

import json
import signal
import sys
from contextlib import contextmanager

from fitting.cli.progress import CountProgress
from fitting.core.events import CancelToken


@contextmanager
def _cancel_on_interrupt():
    """A CancelToken that Ctrl+C cancels while the block runs (the data sets then stop after
    the chunk in hand, and a later run resumes them)."""
    cancel = CancelToken()
    old = signal.signal(signal.SIGINT, lambda *_: cancel.cancel())
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, old)


def cmd_train(args) -> int:
    from fitting.describe.descriptor import TextureDescriptor
    from fitting.core.errors import MatfitError
    from fitting.materials.library import load_library
    from fitting.fit.predictor import generate_dataset, train_predictor
    from fitting.core.runtime import init_mitsuba
    init_mitsuba(args.device)
    lib = load_library()
    if args.all or not args.materials:
        ids = list(lib)
    else:
        unknown = [m for m in args.materials if m not in lib]
        if unknown:
            raise MatfitError(f"unknown material(s) {', '.join(unknown)}", hint="see `matfit library list`")
        ids = args.materials
    desc = TextureDescriptor(args.backbone, work_size=args.size)
    if args.classifier:
        return _train_classifier(args, lib, desc)
    results = {}
    with _cancel_on_interrupt() as cancel:
        for mid in ids:
            mat = lib[mid]
            x, f = generate_dataset(mat, args.samples, backbone=desc.backbone_id, size=args.size, spp=args.spp,
                                    workers=args.workers, progress=CountProgress(mid), cancel=cancel)
            meta = train_predictor(mat, x, f, desc.part_slices(), desc.backbone_id, epochs=args.epochs,
                                   log=lambda m: print(f"  {m}", file=sys.stderr))
            results[mid] = {k: meta[k] for k in ("samples", "heldout_mae", "heldout_mean_baseline", "per_group")}
            print(f"{mid}: held-out MAE {meta['heldout_mae']:.4f} vs mean predictor "
                  f"{meta['heldout_mean_baseline']:.4f} ({meta['samples']} samples)", file=sys.stderr)
    if args.json:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    return 0


def _train_classifier(args, lib: dict, desc) -> int:
    """`matfit train --classifier`: the material classifier on every material's data set (the
    predictors' cached renders; missing ones are rendered first, resumable)."""
    from fitting.fit.classifier import train_classifier
    from fitting.fit.predictor import generate_dataset
    from fitting.materials.library import library_dir
    features = {}
    with _cancel_on_interrupt() as cancel:
        for mid, mat in lib.items():
            _, features[mid] = generate_dataset(mat, args.samples, backbone=desc.backbone_id, size=args.size,
                                                spp=args.spp, workers=args.workers, progress=CountProgress(mid),
                                                cancel=cancel)
    clf, meta = train_classifier(features, desc.part_slices(), desc.backbone_id,
                                 {mid: mat.content_hash for mid, mat in lib.items()}, epochs=args.classifier_epochs,
                                 log=lambda m: print(f"  {m}", file=sys.stderr))
    clf.save(library_dir())
    for mid, r in meta["per_material"].items():
        print(f"{mid}: held-out top 1 {r['top1']:.2f}, top 3 {r['top3']:.2f}"
              + (f" (mistaken mostly for {r['confused_with']})" if r["confused_with"] else ""), file=sys.stderr)
    print(f"material classifier: held-out top 1 {meta['heldout_top1']:.3f}, top 3 {meta['heldout_top3']:.3f} "
          f"({sum(meta['samples'].values())} samples of {len(lib)} materials)", file=sys.stderr)
    if args.json:
        sys.stdout.write(json.dumps(meta, indent=2) + "\n")
    return 0


def register(sub) -> None:
    t = sub.add_parser("train", help="train per-material parameter predictors")
    t.add_argument("materials", nargs="*", help="material ids (default: all)")
    t.add_argument("--all", action="store_true")
    t.add_argument("--samples", type=int, default=2000)
    t.add_argument("--epochs", type=int, default=300)
    t.add_argument("--size", type=int, default=256)
    t.add_argument("--spp", type=int, default=4)
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--backbone", default="vgg16-hed")
    t.add_argument("--classifier", action="store_true",
                   help="train the library's material classifier (on every material's data set) instead of predictors")
    t.add_argument("--classifier-epochs", type=int, default=200)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_train)
