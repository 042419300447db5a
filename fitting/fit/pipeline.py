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
4. Each refined candidate is measured on a field that holds several of the reference's
   particles (its geometry was settled there before refinement, and is corrected again
   after); the candidate with the smallest final distance (fixed evaluation seeds for all
   candidates alike) times (1 + ``final_structure_weight`` x its structure distance) is the result.

Emits :class:`FitEvent`s; honours a :class:`CancelToken` between iterations.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from fitting.core.errors import Cancelled, MatfitError
from fitting.core.events import (
    CancelToken,
    EventSink,
    MonotoneProgress,
    _emit,
    null_sink,
)
from fitting.fit.appearance import AppearanceTerm, reference_profile
from fitting.fit.candidates import (classified_candidates, keep_branched_candidate, rank_materials,
                                   structure_first)
from fitting.fit.options import FitOptions
from fitting.fit.refine import EVAL_SEEDS, evaluate_distance, loss_precision, refine
from fitting.fit.results import Candidate, FitResult
from fitting.fit.structure import (StructureTarget, combined_score, correct_geometry, has_particles,
                                   measurement_is_usable, size_summary, structure_distance, structure_terms,
                                   target_cluster_area, working_scales)
from fitting.fit.target import ReferenceTarget, thumbnail
from fitting.measure.instrument import guess_imaging_of


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
    from fitting.materials.library import load_library
    from fitting.materials.recipe import Recipe
    from fitting.materials.scene import MaterialScene, RenderSettings
    from fitting.reference.loading import ReferenceImage, load_reference

    t_start = time.time()
    # The last share of the budget is kept for judging the refined candidates, correcting their
    # geometry and rendering the whole field, so a fit ends within its budget.
    deadline = t_start + (1.0 - END_RESERVE) * opts.budget_s
    timings: dict[str, float] = {}
    torch.manual_seed(opts.seed)

    _emit(sink, "stage", stage="load", message="loading the reference", progress=0.0)
    ref = reference if isinstance(reference, ReferenceImage) else load_reference(reference)
    info = init_mitsuba()
    lib = library or load_library()
    full_library = lib
    if opts.materials:
        unknown = [m for m in opts.materials if m not in lib]
        if unknown:
            raise MatfitError(f"unknown material(s) {', '.join(unknown)}", hint="see `matfit library list`")
        lib = {k: lib[k] for k in opts.materials}
    timings["load"] = time.time() - t_start

    # ------------------------------------------------------------------ measurement + description
    prepared = prepare_target(ref, opts, lib, sink, cancel, timings)
    measurement, guess, lib = prepared.measurement, prepared.guess, prepared.library
    target, structures, desc, pixel_size = prepared.target, prepared.structures, prepared.descriptor, prepared.pixel_size

    # ------------------------------------------------------------------ ranking
    t0 = time.time()
    _emit(sink, "stage", stage="rank", message=f"rendering {len(lib)} library materials", progress=0.05)
    scenes = {mid: MaterialScene(mat, RenderSettings(size=opts.size, spp=opts.spp, layout_seed=opts.seed))
              for mid, mat in lib.items()}
    # Ranking may use up to half the budget (geometry corrections and finer scales stop then);
    # the rest is refinement's.
    sparse = bool(structures) and is_sparse(structures, list(structures), opts.size)
    ranking = rank_materials(lib, scenes, target, desc, opts, sink, cancel,
                             search_deadline=t_start + RANK_SHARE * opts.budget_s, structures=structures,
                             sparse=sparse)
    if sparse:
        ranking = structure_first(ranking)
    classification = (classify_materials(full_library, target, desc, lib, sink)
                      if opts.classified_candidates > 0 else None)
    if classification:
        ranking = classified_candidates(ranking, classification["probabilities"], opts.top_k,
                                        opts.classified_candidates)
    if structures:
        ranking = keep_branched_candidate(ranking, lib, next(iter(structures.values())).shape_class, opts.top_k)
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
            structure = structures.get(r["scale"])
            if structure is not None and judge_field_size(structure, opts.size) > opts.size:
                cand.x_initial, cand.initial_measurement = settle_geometry(
                    scene, structure, cand.x_initial, deadline=deadline)
                share = max(0.0, deadline - time.time()) / (len(top) - ci)
            refine(scene, tgt, desc, cand, opts, share, sink, cancel, ci, len(top),
                   progress_range=(refine_from, 0.95))
        else:
            # continue from the screened parameters; report against the original guess
            cand = Candidate(material_id=mat.id, scale=r["scale"], x_initial=first.x_final,
                             distance_initial=float("nan"), predictor=r["source"], appearance=first.appearance)
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
    baselines = {r["scale"]: r.get("scale_baseline", 1.0) for r in ranking}
    for cand in candidates:
        judge_structure(cand, scenes[cand.material_id], structures.get(cand.scale), opts,
                        baselines.get(cand.scale, 1.0), desc, target.by_scale[cand.scale]["descriptor"],
                        deadline=t_start + opts.budget_s)
    for cand in candidates:
        weigh_by_classifier(cand, classification["probabilities"] if classification else None,
                            opts.final_classifier_weight)
    best = choose_result(candidates, sparse=is_sparse(structures, [c.scale for c in candidates], opts.size))
    mat = lib[best.material_id]
    scene = scenes[best.material_id]
    preview = scene.render_numpy(best.x_final, seed=EVAL_SEEDS[0])
    work = center_window(target.by_scale[best.scale]["work"], FIELD_MAX_SIDE)
    render_field = render_whole_field(mat, best.x_final, work.shape, opts)
    full = target.by_scale[best.scale]["work"]
    field_scale = float(full.size) / float(render_field.size)   # reference region / rendered window
    measured, fitted = particle_summaries(measurement, render_field, structures.get(best.scale), ref, pixel_size,
                                          field_scale)
    timings["export"] = time.time() - t0
    timings["total"] = time.time() - t_start
    classifier_summary = _classifier_summary(classification)
    refined = [s.name for s, m in zip(mat.specs, mat.refine_mask()) if m]
    recipe = Recipe.from_vector(
        mat, best.x_final,
        render={"size": opts.size, "spp": opts.spp, "layout_seed": opts.seed, "variant": info.variant},
        seeds={"layout": opts.seed, "render": EVAL_SEEDS[0], "fit": opts.seed},
        refined=refined, initial=mat.physical(best.x_initial),
        descriptor={"backbone": desc.backbone_id, "work_size": opts.size, "layers": list(desc.layers)},
        reference={**ref.to_dict(), "working_scale": best.scale,
                   "pixel_size_nm": None if pixel_size is None else float(pixel_size),
                   "pixel_size_source": ("user" if opts.pixel_size_nm is not None else
                                         "file tags" if ref.pixel_size_nm is not None else None)},
        fit={"options": opts.to_dict(),
             "imaging": guess.to_dict(),
             "classifier": classifier_summary,
             "measured": measured, "fitted": fitted,
             "refinement_gained": best.gained,
             "loss_precision": loss_precision(opts, desc.device),
             "top": [c.summary() for c in candidates],
             "ranking": [_ranking_row(r) for r in ranking],
             "loss_history": {c.material_id: _history_summary(c.history) for c in candidates},
             "timings": {k: round(v, 3) for k, v in timings.items()}})
    result = FitResult(recipe=recipe, candidates=candidates, ranking=[_ranking_row(r) for r in ranking],
                       best=best, timings=timings, reference=ref.to_dict(), preview=preview,
                       reference_tile=target.by_scale[best.scale]["tile"], reference_field=work,
                       render_field=render_field, imaging=guess.to_dict(), measured=measured, fitted=fitted,
                       classifier=classifier_summary)
    gained = (f"distance {best.distance_initial:.4f} -> {best.distance_final:.4f}" if best.gained else
              f"distance {best.distance_final:.4f}; refinement gained nothing, the initial guess is the result")
    _emit(sink, "finished", stage="export", progress=1.0,
          message=f"best: {best.material_id}, {gained}",
          data={"summary": result.summary(), "preview": thumbnail(preview, opts.size),
                "reference_field": _uint8(work), "render_field": _uint8(render_field)})
    return result


