"""Differentiable rendering of a particle layout with Mitsuba 3, bridged to PyTorch.

How a frame is made (deferred shading):

1. ``trace``: Mitsuba intersects one orthographic top-down ray per sample (``spp`` jittered
   samples per pixel) with the particles (one merged triangle mesh), then the imaging model
   traces what its physics needs (SEM: detector shadow ray and an ambient-occlusion ray;
   TEM: the exact path length through the union of particles; optical: refraction in and
   out of transparent particles). Geometry is fixed during a fit, so this runs without AD.
2. ``shade``: a Dr.Jit program turns the traced samples, the surface maps from the node graph
   (a texture looked up at each hit) and the scalar parameters into sample intensities and
   box-filters them into pixels. This part is recorded by Dr.Jit's AD.
3. The shading is wrapped with ``@dr.wrap(source="torch", target="drjit")`` so gradients of a
   torch loss flow back through Mitsuba's shading into the torch texture maps and scalars.
4. Image-space effects (blur, noise, tone) are torch post-processing (``imaging.py``).

A new ``seed`` draws new sample positions (and new AO/detector samples), so every refinement
iteration sees a fresh Monte-Carlo estimate.
"""
from __future__ import annotations

import atexit
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .runtime import init_mitsuba

TEXTURE_CHANNELS = ("albedo", "slope_x", "slope_y", "substrate", "absorption")
TEXTURE_DEFAULTS = {"albedo": 0.8, "slope_x": 0.0, "slope_y": 0.0, "substrate": 0.5, "absorption": 0.5}


def _mi():
    init_mitsuba()
    import drjit as dr
    import mitsuba as mi
    return dr, mi


def build_scene(layout) -> Any:
    """One Mitsuba scene holding every particle as ONE merged mesh (fast BVH, one shape).

    Particle ids come from the primitive index through ``layout.face_particle``.
    Returns None for an empty layout (no particles: every ray sees the substrate).
    """
    dr, mi = _mi()
    if layout.faces.shape[0] == 0:
        return None
    mesh = mi.Mesh("particles", vertex_count=int(layout.vertices.shape[0]),
                   face_count=int(layout.faces.shape[0]), has_vertex_normals=True,
                   has_vertex_texcoords=False)
    params = mi.traverse(mesh)
    params["vertex_positions"] = mi.Float(np.ascontiguousarray(layout.vertices, np.float32).ravel())
    params["faces"] = mi.UInt32(np.ascontiguousarray(layout.faces, np.uint32).ravel())
    params["vertex_normals"] = mi.Float(np.ascontiguousarray(layout.normals, np.float32).ravel())
    params.update()
    return mi.load_dict({"type": "scene", "particles": mesh})


@dataclass
class Samples:
    """Per-sample primary-ray data shared by every imaging model (Dr.Jit arrays)."""
    n: int                 # number of samples = res * res * spp
    x: Any                 # world x of the sample (Float)
    y: Any                 # world y
    hit: Any               # Bool: the ray hit a particle
    p: Any                 # Point3f hit point (substrate point where no hit)
    normal: Any            # Vector3f shading normal (0,0,1) on the substrate
    particle: Any          # UInt32 particle id (0 = substrate)
    si: Any                # the SurfaceInteraction3f of the primary ray
    sampler: Any           # mi.Sampler seeded for this frame


