"""Differentiable rendering of a particle layout with Mitsuba 3, bridged to PyTorch.

How a frame is made (deferred shading):

1. ``trace``: Mitsuba intersects one orthographic top-down ray per sample (``spp`` jittered
   samples per pixel) with the particles (instanced meshes, see ``build_scene``), then the imaging model
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

from fitting.core.runtime import init_mitsuba

TEXTURE_CHANNELS = ("albedo", "slope_x", "slope_y", "substrate", "absorption")
TEXTURE_DEFAULTS = {"albedo": 0.8, "slope_x": 0.0, "slope_y": 0.0, "substrate": 0.5, "absorption": 0.5}


def _mi():
    init_mitsuba()
    import drjit as dr
    import mitsuba as mi
    return dr, mi


def _mesh(name: str, vertices: np.ndarray, normals: np.ndarray, faces: np.ndarray) -> Any:
    dr, mi = _mi()
    mesh = mi.Mesh(name, vertex_count=int(vertices.shape[0]), face_count=int(faces.shape[0]),
                   has_vertex_normals=True, has_vertex_texcoords=False)
    params = mi.traverse(mesh)
    params["vertex_positions"] = mi.Float(np.ascontiguousarray(vertices, np.float32).ravel())
    params["faces"] = mi.UInt32(np.ascontiguousarray(faces, np.uint32).ravel())
    params["vertex_normals"] = mi.Float(np.ascontiguousarray(normals, np.float32).ravel())
    params.update()
    return mesh


def _jit_array(cls: Any, values: np.ndarray) -> Any:
    """A Dr.Jit lookup table of ``values``, padded to at least two entries (the padding is never
    indexed). Dr.Jit turns a gather from a one-element array into a scalar load, with the load's
    alignment taken from the buffer's address: a layout with a single particle (or no loose
    faces) compiled a kernel of its own, and a one-element table copied from numpy flipped the
    kernel hash with where numpy had allocated it."""
    values = np.asarray(values).ravel()
    if values.size < 2:
        values = np.concatenate([values, np.zeros(2 - values.size, values.dtype)])
    return cls(values)


# Mitsuba's own spawn_ray offset (math::RayEpsilon = 1500 float ulps, scaled by |p|).
_RAY_EPSILON = 1500.0 * 2.0 ** -24


@dataclass
class ParticleScene:
    """A Mitsuba scene of a layout plus the tables that turn an Embree hit into a surface point.

    Hits are resolved from ``ray_intersect_preliminary`` (t, triangle, barycentrics, instance)
    with gathers on these tables instead of Mitsuba's ``compute_surface_interaction``: for
    instances that is a virtual call dispatched over every instance object, far slower on the
    TEM path-length trace (docs/decisions.md, "Hit resolution from preliminary intersections").
    """
    scene: Any                   # mi.Scene, or None for an empty layout
    positions: Any               # Float (3V): loose mesh vertices, then every group's template
    normals: Any                 # Float (3V): matching shading normals
    faces: Any                   # UInt32 (3F): vertex indices, loose faces first
    loose_particle: Any          # UInt32: particle id per loose face
    inst_face_offset: Any        # UInt32 per Dr.Jit registry id of an instance: its group's first face
    inst_particle: Any           # UInt32 per registry id: particle id
    inst_normal_matrix: Any      # Float (9 per registry id): inverse transpose of the 3x3 part
    n_instances: int


def _instances_near_field(g, size: float, margin: float) -> np.ndarray:
    """Which instances of group ``g`` come within ``margin`` of the field [0, size]^2: the
    template's bounding sphere, transformed (centre by the matrix, radius by its largest
    singular value), tested by its bounding square. Exact for a sphere, where the box around
    a rotated template box would reach up to sqrt(3) radii."""
    lo, hi = g.vertices.min(0).astype(np.float64), g.vertices.max(0).astype(np.float64)
    centre = 0.5 * (lo + hi)
    radius = float(np.sqrt(((g.vertices - centre) ** 2).sum(1)).max())
    m = g.matrices.astype(np.float64)
    xy = (m[:, :2, :3] @ centre) + m[:, :2, 3]                      # (n, 2)
    reach = radius * np.linalg.norm(m[:, :, :3], ord=2, axis=(1, 2)) + margin + 1e-4 * size
    return np.all((xy + reach[:, None] >= 0.0) & (xy - reach[:, None] <= size), axis=1)


def _empty_scene() -> ParticleScene:
    _, mi = _mi()
    z = mi.UInt32(0)
    return ParticleScene(None, mi.Float(0, 0, 0), mi.Float(0, 0, 1), mi.UInt32(0, 0, 0), z, None, None, None, 0)


def build_scene(layout, instancing: bool = True, margin: float = math.inf) -> ParticleScene:
    """One Mitsuba scene holding the particles of ``layout``: all of them, or (finite ``margin``)
    the loose ones and the instanced ones whose bounds come within ``margin`` of the field.

    Particles that the layout records as affine copies of a shared mesh become Mitsuba
    instances of one shape group per mesh; the rest are ONE merged mesh.  Why instances:
    Mitsuba's high-quality Embree BVH build is paid per triangle, the instance level per
    particle, so instancing keeps bulk rendering from being BVH-bound (docs/decisions.md,
    "Instanced particles"). ``instancing=False`` forces the merged mesh (tests compare both paths).
    ``margin`` is the imaging model's ``lateral_reach``: a particle farther outside the field
    cannot change a pixel, so it is not built, saving the time to make and free its instance
    (docs/decisions.md, "Culling particles outside the field").
    """
    dr, mi = _mi()
    if layout.n_triangles == 0:
        return _empty_scene()
    groups = list(getattr(layout, "instances", []) or []) if instancing else []
    loose = np.asarray(layout.loose_faces, np.int64) if groups else np.arange(layout.n_triangles)
    # per group: its template and the transforms and particle ids of the instances to build
    parts = [(g, g.matrices, g.pids) for g in groups]
    if math.isfinite(margin):
        near = [_instances_near_field(g, float(layout.size), margin) for g in groups]
        parts = [(g, g.matrices[k], g.pids[k]) for g, k in zip(groups, near) if k.any()]
        if not parts and not loose.size:
            return _empty_scene()
    # The scene is assembled from objects made with the plugin manager, not from a nested dict
    # through mi.load_dict, which parses a dict per instance and then needs a search through
    # scene.shapes() by id for each instance's registry id (docs/decisions.md, "Scene assembly
    # with the plugin manager").
    plugins = mi.PluginManager.instance()
    scene_props = mi.Properties("scene")
    pos, nrm, fac = [], [], []
    nv = nf = 0
    loose_particle = np.zeros(1, np.uint32)
    if loose.size:
        f = layout.faces[loose]
        used, remap = np.unique(f.ravel(), return_inverse=True)
        lv, ln, lf = layout.vertices[used], layout.normals[used], remap.reshape(-1, 3)
        scene_props["loose"] = _mesh("loose", lv, ln, lf)
        loose_particle = layout.face_particle[loose].astype(np.uint32)
        pos.append(lv), nrm.append(ln), fac.append(lf)
        nv, nf = len(lv), len(lf)
    # per instance, in creation order: the instance, its group's first face, particle id, normal matrix
    instances: list[Any] = []
    inst_off, inst_pid, inst_nm = [], [], []
    for gi, (g, matrices, pids) in enumerate(parts):
        group_props = mi.Properties("shapegroup")
        group_props["mesh"] = _mesh(f"group{gi}", g.vertices, g.normals, g.faces)
        group = plugins.create_object(group_props)
        scene_props[f"group{gi}"] = group
        pos.append(g.vertices), nrm.append(g.normals), fac.append(g.faces + nv)
        mats = matrices.astype(np.float64)
        inst_nm.append(np.transpose(np.linalg.inv(mats[:, :, :3]), (0, 2, 1)).reshape(-1, 9))  # inverse transposes
        inst_off.append(np.full(len(mats), nf, np.uint32))
        inst_pid.append(pids.astype(np.uint32))
        T = np.zeros((len(mats), 4, 4))
        T[:, :3, :] = mats
        T[:, 3, 3] = 1.0
        # nested lists: ScalarTransform4f converts them ~8x faster than numpy rows (1.7 vs 15 us)
        for T_j in T.tolist():
            props = mi.Properties("instance")
            props["to_world"] = mi.ScalarTransform4f(T_j)
            props["shapegroup"] = group
            inst = plugins.create_object(props)
            scene_props[f"i{len(instances)}"] = inst
            instances.append(inst)
        nv += len(g.vertices)
        nf += len(g.faces)
    scene = plugins.create_object(scene_props)
    off = pid = nm = None
    if instances:
        # Tables indexed by each instance's Dr.Jit registry id (what ray_intersect_preliminary
        # reports), filled with one fancy assignment rather than a per-shape loop
        # (docs/decisions.md, "Scene assembly with the plugin manager").
        reg = np.array(dr.reinterpret_array(mi.UInt32, mi.ShapePtr(instances)), dtype=np.int64)
        R = int(reg.max()) + 1
        t_off, t_pid, t_nm = np.zeros(R, np.uint32), np.zeros(R, np.uint32), np.zeros((R, 9), np.float32)
        t_off[reg] = np.concatenate(inst_off)
        t_pid[reg] = np.concatenate(inst_pid)
        t_nm[reg] = np.concatenate(inst_nm)
        off, pid, nm = _jit_array(mi.UInt32, t_off), _jit_array(mi.UInt32, t_pid), _jit_array(mi.Float, t_nm)
    return ParticleScene(scene, mi.Float(np.concatenate(pos).astype(np.float32).ravel()),
                         mi.Float(np.concatenate(nrm).astype(np.float32).ravel()),
                         mi.UInt32(np.concatenate(fac).astype(np.uint32).ravel()),
                         _jit_array(mi.UInt32, loose_particle), off, pid, nm, len(instances))


def spawn_ray(p, n, d) -> Any:
    """A ray from surface point ``p`` (geometric normal ``n``) along ``d``, its origin nudged
    off the surface to the side ``d`` leaves by, like Mitsuba's own spawn_ray."""
    dr, mi = _mi()
    mag = (1.0 + dr.max(dr.abs(p))) * _RAY_EPSILON
    mag = dr.select(dr.dot(n, d) < 0, -mag, mag)
    return mi.Ray3f(o=mi.Point3f(p + n * mag), d=d)


