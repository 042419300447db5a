"""Candidate proposals and their ranking: each material's proposal (predictor or defaults), noise
and tone matched to the reference, a few particle sizes, rendered and ranked by descriptor
distance.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from fitting.core.events import CancelToken, EventSink, _emit
from fitting.fit.options import FitOptions
from fitting.fit.refine import describe_in, loss_precision
from fitting.fit.structure import (StructureTarget, combined_score, correct_geometry, impose_geometry, structure_distance,
                                   structure_terms)
from fitting.fit.target import ReferenceTarget, sorted_pixels

SIZE_PARAMS = ("size_mean", "primary_size", "length_mean", "diameter")
#: A render whose measured size, coverage or cluster term exceeds this (about 10 % in size, 0.05
#: in coverage) gets a geometry correction step and a new render, at most CORRECTION_STEPS times.
CORRECT_ABOVE = 0.3
CORRECTION_STEPS = 3
DENSITY_PARAMS = ("coverage",)


def size_variants(material, x0: np.ndarray, search: bool) -> list[np.ndarray]:
    """The proposal plus a few geometry variants around it: particle size up and down, and
    sparser/denser packing (geometry is searched, never differentiated)."""
    out = [x0]
    if not search:
        return out
    for names, steps in ((SIZE_PARAMS, (-0.3, 0.3)), (DENSITY_PARAMS, (-0.35, 0.35))):
        for i, s in enumerate(material.specs):
            if s.name in names:
                for d in steps:
                    x = x0.copy()
                    x[i] = float(np.clip(x0[i] + d, 0.0, 1.0))
                    if abs(x[i] - x0[i]) > 1e-3:
                        out.append(x)
                break
    return out




def match_noise(material, x: np.ndarray, sigma: float) -> np.ndarray:
    """Start from the reference's measured noise level instead of the material default:
    read-out noise at the measured sigma, shot noise at its weakest (highest dose)."""
    x = x.copy()
    names = material.names
    if "noise_gauss" in names:
        s = material.spec("noise_gauss")
        x[names.index("noise_gauss")] = float(np.clip(s.to_normalized(min(max(sigma, s.min), s.max)), 0, 1))
    if "noise_dose" in names:
        x[names.index("noise_dose")] = 1.0
    return x


def match_tone(scene, x: np.ndarray, quantiles: torch.Tensor, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """Set contrast/offset so the render's gray-level distribution matches the reference's.

    The tone curve is the last step before clipping: out = (v - 0.5) * contrast + 0.5 + offset.
    Render once with contrast 1 / offset 0, least-squares fit the sorted render values to the
    reference quantiles, then render again with the fitted tone (applying the tone to the
    first, clipped render instead was measured to misjudge SEM renders with saturated edges:
    distance 1.55 instead of 0.97 for the right material). Lets ranking compare structure
    rather than the defaults' brightness. Returns the adjusted vector and its image.
    """
    mat = scene.material
    names = mat.names
    if "contrast" not in names or "offset" not in names:
        with torch.no_grad():
            return x, scene.render(torch.as_tensor(x), seed=seed)
    ic, io = names.index("contrast"), names.index("offset")
    sc, so = mat.specs[ic], mat.specs[io]
    x1 = x.copy()
    x1[ic] = sc.to_normalized(min(max(1.0, sc.min), sc.max))
    x1[io] = so.to_normalized(min(max(0.0, so.min), so.max))
    c0, o0 = sc.to_physical(float(x1[ic])), so.to_physical(float(x1[io]))
    with torch.no_grad():
        img = scene.render(torch.as_tensor(x1), seed=seed)
    v = (img - 0.5 - o0) / c0          # pre-tone values (clipped ones stay clipped)
    vs = sorted_pixels(v, n=quantiles.numel()).numpy().astype(np.float64)
    q = np.interp(np.linspace(0, 1, vs.size), np.linspace(0, 1, quantiles.numel()), quantiles.numpy()) - 0.5
    if vs.std() < 1e-4:
        return x1, img
    a, b = np.polyfit(vs, q, 1)
    c = float(min(max(a, sc.min), sc.max))
    o = float(min(max(b, so.min), so.max))
    x1[ic] = float(np.clip(sc.to_normalized(c), 0, 1))
    x1[io] = float(np.clip(so.to_normalized(o), 0, 1))
    with torch.no_grad():
        return x1, scene.render(torch.as_tensor(x1), seed=seed)


def measure_render(img, method: str = "auto") -> object:
    """The particle measurement of a render. The size method is chosen on the render itself by
    default: forcing the reference's (say, granulometry of chains) onto a 256 px render that
    holds a few cut aggregates measured it worse than letting it choose."""
    from fitting.measure.particles import measure_particles
    a = img.detach().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    return measure_particles(np.clip(a, 0.0, 1.0).astype(np.float32), method=method)


def scale_baselines(entries: list[dict]) -> dict[int, float]:
    """Each working scale's typical descriptor distance: the median over the materials' best
    entries at the scale every material visited (the one with most materials), and at every
    other scale that median times the median ratio of a material's distance there to its
    distance at the first, over the materials that visited both. Paired, a later scale's
    baseline does not depend on which materials it visited (the best ones, which have lower
    distances than the library's median)."""
    per: dict[int, dict[str, float]] = {}
    for e in entries:
        m = per.setdefault(e["scale"], {})
        m[e["material"]] = min(m.get(e["material"], math.inf), e["descriptor_distance"])
    if not per:
        return {}
    first = max(per, key=lambda s: len(per[s]))
    base = {first: max(float(np.median(list(per[first].values()))), 1e-6)}
    for s, v in per.items():
        if s == first:
            continue
        both = [m for m in v if m in per[first]]
        if both:
            ratio = float(np.median([v[m] / max(per[first][m], 1e-6) for m in both]))
            base[s] = max(base[first] * ratio, 1e-6)
        else:
            base[s] = max(float(np.median(list(v.values()))), 1e-6)
    return base


#: Materials each later working scale visits: the first scale's best, in order. A fixed number,
#: not as many as the ranking's time allows, so that which materials reach a finer scale (and
#: with them the ranking) does not depend on the machine's speed that minute.
LATER_SCALE_MATERIALS = 6

#: Geometry kinds whose particles can form branched aggregates.
BRANCHED_KINDS = ("agglomerates",)


def keep_branched_candidate(ranking: list[dict], lib: dict, shape_class: str | None, top_k: int) -> list[dict]:
    """The ranking, with the best material that renders branched aggregates moved up to place
    ``top_k`` when the reference's particles are branched and no such material is in the top ``top_k``.

    A ranking render (256 px) cannot hold aggregates as large as those of a sparse TEM field, so
    on such references it rates the materials that make them below compact particles; the refined
    candidates are judged on a larger field (:func:`fitting.fit.pipeline.judge_field_scene`), where
    the aggregate material can win, but only if it is among them.
    """
    if shape_class != "branched" or len(ranking) <= top_k:
        return ranking
    makes = [lib[r["material"]].geometry_kind in BRANCHED_KINDS for r in ranking]
    if any(makes[:top_k]) or not any(makes):
        return ranking
    j = makes.index(True)
    return ranking[:top_k - 1] + [ranking[j]] + [r for i, r in enumerate(ranking[top_k - 1:], top_k - 1) if i != j]


def classified_candidates(ranking: list[dict], probabilities: dict[str, float] | None, top_k: int,
                          from_classifier: int) -> list[dict]:
    """The ranking, reordered so that its first ``top_k`` entries (the materials refined) are the
    ranking's best material and the ``from_classifier`` materials the classifier finds most
    probable, then the ranking's next best as long as places are left; the other entries
    follow in ranking order.

    The ranking sees each material at one parameter vector, its predictor's proposal; where that
    proposal misses, a sibling material whose proposal happened to land closer ranks higher, and
    on the synthetic benchmark the true material was among the ranking's first three on 9 of 20
    targets. The classifier has seen every material over its whole parameter range
    (:mod:`fitting.fit.classifier`); refinement and the judged field decide between them
    (docs/decisions.md, "Fit: a material classifier picks candidates").
    """
    if not probabilities or from_classifier <= 0 or len(ranking) <= 1:
        return ranking
    by_id = {r["material"]: r for r in ranking}
    chosen = [ranking[0]["material"]]
    for m in probabilities:
        if len(chosen) >= min(top_k, 1 + from_classifier):
            break
        if m in by_id and m not in chosen:
            chosen.append(m)
    for r in ranking:
        if len(chosen) >= top_k:
            break
        if r["material"] not in chosen:
            chosen.append(r["material"])
    return [by_id[m] for m in chosen] + [r for r in ranking if r["material"] not in chosen]


def structure_first(ranking: list[dict]) -> list[dict]:
    """The ranking with the entry whose render measures closest to the reference (lowest
    structure distance; the ranking distance breaks ties) moved to the front.

    For a sparse reference (``pipeline.is_sparse``), whose descriptor distances compare renders
    that are mostly background: the ranking's place among the refined candidates goes to the
    material the final choice would judge best, as the final choice judges it."""
    if len(ranking) <= 1 or any(r.get("structure_distance") is None for r in ranking):
        return ranking
    best = min(ranking, key=lambda r: (round(float(r["structure_distance"]), 3), r["distance"]))
    return [best] + [r for r in ranking if r is not best]


def rank_materials(lib: dict, scenes: dict, target: "ReferenceTarget", desc, opts: "FitOptions", sink: EventSink,
                   cancel: CancelToken, search_deadline: float = math.inf,
                   structures: dict[int, StructureTarget] | None = None,
                   all_entries: list[dict] | None = None, sparse: bool = False) -> list[dict]:
    """Propose, tone-match, render and describe every material; rank by distance to the reference.

    With ``structures`` (the reference's measured particles expressed at each working scale),
    each material starts twice at every scale: its predictor's proposal as it is, and the
    proposal with the geometry set from the measurement, whose geometry is then corrected (at
    most :data:`CORRECTION_STEPS` times, kept only when it measures closer) until it measures
    like the reference. For a ``sparse`` reference (``pipeline.is_sparse``) a third start takes
    the material's default appearance with the measured geometry: the predictors read the
    reference's descriptor, which there describes mostly background, so their appearance can
    miss the look entirely (a colloid proposal of dark discs for bright cores in dark rings).
    Every render is measured the same way as the reference; the ranking
    distance is :func:`combined_score` of the descriptor and structure distances, and each
    material keeps its best start and scale. Without them, particle sizes are
    searched around the proposal (stage B, for the best half of the materials, until
    ``search_deadline``). Returns the ranking, best first; ``all_entries``, when given, receives
    every rendered entry (each material's every scale and start), for benchmarks.
    """
    from fitting.describe.descriptor import descriptor_distance
    from fitting.fit.predictor import load_predictor
    quant = target.by_scale[target.scales[0]]["quantiles"]   # gray levels barely depend on scale
    seed = opts.seed + 17
    precision = loss_precision(opts, desc.device)
    steer = bool(structures)
    best: dict[str, dict] = {}
    proposals: dict[str, dict[int, np.ndarray]] = {}
    sources: dict[str, str] = {}

    entries: list[dict] = [] if all_entries is None else all_entries

    def keep(mid: str, s: int, x: np.ndarray, img, terms, m_render, start: str = "proposal") -> None:
        mat = lib[mid]
        with torch.no_grad():
            dvec = describe_in(desc, img[None, None], precision)
        for sc in ([s] if steer else target.scales):
            d_desc = float(descriptor_distance(dvec, target.by_scale[sc]["descriptor"]).mean())
            d_struct = structure_distance(terms, structures[sc].weights) if terms is not None else 0.0
            entries.append({"material": mid, "title": mat.title, "imaging": mat.imaging,
                            "descriptor_distance": d_desc, "structure_distance": d_struct,
                            "structure_terms": terms, "render_measurement": m_render,
                            "scale": sc, "x": x.copy(), "source": sources[mid], "start": start,
                            "img": img.numpy()})
        choose()

    def choose() -> None:
        """Best entry per material. With several working scales each descriptor distance is
        taken relative to the materials' median at its scale: finer scales show smoother,
        larger particles and give every material lower distances, which would otherwise
        decide the scale instead of the match."""
        base = scale_baselines(entries) if steer else {}
        best.clear()
        for e in entries:
            e["scale_baseline"] = base.get(e["scale"], 1.0)
            e["distance"] = combined_score(e["descriptor_distance"] / e["scale_baseline"], e["structure_distance"],
                                           opts.structure_weight)
            if e["material"] not in best or e["distance"] < best[e["material"]]["distance"]:
                best[e["material"]] = e

    def consider(mid: str, x: np.ndarray, s: int) -> None:
        mat = lib[mid]
        x = match_noise(mat, x, target.noise)
        if not steer:
            x, img = match_tone(scenes[mid], x, quant, seed)
            keep(mid, s, x, img, None, None)
            return
        st = structures[s]
        if sources[mid] == "predictor":
            # The predictor's own proposal is a candidate too: on a reference its training
            # renders resemble, it is often closer than any geometry the measurement imposes.
            x_p, img_p = match_tone(scenes[mid], x, quant, seed)
            m_p = measure_render(img_p)
            keep(mid, s, x_p, img_p, structure_terms(st, m_p), m_p, start="predictor")
        measured_start(mid, x, s, keep_predicted_size=sources[mid] == "predictor", start="measured")
        if sparse and sources[mid] == "predictor":
            measured_start(mid, match_noise(mat, mat.default_vector(), target.noise), s,
                           keep_predicted_size=False, start="default")

    def measured_start(mid: str, x: np.ndarray, s: int, keep_predicted_size: bool, start: str) -> None:
        mat = lib[mid]
        st = structures[s]
        # The geometry starts from the measurement, except the primary size of an agglomerate
        # material on a reference whose particles are compact (not branched): there a measured
        # "particle" may be a whole cluster, and a predictor's primary size is the better start.
        # The corrections below then fix what still measures differently.
        keep_size = (keep_predicted_size and mat.geometry_kind == "agglomerates"
                     and st.shape_class != "branched")
        x = impose_geometry(mat, x, None if keep_size else st.diameter_render, st.coverage,
                            st.measurement.gsd, st.measurement.shape.get("elongation"))
        x, img = match_tone(scenes[mid], x, quant, seed)
        m_render = measure_render(img)
        terms = structure_terms(st, m_render)
        for _ in range(CORRECTION_STEPS):
            if max(terms["size"], terms["coverage"]) <= CORRECT_ABOVE or \
                    time.time() > search_deadline:
                break
            x_new = correct_geometry(mat, x, st, m_render)
            x_new, img_new = match_tone(scenes[mid], x_new, quant, seed)
            m_new = measure_render(img_new)
            t_new = structure_terms(st, m_new)
            if structure_distance(t_new, st.weights) >= structure_distance(terms, st.weights):
                break          # the material cannot get closer (e.g. a parameter at its limit)
            x, img, m_render, terms = x_new, img_new, m_new, t_new
        keep(mid, s, x, img, terms, m_render, start=start)

    n = len(lib)
    seen: dict[str, set[bytes]] = {mid: set() for mid in lib}
    # Scales in the outer loop: every material is rendered at the first (preferred) working
    # scale before any gets a second one, and the later scales visit the materials closest at
    # the first one first, so when ranking time runs out it is the least promising materials,
    # not those late in the library, that are left with one scale.
    for k, s in enumerate(target.scales):
        order = list(lib.items()) if k == 0 else sorted(
            lib.items(), key=lambda item: best[item[0]]["distance"] if item[0] in best else math.inf)
        for i, (mid, mat) in enumerate(order):
            cancel.check("the fit")
            if k > 0 and (i >= LATER_SCALE_MATERIALS or time.time() > search_deadline):
                break   # the scales ranked so far decide
            if mid not in proposals:
                pred = load_predictor(mat, backbone=desc.backbone_id,
                                      on_warning=lambda m: _emit(sink, "log", stage="rank", message=m))
                sources[mid] = "predictor" if pred is not None else "defaults"
                proposals[mid] = {sc: (pred.predict(target.by_scale[sc]["descriptor"]) if pred is not None
                                       else mat.default_vector()) for sc in target.scales}
            key = np.round(proposals[mid][s], 4).tobytes() + (str(s).encode() if steer else b"")
            if key in seen[mid]:
                continue
            seen[mid].add(key)
            consider(mid, proposals[mid][s], s)
            r = best[mid]
            extra = (f" (descriptor {r['descriptor_distance']:.4f}, structure {r['structure_distance']:.2f}; "
                     f"so far)" if steer else "")
            _emit(sink, "log", stage="rank", progress=0.05 + 0.12 * (k * n + i + 1) / (n * len(target.scales)),
                  message=f"{mid}: distance {r['distance']:.4f}{extra} at scale {r['scale']}")
    if opts.search_sizes and not steer:
        order = sorted(best, key=lambda m: best[m]["distance"])[:max(opts.top_k, (n + 1) // 2)]
        for i, mid in enumerate(order):
            cancel.check("the fit")
            if time.time() > search_deadline:
                _emit(sink, "log", stage="rank", message="size search stopped: its share of the budget is used")
                break
            x0 = proposals[mid][best[mid]["scale"]]
            for x in size_variants(lib[mid], x0, True)[1:]:
                consider(mid, x, best[mid]["scale"])
            _emit(sink, "log", stage="rank", progress=0.17 + 0.08 * (i + 1) / len(order),
                  message=f"{mid}: size search -> distance {best[mid]['distance']:.4f}")
    return sorted(best.values(), key=lambda r: r["distance"])
