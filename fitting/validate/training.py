"""Training the particle detector on a recipe's renders: augmented crops, progress with ETA,
cancel, and checkpoints a later run resumes from."""
from __future__ import annotations

import hashlib
import io
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fitting.core.events import CancelToken, EventSink, _emit, null_sink
from fitting.validate.detector import ParticleDetector, SegmentationSettings, UNet, equivalent_diameters
from fitting.validate.trainset import detector_targets


@dataclass
class TrainingSettings:
    """How the detector is trained.

    Attributes
    ----------
    steps : int
        Optimiser steps (each one batch of random crops).
    batch : int
        Crops per step.
    crop : int
        Side of the square crops, px (a multiple of 8; at most the renders' side).
    learning_rate : float
        Peak learning rate of AdamW; it decays to zero along a cosine.
    channels : tuple of int
        U-Net channels per resolution.
    centre_weight : float
        Weight of the centre-map loss beside the foreground loss.
    seed : int
        Crops, augmentation and initial weights.
    checkpoint_every_s : float
        Least time between two checkpoints.
    """

    steps: int = 1200
    batch: int = 8
    crop: int = 128
    learning_rate: float = 3e-3
    channels: tuple[int, ...] = (16, 32, 64, 96)
    centre_weight: float = 2.0
    seed: int = 0
    checkpoint_every_s: float = 30.0


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Photometric augmentation of a batch (B, H, W) in [0, 1], then per-image standardisation:
    gamma, contrast and offset, Gaussian blur and Gaussian noise of random strength, so the
    detector does not lean on the renders' exact tone, sharpness or noise and transfers to the
    micrograph."""
    b = images.shape[0]

    def u(lo: float, hi: float, n: int = b) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)
    x = images.clamp(0.0, 1.0)
    gamma = torch.exp(u(math.log(0.6), math.log(1.6)))
    x = x ** gamma[:, None, None]
    mean = x.mean(dim=(1, 2), keepdim=True)
    x = mean + (x - mean) * u(0.6, 1.5)[:, None, None] + u(-0.1, 0.1)[:, None, None]
    sigma = torch.where(torch.rand(b, generator=gen) < 0.5, u(0.3, 1.6), torch.zeros(b))
    x = torch.stack([_blur(x[i], float(sigma[i])) for i in range(b)])
    noise = torch.where(torch.rand(b, generator=gen) < 0.7, u(0.0, 0.06), torch.zeros(b))
    x = x + noise[:, None, None] * torch.randn(x.shape, generator=gen)
    m = x.mean(dim=(1, 2), keepdim=True)
    s = x.std(dim=(1, 2), keepdim=True).clamp_min(1e-3)
    return (x - m) / s


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0.0:
        return img
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=img.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = img[None, None]
    x = nn.functional.conv2d(nn.functional.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = nn.functional.conv2d(nn.functional.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return x[0, 0]


def random_crops(images: np.ndarray, fg: np.ndarray, centre: np.ndarray, batch: int, crop: int,
                 gen: torch.Generator, on_particles: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch`` random crops (random image, position, quarter turn and flip) of images and
    their two target maps. A share ``on_particles`` of the crops is placed around a random
    particle pixel: in a sparse field (a TEM grid at 5 % coverage) most random crops would
    hold substrate only, and the centre map would learn from few particles per step."""
    n, h, w = images.shape
    idx = torch.randint(0, n, (batch,), generator=gen).tolist()
    ys = torch.randint(0, h - crop + 1, (batch,), generator=gen).tolist()
    xs = torch.randint(0, w - crop + 1, (batch,), generator=gen).tolist()
    aim = (torch.rand(batch, generator=gen) < on_particles).tolist()
    pick = torch.rand(batch, generator=gen).tolist()
    shift = torch.rand(batch, 2, generator=gen).tolist()
    for b in range(batch):
        if not aim[b]:
            continue
        yy, xx = np.nonzero(fg[idx[b]])
        if len(yy) == 0:
            continue
        j = min(int(pick[b] * len(yy)), len(yy) - 1)
        ys[b] = int(np.clip(yy[j] - int(shift[b][0] * crop), 0, h - crop))
        xs[b] = int(np.clip(xx[j] - int(shift[b][1] * crop), 0, w - crop))
    turns = torch.randint(0, 4, (batch,), generator=gen).tolist()
    flips = torch.randint(0, 2, (batch,), generator=gen).tolist()
    out = []
    for a in (images, fg, centre):
        crops = []
        for i, y, x, k, f in zip(idx, ys, xs, turns, flips):
            c = np.rot90(a[i, y:y + crop, x:x + crop], k)
            crops.append(np.ascontiguousarray(c[:, ::-1] if f else c))
        out.append(torch.from_numpy(np.stack(crops)))
    return out[0], out[1], out[2]


