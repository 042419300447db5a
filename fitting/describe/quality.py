"""How close a synthetic image set is to a real micrograph: FID and KID on VGG trunk features.

Why these two: of FID, CLIP score and a style-loss score, FID predicted best how well detectors
trained on synthetic particle images do on real ones (the project design report, shared/DESIGN.md). FID is biased by the
number of samples (compare FIDs only at the same crop count); KID's estimate is unbiased, so it
is comparable across set sizes and ~0 for two samples of one distribution.

Features: the descriptor backbone's conv trunk (default ``vgg16-hed``), global-average-pooled
over the positions of one layer (default ``relu4_3``, 512 channels, ~100 px receptive field:
particles and their arrangement). Crops are taken at native pixel scale (no resizing), so a
render pixel and a working-reference pixel mean the same length; global average pooling makes
crops of different sizes (default 128-256 px) comparable.

The backbone is reached through :class:`~fitting.describe.descriptor.TextureDescriptor`'s internal
runner (its preprocessing and its cached, frozen trunk); nothing is added to that module.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fitting.core.errors import ImageLoadError, MatfitError

DEFAULT_LAYER = "relu4_3"
DEFAULT_CROPS = 100
CROP_RANGE = (128, 256)


# ----------------------------------------------------------------------------------------------
# metrics (numpy / scipy only)
# ----------------------------------------------------------------------------------------------
def _as_features(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"features must be (n >= 2, d), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("features contain NaN or infinite values")
    return a


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance of two Gaussians: |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    from scipy import linalg
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    s1, s2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # fewer samples than dimensions make S1 S2 singular; sqrtm still returns its (PSD) root
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        # singular product (fewer samples than dimensions): regularise both covariances
        off = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + off).dot(s2 + off))
    if np.iscomplexobj(covmean):
        # numerical noise gives tiny imaginary parts; large ones mean a broken covariance
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3 * max(1.0, np.abs(covmean).max())):
            raise ValueError(f"sqrtm has a large imaginary component ({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    fid = diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)
    return float(max(fid, 0.0))


def fid(feats_a, feats_b) -> float:
    """Fréchet Inception-style distance between two feature sets (n, d) (scipy.linalg.sqrtm)."""
    a, b = _as_features(feats_a), _as_features(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
    """k(x, y) = (gamma x.y + coef0)^degree, gamma = 1/d by default (the KID kernel)."""
    g = 1.0 / x.shape[1] if gamma is None else gamma
    return (g * (x @ y.T) + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, **kernel) -> float:
    """Unbiased estimate of the squared MMD between samples x (m, d) and y (n, d)."""
    m, n = x.shape[0], y.shape[0]
    kxx = polynomial_kernel(x, x, **kernel)
    kyy = polynomial_kernel(y, y, **kernel)
    kxy = polynomial_kernel(x, y, **kernel)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kid(feats_a, feats_b, subsets: int = 100, subset_size: int | None = None, seed: int = 0,
        degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> tuple[float, float]:
    """Kernel Inception-style distance: mean and std of the unbiased MMD^2 over random subsets.

    Polynomial kernel of degree 3 (gamma = 1/d, coef0 = 1). Each subset draws ``subset_size``
    samples without replacement from each set; by default min(1000, half the smaller set), so
    that the subsets differ and the std says how stable the estimate is.
    """
    a, b = _as_features(feats_a), _as_features(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    n = min(a.shape[0], b.shape[0])
    if subset_size is None:
        subset_size = min(1000, n // 2) if n >= 8 else n
    m = max(2, min(int(subset_size), n))
    rng = np.random.default_rng(seed)
    vals = np.empty(max(1, subsets))
    for i in range(vals.size):
        xa = a[rng.choice(a.shape[0], m, replace=False)]
        xb = b[rng.choice(b.shape[0], m, replace=False)]
        vals[i] = mmd2_unbiased(xa, xb, degree=degree, gamma=gamma, coef0=coef0)
    return float(vals.mean()), float(vals.std())


# ----------------------------------------------------------------------------------------------
# crops
# ----------------------------------------------------------------------------------------------
def random_crops(images: list[np.ndarray], n: int, size_range: tuple[int, int] = CROP_RANGE,
                 seed: int = 0) -> list[np.ndarray]:
    """``n`` random square crops at native scale, spread evenly over ``images``.

    Side uniform in ``size_range`` (clipped to the image); position uniform inside the image.
    """
    if not images:
        raise ImageLoadError("no images to crop")
    rng = np.random.default_rng(seed)
    lo, hi = int(size_range[0]), int(size_range[1])
    if lo < 32 or hi < lo:
        raise ValueError(f"bad crop size range {size_range}")
    out = []
    for k in range(n):
        img = images[k % len(images)]
        h, w = img.shape
        s = int(min(rng.integers(lo, hi + 1), h, w))
        y = int(rng.integers(0, h - s + 1))
        x = int(rng.integers(0, w - s + 1))
        out.append(np.ascontiguousarray(img[y:y + s, x:x + s], dtype=np.float32))
    return out


# ----------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------
class TrunkFeatures:
    """Global-average-pooled activations of one layer of a descriptor backbone's VGG trunk."""

    def __init__(self, backbone: str = "vgg16-hed", layer: str = DEFAULT_LAYER, device: str = "cpu") -> None:
        import torch
        from fitting.describe.descriptor import TextureDescriptor, _relu_names
        self.desc = TextureDescriptor(backbone, device=device)
        # The descriptor's runner: preprocess() (gray -> backbone input) and loaded.trunk
        # (frozen nn.Sequential up to its last tap), both internal to fitting.describe.descriptor.
        self._runner = self.desc._runner(torch.float32)
        names = _relu_names(self._runner.loaded.spec.cfg)
        if layer not in names or names.index(layer) >= len(self._runner.loaded.trunk):
            avail = [n for n in names[:len(self._runner.loaded.trunk)] if n]
            raise MatfitError(f"layer {layer!r} is not in the {backbone} trunk",
                              hint=f"choose one of: {', '.join(avail)}")
        self.layer = layer
        self.backbone = backbone
        self._stop = names.index(layer)
        convs = [m for m in list(self._runner.loaded.trunk)[:self._stop + 1] if hasattr(m, "out_channels")]
        self.dim = int(convs[-1].out_channels)

    def __call__(self, crops: list[np.ndarray]) -> np.ndarray:
        """Crops (H, W) float in [0, 1] (any sizes) -> features (n, C) float64."""
        import torch
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, c in enumerate(crops):
            by_shape.setdefault(c.shape, []).append(i)
        out = np.zeros((len(crops), self.dim), np.float64)
        trunk = self._runner.loaded.trunk
        with torch.no_grad():
            for shape, idx in by_shape.items():
                for j in range(0, len(idx), 8):
                    part = idx[j:j + 8]
                    x = torch.from_numpy(np.stack([crops[i] for i in part]))[:, None].float()
                    y = self._runner.preprocess(x.to(self.desc.device))
                    for k, mod in enumerate(trunk):
                        y = mod(y)
                        if k >= self._stop:
                            break
                    out[part] = y.mean(dim=(2, 3)).double().cpu().numpy()
        return out