@dataclasses.dataclass
class PreparedTarget:
    """What the fit knows about the reference before any material is rendered.

    Attributes
    ----------
    measurement : ParticleMeasurement or None
        The reference's particles (None with ``FitOptions.measure`` off).
    guess : ImagingGuess
        The instrument decision.
    library : dict
        The candidate materials (restricted by a hard instrument cue).
    target : ReferenceTarget
        The reference described at its working scales.
    structures : dict
        Working scale -> :class:`StructureTarget`; empty when the measurement is too uncertain
        to steer the fit (the fixed ``FitOptions.scales`` are used then).
    descriptor : TextureDescriptor
    pixel_size : float or None
        nm per reference pixel (typed by the user, else from the file's tags).
    """

    measurement: object
    guess: object
    library: dict
    target: ReferenceTarget
    structures: dict
    descriptor: object
    pixel_size: float | None


def prepare_target(ref, opts: FitOptions, lib: dict, sink: EventSink = null_sink, cancel: CancelToken | None = None,
                   timings: dict | None = None) -> PreparedTarget:
    """Measure the reference's particles, decide the instrument, pick the working scales from
    the measured size and describe the reference at each (the stages before ranking)."""
    from fitting.describe.descriptor import TextureDescriptor
    cancel = cancel or CancelToken()
    timings = timings if timings is not None else {}
    t0 = time.time()
    _emit(sink, "stage", stage="measure", message="measuring the reference's particles", progress=0.01)
    measurement = measure_reference(ref) if opts.measure else None
    pixel_size = opts.pixel_size_nm if opts.pixel_size_nm is not None else ref.pixel_size_nm
    guess = guess_imaging_of(ref, measurement, opts.imaging)
    lib = restrict_to_imaging(lib, guess)
    timings["measure"] = time.time() - t0
    usable = opts.measure and measurement_is_usable(measurement)
    if measurement is not None:
        md = measurement.median_px
        _emit(sink, "log", stage="measure",
              message=(f"{measurement.count} particles, median diameter "
                       f"{'?' if md is None else f'{md:.1f}'} px, coverage {measurement.coverage:.2f}, "
                       f"{measurement.polarity}, {measurement.shape.get('class')}"
                       + ("" if usable else " (too uncertain to steer the fit)")))
    _emit(sink, "log", stage="measure", message=f"instrument: {guess.reason}; candidates: {', '.join(lib)}",
          data={"measured": measurement_event_data(measurement, pixel_size), "imaging": guess.to_dict()})
    cancel.check("the fit")

    t0 = time.time()
    _emit(sink, "stage", stage="describe", message="describing the reference", progress=0.02)
    desc = TextureDescriptor(opts.backbone, work_size=opts.size)
    longest = max(ref.cropped.shape)
    scales = working_scales(longest, measurement.median_px, opts.size) if usable else opts.scales
    target = ReferenceTarget(ref, desc, scales, opts.size, cancel)
    structures: dict[int, StructureTarget] = {}
    if usable:
        for s in target.scales:
            structures[s] = StructureTarget(measurement, max(target.by_scale[s]["work"].shape) / float(longest))
            tgt = target.by_scale[s]
            tgt["profile"] = reference_profile(measurement, tgt["work"], tgt.get("mask"))
        _emit(sink, "log", stage="describe", message="working scales " + ", ".join(
            f"{s} px (particles at {st.diameter_render:.1f} render px)" for s, st in structures.items()))
    timings["describe"] = time.time() - t0
    cancel.check("the fit")
    return PreparedTarget(measurement, guess, lib, target, structures, desc, pixel_size)