@dataclass
class Hit:
    """A ray's first particle hit, in world space (Dr.Jit arrays; undefined where not valid)."""
    valid: Any             # Bool
    p: Any                 # Point3f
    n: Any                 # Vector3f geometric normal (outward: faces are counter-clockwise)
    sh_n: Any              # Vector3f interpolated shading normal
    particle: Any          # UInt32 particle id (0 where not valid)

    def spawn_ray(self, d) -> Any:
        """A ray leaving the surface along ``d`` (origin nudged off the surface, like Mitsuba)."""
        return spawn_ray(self.p, self.n, d)

    def eval(self) -> None:
        dr, _ = _mi()
        dr.eval(self.valid, self.p, self.n, self.sh_n, self.particle)


def intersect(ps: ParticleScene, ray, active: Any = True) -> Hit:
    """First hit of ``ray`` with the particles of ``ps`` (no AD)."""
    dr, mi = _mi()
    if ps.scene is None:
        n = dr.width(ray.o)
        z3 = dr.zeros(mi.Vector3f, n)
        return Hit(dr.zeros(mi.Bool, n), mi.Point3f(z3), z3, z3, dr.zeros(mi.UInt32, n))
    pi = ps.scene.ray_intersect_preliminary(ray, coherent=False, active=active)
    valid = mi.Bool(active) & pi.is_valid()
    face = mi.UInt32(pi.prim_index)
    if ps.inst_particle is not None:
        reg = dr.reinterpret_array(mi.UInt32, pi.instance)
        inst = valid & (reg != 0)
        # an instance's prim_index counts the faces of its group's mesh
        face = face + dr.select(inst, dr.gather(mi.UInt32, ps.inst_face_offset, reg, inst), 0)
        particle = dr.select(inst, dr.gather(mi.UInt32, ps.inst_particle, reg, inst),
                             dr.gather(mi.UInt32, ps.loose_particle, pi.prim_index, valid & ~inst))
    else:
        inst = None
        particle = dr.gather(mi.UInt32, ps.loose_particle, pi.prim_index, valid)
    i0 = dr.gather(mi.UInt32, ps.faces, face * 3, valid)
    i1 = dr.gather(mi.UInt32, ps.faces, face * 3 + 1, valid)
    i2 = dr.gather(mi.UInt32, ps.faces, face * 3 + 2, valid)
    p0 = dr.gather(mi.Vector3f, ps.positions, i0, valid)
    p1 = dr.gather(mi.Vector3f, ps.positions, i1, valid)
    p2 = dr.gather(mi.Vector3f, ps.positions, i2, valid)
    u, v = pi.prim_uv.x, pi.prim_uv.y
    ng = dr.cross(p1 - p0, p2 - p0)
    ns = (dr.gather(mi.Vector3f, ps.normals, i0, valid) * (1.0 - u - v)
          + dr.gather(mi.Vector3f, ps.normals, i1, valid) * u
          + dr.gather(mi.Vector3f, ps.normals, i2, valid) * v)
    if inst is not None:
        rows = [dr.gather(mi.Vector3f, ps.inst_normal_matrix, reg * 3 + k, inst) for k in range(3)]
        ng = dr.select(inst, mi.Vector3f(*(dr.dot(rw, ng) for rw in rows)), ng)
        ns = dr.select(inst, mi.Vector3f(*(dr.dot(rw, ns) for rw in rows)), ns)
    t = dr.select(valid, pi.t, 0.0)
    return Hit(valid, mi.Point3f(ray.o + ray.d * t), dr.normalize(ng), dr.normalize(ns),
               dr.select(valid, particle, 0))


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
    surface: Hit           # the primary ray's particle hit
    sampler: Any           # mi.Sampler seeded for this frame