# ----------------------------------------------------------------------------------------------
# images in / score out
# ----------------------------------------------------------------------------------------------
def load_gray_pngs(folder: str | os.PathLike, limit: int | None = None) -> list[np.ndarray]:
    """Gray float images of a folder (a bulk set's ``images/`` when it has one)."""
    from PIL import Image
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageLoadError(f"{folder}: no such folder", hint="give the output folder of `matfit bulk`")
    if (folder / "images").is_dir():
        folder = folder / "images"
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".tif", ".tiff", ".jpg", ".jpeg")
                   and not p.name.startswith("."))
    if limit is not None:
        files = files[:limit]
    if not files:
        raise ImageLoadError(f"{folder}: contains no images", hint="give the output folder of `matfit bulk`")
    out = []
    for p in files:
        with Image.open(p) as im:
            a = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        out.append(a)
    return out


@dataclass
class QualityScore:
    fid: float
    kid: float
    kid_std: float
    n_real: int
    n_synthetic: int
    layer: str
    backbone: str
    working_scale: int
    dim: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def text(self) -> str:
        lines = [f"FID {self.fid:.3f}", f"KID {self.kid:.5f} +- {self.kid_std:.5f}",
                 f"({self.n_real} real / {self.n_synthetic} synthetic crops, {self.backbone} {self.layer}, "
                 f"reference at working scale {self.working_scale})"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def score_images(reference: str | os.PathLike | np.ndarray, synthetic: list[np.ndarray], *,
                 working_scale: int = 512, crops: int = DEFAULT_CROPS, crop_range=CROP_RANGE,
                 seed: int = 0, backbone: str = "vgg16-hed", layer: str = DEFAULT_LAYER,
                 kid_subsets: int = 100) -> QualityScore:
    """FID and KID between crops of a reference (at its working scale) and synthetic images."""
    if isinstance(reference, np.ndarray):
        ref = np.asarray(reference, np.float32)
    else:
        from fitting.reference.loading import load_reference
        ref = load_reference(reference).working(max_side=int(working_scale))
    feats = TrunkFeatures(backbone, layer)
    lo = min(int(crop_range[0]), min(ref.shape))
    rng_range = (max(32, lo), max(max(32, lo), min(int(crop_range[1]), min(ref.shape))))
    real = feats(random_crops([ref], crops, rng_range, seed))
    syn = feats(random_crops(list(synthetic), crops, crop_range, seed + 1))
    k, ks = kid(real, syn, subsets=kid_subsets, seed=seed)
    notes = []
    if min(len(real), len(syn)) <= feats.dim:
        notes.append(f"{min(len(real), len(syn))} crops <= {feats.dim} feature dimensions: FID is biased "
                     "upwards; compare FIDs only at the same crop count, or use KID")
    return QualityScore(fid=fid(real, syn), kid=k, kid_std=ks, n_real=len(real), n_synthetic=len(syn),
                        layer=layer, backbone=backbone, working_scale=int(working_scale), dim=feats.dim,
                        notes=notes)


def score_folder(reference, synthetic_dir, **kw) -> QualityScore:
    return score_images(reference, load_gray_pngs(synthetic_dir), **kw)