#: Share of the budget kept for the stages after refinement (judge, geometry, whole field).
END_RESERVE = 0.1
#: Share of the budget after which the ranking starts no geometry correction and no finer scale:
#: a guard for slow machines. At the default budget on 2 cores the ranking ends before it (the
#: labelled real images take 6-56 s).
RANK_SHARE = 0.5


def _uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _ranking_row(r: dict) -> dict:
    """What the recipe and the result keep of a ranking entry (screened distance if any)."""
    row = {k: r[k] for k in ("material", "imaging", "distance", "descriptor_distance", "structure_distance",
                             "scale_baseline", "distance_screened", "scale", "source", "start") if k in r}
    if r.get("structure_terms"):
        row["structure_terms"] = {k: round(v, 3) for k, v in r["structure_terms"].items()}
    return row


def _classifier_summary(classification: dict | None, top: int = 5) -> dict | None:
    """The classifier's choice and its most probable materials, for the recipe and the result."""
    if not classification:
        return None
    return {"choice": classification["choice"],
            "probabilities": dict(list(classification["probabilities"].items())[:top])}


def classify_materials(full_library: dict, target, desc, candidates: dict, sink: EventSink = null_sink) -> dict | None:
    """The material classifier's probabilities for the reference (averaged over its working
    scales, restricted to the candidate materials), or None when the library has no current
    classifier (the fit then says so in its log and goes on without)."""
    from fitting.fit.classifier import classify_reference, load_classifier
    folder = next(iter(full_library.values())).folder.parent
    clf = load_classifier(full_library, folder, backbone=desc.backbone_id,
                          on_warning=lambda m: _emit(sink, "log", stage="rank", message=m))
    if clf is None:
        return None
    p = classify_reference(clf, [target.by_scale[s]["descriptor"] for s in target.scales], list(candidates))
    top = list(p.items())[:3]
    _emit(sink, "log", stage="rank", message="material classifier: " + ", ".join(f"{m} {v:.2f}" for m, v in top))
    return {"probabilities": {m: round(v, 4) for m, v in p.items()}, "choice": top[0][0] if top else None}


