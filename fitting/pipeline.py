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
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import Cancelled, MatfitError
from .events import CancelToken, EventSink, FitEvent, null_sink

SIZE_PARAMS = ("size_mean", "primary_size", "length_mean", "diameter")
DENSITY_PARAMS = ("coverage",)
EVAL_SEEDS = (1001, 1002)
LOSS_PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass
class FitOptions:
    budget_s: float = 120.0          # whole fit, wall clock
    iterations: int = 60             # per candidate, at most
    size: int = 256                  # render/working resolution
    spp: int = 4
    seed: int = 0
    top_k: int = 3
    backbone: str = "vgg16-hed"
    preview_every: int = 5           # iterations between preview events
    lr: float = 0.04
    patience: int = 12               # whole-render iterations without improvement before stopping
    hist_weight: float = 1.0
    # Side of the random square crop of each refinement render that the descriptor loss sees, as
    # a fraction of the render size (1 = the whole render); ``screen_loss_crop`` for the short
    # screening refinements, ``loss_crop`` for the final ones. The reference is described by
    # tiles of the same side at the same pixel scale; Gram matrices are position averages, so a
    # crop's is a noisy sample of the whole image's. VGG forward+backward dominates an iteration
    # and scales with the pixel count: a 128 px crop of a 256 px render runs ~2x the iterations
    # (5.3-6.6 vs 2.5-3.0 per second in bfloat16, fit_speed.json). Why the final refinement
    # sees the whole render anyway: an L1 distance of one crop to the tiles' mean also rewards
    # renders whose crops all look alike. On the bundled example the crop loss fell from 1.6 to
    # 0.8 while the whole render's distance rose from 0.39 to 0.69, so the fit kept its initial
    # guess; with the whole render it refines 0.386 -> 0.308 (README example, 120 s budget,
    # no screening: done in 82 s; 0.390 -> 0.306 in 84 s in a later clean install). On 30
    # synthetic fits (50 s, with screening) whole-render final refinement reached median final
    # distances of 0.267 and 0.279 in two runs, crops everywhere 0.288, and removed 70-71 % of
    # the excess over the true parameters' floor (67 %). Screening (when on) keeps the crops: whole-render screening put
    # the true material in the top 3 less often (80 % vs 83-90 %).
    loss_crop: float = 1.0
    screen_loss_crop: float = 0.5
    materials: list[str] | None = None   # restrict the library (tests, power users)
    scales: tuple[int, ...] = (256, 384, 512, 768)   # reference working sizes (longer side, px)
    search_sizes: bool = True
    # Screening (off by default): the best ``screen`` materials of the ranking are each refined
    # briefly (together ``screen_share`` of the budget) and re-ranked by their refined distance
    # before the final ``top_k`` are refined in full. Meant to lift a true material that one
    # render of its predictor's guess ranks 4th-5th; measured, it does more harm than good. In
    # four runs of 30 synthetic fits (50 s) it moved the true material out of the top 3 in 3-5
    # fits and into it in 2-4 (top 3: 87-90 % before, 80-90 % after), because a 2.5 s refinement
    # gains most on materials that start far off. Without it the three refinements share the
    # whole budget (fit_synthetic.json; with screening: fit_synthetic_screening.json): top 3
    # 90 %, result = true material 63 % (57 %), median final distance 0.251 (0.267), 85 % of
    # the excess over the floor removed (70 %), lower final distance on 22 of 30 fits.
    screen: int = 0
    screen_share: float = 0.25
    # Arithmetic of the VGG passes of the ranking renders and of the refinement loss: "bfloat16"
    # (autocast), "float32", or "auto" = bfloat16 on CPUs with bfloat16 instructions
    # (cpu_has_fast_bf16), float32 elsewhere. VGG16 forward+backward on this machine (2 cores,
    # AVX512-BF16): 128 px 127 -> 71 ms, 256 px 467 -> 238 ms; the loss moved by < 0.05 % and the
    # image gradient kept a cosine of 0.983-0.999 to float32's on four texture pairs. The
    # distances that screen and choose the result and that are reported (evaluate_distance)
    # are always float32.
    loss_precision: str = "auto"

    def __post_init__(self) -> None:
        for name in ("loss_crop", "screen_loss_crop"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise MatfitError(f"{name} must be a fraction in 0..1, got {getattr(self, name)}",
                                  hint="0.5 = a crop of half the render's side; 1 = the whole render")
        if self.loss_precision not in LOSS_PRECISIONS:
            raise MatfitError(f"loss_precision must be one of {', '.join(LOSS_PRECISIONS)}, got {self.loss_precision!r}",
                              hint="auto picks bfloat16 on CPUs with bfloat16 instructions, else float32")
        if int(self.screen) < 0 or not 0.0 <= float(self.screen_share) < 1.0:
            raise MatfitError(f"screen must be >= 0 and screen_share in [0, 1), got {self.screen}, "
                              f"{self.screen_share}", hint="screen 0 (or <= top_k) turns screening off")

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["scales"] = list(self.scales)
        return d


@dataclass
class Candidate:
    material_id: str
    scale: int
    x_initial: np.ndarray
    distance_initial: float
    x_final: np.ndarray | None = None
    distance_final: float | None = None
    history: list[float] = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0
    stopped: str = ""
    predictor: str = "defaults"

    def summary(self) -> dict:
        return {"material": self.material_id, "scale": self.scale, "distance_initial": self.distance_initial,
                "distance_final": self.distance_final, "iterations": self.iterations,
                "seconds": round(self.seconds, 2), "stopped": self.stopped, "initial_guess": self.predictor}


@dataclass
class FitResult:
    recipe: Any
    candidates: list[Candidate]
    ranking: list[dict]
    best: Candidate
    timings: dict[str, float]
    reference: dict
    preview: np.ndarray              # best render (size x size, float [0,1])
    reference_tile: np.ndarray       # the reference at the chosen scale, centre tile

    def summary(self) -> dict:
        return {"candidates": [c.summary() for c in self.candidates], "best": self.best.material_id,
                "metrics": {"distance_initial": self.best.distance_initial,
                            "distance_final": self.best.distance_final,
                            "improvement": (self.best.distance_initial - (self.best.distance_final or 0.0)),
                            "scale": self.best.scale},
                "ranking": self.ranking, "timings": self.timings}


def thumbnail(img: np.ndarray, size: int = 96) -> np.ndarray:
    from PIL import Image
    a = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))


