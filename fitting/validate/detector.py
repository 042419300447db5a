"""The particle detector: a small U-Net that predicts, per pixel, whether it belongs to a
particle and how close it lies to that particle's centre (:func:`fitting.validate.trainset.centre_map`);
instances are the watershed basins of that centre map, seeded at its cores.

The design follows the centre-map + watershed route of nucleus and colloid segmentation: it
learns in minutes on a CPU, splits touching and overlapping round particles, and needs no
anchor boxes or proposals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fitting.core.errors import MatfitError

#: Format tag of a saved detector.
DETECTOR_FORMAT = "matfit-detector/1"


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with ``len(channels)`` resolutions; input (B, 1, H, W)
    with H and W multiples of ``2 ** (len(channels) - 1)``; output (B, 2, H, W): the foreground
    logit and the centre-map logit."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 96)) -> None:
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        self.down = nn.ModuleList()
        c_prev = 1
        for c in self.channels:
            self.down.append(_block(c_prev, c))
            c_prev = c
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for c_skip in reversed(self.channels[:-1]):
            self.up.append(nn.ConvTranspose2d(c_prev, c_skip, 2, stride=2))
            self.merge.append(_block(2 * c_skip, c_skip))
            c_prev = c_skip
        self.head = nn.Conv2d(c_prev, 2, 1)

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = nn.functional.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def standardize(image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """``image`` minus its mean over ``valid`` pixels, divided by their standard deviation;
    invalid pixels are set to 0 (the mean). The detector sees every image this way, so a render
    and a micrograph with another brightness or contrast look alike to it."""
    a = np.asarray(image, np.float32)
    v = a if valid is None else a[np.asarray(valid, bool)]
    if v.size == 0:
        raise MatfitError("the image has no valid pixels to detect particles in")
    out = (a - float(v.mean())) / max(float(v.std()), 1e-3)
    if valid is not None:
        out = np.where(valid, out, 0.0).astype(np.float32)
    return out.astype(np.float32)


@dataclass
class SegmentationSettings:
    """How the predicted maps become instances.

    Attributes
    ----------
    foreground : float
        Probability above which a pixel belongs to a particle.
    core : float
        Centre-map value above which a pixel is part of a particle's core (one seed per core):
        above 0.5, so that the cores of primaries overlapping by up to half stay apart.
    min_area : int
        Smallest instance kept, in pixels.
    fragment_area : int
        Smallest instance kept among those the image's frame does not cut (a cut particle's
        visible part can be any size): set from the training particles
        (:func:`fitting.validate.training.smallest_instance_area`), 0 keeps all.
    """

    foreground: float = 0.5
    core: float = 0.6
    min_area: int = 6
    fragment_area: int = 0


def instances_from_maps(foreground: np.ndarray, centre: np.ndarray,
                        settings: SegmentationSettings | None = None) -> np.ndarray:
    """Instance labels (int32, 0 = background) from a foreground probability map and a centre
    map: watershed of the negated centre map inside the foreground, seeded at the connected
    cores (centre map above ``settings.core``); foreground regions without a core become
    instances of their own; instances smaller than ``settings.min_area``, and those inside the
    frame smaller than ``settings.fragment_area``, are dropped."""
    from skimage import measure, morphology, segmentation
    s = settings or SegmentationSettings()
    fg = np.asarray(foreground) > s.foreground
    fg = morphology.remove_small_objects(fg, max_size=max(s.min_area - 1, 0)) if s.min_area > 1 else fg
    cores = measure.label(fg & (np.asarray(centre) > s.core))
    labels = segmentation.watershed(-np.asarray(centre, np.float32), cores, mask=fg).astype(np.int32)
    rest = measure.label(fg & (labels == 0))
    if rest.max() > 0:
        labels = np.where(rest > 0, rest + labels.max(), labels).astype(np.int32)
    if s.min_area > 1 or s.fragment_area > 0:
        sizes = np.bincount(labels.ravel())
        small = sizes < s.min_area
        if s.fragment_area > 0:
            from fitting.measure.particles import edge_zone
            frame = np.zeros(sizes.size, bool)
            frame[np.unique(labels[edge_zone(np.ones(labels.shape, bool))])] = True
            small |= (sizes < s.fragment_area) & ~frame
        small = np.flatnonzero(small)
        small = small[small > 0]
        if small.size:
            labels[np.isin(labels, small)] = 0
    labels, _, _ = segmentation.relabel_sequential(labels)
    return labels.astype(np.int32)


@dataclass
class ParticleDetector:
    """A trained U-Net with what it needs to run on a new image.

    Attributes
    ----------
    model : UNet
    settings : SegmentationSettings
    meta : dict
        What it was trained on (recipe material, working scale, images, steps, timings).
    """

    model: UNet
    settings: SegmentationSettings = field(default_factory=SegmentationSettings)
    meta: dict = field(default_factory=dict)

    #: Side of the tiles a large image is predicted in, and the margin dropped from each tile's
    #: edge (where the network sees no context).
    TILE = 512
    MARGIN = 32

    def predict_maps(self, image: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Foreground probability and centre map (each (H, W) float32 in [0, 1]) of a gray
        image in [0, 1], predicted in overlapping tiles; invalid pixels get 0."""
        x = standardize(image, valid)
        h, w = x.shape
        fg = np.zeros((h, w), np.float32)
        centre = np.zeros((h, w), np.float32)
        step = self.TILE - 2 * self.MARGIN
        self.model.eval()
        with torch.no_grad():
            if h <= self.TILE and w <= self.TILE:
                fg[:], centre[:] = self._predict_tile(x)
            else:
                for y0 in range(0, h, step):
                    for x0 in range(0, w, step):
                        ya, xa = max(y0 - self.MARGIN, 0), max(x0 - self.MARGIN, 0)
                        yb, xb = min(y0 + step + self.MARGIN, h), min(x0 + step + self.MARGIN, w)
                        out = self._predict_tile(x[ya:yb, xa:xb])
                        yc, xc = min(y0 + step, h), min(x0 + step, w)
                        fg[y0:yc, x0:xc] = out[0, y0 - ya:yc - ya, x0 - xa:xc - xa]
                        centre[y0:yc, x0:xc] = out[1, y0 - ya:yc - ya, x0 - xa:xc - xa]
        if valid is not None:
            fg[~np.asarray(valid, bool)] = 0.0
        return fg, centre

    def _predict_tile(self, tile: np.ndarray) -> np.ndarray:
        m = self.model.multiple
        h, w = tile.shape
        ph, pw = (-h) % m, (-w) % m
        t = np.pad(tile, ((0, ph), (0, pw)), mode="reflect" if min(h, w) > max(ph, pw) else "edge")
        out = torch.sigmoid(self.model(torch.from_numpy(np.ascontiguousarray(t))[None, None]))[0].numpy()
        return out[:, :h, :w]

    def segment(self, image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Instance labels (int32, 0 = background) of a gray image in [0, 1]."""
        fg, centre = self.predict_maps(image, valid)
        return instances_from_maps(fg, centre, self.settings)

    def save(self, path: str | Path) -> Path:
        """Write the detector atomically (weights, architecture, settings, meta)."""
        import io

        from fitting.core.files import atomic_write_bytes
        buf = io.BytesIO()
        torch.save({"format": DETECTOR_FORMAT, "channels": list(self.model.channels),
                    "state": self.model.state_dict(), "settings": dict(self.settings.__dict__),
                    "meta": self.meta}, buf)
        atomic_write_bytes(path, buf.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "ParticleDetector":
        try:
            d = torch.load(str(path), map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError) as exc:
            raise MatfitError(f"cannot read the detector {path}: {exc}",
                              hint="train it again with `matfit validate`") from exc
        if not isinstance(d, dict) or d.get("format") != DETECTOR_FORMAT:
            raise MatfitError(f"{path} is not a matfit detector", hint="train one with `matfit validate`")
        model = UNet(tuple(d["channels"]))
        model.load_state_dict(d["state"])
        model.eval()
        return cls(model, SegmentationSettings(**d.get("settings", {})), d.get("meta", {}))


def equivalent_diameters(labels: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Equivalent-circle diameters (px) of the instances that touch neither the image's frame
    nor the invalid region: a cut particle's visible part would measure too small."""
    lab = np.asarray(labels)
    n = int(lab.max())
    if n == 0:
        return np.zeros(0, np.float64)
    from fitting.measure.particles import edge_zone
    area = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64)
    cut = np.unique(lab[edge_zone(np.ones(lab.shape, bool) if valid is None else np.asarray(valid, bool))])
    keep = np.ones(n + 1, bool)
    keep[0] = False
    keep[cut] = False
    return np.sqrt(4.0 * area[keep] / math.pi)