def measure_reference(ref):
    """The particle measurement of the reference's fitting region (full resolution)."""
    from fitting.measure.particles import measure_particles
    return measure_particles(ref.cropped, ref.cropped_mask)


#: Longest side of the outline picture sent with the measurement event (the window's overlay).
OUTLINE_MAX_SIDE = 1024


def measurement_event_data(measurement, pixel_size_nm: float | None) -> dict | None:
    """The measurement for listeners: summary, diameters (reference px) and the measured
    particles' outlines as a uint8 picture of the fitting region (at most
    :data:`OUTLINE_MAX_SIDE` px; 255 = outline), for the window's overlay and histogram."""
    if measurement is None:
        return None
    from skimage.segmentation import find_boundaries
    lab = measurement.labels
    k = max(1, int(np.ceil(max(lab.shape) / OUTLINE_MAX_SIDE)))
    small = lab[::k, ::k]
    outline = (find_boundaries(small, mode="inner") & (small > 0)).astype(np.uint8) * 255
    d = measurement.to_dict(pixel_size_nm=pixel_size_nm)
    d.pop("diagnostics", None)
    return {**d, "diameters_px": [round(float(v), 2) for v in measurement.diameters_px],
            "outline": outline, "outline_step": k}


def restrict_to_imaging(lib: dict, guess) -> dict:
    """The library's materials of the guessed instrument kinds when the guess restricts (a
    user's choice, a tag, an aperture); all materials otherwise (polarity, rings: the renders'
    own polarity and outlines are compared instead). An error when a restricting guess leaves
    no material."""
    if not guess.hard:
        return lib
    kept = {k: m for k, m in lib.items() if m.imaging in guess.kinds}
    if kept:
        return kept
    if guess.cue in ("user", "tags"):
        raise MatfitError(f"no candidate material is a {'/'.join(guess.kinds).upper()} material "
                          f"({guess.reason})", hint="choose another imaging kind, or imaging auto")
    return lib


#: Where the reference's particles form branched aggregates, the refined candidates are
#: measured on a render at least this many times the ranking render's side (same pixel scale, a
#: larger field): a 256 px render cannot hold an aggregate as large as a sparse TEM field's, and
#: its clusters would measure as separate particles. Elsewhere the ranking render's field is
#: kept: on SEM renders the larger field's threshold moved the measured coverage more than it helped.
JUDGE_FIELD = 2
#: Fewest reference particles the judged render should hold at the measured coverage and size:
#: in a sparser field a ranking render holds one particle or none, and every candidate, right
#: or empty, measures the same. Such references are judged on a field up to
#: :data:`JUDGE_FIELD_MAX` times the ranking render's side.
JUDGE_MIN_COUNT = 8.0
#: Fewest aggregates the judged render should hold where the reference's particles are branched:
#: a field with one or two aggregates measures a coverage and a size that swing by a factor 2
#: with the layout, so a correct geometry and a wrong one measure alike.
JUDGE_MIN_CLUSTERS = 4.0
JUDGE_FIELD_MAX = 4


