"""The reference as a fitting target: described at several working scales (descriptor and
gray-level quantiles), and small image helpers (centre tile, thumbnail).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fitting.core.events import CancelToken


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


def estimate_noise(gray: np.ndarray) -> float:
    """Robust std of pixel noise: MAD of horizontal neighbour differences (noise adds
    sqrt(2) sigma to a difference, smooth structure adds little to the median)."""
    d = np.diff(np.asarray(gray, np.float64), axis=1).ravel()
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))