class SceneRenderer:
    """Renders one particle layout at a fixed resolution with one imaging model.

    Keep one renderer per (layout, resolution, spp) for a whole fit: kernels compile once.
    """

    def __init__(self, layout, imaging, resolution: int = 256, spp: int = 4, instancing: bool = True,
                 cull: bool = True) -> None:
        dr, mi = _mi()
        if resolution < 16 or resolution > 4096:
            raise ValueError(f"resolution {resolution} outside 16..4096")
        self.layout = layout
        self.imaging = imaging
        self.resolution = int(resolution)
        self.spp = int(max(1, spp))
        self.size = float(layout.size)
        # cull=False builds every particle (tests check that culling changes no pixel)
        margin = float(getattr(imaging, "lateral_reach", math.inf)) if cull else math.inf
        self.particles = build_scene(layout, instancing=instancing, margin=margin)
        self.scene = self.particles.scene
        # float32 arithmetic: the ray origins' height (layout.z_max is a float32 value)
        self.z_top = float(np.float32(layout.z_max) + np.float32(1.0)) if layout.n_triangles else 1.0
        attrs = np.concatenate([[0.0], layout.attributes.astype(np.float32)]) if len(layout.attributes) else np.zeros(1, np.float32)
        self._particle_attr = _jit_array(mi.Float, attrs)
        pops = getattr(layout, "populations", None)           # absent on minimal layout-like objects
        pops = np.zeros(len(attrs) - 1, np.float32) if pops is None else np.asarray(pops, np.float32)
        pops = np.concatenate([[0.0], pops])
        self._particle_population = _jit_array(mi.Float, pops)
        radii = layout.radii if len(layout.radii) else np.array([self.size / 20])
        # A length scale for thickness-like quantities, so absorption parameters mean the same
        # thing for 5 px and 100 px particles.
        self.length_scale = float(2.0 * np.median(radii))
        # The same two numbers as opaque Dr.Jit scalars, for use inside kernels: as Python
        # floats they would be literals of the kernel's IR, so every new layout would compile
        # its own primary-ray and shading kernels (docs/decisions.md, "Opaque per-layout
        # scalars in kernels").
        self.z_top_opaque = dr.opaque(mi.Float, self.z_top)
        self.length_scale_opaque = dr.opaque(mi.Float, self.length_scale)

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
        ray = mi.Ray3f(o=mi.Point3f(x, y, self.z_top_opaque), d=mi.Vector3f(0, 0, -1))
        surf = self.intersect(ray)
        hit = surf.valid
        p = dr.select(hit, surf.p, mi.Point3f(x, y, 0.0))
        normal = dr.select(hit, surf.sh_n, mi.Vector3f(0, 0, 1))
        return Samples(n=n, x=x, y=y, hit=hit, p=p, normal=normal, particle=surf.particle, surface=surf,
                       sampler=sampler)

    def intersect(self, ray, active: Any = True) -> Hit:
        """First particle hit of ``ray`` (see :func:`intersect`)."""
        return intersect(self.particles, ray, active)

    def trace(self, seed: int, trace_params: dict[str, float]) -> dict[str, Any]:
        """Everything geometric the imaging model needs for one frame, evaluated (no AD)."""
        dr, mi = _mi()
        with dr.suspend_grad():
            s = self.primary(seed)
            g = self.imaging.trace(self, s, trace_params)
            g["x"], g["y"], g["hit"] = s.x, s.y, s.hit
            g["attr"] = dr.gather(mi.Float, self._particle_attr, s.particle)
            g["pop"] = dr.gather(mi.Float, self._particle_population, s.particle)
            dr.eval(s.particle, *[v for v in g.values() if v is not None])
        self._last_particle = s.particle
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

    def sample_mask(self, max_votes: int = 16) -> np.ndarray:
        """Particle id per pixel from the samples of the last :meth:`trace`: the id most of the
        pixel's samples hit (ties: the earliest such sample), i.e. the mask of the rendered
        frame's own coverage -- a pixel half covered by a particle in the image is that
        particle's when most of its samples say so. Costs no ray tracing, which is why bulk
        rendering uses it (docs/decisions.md, "Instance mask from the frame's own samples").
        No antialiasing: each pixel belongs to exactly one particle. At most ``max_votes``
        samples vote."""
        if getattr(self, "_last_particle", None) is None:
            raise RuntimeError("sample_mask() needs a trace() or render() first")
        res, spp = self.resolution, self.spp
        ids = np.array(self._last_particle, dtype=np.int32).reshape(res * res, spp)
        out = ids[:, 0].copy()
        if spp > 1:
            ids = ids[:, :max_votes]
            # only pixels whose samples disagree (outlines, a few % of a field) need the vote
            differs = ids[:, 1] != ids[:, 0]
            for j in range(2, ids.shape[1]):       # column by column: ndarray.any(axis=1) over a
                differs |= ids[:, j] != ids[:, 0]   # 4-wide axis is ~10x slower here
            mixed = np.flatnonzero(differs)
            sub = ids[mixed]
            votes = np.zeros(sub.shape, np.uint8)                       # (P, k): samples agreeing with each
            for j in range(sub.shape[1]):
                votes += sub == sub[:, j:j + 1]
            out[mixed] = np.take_along_axis(sub, votes.argmax(1)[:, None], 1)[:, 0]
        return out.reshape(res, res)

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