def expected_count(structure, render_size: int) -> float | None:
    """How many of the reference's particles a ``render_size`` px render at the working scale
    holds at the measured coverage and median diameter (None when either is unknown)."""
    d = structure.diameter_render
    if not d or structure.coverage <= 0.0:
        return None
    return structure.coverage * float(render_size) ** 2 / (math.pi / 4.0 * d * d)


def expected_clusters(structure, render_size: int) -> float | None:
    """How many of the reference's aggregates (its area-weighted median cluster,
    :func:`fitting.fit.structure.target_cluster_area`) a ``render_size`` px render at the working
    scale holds at the measured coverage (None: no clusters measured)."""
    a = target_cluster_area(structure)
    if not a or structure.coverage <= 0.0:
        return None
    return structure.coverage * float(render_size) ** 2 / a


def judge_field_factor(structure, render_size: int) -> float:
    """How many times the ranking render's side the refined candidates are judged on: for
    branched particles at least :data:`JUDGE_FIELD` and enough for :data:`JUDGE_MIN_CLUSTERS`
    aggregates; enough for :data:`JUDGE_MIN_COUNT` particles in a sparse field; else 1. Never
    more than :data:`JUDGE_FIELD_MAX`."""
    if structure is None:
        return 1.0
    k = 1.0
    if structure.shape_class == "branched":
        k = float(JUDGE_FIELD)
        n = expected_clusters(structure, render_size)
        if n is not None and n < JUDGE_MIN_CLUSTERS:
            k = max(k, math.sqrt(JUDGE_MIN_CLUSTERS / max(n, 1e-6)))
    n = expected_count(structure, render_size)
    if n is not None and n < JUDGE_MIN_COUNT:
        k = max(k, math.sqrt(JUDGE_MIN_COUNT / max(n, 1e-6)))
    return float(min(JUDGE_FIELD_MAX, k))


def judge_field_size(structure, render_size: int) -> int:
    """Side (px) of the render the refined candidates are measured on: ``render_size`` times
    :func:`judge_field_factor`, rounded up to a multiple of 32 px."""
    k = judge_field_factor(structure, render_size)
    if k <= 1.0:
        return int(render_size)
    return int(min(JUDGE_FIELD_MAX * render_size, 32 * math.ceil(k * render_size / 32.0)))


def judge_field_scene(scene, structure=None):
    """The scene the refined candidates are measured on: ``scene`` itself, or the same material
    at the same pixel scale on the larger field of :func:`judge_field_size` (branched
    particles, sparse fields)."""
    import dataclasses as dc
    from fitting.materials.scene import MaterialScene
    side = judge_field_size(structure, scene.settings.size)
    if side == scene.settings.size:
        return scene
    return MaterialScene(scene.material, dc.replace(scene.settings, size=side))


def settle_geometry(scene, structure, x: np.ndarray, field=None, steps: int | None = None,
                    deadline: float = math.inf):
    """A ranked candidate's geometry corrected on the judged field before it is refined.

    Where the refined candidates are judged on a larger field than the ranking's renders
    (:func:`judge_field_scene`: branched aggregates, sparse fields), the ranking measured its
    geometry on a field that holds an aggregate or two, and refinement would then tune the
    appearance to a wrong size. Each step (:func:`fitting.fit.structure.correct_geometry`) is
    kept when the larger render measures closer to the reference, as in the ranking.

    Parameters
    ----------
    scene : MaterialScene
        The candidate's ranking scene.
    structure : StructureTarget
    x : ndarray
        The ranked normalised parameters.
    field : MaterialScene, optional
        The judged field (default :func:`judge_field_scene`).
    steps : int, optional
        Correction steps at most (default :data:`FINISH_STEPS`).
    deadline : float
        ``time.time()`` after which no further step is made.

    Returns
    -------
    x : ndarray
        The settled parameters.
    measurement : ParticleMeasurement
        Their render's measurement on ``field`` (seed ``EVAL_SEEDS[0]``).
    """
    from fitting.fit.candidates import CORRECT_ABOVE, measure_render
    field = field or judge_field_scene(scene, structure)
    x = np.asarray(x, dtype=np.float64).copy()
    m = measure_render(field.render_numpy(x, seed=EVAL_SEEDS[0]))
    terms = structure_terms(structure, m)
    dist = structure_distance(terms, structure.weights)
    for _ in range(FINISH_STEPS if steps is None else steps):
        if max(terms["size"], terms["coverage"]) <= CORRECT_ABOVE or time.time() > deadline:
            break
        x_new = correct_geometry(scene.material, x, structure, m)
        if np.allclose(x_new, x, atol=1e-4):
            break
        m_new = measure_render(field.render_numpy(x_new, seed=EVAL_SEEDS[0]))
        t_new = structure_terms(structure, m_new)
        d_new = structure_distance(t_new, structure.weights)
        if d_new >= dist:
            break
        x, m, terms, dist = x_new, m_new, t_new, d_new
    return x, m


