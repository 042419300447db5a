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
from fitting.fit.target import ReferenceTarget, sorted_pixels

SIZE_PARAMS = ("size_mean", "primary_size", "length_mean", "diameter")
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


def rank_materials(lib: dict, scenes: dict, target: "ReferenceTarget", desc, opts: "FitOptions", sink: EventSink,
                   cancel: CancelToken, search_deadline: float = math.inf) -> list[dict]:
    """Propose, tone-match, render and describe every material; search sizes for the best.

    Stage A: each material's proposal (predictor or defaults) at every scale.
    Stage B: for the best half of the materials, particle sizes around the proposal.
    Every render is compared with the reference at every working scale; each material keeps
    its best (scale, size) combination. Stage B stops at ``search_deadline`` (time.time())
    so ranking cannot eat the refinement's budget. Returns the ranking, best first.
    """
    from fitting.describe.descriptor import descriptor_distance
    from fitting.fit.predictor import load_predictor
    quant = target.by_scale[target.scales[0]]["quantiles"]   # gray levels barely depend on scale
    seed = opts.seed + 17
    precision = loss_precision(opts, desc.device)
    best: dict[str, dict] = {}
    proposals: dict[str, dict[int, np.ndarray]] = {}
    sources: dict[str, str] = {}

    def consider(mid: str, x: np.ndarray) -> None:
        x = match_noise(lib[mid], x, target.noise)
        x, img = match_tone(scenes[mid], x, quant, seed)
        with torch.no_grad():
            dvec = describe_in(desc, img[None, None], precision)
        for s in target.scales:
            d = float(descriptor_distance(dvec, target.by_scale[s]["descriptor"]).mean())
            if mid not in best or d < best[mid]["distance"]:
                mat = lib[mid]
                best[mid] = {"material": mid, "title": mat.title, "imaging": mat.imaging, "distance": d,
                             "scale": s, "x": x.copy(), "source": sources[mid], "img": img.numpy()}

    n = len(lib)
    for i, (mid, mat) in enumerate(lib.items()):
        cancel.check("the fit")
        pred = load_predictor(mat, backbone=desc.backbone_id,
                              on_warning=lambda m: _emit(sink, "log", stage="rank", message=m))
        sources[mid] = "predictor" if pred is not None else "defaults"
        proposals[mid] = {s: (pred.predict(target.by_scale[s]["descriptor"]) if pred is not None
                              else mat.default_vector()) for s in target.scales}
        seen: set[bytes] = set()
        for s in target.scales:
            if seen and time.time() > search_deadline:
                break   # out of ranking time: one proposal per material from here on
            key = np.round(proposals[mid][s], 4).tobytes()
            if key not in seen:
                seen.add(key)
                consider(mid, proposals[mid][s])
        _emit(sink, "log", stage="rank", progress=0.05 + 0.12 * (i + 1) / n,
              message=f"{mid}: distance {best[mid]['distance']:.4f} at scale {best[mid]['scale']}")
    if opts.search_sizes:
        order = sorted(best, key=lambda m: best[m]["distance"])[:max(opts.top_k, (n + 1) // 2)]
        for i, mid in enumerate(order):
            cancel.check("the fit")
            if time.time() > search_deadline:
                _emit(sink, "log", stage="rank", message="size search stopped: its share of the budget is used")
                break
            x0 = proposals[mid][best[mid]["scale"]]
            for x in size_variants(lib[mid], x0, True)[1:]:
                consider(mid, x)
            _emit(sink, "log", stage="rank", progress=0.17 + 0.08 * (i + 1) / len(order),
                  message=f"{mid}: size search -> distance {best[mid]['distance']:.4f}")
    return sorted(best.values(), key=lambda r: r["distance"])
