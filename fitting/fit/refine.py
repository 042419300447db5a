"""Refinement of one candidate: Adam on its normalised parameters through the differentiable
render, with the descriptor distance plus a gray-level distribution term as the loss, and, where
the reference's particles were measured, the distance of their ring profile
(:class:`fitting.fit.appearance.AppearanceTerm`).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from fitting.core.events import CancelToken, EventSink, _emit
from fitting.fit.appearance import AppearanceTerm
from fitting.fit.options import FitOptions
from fitting.fit.results import Candidate
from fitting.fit.target import sorted_pixels

EVAL_SEEDS = (1001, 1002)


def evaluate_distance(scene, x: np.ndarray, desc, tgt_desc, seeds=EVAL_SEEDS,
                      appearance: AppearanceTerm | None = None) -> float:
    """Descriptor distance averaged over fixed seeds: the same yardstick for every candidate.
    With ``appearance``, its distance (averaged over the same renders) is added."""
    from fitting.describe.descriptor import descriptor_distance
    with torch.no_grad():
        imgs = torch.stack([scene.render(torch.as_tensor(x), seed=s) for s in seeds])
        d = float(descriptor_distance(desc.describe(imgs[:, None]), tgt_desc).mean())
        if appearance is not None:
            d += float(torch.stack([appearance.distance(im) for im in imgs]).mean())
        return d


def appearance_for(scene, x: np.ndarray, tgt: dict, opts: FitOptions) -> AppearanceTerm | None:
    """The ring-profile term for candidate ``x`` at the working scale of ``tgt`` (None where the
    reference has no profile: dense or nearly empty fields, measurement off)."""
    return AppearanceTerm.for_candidate(scene, x, tgt.get("profile"), opts.appearance_weight, seed=EVAL_SEEDS[0])


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
    from fitting.core.runtime import cpu_has_fast_bf16
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
    The candidate's appearance term (``cand.appearance``) is made here when it has none; its
    distance is part of every distance reported.
    """
    from fitting.describe.descriptor import descriptor_distance
    t_start = time.time()
    mat = scene.material
    mask = torch.as_tensor(mat.refine_mask())
    x0 = torch.as_tensor(cand.x_initial, dtype=torch.float32)
    if cand.appearance is None:
        cand.appearance = appearance_for(scene, cand.x_initial, tgt, opts)
    appearance = cand.appearance
    cand.distance_initial = (known_initial if known_initial is not None
                             else evaluate_distance(scene, cand.x_initial, desc, tgt["descriptor"],
                                                    appearance=appearance))
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
    # Backtracking: the lowest single-iteration loss and its free parameters. A loss far above
    # it means the step overshot; return there with half the step and fresh Adam moments.
    low_loss, low_free = math.inf, free.detach().clone()
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
        look = appearance.distance(img) if appearance is not None else torch.zeros(())
        loss = d + opts.hist_weight * hist + look
        lv = float(loss.detach())
        if lv > low_loss * (1.0 + opts.backtrack_jump):
            with torch.no_grad():
                free.copy_(low_free)
            lr = optim.param_groups[0]["lr"] * 0.5
            optim = torch.optim.Adam([free], lr=lr)
            cand.backtracks += 1
            cand.history.append(lv)
            cand.iterations = it + 1
            since_best += 1
            last_dur = time.time() - t_it
            _emit(sink, "log", stage=stage, message=f"{mat.id} it {first_iteration + it + 1}: loss {lv:.4f} jumped "
                  f"above {low_loss:.4f}; back to the best point, step {lr:.4f}")
            if since_best >= patience:
                cand.stopped = "converged"
                break
            continue
        if lv < low_loss:
            low_loss, low_free = lv, free.detach().clone()
        optim.zero_grad()
        loss.backward()
        # The loss was measured at x *before* this step: remember that x if it is the best.
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
                    "appearance": float(look.detach()),
                    "params": {k: round(v, 5) for k, v in phys.items()}})
        if opts.preview_every and (it % opts.preview_every == 0):
            _emit(sink, "preview", stage=stage, progress=frac,
                  data={"candidate": index, "material": mat.id, "iteration": first_iteration + it + 1,
                        "image": (np.clip(img.detach().numpy(), 0, 1) * 255).astype(np.uint8)})
        if since_best >= patience:
            cand.stopped = "converged"
            break
    final = evaluate_distance(scene, best_x, desc, tgt["descriptor"], appearance=appearance)
    if final > cand.distance_initial:
        # Refinement must never hand back something worse than where it started.
        best_x, final = cand.x_initial.copy(), cand.distance_initial
        cand.stopped += " (kept initial)"
    cand.x_final = best_x
    cand.distance_final = final
    cand.seconds = time.time() - t_start