def same_kind_of_specimen(cand: Candidate) -> bool:
    """Whether the candidate's judged render shows the reference's kind of specimen: branched
    aggregates where the reference has them, separate particles where it has those (the
    ``shape`` structure term below 1)."""
    return (cand.structure_terms or {}).get("shape", 0.0) < 1.0


#: The kind-of-specimen rule settles near-ties: a candidate of the reference's kind wins
#: against a better score only within this factor of it. Beyond it the reference's own shape
#: class is the doubtful number (a clump of compact particles measured as branched).
KIND_MARGIN = 1.5


def choose_result(candidates: list[Candidate], sparse: bool = False,
                  kind_margin: float = KIND_MARGIN) -> Candidate:
    """The refined candidate with the best final score among those that show the reference's
    kind of specimen (:func:`same_kind_of_specimen`) and score within ``kind_margin`` of the
    best, or among all when none does; for a ``sparse`` reference (:func:`is_sparse`), whose
    scores are unreliable, the one of the reference's kind whose judged render measures
    closest to the reference (structure distance; the score breaks ties).

    The kind of specimen is what a microscopist checks first; in the score it is one structure
    term among several, and a candidate of compact particles whose texture matches a branched
    reference's closely can tie with the aggregate material (docs/decisions.md, "Fit: a
    material classifier picks candidates"). In a sparse field the descriptor compares renders
    that are mostly background, and a render with many times the reference's particles of
    another instrument can be the closest (docs/decisions.md, "Fit: aggregate size corrected,
    sparse references judged by their measured structure"); the margin: docs/decisions.md,
    "Measurement: SEM edges end on their crest; the kind of specimen settles near-ties")."""
    same = [c for c in candidates if same_kind_of_specimen(c)] or candidates
    if sparse:
        return min(same, key=lambda c: (round(c.structure_distance, 3), c.score))
    best = min(c.score for c in candidates)
    same = [c for c in same if c.score <= kind_margin * best] or candidates
    return min(same, key=lambda c: c.score)


def is_sparse(structures: dict, scales, render_size: int) -> bool:
    """Whether a ranking render holds fewer than :data:`JUDGE_MIN_COUNT` of the reference's
    particles at every one of ``scales`` (the refined candidates' working scales)."""
    counts = [expected_count(structures[s], render_size) if structures.get(s) is not None else None
              for s in scales]
    return bool(counts) and all(n is not None and n < JUDGE_MIN_COUNT for n in counts)