def training_key(images: np.ndarray, labels: np.ndarray, settings: TrainingSettings) -> str:
    """Identity of a training run (data and settings): a checkpoint resumes only the same run."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images[:, ::7, ::7]).tobytes())
    h.update(np.ascontiguousarray(labels[:, ::7, ::7]).tobytes())
    h.update(repr(sorted(asdict(settings).items(), key=lambda kv: kv[0])).encode())
    return h.hexdigest()[:16]


def learning_rate_at(step: int, settings: TrainingSettings) -> float:
    """Linear warm-up over the first 5 % of the steps, then cosine decay to zero."""
    warm = max(1, settings.steps // 20)
    if step < warm:
        return settings.learning_rate * (step + 1) / warm
    t = (step - warm) / max(1, settings.steps - warm)
    return settings.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def _save_checkpoint(path: Path, key: str, step: int, model, opt, gen, losses) -> None:
    from fitting.core.files import atomic_write_bytes
    buf = io.BytesIO()
    torch.save({"key": key, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "generator": gen.get_state(), "losses": losses}, buf)
    atomic_write_bytes(path, buf.getvalue())


def train_detector(images: np.ndarray, labels: np.ndarray, settings: TrainingSettings | None = None, *,
                   disks: list[dict] | None = None,
                   checkpoint: str | Path | None = None, on_event: EventSink | None = None,
                   cancel: CancelToken | None = None, progress_range: tuple[float, float] = (0.0, 1.0),
                   threads: int | None = None) -> ParticleDetector:
    """Train a :class:`ParticleDetector` on renders and their instance masks.

    Parameters
    ----------
    images : (N, H, W) float array in [0, 1]
    labels : (N, H, W) int array of instance ids
    settings : TrainingSettings
    disks : list of {instance id: (row, column, radius)}, optional
        Each particle's true centre and radius (:func:`~fitting.validate.trainset.load_training_set`),
        for the centre map of partly hidden particles.
    checkpoint : path, optional
        Written atomically every ``settings.checkpoint_every_s`` and when cancelled; a run with the
        same data and settings resumes from it. Deleted when training finishes.
    on_event : callable, optional
        Receives ``iteration`` events (progress scaled into ``progress_range``, ETA, loss).
    cancel : CancelToken, optional
        Checked every step; a cancelled run saves its checkpoint and raises ``Cancelled``.
    threads : int, optional
        torch CPU threads (default: torch's own choice).

    Returns
    -------
    ParticleDetector
        With ``meta`` holding steps, seconds, final loss and whether it resumed.
    """
    s = settings or TrainingSettings()
    sink = on_event or null_sink
    cancel = cancel or CancelToken()
    if threads:
        torch.set_num_threads(int(threads))
    n, h, w = images.shape
    crop = int(min(s.crop, h, w)) // 8 * 8
    fg, centre = detector_targets(labels, disks)
    gen = torch.Generator().manual_seed(int(s.seed))
    torch.manual_seed(int(s.seed))
    model = UNet(s.channels)
    opt = torch.optim.AdamW(model.parameters(), lr=s.learning_rate, weight_decay=1e-4)
    key = training_key(images, labels, s)
    step0, losses, resumed = 0, [], False
    ck = Path(checkpoint) if checkpoint else None
    if ck is not None and ck.is_file():
        try:
            d = torch.load(str(ck), map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError):
            d = None
        if isinstance(d, dict) and d.get("key") == key:
            model.load_state_dict(d["model"])
            opt.load_state_dict(d["optimizer"])
            gen.set_state(d["generator"])
            step0, losses, resumed = int(d["step"]), list(d["losses"]), True
            _emit(sink, "log", stage="train", message=f"resuming training at step {step0} of {s.steps}")
    bce = nn.BCEWithLogitsLoss()
    p0, p1 = progress_range
    t0 = time.time()
    last_save = t0
    model.train()
    step = step0
    try:
        for step in range(step0, s.steps):
            if cancel.cancelled:
                break
            for g in opt.param_groups:
                g["lr"] = learning_rate_at(step, s)
            x, t_fg, t_centre = random_crops(images, fg, centre, s.batch, crop, gen)
            x = augment(x, gen)
            out = model(x[:, None])
            loss = bce(out[:, 0], t_fg) + s.centre_weight * bce(out[:, 1], t_centre)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            done = step + 1 - step0
            el = time.time() - t0
            eta = el / done * (s.steps - step - 1)
            if step % 10 == 0 or step == s.steps - 1:
                _emit(sink, "iteration", stage="train", progress=p0 + (p1 - p0) * (step + 1) / s.steps, eta_s=eta,
                      message=f"training step {step + 1}/{s.steps}, loss {np.mean(losses[-10:]):.3f}",
                      data={"step": step + 1, "steps": s.steps, "loss": float(np.mean(losses[-10:]))})
            if ck is not None and time.time() - last_save >= s.checkpoint_every_s:
                _save_checkpoint(ck, key, step + 1, model, opt, gen, losses)
                last_save = time.time()
        else:
            step = s.steps
    finally:
        if ck is not None and cancel.cancelled and step < s.steps:
            _save_checkpoint(ck, key, step, model, opt, gen, losses)
    cancel.check("training the detector")
    if ck is not None and ck.is_file():
        ck.unlink()
    model.eval()
    meta = {"steps": s.steps, "batch": s.batch, "crop": crop, "images": int(n), "resumed_at": step0 if resumed else None,
            "seconds": round(time.time() - t0, 1), "final_loss": float(np.mean(losses[-50:])) if losses else None,
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()}}
    return ParticleDetector(model, SegmentationSettings(fragment_area=smallest_instance_area(labels)), meta)


#: The detector drops instances inside the frame below this share of the training particles'
#: 5th-percentile area.
FRAGMENT_SHARE = 0.25


def smallest_instance_area(labels: np.ndarray) -> int:
    """Smallest instance (px) inside the frame that a detector trained on ``labels`` keeps
    (``SegmentationSettings.fragment_area``): :data:`FRAGMENT_SHARE` of the 5th-percentile area
    of the training particles that the frame does not cut, at least
    :class:`SegmentationSettings`'s ``min_area``. A detected instance far smaller than any particle
    it learned from is a fragment of one (a sliver at a blurred edge, a core split off), and
    a few such fragments pull the detected size distribution down."""
    floor = SegmentationSettings().min_area
    d = np.concatenate([equivalent_diameters(lab) for lab in np.asarray(labels)] or [np.zeros(0)])
    d = d[d > 0]
    if d.size == 0:
        return floor
    areas = np.rint(math.pi / 4.0 * d ** 2)          # back to the instances' pixel counts
    return max(floor, int(FRAGMENT_SHARE * float(np.percentile(areas, 5))))