def center_tile(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape
    if h < size or w < size:
        from PIL import Image
        s = size / min(h, w)
        img = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize(
            (max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR))
        h, w = img.shape
    y0, x0 = (h - size) // 2, (w - size) // 2
    return img[y0:y0 + size, x0:x0 + size]


def sorted_pixels(img: torch.Tensor, n: int = 4096) -> torch.Tensor:
    """Quantiles of the gray-level distribution (differentiable through the sort)."""
    flat = img.reshape(-1)
    if flat.numel() > n:
        idx = torch.linspace(0, flat.numel() - 1, n).long()
        return torch.sort(flat)[0][idx]
    return torch.sort(flat)[0]


class ReferenceTarget:
    """The reference described at several working scales (descriptor + gray-level quantiles)."""

    def __init__(self, ref, descriptor, scales, size, cancel: CancelToken | None = None) -> None:
        self.ref = ref
        self.size = size
        self.by_scale: dict[int, dict[str, Any]] = {}
        full = ref.cropped
        longest = max(full.shape)
        mask_full = None
        if ref.valid_mask is not None:
            x0, y0, x1, y1 = ref.crop_box
            mask_full = ref.valid_mask[y0:y1, x0:x1]
        used = []
        for s in scales:
            if cancel is not None:
                cancel.check("the fit")
            s = int(min(s, longest))
            if s in used or s < size * 0.75:
                continue
            used.append(s)
            work = ref.working(max_side=s)
            mask = None
            if mask_full is not None:
                from PIL import Image
                mask = np.asarray(Image.fromarray(mask_full.astype(np.uint8) * 255).resize(
                    (work.shape[1], work.shape[0]), Image.NEAREST)) > 127
            self.by_scale[s] = self._describe(descriptor, work, mask, max_tiles=6)
        if not self.by_scale:  # image smaller than every scale: use it as it is
            self.by_scale[longest] = self._describe(descriptor, ref.working(max_side=longest), None)

    def _describe(self, descriptor, work: np.ndarray, mask: np.ndarray | None, **kw) -> dict[str, Any]:
        desc = descriptor.describe_reference(work, valid_mask=mask, **kw)
        vals = work[mask] if mask is not None else work.reshape(-1)
        q = torch.as_tensor(np.quantile(vals, np.linspace(0, 1, 4096)).astype(np.float32))
        return {"descriptor": desc.detach(), "quantiles": q, "work": work, "mask": mask,
                "tile": center_tile(work, self.size)}

    @property
    def noise(self) -> float:
        """Pixel noise std of the reference at the working size of the renders."""
        size = min(self.by_scale)
        return estimate_noise(self.by_scale[size]["work"])

    @property
    def scales(self) -> list[int]:
        return list(self.by_scale)


class MonotoneProgress:
    """Wraps a listener so overall progress never goes backwards (events that carry no
    progress of their own, such as log lines, inherit the last value)."""

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink
        self.progress = 0.0

    def __call__(self, ev: FitEvent) -> None:
        self.progress = max(self.progress, ev.progress)
        ev.progress = self.progress
        self.sink(ev)


def _emit(sink: EventSink, kind: str, **kw) -> None:
    try:
        sink(FitEvent(kind=kind, **kw))
    except Exception:  # a broken listener must not kill the fit
        pass


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


def estimate_noise(gray: np.ndarray) -> float:
    """Robust std of pixel noise: MAD of horizontal neighbour differences (noise adds
    sqrt(2) sigma to a difference, smooth structure adds little to the median)."""
    d = np.diff(np.asarray(gray, np.float64), axis=1).ravel()
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


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
    from .descriptor import descriptor_distance
    from .predictor import load_predictor
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
    from .descriptor import TextureDescriptor
    from .images import ReferenceImage, load_reference
    from .library import load_library
    from .recipe import Recipe
    from .runtime import init_mitsuba
    from .scene import MaterialScene, RenderSettings

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


def evaluate_distance(scene, x: np.ndarray, desc, tgt_desc, seeds=EVAL_SEEDS) -> float:
    """Descriptor distance averaged over fixed seeds: the same yardstick for every candidate."""
    from .descriptor import descriptor_distance
    with torch.no_grad():
        imgs = torch.stack([scene.render(torch.as_tensor(x), seed=s) for s in seeds])[:, None]
        return float(descriptor_distance(desc.describe(imgs), tgt_desc).mean())


def crop_loss_target(desc, tgt: dict, opts: FitOptions):
    """(descriptor, target vector, crop side in px or 0) of the refinement loss at one scale.

    With ``opts.loss_crop`` below 1, the loss describes a crop at its own pixel
    scale (no resampling), and the reference is described by tiles of that size of the same
    working image (cached in ``tgt``), so both sides are statistics of equal-sized windows.
    """
    frac = float(opts.loss_crop or 0.0)
    crop = int(round(frac * opts.size))
    if frac <= 0.0 or crop >= opts.size:
        return desc, tgt["descriptor"], 0
    crop = max(crop, 32)          # the descriptor's minimum working size
    key = ("crop_descriptor", crop)
    cdesc = desc.with_work_size(crop)
    if key not in tgt:
        tgt[key] = cdesc.describe_reference(tgt["work"], valid_mask=tgt.get("mask"), max_tiles=16).detach()
    return cdesc, tgt[key], crop


def loss_precision(opts: FitOptions, device: torch.device) -> str:
    """The arithmetic the ranking's and the refinement loss's VGG passes run in: "float32" or
    "bfloat16" (FitOptions.loss_precision resolved for ``device``)."""
    if opts.loss_precision != "auto":
        return opts.loss_precision
    from .runtime import cpu_has_fast_bf16
    return "bfloat16" if torch.device(device).type == "cpu" and cpu_has_fast_bf16() else "float32"


def describe_in(desc, images: torch.Tensor, precision: str) -> torch.Tensor:
    """``desc.describe(images)`` with the VGG pass in ``precision``; float32 descriptors."""
    with torch.autocast(desc.device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        return desc.describe(images).float()


def refine(scene, tgt: dict, desc, cand: Candidate, opts: FitOptions, budget_s: float, sink: EventSink,
           cancel: CancelToken, index: int, total: int, stage: str = "refine",
           progress_range: tuple[float, float] = (0.25, 0.95), known_initial: float | None = None,
           first_iteration: int = 0) -> None:
    """Gradient descent on ``cand``'s refinable parameters from ``cand.x_initial`` for at most
    ``budget_s`` seconds; sets x_final, distance_final (never worse than the start), history.

    ``known_initial``: the start's evaluated distance when already known (continuing a screened
    candidate); ``first_iteration`` numbers the iterations (and render seeds) after earlier ones.
    """
    from .descriptor import descriptor_distance
    t_start = time.time()
    mat = scene.material
    mask = torch.as_tensor(mat.refine_mask())
    x0 = torch.as_tensor(cand.x_initial, dtype=torch.float32)
    cand.distance_initial = (known_initial if known_initial is not None
                             else evaluate_distance(scene, cand.x_initial, desc, tgt["descriptor"]))
    free = x0[mask].clone().requires_grad_(True)
    loss_desc, loss_target, crop = crop_loss_target(desc, tgt, opts)
    precision = loss_precision(opts, loss_desc.device)
    crop_rng = np.random.default_rng([opts.seed, index, first_iteration, 0xC409])
    p0, p1 = progress_range
    # A crop's loss is noisier and ~2.4x cheaper than the whole render's: scale the patience by
    # the side ratio so early stopping waits about as long in time (with a patience of 12 crop
    # iterations, the best candidate's refinement stopped "converged" in 14 of 30 synthetic
    # fits, 7 of them without any gain).
    patience = int(round(opts.patience * (opts.size / crop))) if crop else opts.patience
    optim = torch.optim.Adam([free], lr=opts.lr)
    q_ref = tgt["quantiles"]
    best_x, best_loss, since_best = cand.x_initial.copy(), math.inf, 0
    ema = None
    last_dur = 0.0
    cand.stopped = "iterations"
    for it in range(opts.iterations):
        cancel.check("the fit")
        elapsed = time.time() - t_start
        if elapsed + last_dur > budget_s and it > 0:
            cand.stopped = "budget"
            break
        t_it = time.time()
        x = x0.clone()
        x[mask] = free
        seed = opts.seed * 100003 + index * 1009 + first_iteration + it
        img = scene.render(x, seed=seed)
        seen = img
        if crop:
            y0, x0_ = (int(v) for v in crop_rng.integers(0, img.shape[-1] - crop + 1, size=2))
            seen = img[y0:y0 + crop, x0_:x0_ + crop]
        d = descriptor_distance(describe_in(loss_desc, seen[None, None], precision), loss_target).mean()
        hist = (sorted_pixels(img) - q_ref).abs().mean()
        loss = d + opts.hist_weight * hist
        optim.zero_grad()
        loss.backward()
        # The loss was measured at x *before* this step: remember that x if it is the best.
        lv = float(loss.detach())
        ema = lv if ema is None else 0.7 * ema + 0.3 * lv
        if ema < best_loss - 1e-4:
            best_loss, since_best = ema, 0
            best_x = x.detach().numpy().copy()
        else:
            since_best += 1
        optim.step()
        with torch.no_grad():
            free.clamp_(0.0, 1.0)
        cand.history.append(lv)
        cand.iterations = it + 1
        last_dur = time.time() - t_it
        frac = p0 + (p1 - p0) * (index + min(1.0, (it + 1) / opts.iterations)) / total
        phys = mat.physical(x.detach().numpy())
        _emit(sink, "iteration", stage=stage, progress=frac,
              eta_s=max(0.0, budget_s - (time.time() - t_start)) + (total - index - 1) * budget_s,
              message=f"{mat.id} it {first_iteration + it + 1}: loss {lv:.4f}",
              data={"candidate": index, "material": mat.id, "iteration": first_iteration + it + 1, "loss": lv,
                    "distance": float(d.detach()), "hist": float(hist.detach()),
                    "params": {k: round(v, 5) for k, v in phys.items()}})
        if opts.preview_every and (it % opts.preview_every == 0):
            _emit(sink, "preview", stage=stage, progress=frac,
                  data={"candidate": index, "material": mat.id, "iteration": first_iteration + it + 1,
                        "image": (np.clip(img.detach().numpy(), 0, 1) * 255).astype(np.uint8)})
        if since_best >= patience:
            cand.stopped = "converged"
            break
    final = evaluate_distance(scene, best_x, desc, tgt["descriptor"])
    if final > cand.distance_initial:
        # Refinement must never hand back something worse than where it started.
        best_x, final = cand.x_initial.copy(), cand.distance_initial
        cand.stopped += " (kept initial)"
    cand.x_final = best_x
    cand.distance_final = final
    cand.seconds = time.time() - t_start
