"""Differentiable node types of a material surface graph, evaluated in torch.

A node turns its input maps and its parameters into one or more output maps ("ports"). Maps are
float tensors broadcastable to ``(size, size)`` (a constant node returns a 0-dim tensor, a linear
gradient may return ``(1, size)``); :class:`fitting.materials.graph.MaterialGraph` expands the declared
outputs to full ``(size, size)`` maps. Everything runs in the dtype/device of the evaluation
(float32 by default, float64 in the gradient tests), without Python loops over pixels.

Coordinates (see docs/ARCHITECTURE.md): world unit = one pixel; pixel (row i, column j) has its
centre at ``x = j + 0.5``, ``y = size - (i + 0.5)`` (row 0 is the top, y points up). Maps are
projected onto particles from the top view, so they need not tile.

Parameters
----------
Every node declares its parameters (:class:`Param`) with a kind and a default:

``float``   a number, ``"$name"`` (the PHYSICAL value of material parameter ``name``), or
            ``{"param": "name", "scale": s, "offset": o}`` meaning ``s * name + o``
            (scale defaults to 1, offset to 0). Differentiable.
``floats``  a list whose items are each a ``float`` value as above (ramp / curve stops).
``int``     an integer, or a parameter reference (rounded, not differentiable).
``choice``  one string out of a fixed set (literal only).
``bool``    true / false (literal only).

Some float parameters carry a safe range: a literal outside it is rejected when the graph is
loaded, a referenced value outside it is clamped at evaluation (so the maps stay finite).

Randomness
----------
Random nodes (noise, fbm, cellular) draw from a 32-bit integer hash of the lattice coordinates
and of a node seed derived from ``(material seed, node id)`` (:func:`node_seed`): the same graph,
parameters and seed give bit-identical maps; another seed gives another realisation with the same
statistics. The hash has no period (no permutation table), so large fields show no repetition.

Node types (``type`` -> inputs; parameters = defaults; ports, first is the default)
----------------------------------------------------------------------------------
constant          -; value=0.5
noise             -; scale=32 px, angle=0 deg, stretch=1          Perlin noise, mean 0.5, std ~0.16
fbm               -; scale=32, octaves=4, lacunarity=2, gain=0.5, angle=0, stretch=1
cellular          -; cell_size=32 px, jitter=1, mode=f1|f2|f2-f1|cell; ports out, f1, f2, edge, cell
gradient          -; mode=linear|radial, angle=0, center_x=0.5, center_y=0.5, length=1, radius=0.5, clamp=true
ramp              in; positions=[0,1], values=[0,1]                piecewise linear
curve             in; positions=[0,.25,.5,.75,1], values=[same]    monotone cubic (PCHIP)
blend             a, b, mask?; mode=mix|multiply|screen|overlay|add|subtract|difference|lighten|darken, opacity=1
levels            in; in_low=0, in_high=1, gamma=1, out_low=0, out_high=1
blur              in; sigma=2 px                                   Gaussian, reflect borders
warp              in, warp, warp_y?; intensity=8 px, angle=0, mode=directional|vector
slope             in; intensity=1; ports dx, dy, magnitude         central differences (:func:`slopes`)
height_to_normal  in; intensity=1, light_azimuth=135, light_elevation=45; ports out (n.L), nx, ny, nz
clamp             in; low=0, high=1
invert            in; -                                            1 - x
threshold         in; threshold=0.5, sharpness=20                  sigmoid((x - threshold) * sharpness)
scale_offset      in; scale=1, offset=0                            scale * x + offset
math              a, b?; op=add|subtract|multiply|divide|pow|min|max|abs, value=1, scale=1, offset=0
                  scale * op(a, b if connected else value) + offset
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F

from fitting.core.errors import LibraryError
from fitting.render.filters import shifted_sum

Tensor = torch.Tensor

NODE_TYPES: dict[str, type["Node"]] = {}
"""Registry: node type name -> node class."""

M32 = 0xFFFFFFFF
_INV_2_32 = 1.0 / 4294967296.0
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Perlin noise with unit gradients has std ~0.215 in 2-D (measured); this maps it (and fbm, which is
# normalised to the same std) to mean 0.5, std ~0.16, so values rarely leave [0, 1].
_NOISE_GAIN = 0.75


def _mix32(x: int) -> int:
    """32-bit integer hash (Python ints), same function as :func:`_mix32_t`."""
    x &= M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    return (x >> 16) ^ x


def _mix32_t(x: Tensor) -> Tensor:
    """32-bit integer hash on int64 tensors holding values in [0, 2**32) (no int64 overflow)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    return (x >> 16) ^ x


