"""The fit: reference -> descriptor -> top-3 candidates -> refinement -> recipe.

1. Load the reference (data bar excluded) and describe it at a few working scales
   (particle size in pixels is unknown, so the reference is described at several
   downsamplings and each candidate keeps the scale it matches best).
2. Every library material proposes parameters (its predictor, else its defaults), a few
   particle sizes are searched around that proposal, each proposal is rendered and
   described, and materials are ranked by L1 descriptor distance. The best 3 are kept.
3. Each is refined by Adam on its refinable, normalised parameters through the
   differentiable Mitsuba render; the loss is the descriptor distance plus a gray-level
   distribution term (sorted-pixel L1 = 1-D Wasserstein distance; see
   benchmarks/bench_fit.py for the measurement that justifies it). A new render seed every
   iteration, early stopping, a time/iteration budget.
4. The candidate with the smallest final distance (measured on fixed evaluation seeds for
   all candidates alike) is the result.

Emits :class:`FitEvent`s; honours a :class:`CancelToken` between iterations.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from fitting.core.errors import Cancelled, MatfitError
from fitting.core.events import (
    CancelToken,
    EventSink,
    MonotoneProgress,
    _emit,
    null_sink,
)
from fitting.fit.candidates import rank_materials
from fitting.fit.options import FitOptions
from fitting.fit.refine import EVAL_SEEDS, loss_precision, refine
from fitting.fit.results import Candidate, FitResult
from fitting.fit.target import ReferenceTarget, thumbnail


def fit_reference(reference, options: FitOptions | None = None, on_event: EventSink | None = None,
                  cancel: CancelToken | None = None, library: dict | None = None):
    """Fit the library to a reference image (path or ReferenceImage). Returns a FitResult.

    Raises Cancelled when ``cancel`` fires (within one iteration), MatfitError on bad input.
    """
    opts = options or FitOptions()
    sink = MonotoneProgress(on_event or null_sink)
    cancel = cancel or CancelToken()
    try:
        return _fit(reference, opts, sink, cancel, library)
    except Cancelled as exc:
        _emit(sink, "failed", message=str(exc.message), data={"cancelled": True})
        raise
    except MatfitError as exc:
        _emit(sink, "failed", message=exc.message, data={"hint": exc.hint})
        raise
    except Exception as exc:  # pragma: no cover - unexpected: still tell the listener
        _emit(sink, "failed", message=f"{type(exc).__name__}: {exc}")
        raise


def _fit(reference, opts: FitOptions, sink: EventSink, cancel: CancelToken, library):
    from fitting.core.runtime import init_mitsuba
    from fitting.describe.descriptor import TextureDescriptor
    from fitting.materials.library import load_library
    from fitting.materials.recipe import Recipe
    from fitting.materials.scene import MaterialScene, RenderSettings
    from fitting.reference.loading import ReferenceImage, load_reference

    t_start = time.time()
    deadline = t_start + opts.budget_s
    timings: dict[str, float] = {}
    torch.manual_seed(opts.seed)

    _emit(sink, "stage", stage="load", message="loading the reference", progress=0.0)
    ref = reference if isinstance(reference, ReferenceImage) else load_reference(reference)
    info = init_mitsuba()
    lib = library or load_library()
    if opts.materials:
        unknown = [m for m in opts.materials if m not in lib]
        if unknown:
            raise MatfitError(f"unknown material(s) {', '.join(unknown)}", hint="see `matfit library list`")
        lib = {k: lib[k] for k in opts.materials}
    timings["load"] = time.time() - t_start

    t0 = time.time()
    _emit(sink, "stage", stage="describe", message="describing the reference", progress=0.02)
    desc = TextureDescriptor(opts.backbone, work_size=opts.size)
    target = ReferenceTarget(ref, desc, opts.scales, opts.size, cancel)
    timings["describe"] = time.time() - t0
    cancel.check("the fit")

    # ------------------------------------------------------------------ ranking
    t0 = time.time()
    _emit(sink, "stage", stage="rank", message=f"rendering {len(lib)} library materials", progress=0.05)
    scenes = {mid: MaterialScene(mat, RenderSettings(size=opts.size, spp=opts.spp, layout_seed=opts.seed))
              for mid, mat in lib.items()}
    # Ranking may use up to 35 % of the budget; the rest is refinement's.
    ranking = rank_materials(lib, scenes, target, desc, opts, sink, cancel,
                             search_deadline=t_start + 0.35 * opts.budget_s)
    pool = ranking[:max(opts.top_k, opts.screen)]
    timings["rank"] = time.time() - t0
    _emit_candidates(sink, "rank", 0.25, ranking, pool, target)

    # ------------------------------------------------------------------ screening
    screened: dict[str, Candidate] = {}
    refine_from = 0.25
    if len(pool) > opts.top_k:
        t0 = time.time()
        refine_from = 0.45
        _emit(sink, "stage", stage="screen", progress=0.25,
              message=f"screening the best {len(pool)} materials with a short refinement")
        # equal slices: the re-ranking compares the candidates after the same refinement time
        each = max(0.0, min(opts.screen_share * opts.budget_s, deadline - time.time())) / len(pool)
        screen_opts = dataclasses.replace(opts, loss_crop=opts.screen_loss_crop)
        for ci, r in enumerate(pool):
            cancel.check("the fit")
            mid = r["material"]
            cand = Candidate(material_id=mid, scale=r["scale"], x_initial=r["x"], distance_initial=float("nan"),
                             predictor=r["source"])
            _emit(sink, "stage", stage="screen", message=f"screening {mid} ({ci + 1}/{len(pool)})",
                  progress=0.25 + 0.2 * ci / len(pool), data={"candidate": ci, "material": mid})
            refine(scenes[mid], target.by_scale[r["scale"]], desc, cand, screen_opts, each, sink, cancel, ci,
                   len(pool), stage="screen", progress_range=(0.25, 0.45))
            screened[mid] = cand
        # re-rank the pool by the screened distances (fixed evaluation seeds, comparable)
        order = sorted(pool, key=lambda r: screened[r["material"]].distance_final)
        ranking = order + ranking[len(pool):]
        for r in order:
            r["distance_screened"] = screened[r["material"]].distance_final
        timings["screen"] = time.time() - t0
        _emit_candidates(sink, "screen", refine_from, ranking, ranking[:opts.top_k], target)
    top = ranking[:opts.top_k]

    # ------------------------------------------------------------------ refinement
    t0 = time.time()
    candidates: list[Candidate] = []
    for ci, r in enumerate(top):
        cancel.check("the fit")
        mat = lib[r["material"]]
        scene = scenes[r["material"]]
        tgt = target.by_scale[r["scale"]]
        remaining = max(0.0, deadline - time.time())
        share = remaining / (len(top) - ci)
        _emit(sink, "stage", stage="refine", message=f"refining {mat.id} ({ci + 1}/{len(top)})",
              progress=refine_from + (0.95 - refine_from) * ci / len(top), data={"candidate": ci, "material": mat.id})
        first = screened.get(mat.id)
        if first is None:
            cand = Candidate(material_id=mat.id, scale=r["scale"], x_initial=r["x"], distance_initial=float("nan"),
                             predictor=r["source"])
            refine(scene, tgt, desc, cand, opts, share, sink, cancel, ci, len(top),
                   progress_range=(refine_from, 0.95))
        else:
            # continue from the screened parameters; report against the original guess
            cand = Candidate(material_id=mat.id, scale=r["scale"], x_initial=first.x_final,
                             distance_initial=float("nan"), predictor=r["source"])
            refine(scene, tgt, desc, cand, opts, share, sink, cancel, ci, len(top),
                   progress_range=(refine_from, 0.95), known_initial=first.distance_final,
                   first_iteration=first.iterations)
            cand.x_initial, cand.distance_initial = first.x_initial, first.distance_initial
            cand.history = first.history + cand.history
            cand.iterations += first.iterations
            cand.seconds += first.seconds
            cand.stopped = f"screen: {first.stopped}; {cand.stopped}"
        candidates.append(cand)
    timings["refine"] = time.time() - t0

    # ------------------------------------------------------------------ choose + recipe
    t0 = time.time()
    best = min(candidates, key=lambda c: c.distance_final)
    mat = lib[best.material_id]
    scene = scenes[best.material_id]
    preview = scene.render_numpy(best.x_final, seed=EVAL_SEEDS[0])
    timings["export"] = time.time() - t0
    timings["total"] = time.time() - t_start
    refined = [s.name for s, m in zip(mat.specs, mat.refine_mask()) if m]
    recipe = Recipe.from_vector(
        mat, best.x_final,
        render={"size": opts.size, "spp": opts.spp, "layout_seed": opts.seed, "variant": info.variant},
        seeds={"layout": opts.seed, "render": EVAL_SEEDS[0], "fit": opts.seed},
        refined=refined, initial=mat.physical(best.x_initial),
        descriptor={"backbone": desc.backbone_id, "work_size": opts.size, "layers": list(desc.layers)},
        reference={**ref.to_dict(), "working_scale": best.scale},
        fit={"options": opts.to_dict(),
             "loss_precision": loss_precision(opts, desc.device),
             "top": [c.summary() for c in candidates],
             "ranking": [_ranking_row(r) for r in ranking],
             "loss_history": {c.material_id: _history_summary(c.history) for c in candidates},
             "timings": {k: round(v, 3) for k, v in timings.items()}})
    result = FitResult(recipe=recipe, candidates=candidates, ranking=[_ranking_row(r) for r in ranking],
                       best=best, timings=timings, reference=ref.to_dict(), preview=preview,
                       reference_tile=target.by_scale[best.scale]["tile"])
    _emit(sink, "finished", stage="export", progress=1.0,
          message=f"best: {best.material_id}, distance {best.distance_initial:.4f} -> {best.distance_final:.4f}",
          data={"summary": result.summary(), "preview": thumbnail(preview, opts.size)})
    return result


def _ranking_row(r: dict) -> dict:
    """What the recipe and the result keep of a ranking entry (screened distance if any)."""
    return {k: r[k] for k in ("material", "distance", "distance_screened", "scale", "source") if k in r}


def _emit_candidates(sink: EventSink, stage: str, progress: float, ranking: list[dict], shown: list[dict],
                     target: "ReferenceTarget") -> None:
    """The ranking with thumbnails of the candidates about to be refined (``shown``)."""
    _emit(sink, "candidates", stage=stage, progress=progress,
          message="candidates: " + ", ".join(f"{r['material']} ({r.get('distance_screened', r['distance']):.3f})"
                                           for r in shown),
          data={"ranking": [{k: r[k] for k in ("material", "title", "imaging", "distance", "scale")}
                            for r in ranking],
                "thumbnails": {r["material"]: thumbnail(r["img"]) for r in shown},
                "reference": thumbnail(target.by_scale[shown[0]["scale"]]["tile"])})


def _history_summary(h: list[float]) -> dict:
    if not h:
        return {"iterations": 0}
    return {"iterations": len(h), "first": h[0], "last": h[-1], "min": min(h),
            "every_5th": [round(v, 5) for v in h[::5]]}
