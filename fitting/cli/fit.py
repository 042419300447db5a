"""`matfit fit`, `matfit compare` and `matfit export`."""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from fitting.cli.progress import EventProgress
from fitting.core.events import CancelToken


def cmd_fit(args) -> int:
    from fitting.fit.options import FitOptions
    from fitting.fit.pipeline import fit_reference
    from fitting.core.files import atomic_save_png
    from fitting.core.runtime import init_mitsuba
    init_mitsuba(args.device)
    opts = FitOptions(budget_s=args.budget, iterations=args.iterations, size=args.size, seed=args.seed,
                      spp=args.spp, backbone=args.backbone, loss_crop=args.loss_crop,
                      screen=args.screen, screen_loss_crop=args.screen_loss_crop,
                      loss_precision=args.loss_precision, imaging=args.imaging, pixel_size_nm=args.pixel_size,
                      measure=not args.no_measure,
                      materials=args.materials.split(",") if args.materials else None)
    cancel = CancelToken()

    def on_sigint(signum, frame):  # first Ctrl-C: stop cleanly after the current iteration
        cancel.cancel()
        print("\nmatfit: cancelling after the current iteration (Ctrl-C again to abort)", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        res = fit_reference(args.image, opts, on_event=None if args.quiet else EventProgress("fit"), cancel=cancel)
    finally:
        signal.signal(signal.SIGINT, old)
    out = Path(args.output)
    res.recipe.save(out)
    if args.save_preview:
        from fitting.output.preview import side_by_side
        atomic_save_png(args.save_preview, side_by_side(
            res.reference_field, res.render_field,
            labels=("reference", f"fit: {res.best.material_id}")))
    summary = res.summary()
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        b = res.best
        gained = (f"distance {b.distance_initial:.4f} -> {b.distance_final:.4f}" if b.gained else
                  f"distance {b.distance_final:.4f} (refinement gained nothing: the initial guess is the result)")
        print(f"best material: {b.material_id}  {gained}", file=sys.stderr)
        if res.imaging:
            print(f"instrument: {res.imaging['reason']}", file=sys.stderr)
        for label, d in (("measured", res.measured), ("fitted", res.fitted)):
            if d:
                print(f"  {label:<8} {_size_line(d)}", file=sys.stderr)
        for c in res.candidates:
            print(f"  {c.material_id:<28} {c.distance_initial:.4f} -> {c.distance_final:.4f}  "
                  f"({c.iterations} it, {c.seconds:.1f} s, {c.stopped})", file=sys.stderr)
        print(f"recipe written to {out}" + (f", preview to {args.save_preview}" if args.save_preview else ""),
              file=sys.stderr)
    return 0


def _size_line(d: dict) -> str:
    """One line of a particle size summary (fit --json's "measured"/"fitted")."""
    def f(v, fmt=".1f"):
        return "?" if v is None else format(v, fmt)
    nm = d.get("diameter_nm")
    extra = f" = {f(nm['gmean'])} nm" if nm else ""
    return (f"{d['count']} particles, diameter median {f(d['median'])} px, geometric mean {f(d['gmean'])} px"
            f"{extra}, GSD {f(d['gsd'], '.2f')}, coverage {d['coverage']:.2f}")


def cmd_compare(args) -> int:
    import torch
    from fitting.describe.descriptor import TextureDescriptor, check_same_backbone, descriptor_distance
    from fitting.reference.loading import load_reference
    from fitting.materials.recipe import Recipe
    from fitting.core.runtime import init_mitsuba
    from fitting.materials.scene import MaterialScene, RenderSettings
    init_mitsuba(args.device)
    rec = Recipe.load(args.recipe)
    mat = rec.material()
    ref = load_reference(args.image)
    backbone = args.backbone or (rec.descriptor or {}).get("backbone", "vgg16-hed")
    if rec.descriptor:
        check_same_backbone(rec.descriptor.get("backbone", backbone), backbone)
    size = int(rec.render.get("size", 256))
    desc = TextureDescriptor(backbone, work_size=size)
    scale = int((rec.reference or {}).get("working_scale") or 512)
    work = ref.working(max_side=scale)
    d_ref = desc.describe_reference(work)
    scene = MaterialScene(mat, RenderSettings(size=size, spp=int(rec.render.get("spp", 4)),
                                              layout_seed=int(rec.render.get("layout_seed", 0))))
    seeds = [int(rec.seeds.get("render", 0)) + k for k in range(args.seeds)]
    with torch.no_grad():
        imgs = torch.stack([scene.render(torch.as_tensor(rec.vector(mat)), seed=s) for s in seeds])[:, None]
        d = descriptor_distance(desc.describe(imgs), d_ref)
    res = {"image": str(args.image), "recipe": str(args.recipe), "material": mat.id, "backbone": backbone,
           "working_scale": scale, "distance": float(d.mean()), "distance_per_seed": [float(v) for v in d]}
    if args.json:
        sys.stdout.write(json.dumps(res, indent=2) + "\n")
    else:
        print(f"{res['distance']:.5f}")
    return 0


def cmd_export(args) -> int:
    from fitting.output.export import export_mitsuba_scene
    from fitting.materials.recipe import Recipe
    from fitting.core.runtime import init_mitsuba
    init_mitsuba(args.device)
    rec = Recipe.load(args.recipe)
    xml = export_mitsuba_scene(rec, args.output, spp=args.spp)
    print(f"Mitsuba scene written to {xml}", file=sys.stderr)
    return 0


def register(sub) -> None:
    f = sub.add_parser("fit", help="fit the material library to a reference micrograph")
    f.add_argument("image")
    f.add_argument("-o", "--output", required=True, help="recipe JSON to write")
    f.add_argument("--budget", type=float, default=120.0, help="time budget in seconds (default 120)")
    f.add_argument("--iterations", type=int, default=60, help="refinement iterations per candidate, at most")
    f.add_argument("--size", type=int, default=256, help="working/render resolution")
    f.add_argument("--spp", type=int, default=4)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--backbone", default="vgg16-hed")
    f.add_argument("--loss-crop", type=float, default=1.0, metavar="F",
                   help="final refinement loss on a random crop of F x the render's side (default 1 = the "
                        "whole render, aimed at the reported distance; 0.5: ~2x faster iterations, noisier)")
    f.add_argument("--screen", type=int, default=0, metavar="N",
                   help="refine the best N ranked materials briefly and keep the 3 best of them "
                        "(default 0: off; measured to lower the final fits on synthetic targets)")
    f.add_argument("--screen-loss-crop", type=float, default=0.5, metavar="F",
                   help="--loss-crop for the short screening refinements (default 0.5)")
    f.add_argument("--loss-precision", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="arithmetic of the ranking's and the refinement loss's VGG passes (default auto: "
                        "bfloat16 on CPUs with bfloat16 instructions, about 2x faster; reported distances "
                        "are float32 either way)")
    f.add_argument("--materials", help="comma-separated material ids to consider (default: all)")
    f.add_argument("--imaging", choices=("auto", "sem", "tem", "optical"), default="auto",
                   help="instrument kind (default auto: the file's tags, else the image's cues); a kind "
                        "restricts the candidates to its materials")
    f.add_argument("--pixel-size", type=float, metavar="NM",
                   help="pixel size in nm (default: from the file's tags, if any); stored in the recipe")
    f.add_argument("--no-measure", action="store_true",
                   help="do not steer the fit by the measured particles (texture descriptor alone)")
    f.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.add_argument("--save-preview", metavar="PNG", help="save reference | fit side by side: the whole field at the fit's pixel scale")
    f.set_defaults(func=cmd_fit)

    c = sub.add_parser("compare", help="descriptor distance of a recipe's render to an image")
    c.add_argument("image")
    c.add_argument("recipe")
    c.add_argument("--backbone")
    c.add_argument("--seeds", type=int, default=2)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compare)

    e = sub.add_parser("export", help="export a recipe as a plain Mitsuba 3 scene")
    e.add_argument("recipe")
    e.add_argument("-o", "--output", required=True, help="folder to write scene.xml and its files into")
    e.add_argument("--spp", type=int, default=64)
    e.set_defaults(func=cmd_export)