def node_seed(seed: int, node_id: str) -> int:
    """The 32-bit seed of one node, from the material seed and the node id (stable across runs)."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{node_id}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _hash2(i: Tensor, j: Tensor, seed: int) -> Tensor:
    """Hash of lattice point (i, j) (int64 tensors, broadcast together) under ``seed``."""
    return _mix32_t((_mix32_t((j + seed) & M32) + i) & M32)


def _unit(h: Tensor, dtype) -> Tensor:
    """Hash values -> floats in [0, 1)."""
    return h.to(dtype) * _INV_2_32


class _Lattice:
    """Per-lattice-point random data looked up per pixel.

    ``per_point(hash) -> tuple of tensors`` turns lattice hashes into data (gradients, feature
    points). When the lattice points the pixels touch are not many more than the pixels, the data
    is computed once per point into a table and gathered (fast, and the per-point math -- cos/sin,
    jitter -- runs on the small table); otherwise (sub-pixel cells) it is hashed per pixel. Both
    give identical values.
    """

    table_ratio = 4          # use a table while lattice points <= ratio * pixels + slack
    table_slack = 4096

    def __init__(self, iu: Tensor, iv: Tensor, seed: int, reach: tuple[int, int], per_point) -> None:
        self.iu, self.iv, self.seed, self.per_point = iu, iv, seed, per_point
        lo, hi = reach
        i0, i1 = int(iu.min()) + lo, int(iu.max()) + hi
        j0, j1 = int(iv.min()) + lo, int(iv.max()) + hi
        self.ni = i1 - i0 + 1
        n_points = self.ni * (j1 - j0 + 1)
        n_pixels = max(iu.numel(), iv.numel(), torch.broadcast_shapes(iu.shape, iv.shape).numel())
        self.table = None
        if n_points <= self.table_ratio * n_pixels + self.table_slack:
            i = torch.arange(i0, i1 + 1, dtype=torch.int64, device=iu.device)
            j = torch.arange(j0, j1 + 1, dtype=torch.int64, device=iu.device)
            self.table = [t.reshape(-1) for t in per_point(_hash2(i[None, :], j[:, None], seed))]
            self.base = (iv - j0) * self.ni + (iu - i0)

    def fetch(self, di: int, dj: int) -> tuple[Tensor, ...]:
        if self.table is not None:
            k = self.base + (dj * self.ni + di) if (di or dj) else self.base
            return tuple(t.take(k) for t in self.table)
        return tuple(self.per_point(_hash2(self.iu + di, self.iv + dj, self.seed)))


def _fade(t: Tensor) -> Tensor:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin(u: Tensor, v: Tensor, seed: int) -> Tensor:
    """2-D gradient (Perlin) noise at lattice coordinates (u, v); u, v broadcast together.

    Random unit gradients sit on the integer lattice; value 0 at lattice points, range about
    [-0.71, 0.71], C2 in (u, v) (quintic fade), so derivatives flow through the coordinates.
    """
    dtype = u.dtype
    fu0, fv0 = torch.floor(u), torch.floor(v)
    fu, fv = u - fu0, v - fv0

    def gradients(h: Tensor) -> tuple[Tensor, Tensor]:
        ang = _unit(h, dtype) * (2.0 * math.pi)
        return torch.cos(ang), torch.sin(ang)

    lat = _Lattice(fu0.to(torch.int64), fv0.to(torch.int64), seed, (0, 1), gradients)

    def corner(di: int, dj: int, du: Tensor, dv: Tensor) -> Tensor:
        gx, gy = lat.fetch(di, dj)
        return gx * du + gy * dv

    fu1, fv1 = fu - 1.0, fv - 1.0
    n00 = corner(0, 0, fu, fv)
    n10 = corner(1, 0, fu1, fv)
    n01 = corner(0, 1, fu, fv1)
    n11 = corner(1, 1, fu1, fv1)
    su, sv = _fade(fu), _fade(fv)
    nx0 = n00 + su * (n10 - n00)
    nx1 = n01 + su * (n11 - n01)
    return nx0 + sv * (nx1 - nx0)


def worley(u: Tensor, v: Tensor, seed: int, jitter: Tensor) -> dict[str, Tensor]:
    """Cellular (Worley) noise at cell coordinates (u, v): one feature point per unit cell at
    ``cell + 0.5 + jitter * (r - 0.5)``; the 3x3 neighbourhood is searched (exact F1 for
    jitter <= 1, F2 exact up to rare far-corner cases at jitter ~1). Distances in cell units.
    Returns f1, f2 (distances) and cell (a random value in [0, 1) of the nearest point's cell).
    """
    dtype = u.dtype
    cu0, cv0 = torch.floor(u), torch.floor(v)
    fu, fv = u - cu0, v - cv0

    def points(h1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h2 = _mix32_t(h1 ^ 0x9E3779B9)
        h3 = _mix32_t(h2 ^ 0x7F4A7C15)
        return (0.5 + jitter * (_unit(h1, dtype) - 0.5), 0.5 + jitter * (_unit(h2, dtype) - 0.5),
                _unit(h3, dtype))

    lat = _Lattice(cu0.to(torch.int64), cv0.to(torch.int64), seed, (-1, 1), points)
    f1 = f2 = cell = None
    for dj in (-1, 0, 1):
        for di in (-1, 0, 1):
            px, py, rv = lat.fetch(di, dj)
            dx = px + (di - fu)
            dy = py + (dj - fv)
            d2 = dx * dx + dy * dy
            if f1 is None:
                f1, f2, cell = d2, torch.full_like(d2, 1e9), rv
                continue
            closer = d2 < f1
            f2 = torch.minimum(f2, torch.maximum(f1, d2))
            f1 = torch.minimum(f1, d2)
            cell = torch.where(closer, rv, cell)
    return {"f1": torch.sqrt(f1.clamp_min(1e-12)), "f2": torch.sqrt(f2.clamp_min(1e-12)), "cell": cell}


def slopes(height: Tensor) -> tuple[Tensor, Tensor]:
    """Slopes of a height map (..., H, W): ``dh/dx`` (x = column to the right) and ``dh/dy``
    (y = row UP, i.e. the -row direction), in height units per pixel. Central differences inside,
    one-sided differences on the border rows/columns. Differentiable."""
    if height.dim() < 2 or height.shape[-1] < 2 or height.shape[-2] < 2:
        raise ValueError(f"slopes() needs a (..., H, W) map with H, W >= 2, got {tuple(height.shape)}")
    h = height
    dx = torch.cat([h[..., :, 1:2] - h[..., :, 0:1],
                    (h[..., :, 2:] - h[..., :, :-2]) * 0.5,
                    h[..., :, -1:] - h[..., :, -2:-1]], dim=-1)
    dy = torch.cat([h[..., 0:1, :] - h[..., 1:2, :],
                    (h[..., :-2, :] - h[..., 2:, :]) * 0.5,
                    h[..., -2:-1, :] - h[..., -1:, :]], dim=-2)
    return dx, dy


_BLUR_FFT_RADIUS = 6  # above this kernel radius the FFT path is faster (and its backward much faster)


def gaussian_blur(img: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur of a (H, W) map with the kernel built from ``sigma``
    (differentiable; radius ceil(4 sigma), normalised), reflected borders. Small kernels use
    shifted sums, large ones an FFT of the reflect-padded map (same result, no wrap-around)."""
    H, W = img.shape[-2:]
    s = float(sigma.detach())
    r = min(int(math.ceil(4.0 * s)), H - 1, W - 1)
    if r <= 0 or s <= 0.0:
        return img
    t = torch.arange(-r, r + 1, dtype=img.dtype, device=img.device)
    k = torch.exp(-0.5 * (t / sigma.clamp_min(1e-3)) ** 2)
    k = k / k.sum()
    x = F.pad(img.reshape(1, 1, H, W), (r, r, r, r), mode="reflect")[0, 0]
    if r <= _BLUR_FFT_RADIUS:
        return shifted_sum(shifted_sum(x, k, W, dim=1), k, H, dim=0)
    hp, wp = x.shape

    def centred(n: int) -> Tensor:  # kernel laid out circularly around index 0
        return torch.cat([k[r:], k.new_zeros(n - 2 * r - 1), k[:r]])

    spec = torch.fft.fft(centred(hp))[:, None] * torch.fft.rfft(centred(wp))[None, :]
    y = torch.fft.irfft2(torch.fft.rfft2(x) * spec, s=(hp, wp))
    return y[r:r + H, r:r + W]


def _safe_pow(base: Tensor, expo: Tensor) -> Tensor:
    """base ** expo for base >= 0 (non-positive bases give 0), with finite gradients."""
    pos = base > 0
    safe = torch.where(pos, base, torch.ones_like(base))
    return torch.where(pos, torch.exp(expo * torch.log(safe)), torch.zeros_like(base))


def _safe_denominator(d: Tensor, eps: float = 1e-6) -> Tensor:
    small = d.abs() < eps
    return torch.where(small, torch.where(d < 0, -torch.full_like(d, eps), torch.full_like(d, eps)), d)


@dataclass(frozen=True)
class Param:
    """Declaration of a node parameter (see the module docstring for the kinds)."""

    kind: str                       # "float" | "floats" | "int" | "choice" | "bool"
    default: Any
    doc: str = ""
    lo: float | None = None         # safe range (literals checked at load, references clamped)
    hi: float | None = None
    choices: tuple[str, ...] = ()
    min_len: int = 0                # floats: minimum list length

    @property
    def continuous(self) -> bool:
        return self.kind in ("float", "floats")


def _f(default: float, doc: str = "", lo: float | None = None, hi: float | None = None) -> Param:
    return Param("float", float(default), doc, lo, hi)


def _choice(default: str, choices: tuple[str, ...], doc: str = "") -> Param:
    return Param("choice", default, doc, choices=choices)


@dataclass(frozen=True)
class Ref:
    """A reference to a material parameter: ``scale * values[name] + offset``."""

    name: str
    scale: float = 1.0
    offset: float = 0.0

    def to_json(self) -> Any:
        if self.scale == 1.0 and self.offset == 0.0:
            return f"${self.name}"
        d: dict[str, Any] = {"param": self.name}
        if self.scale != 1.0:
            d["scale"] = self.scale
        if self.offset != 0.0:
            d["offset"] = self.offset
        return d


@dataclass(frozen=True)
class Input:
    """Declaration of an input slot."""

    name: str
    required: bool = True
    doc: str = ""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _Where:
    """Error-message prefix ("graph.json: node 'mix'") and raiser."""

    def __init__(self, source: str, node_id: str):
        self.prefix = f"{source}: node '{node_id}'"

    def fail(self, msg: str, hint: str | None = None):
        raise LibraryError(f"{self.prefix}: {msg}", hint=hint)


def _parse_scalar(raw: Any, where: _Where, field: str) -> float | Ref:
    if _is_number(raw):
        if not math.isfinite(raw):
            where.fail(f"param '{field}': value {raw!r} is not finite")
        return float(raw)
    if isinstance(raw, str):
        if raw.startswith("$") and _NAME_RE.match(raw[1:]):
            return Ref(raw[1:])
        where.fail(f"param '{field}': {raw!r} is neither a number nor a parameter reference",
                   hint='write a number, "$name", or {"param": "name", "scale": 2.0, "offset": 0.1}')
    if isinstance(raw, dict):
        unknown = set(raw) - {"param", "scale", "offset"}
        if unknown:
            where.fail(f"param '{field}': unknown key(s) {sorted(unknown)} in parameter expression",
                       hint='allowed keys: "param", "scale", "offset"')
        name = raw.get("param")
        if not isinstance(name, str) or not _NAME_RE.match(name.lstrip("$")):
            where.fail(f"param '{field}': expression needs \"param\": a parameter name, got {name!r}")
        for key in ("scale", "offset"):
            if key in raw and not (_is_number(raw[key]) and math.isfinite(raw[key])):
                where.fail(f"param '{field}': expression '{key}' must be a number, got {raw[key]!r}")
        return Ref(name.lstrip("$"), float(raw.get("scale", 1.0)), float(raw.get("offset", 0.0)))
    where.fail(f"param '{field}': expected a number or a parameter reference, got {type(raw).__name__}")
    raise AssertionError  # unreachable


def _parse_param(name: str, spec: Param, raw: Any, where: _Where) -> Any:
    if spec.kind == "float":
        val = _parse_scalar(raw, where, name)
        if isinstance(val, float):
            if (spec.lo is not None and val < spec.lo) or (spec.hi is not None and val > spec.hi):
                where.fail(f"param '{name}': {val} is outside [{spec.lo}, {spec.hi}]")
        return val
    if spec.kind == "floats":
        if not isinstance(raw, (list, tuple)):
            where.fail(f"param '{name}': expected a list, got {type(raw).__name__}")
        if len(raw) < spec.min_len:
            where.fail(f"param '{name}': needs at least {spec.min_len} entries, got {len(raw)}")
        return [_parse_scalar(r, where, f"{name}[{i}]") for i, r in enumerate(raw)]
    if spec.kind == "int":
        if isinstance(raw, (str, dict)):
            return _parse_scalar(raw, where, name)
        if not _is_number(raw) or float(raw) != int(raw):
            where.fail(f"param '{name}': expected an integer, got {raw!r}")
        val = int(raw)
        if (spec.lo is not None and val < spec.lo) or (spec.hi is not None and val > spec.hi):
            where.fail(f"param '{name}': {val} is outside [{int(spec.lo)}, {int(spec.hi)}]")
        return val
    if spec.kind == "choice":
        if raw not in spec.choices:
            where.fail(f"param '{name}': {raw!r} is not one of {', '.join(spec.choices)}")
        return raw
    if spec.kind == "bool":
        if not isinstance(raw, bool):
            where.fail(f"param '{name}': expected true or false, got {raw!r}")
        return raw
    raise AssertionError(spec.kind)


def _to_json(val: Any) -> Any:
    if isinstance(val, Ref):
        return val.to_json()
    if isinstance(val, list):
        return [_to_json(v) for v in val]
    return val


class EvalContext:
    """What a node sees of one evaluation: field size, dtype/device, seeds, pixel-centre coords."""

    def __init__(self, size: int, seed: int, dtype: torch.dtype, device: torch.device | str):
        self.size = int(size)
        self.seed = int(seed)
        self.dtype = dtype
        self.device = torch.device(device)
        c = torch.arange(self.size, dtype=dtype, device=self.device) + 0.5
        self.x = c.reshape(1, -1)                     # (1, W): x of each column
        self.y = (self.size - c).reshape(-1, 1)       # (H, 1): y of each row (row 0 at top)

    def node_seed(self, node_id: str) -> int:
        return node_seed(self.seed, node_id)

    def scalar(self, v: float) -> Tensor:
        return torch.tensor(float(v), dtype=self.dtype, device=self.device)

    def full(self, t: Tensor) -> Tensor:
        """Expand a broadcastable map to (size, size)."""
        t = t.to(self.dtype)
        if t.shape == (self.size, self.size):
            return t
        return t.expand(self.size, self.size)


class Node:
    """Base class: one node of a material graph.

    Subclasses set ``type_name`` (registers the class in :data:`NODE_TYPES`), ``INPUTS``,
    ``PARAMS`` (name -> :class:`Param`), ``PORTS`` (output names; the first is the default) and
    implement :meth:`forward`.
    """

    type_name: ClassVar[str] = ""
    INPUTS: ClassVar[tuple[Input, ...]] = ()
    PARAMS: ClassVar[dict[str, Param]] = {}
    PORTS: ClassVar[tuple[str, ...]] = ("out",)
    RANDOM: ClassVar[bool] = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        name = cls.__dict__.get("type_name")
        if name:
            NODE_TYPES[name] = cls

    def __init__(self, node_id: str, params: Mapping[str, Any] | None = None,
                 inputs: Mapping[str, str] | None = None, *, source: str = "<graph>") -> None:
        self.id = node_id
        self.source = source
        where = _Where(source, node_id)
        params = dict(params or {})
        self.raw_params: dict[str, Any] = {}
        for name, raw in params.items():
            spec = self.PARAMS.get(name)
            if spec is None:
                known = ", ".join(self.PARAMS) or "none"
                where.fail(f"unknown param '{name}' for node type '{self.type_name}' (known: {known})")
            self.raw_params[name] = _parse_param(name, spec, raw, where)
        self.inputs: dict[str, str] = {}
        self.connections: dict[str, tuple[str, str | None]] = {}
        for slot, ref in dict(inputs or {}).items():
            if not isinstance(ref, str) or not ref:
                where.fail(f"input '{slot}': expected a node id (\"node\" or \"node.port\"), got {ref!r}")
            self.inputs[slot] = ref
            nid, _, port = ref.partition(".")
            self.connections[slot] = (nid, port or None)
        slots = {i.name: i for i in self.INPUTS}
        for slot in self.connections:
            if slot not in slots:
                known = ", ".join(slots) or "none"
                where.fail(f"unknown input '{slot}' for node type '{self.type_name}' (known: {known})")
        for slot in self.INPUTS:
            if slot.required and slot.name not in self.connections:
                where.fail(f"input '{slot.name}' is required by node type '{self.type_name}' but not connected")
        self.check(where)

    # -- hooks ------------------------------------------------------------------------------
    def check(self, where: _Where) -> None:
        """Extra validation across parameters/inputs (override); call ``where.fail(msg)``."""

    def forward(self, ctx: EvalContext, ins: dict[str, Tensor | None], p: dict[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    # -- helpers ----------------------------------------------------------------------------
    def param_value(self, name: str) -> Any:
        """The parsed value of a parameter (literal, :class:`Ref`, list) or its default."""
        return self.raw_params.get(name, self.PARAMS[name].default)

    def referenced_params(self) -> set[str]:
        out: set[str] = set()
        for v in self.raw_params.values():
            for item in (v if isinstance(v, list) else [v]):
                if isinstance(item, Ref):
                    out.add(item.name)
        return out

    def resolve(self, ctx: EvalContext, values: Mapping[str, Tensor]) -> dict[str, Any]:
        """Parameter values for one evaluation: floats -> 0-dim tensors, floats lists -> lists of
        0-dim tensors, ints -> int, choices/bools as they are."""
        out: dict[str, Any] = {}
        for name, spec in self.PARAMS.items():
            val = self.param_value(name)
            if spec.kind == "float":
                out[name] = self._scalar(ctx, values, name, spec, val)
            elif spec.kind == "floats":
                out[name] = [self._scalar(ctx, values, f"{name}[{i}]", spec, v) for i, v in enumerate(val)]
            elif spec.kind == "int":
                if isinstance(val, Ref):
                    val = int(round(float(self._scalar(ctx, values, name, Param("float", 0.0), val).detach())))
                    if spec.lo is not None:
                        val = max(val, int(spec.lo))
                    if spec.hi is not None:
                        val = min(val, int(spec.hi))
                out[name] = int(val)
            else:
                out[name] = val
        return out

    def _scalar(self, ctx: EvalContext, values: Mapping[str, Tensor], field: str, spec: Param, val: Any) -> Tensor:
        if not isinstance(val, Ref):
            return ctx.scalar(val)
        if val.name not in values:
            raise LibraryError(f"{self.source}: node '{self.id}': param '{field}' refers to material "
                               f"parameter '{val.name}', but no value for it was given",
                               hint="every parameter the graph references needs a spec in the material")
        t = values[val.name]
        if not isinstance(t, Tensor):
            t = ctx.scalar(t)
        t = t.to(dtype=ctx.dtype, device=ctx.device).reshape(())
        if val.scale != 1.0:
            t = t * val.scale
        if val.offset != 0.0:
            t = t + val.offset
        if spec.lo is not None or spec.hi is not None:
            t = t.clamp(spec.lo, spec.hi)
        return t

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "type": self.type_name}
        if self.inputs:
            d["inputs"] = dict(self.inputs)
        if self.raw_params:
            d["params"] = {k: _to_json(v) for k, v in self.raw_params.items()}
        return d

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r}>"


class ConstantNode(Node):
    """A uniform map."""

    type_name = "constant"
    PARAMS = {"value": _f(0.5, "the value")}

    def forward(self, ctx, ins, p):
        return {"out": p["value"]}


def _noise_coords(ctx: EvalContext, scale: Tensor, angle: Tensor, stretch: Tensor) -> tuple[Tensor, Tensor]:
    """Lattice coordinates of every pixel: x / scale (rotated by angle, stretched along it)."""
    plain = (not angle.requires_grad and not stretch.requires_grad
             and float(angle.detach()) == 0.0 and float(stretch.detach()) == 1.0)
    if plain:  # separable: (1, W) and (H, 1)
        return ctx.x / scale, ctx.y / scale
    th = angle * (math.pi / 180.0)
    c, s = torch.cos(th), torch.sin(th)
    along = ctx.x * c + ctx.y * s
    across = ctx.y * c - ctx.x * s
    return along / (scale * stretch), across / scale


_SCALE = dict(lo=0.5, hi=1e5)


class NoiseNode(Node):
    """Gradient (Perlin) noise, one octave: lattice cell = ``scale`` pixels. Features are
    ``stretch`` times longer along ``angle`` (degrees, counter-clockwise from +x)."""

    type_name = "noise"
    RANDOM = True
    PARAMS = {
        "scale": _f(32.0, "lattice cell size in pixels (feature size)", **_SCALE),
        "angle": _f(0.0, "direction of stretch, degrees"),
        "stretch": _f(1.0, "elongation along angle", lo=0.01, hi=100.0),
    }

    def octaves(self, p) -> tuple[int, Tensor, Tensor]:
        return 1, p["scale"].new_tensor(2.0), p["scale"].new_tensor(0.5)

    def forward(self, ctx, ins, p):
        n_oct, lac, gain = self.octaves(p)
        u, v = _noise_coords(ctx, p["scale"], p["angle"], p["stretch"])
        seed = ctx.node_seed(self.id)
        total = None
        norm2 = None
        for k in range(n_oct):
            s_k = _mix32(seed + 0x632BE5AB * (k + 1))
            off_u = (_mix32(s_k ^ 0x1B873593) & 0xFFFF) / 256.0   # decorrelate octave lattices
            off_v = (_mix32(s_k ^ 0xCC9E2D51) & 0xFFFF) / 256.0
            f = lac ** k if k else None
            uk = u * f + off_u if k else u + off_u
            vk = v * f + off_v if k else v + off_v
            amp = gain ** k if k else None
            n = perlin(uk, vk, s_k)
            if k == 0:
                total, norm2 = n, 1.0
            else:
                total = total + amp * n
                norm2 = norm2 + amp * amp
        if n_oct > 1:
            total = total / torch.sqrt(norm2)
        return {"out": 0.5 + _NOISE_GAIN * total}


class FbmNode(NoiseNode):
    """Fractal Brownian motion: ``octaves`` Perlin octaves; octave k has cell
    ``scale / lacunarity**k`` and amplitude ``gain**k``; normalised by sqrt(sum amp**2) so the
    contrast does not depend on octaves/gain (mean 0.5, std ~0.16)."""

    type_name = "fbm"
    PARAMS = {
        "scale": _f(32.0, "cell size of the first octave, pixels", **_SCALE),
        "octaves": Param("int", 4, "number of octaves", lo=1, hi=12),
        "lacunarity": _f(2.0, "frequency ratio between octaves", lo=1.0, hi=8.0),
        "gain": _f(0.5, "amplitude ratio between octaves", lo=0.0, hi=2.0),
        "angle": _f(0.0, "direction of stretch, degrees"),
        "stretch": _f(1.0, "elongation along angle", lo=0.01, hi=100.0),
    }

    def octaves(self, p):
        return p["octaves"], p["lacunarity"], p["gain"]


class CellularNode(Node):
    """Worley / Voronoi cells on a jittered grid of ``cell_size`` pixels. Ports: ``f1`` (distance
    to the nearest point), ``f2`` (second nearest), ``edge`` (f2 - f1, 0 on cell borders), all in
    cell units (~[0, 1]), ``cell`` (a random value in [0, 1) per cell), and ``out`` = ``mode``."""

    type_name = "cellular"
    RANDOM = True
    PORTS = ("out", "f1", "f2", "edge", "cell")
    PARAMS = {
        "cell_size": _f(32.0, "grid cell size, pixels", **_SCALE),
        "jitter": _f(1.0, "0 = regular grid, 1 = point anywhere in its cell", lo=0.0, hi=1.0),
        "mode": _choice("f1", ("f1", "f2", "f2-f1", "cell"), "what 'out' is"),
    }

    def forward(self, ctx, ins, p):
        cs = p["cell_size"]
        w = worley(ctx.x / cs, ctx.y / cs, ctx.node_seed(self.id), p["jitter"])
        res = {"f1": w["f1"], "f2": w["f2"], "edge": w["f2"] - w["f1"], "cell": w["cell"]}
        res["out"] = res[{"f1": "f1", "f2": "f2", "f2-f1": "edge", "cell": "cell"}[p["mode"]]]
        return res


class GradientNode(Node):
    """Linear or radial gradient over the field; positions in fractions of the field size.
    linear: ``0.5 + ((x/size - cx) cos a + (y/size - cy) sin a) / length``;
    radial: ``distance((x, y)/size, (cx, cy)) / radius``; clamped to [0, 1] if ``clamp``."""

    type_name = "gradient"
    PARAMS = {
        "mode": _choice("linear", ("linear", "radial")),
        "angle": _f(0.0, "direction of increase, degrees ccw from +x (linear)"),
        "center_x": _f(0.5, "centre x, fraction of the field"),
        "center_y": _f(0.5, "centre y, fraction of the field (y up)"),
        "length": _f(1.0, "distance over which it rises 0 -> 1, fraction (linear)", lo=1e-3, hi=1e3),
        "radius": _f(0.5, "radius where it reaches 1, fraction (radial)", lo=1e-3, hi=1e3),
        "clamp": Param("bool", True, "clamp to [0, 1]"),
    }

    def forward(self, ctx, ins, p):
        xs = ctx.x / ctx.size - p["center_x"]
        ys = ctx.y / ctx.size - p["center_y"]
        if p["mode"] == "linear":
            th = p["angle"] * (math.pi / 180.0)
            t = 0.5 + (xs * torch.cos(th) + ys * torch.sin(th)) / p["length"]
        else:
            t = torch.sqrt(xs * xs + ys * ys + 1e-12) / p["radius"]
        if p["clamp"]:
            t = t.clamp(0.0, 1.0)
        return {"out": t}


def _sorted_stops(pos: list[Tensor], val: list[Tensor]) -> tuple[Tensor, Tensor]:
    p = torch.stack(pos)
    v = torch.stack(val)
    order = torch.argsort(p.detach(), stable=True)
    return p[order], v[order]


class _StopsNode(Node):
    INPUTS = (Input("in"),)

    def check(self, where):
        n_pos = len(self.param_value("positions"))
        n_val = len(self.param_value("values"))
        if n_pos != n_val:
            where.fail(f"param 'values': has {n_val} entries but 'positions' has {n_pos}")


class RampNode(_StopsNode):
    """Gray ramp: piecewise linear through (positions[k], values[k]); constant outside. Stops may
    be given in any order; positions and values are differentiable."""

    type_name = "ramp"
    PARAMS = {
        "positions": Param("floats", [0.0, 1.0], "stop positions (input values)", min_len=1),
        "values": Param("floats", [0.0, 1.0], "output value at each stop", min_len=1),
    }

    def forward(self, ctx, ins, p):
        pos, val = _sorted_stops(p["positions"], p["values"])
        x = ins["in"]
        out = val[0] + torch.zeros_like(x)
        for k in range(len(pos) - 1):
            w = (pos[k + 1] - pos[k]).clamp_min(1e-6)
            out = out + (val[k + 1] - val[k]) * ((x - pos[k]) / w).clamp(0.0, 1.0)
        return {"out": out}


class CurveNode(_StopsNode):
    """Smooth tone curve: monotone cubic Hermite (PCHIP, Fritsch-Carlson) through the control
    points; flat outside [first, last] position; no overshoot; differentiable in the points."""

    type_name = "curve"
    PARAMS = {
        "positions": Param("floats", [0.0, 0.25, 0.5, 0.75, 1.0], "control point inputs", min_len=2),
        "values": Param("floats", [0.0, 0.25, 0.5, 0.75, 1.0], "control point outputs", min_len=2),
    }

    def forward(self, ctx, ins, p):
        xs, ys = _sorted_stops(p["positions"], p["values"])
        h = (xs[1:] - xs[:-1]).clamp_min(1e-6)
        delta = (ys[1:] - ys[:-1]) / h
        if len(xs) > 2:
            d0, d1, h0, h1 = delta[:-1], delta[1:], h[:-1], h[1:]
            same = (d0 * d1) > 0
            one = torch.ones_like(d0)
            w1, w2 = 2.0 * h1 + h0, h1 + 2.0 * h0
            hm = (w1 + w2) / (w1 / torch.where(same, d0, one) + w2 / torch.where(same, d1, one))
            m_in = torch.where(same, hm, torch.zeros_like(hm))
            m = torch.cat([delta[:1], m_in, delta[-1:]])
        else:
            m = torch.cat([delta, delta])
        x = ins["in"]
        t = torch.minimum(torch.maximum(x, xs[0]), xs[-1])
        idx = (torch.searchsorted(xs.detach().contiguous(), t.detach().contiguous().reshape(-1), right=True) - 1)
        idx = idx.clamp(0, len(xs) - 2).reshape(t.shape)
        xk, hk = xs[idx], h[idx]
        s = (t - xk) / hk
        s2, s3 = s * s, s * s * s
        y = ((2 * s3 - 3 * s2 + 1) * ys[idx] + (s3 - 2 * s2 + s) * hk * m[idx]
             + (3 * s2 - 2 * s3) * ys[idx + 1] + (s3 - s2) * hk * m[idx + 1])
        return {"out": y}


class LevelsNode(Node):
    """Levels: ``t = clamp((x - in_low) / (in_high - in_low), 0, 1) ** (1 / gamma)``, then
    ``out_low + (out_high - out_low) * t`` (gamma > 1 brightens midtones)."""

    type_name = "levels"
    INPUTS = (Input("in"),)
    PARAMS = {
        "in_low": _f(0.0), "in_high": _f(1.0),
        "gamma": _f(1.0, "midtone gamma", lo=0.01, hi=100.0),
        "out_low": _f(0.0), "out_high": _f(1.0),
    }

    def forward(self, ctx, ins, p):
        t = (ins["in"] - p["in_low"]) / _safe_denominator(p["in_high"] - p["in_low"])
        t = _safe_pow(t.clamp(0.0, 1.0), 1.0 / p["gamma"])
        return {"out": p["out_low"] + (p["out_high"] - p["out_low"]) * t}


class ClampNode(Node):
    """Clamp to [low, high]."""

    type_name = "clamp"
    INPUTS = (Input("in"),)
    PARAMS = {"low": _f(0.0), "high": _f(1.0)}

    def forward(self, ctx, ins, p):
        return {"out": torch.minimum(torch.maximum(ins["in"], p["low"]), p["high"])}


class InvertNode(Node):
    """1 - x."""

    type_name = "invert"
    INPUTS = (Input("in"),)

    def forward(self, ctx, ins, p):
        return {"out": 1.0 - ins["in"]}


class ThresholdNode(Node):
    """Smooth threshold: ``sigmoid((x - threshold) * sharpness)``."""

    type_name = "threshold"
    INPUTS = (Input("in"),)
    PARAMS = {"threshold": _f(0.5), "sharpness": _f(20.0, "slope of the step", lo=0.0, hi=1e4)}

    def forward(self, ctx, ins, p):
        return {"out": torch.sigmoid((ins["in"] - p["threshold"]) * p["sharpness"])}


class ScaleOffsetNode(Node):
    """``scale * x + offset`` (e.g. a 0..1 map to a bump height in pixels)."""

    type_name = "scale_offset"
    INPUTS = (Input("in"),)
    PARAMS = {"scale": _f(1.0), "offset": _f(0.0)}

    def forward(self, ctx, ins, p):
        return {"out": ins["in"] * p["scale"] + p["offset"]}


class MathNode(Node):
    """``scale * op(a, b) + offset``, b = the 'b' input if connected, else ``value``.
    pow: a ** b with a <= 0 giving 0; divide: |b| is kept >= 1e-6; abs ignores b."""

    type_name = "math"
    INPUTS = (Input("a"), Input("b", required=False))
    PARAMS = {
        "op": _choice("add", ("add", "subtract", "multiply", "divide", "pow", "min", "max", "abs")),
        "value": _f(1.0, "second operand when 'b' is not connected"),
        "scale": _f(1.0), "offset": _f(0.0),
    }

    def forward(self, ctx, ins, p):
        a = ins["a"]
        b = ins["b"] if ins.get("b") is not None else p["value"]
        op = p["op"]
        if op == "add":
            r = a + b
        elif op == "subtract":
            r = a - b
        elif op == "multiply":
            r = a * b
        elif op == "divide":
            r = a / _safe_denominator(b)
        elif op == "pow":
            r = _safe_pow(a, b)
        elif op == "min":
            r = torch.minimum(a, b)
        elif op == "max":
            r = torch.maximum(a, b)
        else:
            r = a.abs()
        return {"out": r * p["scale"] + p["offset"]}


class BlendNode(Node):
    """Blend foreground ``b`` over background ``a``: ``a + (f(a, b) - a) * opacity * mask``."""

    type_name = "blend"
    INPUTS = (Input("a", doc="background"), Input("b", doc="foreground"),
              Input("mask", required=False, doc="per-pixel opacity factor"))
    PARAMS = {
        "mode": _choice("mix", ("mix", "multiply", "screen", "overlay", "add", "subtract",
                                "difference", "lighten", "darken")),
        "opacity": _f(1.0),
    }

    def forward(self, ctx, ins, p):
        a, b = ins["a"], ins["b"]
        mode = p["mode"]
        if mode == "mix":
            f = b
        elif mode == "multiply":
            f = a * b
        elif mode == "screen":
            f = 1.0 - (1.0 - a) * (1.0 - b)
        elif mode == "overlay":
            f = torch.where(a < 0.5, 2.0 * a * b, 1.0 - 2.0 * (1.0 - a) * (1.0 - b))
        elif mode == "add":
            f = a + b
        elif mode == "subtract":
            f = a - b
        elif mode == "difference":
            f = (a - b).abs()
        elif mode == "lighten":
            f = torch.maximum(a, b)
        else:
            f = torch.minimum(a, b)
        k = p["opacity"]
        if ins.get("mask") is not None:
            k = k * ins["mask"]
        return {"out": a + (f - a) * k}


class BlurNode(Node):
    """Gaussian blur, ``sigma`` in pixels (kernel radius ceil(4 sigma)), reflected borders."""

    type_name = "blur"
    INPUTS = (Input("in"),)
    PARAMS = {"sigma": _f(2.0, "standard deviation, pixels", lo=0.0, hi=256.0)}

    def forward(self, ctx, ins, p):
        return {"out": gaussian_blur(ctx.full(ins["in"]), p["sigma"])}


class WarpNode(Node):
    """Domain warp: ``out(p) = in(p + d(p))`` (bilinear, reflected borders). directional:
    ``d = intensity * (warp - 0.5) * (cos angle, sin angle)``; vector:
    ``d = intensity * (warp - 0.5, warp_y - 0.5)`` (needs the warp_y input). Pixels, y up."""

    type_name = "warp"
    INPUTS = (Input("in"), Input("warp"), Input("warp_y", required=False))
    PARAMS = {
        "intensity": _f(8.0, "displacement in pixels per unit of warp"),
        "angle": _f(0.0, "direction, degrees ccw from +x (directional)"),
        "mode": _choice("directional", ("directional", "vector")),
    }

    def check(self, where):
        if self.param_value("mode") == "vector" and "warp_y" not in self.connections:
            where.fail("input 'warp_y' is required when mode is 'vector'")

    def forward(self, ctx, ins, p):
        n = ctx.size
        w = ins["warp"] - 0.5
        if p["mode"] == "vector":
            dx = p["intensity"] * w
            dy = p["intensity"] * (ins["warp_y"] - 0.5)
        else:
            th = p["angle"] * (math.pi / 180.0)
            dx = p["intensity"] * torch.cos(th) * w
            dy = p["intensity"] * torch.sin(th) * w
        sx = ctx.full(ctx.x + dx)                        # sample position x (pixels)
        sy = ctx.full((n - ctx.y) - dy)                  # sample position in row units (down)
        grid = torch.stack([sx * (2.0 / n) - 1.0, sy * (2.0 / n) - 1.0], dim=-1).unsqueeze(0)
        img = ctx.full(ins["in"]).reshape(1, 1, n, n)
        out = F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return {"out": out.reshape(n, n)}


class SlopeNode(Node):
    """Slopes of ``intensity * in`` (see :func:`slopes`): ports dx, dy, magnitude."""

    type_name = "slope"
    INPUTS = (Input("in"),)
    PORTS = ("dx", "dy", "magnitude")
    PARAMS = {"intensity": _f(1.0, "height multiplier")}

    def forward(self, ctx, ins, p):
        dx, dy = slopes(ctx.full(ins["in"]) * p["intensity"])
        return {"dx": dx, "dy": dy, "magnitude": torch.sqrt(dx * dx + dy * dy + 1e-12)}


class HeightToNormalNode(Node):
    """Normal of the height field ``intensity * in`` (pixels): ``n = (-dx, -dy, 1) / |.|``.
    Ports: out = n . L (signed Lambert term, light at azimuth/elevation degrees), nx, ny, nz."""

    type_name = "height_to_normal"
    INPUTS = (Input("in"),)
    PORTS = ("out", "nx", "ny", "nz")
    PARAMS = {
        "intensity": _f(1.0, "height multiplier"),
        "light_azimuth": _f(135.0, "degrees ccw from +x"),
        "light_elevation": _f(45.0, "degrees above the substrate plane"),
    }

    def forward(self, ctx, ins, p):
        dx, dy = slopes(ctx.full(ins["in"]) * p["intensity"])
        inv = torch.rsqrt(1.0 + dx * dx + dy * dy)
        nx, ny, nz = -dx * inv, -dy * inv, inv
        az = p["light_azimuth"] * (math.pi / 180.0)
        el = p["light_elevation"] * (math.pi / 180.0)
        lx, ly, lz = torch.cos(el) * torch.cos(az), torch.cos(el) * torch.sin(az), torch.sin(el)
        return {"out": nx * lx + ny * ly + nz * lz, "nx": nx, "ny": ny, "nz": nz}


__all__ = [
    "NODE_TYPES", "Node", "Param", "Input", "Ref", "EvalContext", "node_seed", "slopes",
    "perlin", "worley", "gaussian_blur",
] + [cls.__name__ for cls in NODE_TYPES.values()]