def judge_structure(cand: Candidate, scene, structure, opts: FitOptions, baseline: float = 1.0,
                    desc=None, target_descriptor=None, deadline: float = math.inf) -> None:
    """Measure the candidate's final render; its score is :func:`combined_score` of its final
    distance (relative to ``baseline``, the ranking's median distance at its working scale)
    and the structure distance, measured on :func:`judge_field_scene`'s render.
    Refinement that made the render measure worse by more than it gained in distance (an
    emptier or smoother field, say) is undone, and so is refinement that left no measurable
    particle where the initial render had some: the reference has particles (its measurement
    steers the fit), and no gain in texture distance makes an empty field a match. With
    ``desc`` and ``target_descriptor``, the geometry is then corrected (:func:`finish_geometry`)."""
    from fitting.fit.candidates import measure_render
    if structure is None:
        cand.score = cand.distance_final
        return
    field = judge_field_scene(scene, structure)
    if cand.initial_measurement is not None and np.array_equal(cand.x_final, cand.x_initial):
        m_final = cand.initial_measurement      # refinement kept the settled start: measured already
    else:
        m_final = measure_render(field.render_numpy(cand.x_final, seed=EVAL_SEEDS[0]))
    terms = structure_terms(structure, m_final)
    s_final = structure_distance(terms, structure.weights)
    if cand.gained:
        m0 = cand.initial_measurement
        if m0 is None:
            m0 = measure_render(field.render_numpy(cand.x_initial, seed=EVAL_SEEDS[0]))
        t0 = structure_terms(structure, m0)
        s0 = structure_distance(t0, structure.weights)
        emptied = not has_particles(m_final) and has_particles(m0)
        if emptied or combined_score(cand.distance_final / baseline, s_final, opts.final_structure_weight) > \
                combined_score(cand.distance_initial / baseline, s0, opts.final_structure_weight):
            cand.x_final, cand.distance_final = cand.x_initial.copy(), cand.distance_initial
            cand.stopped += (" (kept initial: the refined render has no measurable particles)" if emptied else
                             " (kept initial: the refined render measured further from the reference)")
            m_final, terms, s_final = m0, t0, s0
    cand.structure_terms, cand.structure_distance = terms, s_final
    cand.score = combined_score(cand.distance_final / baseline, s_final, opts.final_structure_weight)
    if desc is not None and target_descriptor is not None:
        finish_geometry(cand, scene, structure, opts, baseline, desc, target_descriptor, field, m_final,
                        deadline=deadline)


#: Smallest classifier probability the final score uses (the probabilities are rounded to 4
#: decimals, so an unlikely material reads 0).
CLASSIFIER_FLOOR = 1e-4


def weigh_by_classifier(cand: Candidate, probabilities: dict[str, float] | None, weight: float) -> None:
    """Multiply the refined candidate's final score by ``1 + weight x -ln p``, ``p`` the
    classifier's probability of its material (at least :data:`CLASSIFIER_FLOOR`): 1 for a
    material the classifier is sure of, 1.2 at p = 0.5 and 2.4 at p = 0.01 with weight 0.3.
    Refined siblings (four sphere materials, two emulsions) often end within the noise of a
    256 px render's descriptor distance, which varies by a factor 2-3 between particle layouts of
    one recipe; the classifier has seen every material over its whole parameter range. No
    classifier (stale or missing) or weight 0: the score is left as it is."""
    if not probabilities or weight <= 0 or cand.score is None:
        return
    p = max(float(probabilities.get(cand.material_id, 0.0)), CLASSIFIER_FLOOR)
    cand.classifier_probability = p
    cand.score *= 1.0 + weight * -math.log(p)


#: Geometry correction steps after refinement (each: one render to measure, two to describe).
FINISH_STEPS = 2


def finish_geometry(cand: Candidate, scene, structure, opts: FitOptions, baseline: float, desc,
                    target_descriptor, field=None, measurement=None, deadline: float = math.inf) -> None:
    """Correct the refined candidate's particle size and coverage (and, for agglomerates on a
    judged field larger than the ranking render, the primaries per aggregate: the reference's
    aggregate size) until its render (``field``,
    default :func:`judge_field_scene`) measures like the reference (refinement changes blur,
    contrast and noise, which move the measured edges, but never the geometry), keeping each
    step only when the combined score improves. ``measurement`` is that render's measurement
    at ``cand.x_final`` when the caller has it already; no step starts after ``deadline``."""
    from fitting.fit.candidates import CORRECT_ABOVE, measure_render
    mat = scene.material
    field = field or judge_field_scene(scene, structure)
    m = measurement
    # Aggregate size is corrected only where the judged field is larger than the ranking
    # render's, i.e. holds several of the reference's aggregates (judge_field_factor).
    clusters = field.settings.size > scene.settings.size and mat.geometry_kind == "agglomerates"
    corrected = ("size", "coverage", "cluster") if clusters else ("size", "coverage")
    for _ in range(FINISH_STEPS):
        terms = cand.structure_terms or {}
        if max(terms.get(k, 0.0) for k in corrected) <= CORRECT_ABOVE or time.time() > deadline:
            return
        if m is None:
            m = measure_render(field.render_numpy(cand.x_final, seed=EVAL_SEEDS[0]))
        x_new = correct_geometry(mat, cand.x_final, structure, m, clusters=clusters)
        if np.allclose(x_new, cand.x_final, atol=1e-4):
            return
        m_new = measure_render(field.render_numpy(x_new, seed=EVAL_SEEDS[0]))
        t_new = structure_terms(structure, m_new)
        s_new = structure_distance(t_new, structure.weights)
        # new geometry, new particle positions: the appearance term's zones are made again
        look = (None if cand.appearance is None else
                AppearanceTerm.for_candidate(scene, x_new, cand.appearance.reference, cand.appearance.weight,
                                             seed=EVAL_SEEDS[0]))
        d_new = evaluate_distance(scene, x_new, desc, target_descriptor, appearance=look)
        score = combined_score(d_new / baseline, s_new, opts.final_structure_weight)
        if score >= cand.score:
            return
        cand.x_final, cand.distance_final, cand.structure_terms, cand.structure_distance, cand.score = \
            x_new, d_new, t_new, s_new, score
        cand.appearance = look
        m = m_new
        cand.stopped += " (geometry corrected to the measurement)" if "corrected" not in cand.stopped else ""