class SceneRenderer:
    """Renders one particle layout at a fixed resolution with one imaging model.

    Keep one renderer per (layout, resolution, spp) for a whole fit: kernels compile once.
    """

    def __init__(self, layout, imaging, resolution: int = 256, spp: int = 4) -> None:
        dr, mi = _mi()
        if resolution < 16 or resolution > 4096:
            raise ValueError(f"resolution {resolution} outside 16..4096")
        self.layout = layout
        self.imaging = imaging
        self.resolution = int(resolution)
        self.spp = int(max(1, spp))
        self.size = float(layout.size)
        self.scene = build_scene(layout)
        self.z_top = float(layout.vertices[:, 2].max() + 1.0) if layout.vertices.size else 1.0
        fp = np.concatenate([[0], layout.face_particle.astype(np.uint32)]) if layout.faces.size else np.zeros(1, np.uint32)
        self._face_particle = mi.UInt32(fp[1:] if fp.size > 1 else fp)
        attrs = np.concatenate([[0.0], layout.attributes.astype(np.float32)]) if len(layout.attributes) else np.zeros(1, np.float32)
        self._particle_attr = mi.Float(attrs)
        radii = layout.radii if len(layout.radii) else np.array([self.size / 20])
        # A length scale for thickness-like quantities, so absorption parameters mean the same
        # thing for 5 px and 100 px particles.
        self.length_scale = float(2.0 * np.median(radii))

    # ---------------------------------------------------------------- tracing (no AD)
    def primary(self, seed: int, jitter: bool = True) -> Samples:
        dr, mi = _mi()
        res, spp = self.resolution, (self.spp if jitter else 1)
        n = res * res * spp
        sampler = mi.load_dict({"type": "independent", "sample_count": spp})
        sampler.seed(int(seed) & 0x7FFFFFFF, n)
        idx = dr.arange(mi.UInt32, n)
        pix = idx // spp
        col = mi.Float(pix % res)
        row = mi.Float(pix // res)
        if jitter:
            j = sampler.next_2d()
        else:
            j = mi.Point2f(0.5, 0.5)
        scale = self.size / res
        x = (col + j.x) * scale
        y = self.size - (row + j.y) * scale
        ray = mi.Ray3f(o=mi.Point3f(x, y, self.z_top), d=mi.Vector3f(0, 0, -1))
        if self.scene is None:
            hit = dr.zeros(mi.Bool, n)
            si = dr.zeros(mi.SurfaceInteraction3f, n)
        else:
            si = self.scene.ray_intersect(ray)
            hit = si.is_valid()
        p = dr.select(hit, si.p, mi.Point3f(x, y, 0.0))
        normal = dr.select(hit, si.sh_frame.n, mi.Vector3f(0, 0, 1))
        particle = dr.select(hit, dr.gather(mi.UInt32, self._face_particle, si.prim_index, hit), 0)
        return Samples(n=n, x=x, y=y, hit=hit, p=p, normal=normal, particle=particle, si=si, sampler=sampler)

    def trace(self, seed: int, trace_params: dict[str, float]) -> dict[str, Any]:
        """Everything geometric the imaging model needs for one frame, evaluated (no AD)."""
        dr, mi = _mi()
        with dr.suspend_grad():
            s = self.primary(seed)
            g = self.imaging.trace(self, s, trace_params)
            g["x"], g["y"], g["hit"] = s.x, s.y, s.hit
            g["attr"] = dr.gather(mi.Float, self._particle_attr, s.particle)
            dr.eval(*[v for v in g.values() if v is not None])
        return g

    def instance_mask(self) -> np.ndarray:
        """Particle id per pixel (0 = substrate) from one ray through each pixel centre.

        No antialiasing by construction: each pixel belongs to exactly one particle.
        """
        dr, mi = _mi()
        with dr.suspend_grad():
            s = self.primary(0, jitter=False)
            ids = np.array(s.particle, dtype=np.int32)
        return ids.reshape(self.resolution, self.resolution)

    # ---------------------------------------------------------------- shading (AD)
    def render(self, maps: torch.Tensor, scalars: dict[str, torch.Tensor], seed: int,
               trace_params: dict[str, float] | None = None, g: dict[str, Any] | None = None) -> torch.Tensor:
        """Differentiable render: maps (C,H,W) torch + scalar dict -> (res,res) torch image.

        ``maps`` holds TEXTURE_CHANNELS in that order (use :func:`stack_maps`), covering the
        whole field. Gradients flow to ``maps`` and every scalar that requires grad.
        """
        if g is None:
            g = self.trace(seed, trace_params or {})
        names = sorted(scalars)
        vals = [scalars[k].reshape(1).to(torch.float32) for k in names]
        tex = maps.to(torch.float32).permute(1, 2, 0).contiguous()
        img = _shade_bridge(self, g, names, tex, *vals)
        return img.reshape(self.resolution, self.resolution)

    def shade_drjit(self, g: dict[str, Any], names: list[str], tex, vals) -> Any:
        """The Dr.Jit shading program: texture lookup, imaging model, pixel box filter."""
        dr, mi = _mi()
        texture = mi.Texture2f(tex, filter_mode=dr.FilterMode.Linear, wrap_mode=dr.WrapMode.Clamp)
        # Texture row 0 is the top of the image (y = size).
        uv = mi.Point2f(g["x"] / self.size, 1.0 - g["y"] / self.size)
        looked = texture.eval(uv)
        t = {name: looked[i] for i, name in enumerate(TEXTURE_CHANNELS)}
        # Scalars stay width-1 arrays: Dr.Jit broadcasts them, and their adjoint is a
        # reduction rather than millions of atomic adds into one address.
        s = {k: mi.Float(v.array) for k, v in zip(names, vals)}
        value = self.imaging.shade(self, g, t, s)
        pixels = dr.block_sum(value, self.spp) / self.spp
        return mi.TensorXf(pixels, shape=(self.resolution, self.resolution))


def _shade_bridge(renderer: SceneRenderer, g, names, tex, *vals):
    dr, mi = _mi()

    @dr.wrap(source="torch", target="drjit")
    def shade(tex, *vals):
        return renderer.shade_drjit(g, names, tex, vals)

    return shade(tex, *vals)


def stack_maps(maps: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """(C,H,W) tensor of TEXTURE_CHANNELS; channels a graph does not output get defaults."""
    out = []
    for name in TEXTURE_CHANNELS:
        m = maps.get(name)
        if m is None:
            m = torch.full((size, size), TEXTURE_DEFAULTS[name])
        out.append(m.to(torch.float32).reshape(size, size))
    return torch.stack(out)


def _release_ad_graph() -> None:
    # An un-back-propagated dr.wrap graph still held at interpreter exit can abort the process
    # ("LLVM backend is inactive"); dropping Dr.Jit's AD state first avoids that.
    try:
        import sys
        if "drjit" in sys.modules:
            import gc
            gc.collect()
            sys.modules["drjit"].flush_malloc_cache()
    except Exception:
        pass


atexit.register(_release_ad_graph)


def direction_from_angles(azimuth_deg: float, elevation_deg: float) -> tuple[float, float, float]:
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    return (math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el))