#: Largest side (px) of the whole-field render made for side-by-sides: a larger working image
#: is shown by its central window of this size (the render's cost grows with its area).
FIELD_MAX_SIDE = 1024


def center_window(img: np.ndarray, max_side: int) -> np.ndarray:
    """The central ``max_side`` x ``max_side`` window of ``img`` (all of it when smaller)."""
    h, w = img.shape[:2]
    y0, x0 = max(0, (h - max_side) // 2), max(0, (w - max_side) // 2)
    return img[y0:y0 + min(h, max_side), x0:x0 + min(w, max_side)]


def render_whole_field(material, x, shape: tuple[int, int], opts: FitOptions) -> np.ndarray:
    """A render of the working image's whole field (same pixel size and scale), for
    side-by-sides: a square field of the longer side, cropped to the reference's aspect."""
    from fitting.materials.scene import MaterialScene, RenderSettings
    h, w = int(shape[0]), int(shape[1])
    side = max(h, w, 16)
    img = MaterialScene(material, RenderSettings(size=side, spp=opts.spp, layout_seed=opts.seed)).render_numpy(
        x, seed=EVAL_SEEDS[0])
    return np.clip(img[:h, :w], 0.0, 1.0).astype(np.float32)


def particle_summaries(measurement, render_field: np.ndarray, structure, ref, pixel_size_nm,
                       field_scale: float = 1.0):
    """``measured`` (the reference's particles) and ``fitted`` (the result's, measured on the
    whole-field render) as count, median / geometric-mean diameter, GSD and coverage in
    reference pixels, and in nm when the pixel size is known. Counts are for the reference's
    whole fitting region: the render's count is multiplied by ``field_scale`` (the region's
    area over the rendered window's)."""
    from fitting.fit.candidates import measure_render
    if measurement is None:
        return None, None
    f = structure.render_per_reference_px if structure is not None else (
        max(render_field.shape) / float(max(ref.cropped.shape)))
    measured = size_summary(measurement)
    # The whole field at the reference's pixel scale is measured the way the reference was
    # (the same size method), so the two numbers compare like for like.
    m_fit = measure_render(render_field, method=measurement.method)
    measured["diameters"] = [round(float(v), 2) for v in measurement.diameters_px]
    fitted_diameters = [round(float(v) / f, 2) for v in m_fit.diameters_px]
    fitted = size_summary(m_fit, reference_px_per_unit=f, field_scale=field_scale)
    measured.update(polarity=measurement.polarity, shape=measurement.shape.get("class"), method=measurement.method,
                    confidence={k: round(float(v), 3) for k, v in measurement.confidence.items()})
    fitted.update(polarity=m_fit.polarity, shape=m_fit.shape.get("class"), method=m_fit.method,
                  diameters=fitted_diameters)
    for d in (measured, fitted):
        d["unit"] = "reference px"
        d["pixel_size_nm"] = None if pixel_size_nm is None else float(pixel_size_nm)
        d["diameter_nm"] = (None if pixel_size_nm is None else
                            {k: (None if d[k] is None else d[k] * float(pixel_size_nm)) for k in ("median", "gmean")})
    return measured, fitted


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
