"""Imaging models: how a microscope turns a particle scene into gray values.

Each model has three parts, matching the renderer's stages:
- ``trace``   (Dr.Jit, no AD): the geometric quantities its physics needs, from Mitsuba rays.
- ``shade``   (Dr.Jit, AD):    per-sample intensity from traced data, surface maps and scalars.
- ``post``    (torch, AD):     image-space effects: blur, tone, noise, aperture.

Parameters are physical values here; specs (ranges, groups, refine flags) live in the
material library. ``TRACE_PARAMS`` change rays and are never differentiated.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from fitting.render.filters import shifted_sum
from fitting.render.tracing import _mi, direction_from_angles, spawn_ray

# name -> default physical value
COMMON_POST = {
    "blur": 0.6,            # px, Gaussian sigma of beam spot / optics
    "gain": 1.0,            # multiplies the signal before the tone curve
    "gamma": 1.0,
    "contrast": 1.0,        # around mid gray
    "offset": 0.0,          # added after contrast
    "noise_gauss": 0.02,    # std of additive Gaussian noise
    "noise_dose": 200.0,    # counts at unit intensity: Poisson shot noise (Gaussian approximation)
}


class ImagingModel:
    name = "base"
    # How far outside the field (world units) a particle can still change a pixel: the scene
    # leaves out particles beyond it. Unbounded unless a model's rays cannot go sideways (SEM's
    # detector and occlusion rays and optical refraction reach neighbours across the edge).
    lateral_reach: float = math.inf
    TRACE_PARAMS: dict[str, float] = {}
    SHADE_PARAMS: dict[str, float] = {}
    POST_PARAMS: dict[str, float] = dict(COMMON_POST)

    @classmethod
    def all_params(cls) -> dict[str, float]:
        return {**cls.TRACE_PARAMS, **cls.SHADE_PARAMS, **cls.POST_PARAMS}

    def trace(self, r, s, tp: dict[str, float]) -> dict[str, Any]:
        raise NotImplementedError

    def shade(self, r, g, t, s) -> Any:
        raise NotImplementedError

    def post(self, img: torch.Tensor, p: dict[str, torch.Tensor], seed: int, noise: bool = True) -> torch.Tensor:
        return common_post(img, p, seed, noise)


def _p(p: dict[str, torch.Tensor], name: str, defaults: dict[str, float]) -> torch.Tensor:
    v = p.get(name)
    return torch.as_tensor(defaults[name] if v is None else v, dtype=torch.float32)


def gaussian_blur(img: torch.Tensor, sigma: torch.Tensor, max_radius: int = 12) -> torch.Tensor:
    """Separable Gaussian blur of an (H,W) image; differentiable in ``sigma`` (kernel built from it)."""
    sigma = torch.clamp(torch.as_tensor(sigma, dtype=img.dtype), min=1e-3)
    radius = int(min(max_radius, max(1, math.ceil(3.0 * float(sigma.detach())))))
    xs = torch.arange(-radius, radius + 1, dtype=img.dtype)
    k = torch.exp(-0.5 * (xs / sigma) ** 2)
    k = k / k.sum()
    h, w = img.shape
    # Weighted sums of shifted views instead of F.conv2d: torch's CPU convolution has no fast
    # path for one channel; this is faster and stays differentiable in img and sigma
    # (docs/decisions.md, "Blur as weighted sums of shifted views").
    x = F.pad(img[None, None], (radius, radius, 0, 0), mode="reflect" if radius < w else "replicate")[0, 0]
    x = shifted_sum(x, k, w, dim=1)
    x = F.pad(x[None, None], (0, 0, radius, radius), mode="reflect" if radius < h else "replicate")[0, 0]
    return shifted_sum(x, k, h, dim=0)


def noise_generator(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(int(seed) * 7919 + 17)
    return gen


def tone(img: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    gain = _p(p, "gain", COMMON_POST)
    gamma = _p(p, "gamma", COMMON_POST)
    contrast = _p(p, "contrast", COMMON_POST)
    offset = _p(p, "offset", COMMON_POST)
    x = torch.clamp(img * gain, min=1e-4) ** gamma
    return (x - 0.5) * contrast + 0.5 + offset


def add_noise(img: torch.Tensor, p: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """Shot noise (Gaussian approximation of Poisson) + read-out noise, reparameterised.

    The two are independent zero-mean Gaussians, so their sum is one Gaussian of the summed
    variance: one normal draw per pixel instead of two, the same distribution and gradients in
    expectation (docs/decisions.md, "One noise draw per pixel")."""
    dose = torch.clamp(_p(p, "noise_dose", COMMON_POST), min=1.0)
    sigma_g = torch.clamp(_p(p, "noise_gauss", COMMON_POST), min=0.0)
    e = torch.randn(img.shape, generator=gen)
    std = torch.sqrt(torch.clamp(img, min=0.0) / dose + sigma_g * sigma_g + 1e-8)
    return img + std * e


def defocus_fringe(img: torch.Tensor, strength: torch.Tensor, width: torch.Tensor, max_radius: int = 12) -> torch.Tensor:
    """Defocus overshoot at every edge (unsharp mask): a bright halo outside dark particles, a
    dark ring around bright ones; ``width`` is the Gaussian sigma of the overshoot in pixels."""
    return img + strength * (img - gaussian_blur(img, width, max_radius=max_radius))


def common_post(img, p, seed, noise=True):
    img = gaussian_blur(img, _p(p, "blur", COMMON_POST))
    if noise:
        img = add_noise(img, p, noise_generator(seed))
    img = tone(img, p)
    return torch.clamp(img, 0.0, 1.0)


# ------------------------------------------------------------------------------- SEM
class SEMModel(ImagingModel):
    """Secondary-electron imaging.

    Yield grows toward grazing incidence (1/cos^k, the facing-ratio law that makes SEM edges
    bright), modulated by the surface albedo map and bump slopes; an Everhart-Thornley-like
    detector at (azimuth, elevation) collects electrons from surfaces it sees (shadow ray:
    the dark side of particles); ambient occlusion darkens gaps between particles.
    """
    name = "sem"
    TRACE_PARAMS = {"detector_azimuth": 45.0, "detector_elevation": 35.0, "ao_distance": 0.5}
    SHADE_PARAMS = {"particle_brightness": 0.5, "substrate_brightness": 0.25, "edge_gain": 0.6,
                    "edge_power": 1.2, "bump": 1.0, "detector_mix": 0.35, "ao_strength": 0.5,
                    "second_contrast": 1.0}
    POST_PARAMS = {**COMMON_POST, "scanline": 0.01}

    def trace(self, r, s, tp):
        dr, mi = _mi()
        tp = {**self.TRACE_PARAMS, **tp}
        d_det = mi.Vector3f(*direction_from_angles(tp["detector_azimuth"], tp["detector_elevation"]))
        eps = 1e-3 * r.size
        origin = mi.Point3f(s.p + s.normal * eps)
        if r.scene is None:
            vis = dr.full(mi.Bool, True, s.n)
            occl = dr.zeros(mi.Float, s.n)
        else:
            vis = ~r.scene.ray_test(mi.Ray3f(o=mi.Point3f(origin), d=d_det))
            frame = mi.Frame3f(s.normal)
            wo = frame.to_world(mi.warp.square_to_cosine_hemisphere(s.sampler.next_2d()))
            # opaque: a per-layout number, see SceneRenderer.length_scale_opaque
            ao_len = dr.opaque(mi.Float, max(tp["ao_distance"] * r.length_scale, 1e-3))
            occl = mi.Float(r.scene.ray_test(mi.Ray3f(mi.Ray3f(mi.Point3f(origin), wo), ao_len)))
        return {"nx": s.normal.x, "ny": s.normal.y, "nz": s.normal.z, "vis": mi.Float(vis), "occl": occl,
                "dx": dr.full(mi.Float, d_det.x[0], 1), "dy": dr.full(mi.Float, d_det.y[0], 1),
                "dz": dr.full(mi.Float, d_det.z[0], 1)}

    def shade(self, r, g, t, s):
        dr, mi = _mi()
        P = {**{k: mi.Float(v) for k, v in self.SHADE_PARAMS.items()}, **s}
        hit = g["hit"]
        # Bump: the top-view height map tilts the normal (only on particles).
        bump = dr.select(hit, P["bump"], 0.0)
        n = dr.normalize(mi.Vector3f(g["nx"] - bump * t["slope_x"], g["ny"] - bump * t["slope_y"], g["nz"]))
        cos = dr.maximum(n.z, 0.04)
        # Capped: a grazing sample would otherwise add a single-sample speckle on silhouettes.
        sec = dr.minimum(dr.rcp(cos), 10.0)
        se_yield = 1.0 + P["edge_gain"] * (dr.power(sec, P["edge_power"]) - 1.0)
        albedo = dr.select(hit, P["particle_brightness"] * 2.0 * t["albedo"] * _second(P, g),
                           P["substrate_brightness"] * 2.0 * t["substrate"])
        facing = dr.maximum(n.x * g["dx"] + n.y * g["dy"] + n.z * g["dz"], 0.0)
        detector = (1.0 - P["detector_mix"]) + P["detector_mix"] * g["vis"] * facing * 1.6
        ao = 1.0 - P["ao_strength"] * g["occl"]
        return albedo * se_yield * detector * ao

    def post(self, img, p, seed, noise=True):
        img = gaussian_blur(img, _p(p, "blur", self.POST_PARAMS))
        if noise:
            gen = noise_generator(seed)
            img = add_noise(img, p, gen)
            # Scan-line noise: each line's beam current jitters, so whole rows shift.
            rows = torch.randn((img.shape[0], 1), generator=gen)
            img = img + _p(p, "scanline", self.POST_PARAMS) * rows
        return torch.clamp(tone(img, p), 0.0, 1.0)


# ------------------------------------------------------------------------------- TEM
class TEMModel(ImagingModel):
    """Bright-field TEM: particles absorb, so they are dark on a light film, darker where thicker.

    The trace measures the exact path length through the union of all particle meshes
    (counting entries and exits along the beam); intensity follows Beer-Lambert with an
    optical density per particle diameter, modulated by the absorption map (internal
    contrast: crystallites, thickness fringes). A Fresnel-fringe halo is added in post.
    """
    name = "tem"
    # A parallel beam: every ray runs straight down, so a particle outside the field is never
    # crossed and need not be built (docs/decisions.md, "Culling particles outside the field").
    lateral_reach = 0.0
    TRACE_PARAMS = {"max_crossings": 12.0}
    SHADE_PARAMS = {"film_level": 0.85, "optical_density": 1.2, "absorb_contrast": 0.3, "film_texture": 0.1,
                    "diffraction": 0.0, "thickness_fringes": 0.0, "extinction": 0.5, "second_contrast": 1.0}
    POST_PARAMS = {**COMMON_POST, "fringe": 0.3, "fringe_width": 2.0}

    def trace(self, r, s, tp):
        dr, mi = _mi()
        n_cross = int((tp or {}).get("max_crossings", self.TRACE_PARAMS["max_crossings"]))
        length = dr.zeros(mi.Float, s.n)
        if r.scene is not None:
            # One intersection kernel per crossing, over the rays still inside the field only
            # (dr.compress: few rays survive several crossings), each step evaluated before its
            # fields are read, so no intersection runs twice (docs/decisions.md, "TEM
            # path-length trace with compressed rays").
            # The primary hits in one kernel: every later read of a still-lazy field (compress,
            # gathers, the caller's final eval) would re-run the primary intersection.
            dr.eval(s.hit, s.surface.p, s.surface.n, s.normal, s.particle)
            idx = dr.compress(s.hit)                   # sample index of every live ray
            p = dr.gather(mi.Point3f, s.surface.p, idx)
            n = dr.gather(mi.Vector3f, s.surface.n, idx)
            depth = dr.zeros(mi.Int32, dr.width(idx))
            d = mi.Vector3f(0, 0, -1)
            for _ in range(n_cross):
                if dr.width(idx) == 0:
                    break
                depth += dr.select(dr.dot(n, d) < 0, 1, -1)          # entering / leaving
                nxt = r.intersect(spawn_ray(p, n, d))
                seg = dr.select(nxt.valid & (depth > 0), dr.norm(nxt.p - p), 0.0)
                dr.eval(nxt.valid, nxt.p, nxt.n, seg, depth)         # one intersection kernel
                dr.scatter_add(length, seg, idx)                     # idx unique: no reordering
                live = dr.compress(nxt.valid)
                idx = dr.gather(mi.UInt32, idx, live)
                depth = dr.gather(mi.Int32, depth, live)
                p = dr.gather(mi.Point3f, nxt.p, live)
                n = dr.gather(mi.Vector3f, nxt.n, live)
                dr.eval(length, idx, depth, p, n)
        return {"length": length / r.length_scale_opaque, "nz": s.normal.z}

    def shade(self, r, g, t, s):
        dr, mi = _mi()
        P = {**{k: mi.Float(v) for k, v in self.SHADE_PARAMS.items()}, **s}
        film = P["film_level"] * (1.0 + P["film_texture"] * 2.0 * (t["substrate"] - 0.5))
        mu = P["optical_density"] * dr.maximum(1.0 + P["absorb_contrast"] * 2.0 * (t["absorption"] - 0.5), 0.0)
        # Diffraction contrast: each crystal's orientation puts it nearer to or further from a
        # Bragg condition, so whole particles scatter more or less (per-particle random attribute).
        mu = mu * dr.maximum(1.0 + P["diffraction"] * 2.0 * (g["attr"] - 0.5), 0.0) * _second(P, g)
        thickness = g["length"]
        # Thickness fringes: intensity oscillates with the path length (extinction distance in
        # units of the median particle diameter), seen as concentric bands in wedge-shaped edges.
        period = dr.maximum(P["extinction"], 1e-3)
        fringes = 1.0 - P["thickness_fringes"] * 0.5 * (1.0 - dr.cos(6.2831853 * thickness / period))
        fringes = dr.select(thickness > 0, fringes, 1.0)
        return film * dr.exp(-mu * thickness) * fringes

    def post(self, img, p, seed, noise=True):
        # Fresnel fringe (defocus): a bright halo outside dark edges.
        img = defocus_fringe(img, _p(p, "fringe", self.POST_PARAMS), _p(p, "fringe_width", self.POST_PARAMS))
        return common_post(img, p, seed, noise)


# --------------------------------------------------------------------------- optical
class OpticalModel(ImagingModel):
    """Back-lit bright-field optics (droplets, in-situ probes).

    A transparent particle refracts the camera ray in and out (Snell, exact second
    intersection); only rays leaving within the condenser cone receive light, which darkens
    the rims of droplets. Opaque particles block light; reflective ones add a Fresnel term.
    Per-particle random attributes choose transparent vs opaque smoothly (differentiable
    share). Defocus blur and a round-aperture vignette are post-processing.
    """
    name = "optical"
    TRACE_PARAMS = {"ior": 1.45}
    SHADE_PARAMS = {"background": 0.8, "cone_angle": 0.35, "cone_softness": 0.1, "absorption": 0.2,
                    "transparent_share": 0.7, "opaque_level": 0.15, "reflect_strength": 0.2,
                    "background_texture": 0.05, "focus_gain": 0.0, "second_contrast": 1.0}
    POST_PARAMS = {**COMMON_POST, "aperture_radius": 0.0, "aperture_softness": 0.02, "outside_level": 0.02,
                   "fringe": 0.0, "fringe_width": 2.0}

    def trace(self, r, s, tp):
        dr, mi = _mi()
        ior = float((tp or {}).get("ior", self.TRACE_PARAMS["ior"]))
        n = s.n
        dev = dr.zeros(mi.Float, n)
        inner = dr.zeros(mi.Float, n)
        trans = dr.zeros(mi.Float, n)
        refl = dr.zeros(mi.Float, n)
        if r.scene is not None:
            d = mi.Vector3f(0, 0, -1)
            n1s = s.normal
            cos_i = dr.clip(-dr.dot(d, n1s), 0.0, 1.0)
            f1 = mi.fresnel(cos_i, ior)[0]
            d1 = _refract(d, n1s, 1.0 / ior)
            si2 = r.intersect(s.surface.spawn_ray(d1), s.hit)
            ok = s.hit & si2.valid
            n2 = si2.sh_n  # outward normal at the exit point
            cos_2 = dr.clip(dr.dot(d1, n2), 0.0, 1.0)
            f2 = mi.fresnel(cos_2, 1.0 / ior)[0]
            # leaving: refraction from inside (ior) to outside (1)
            d2 = _refract(d1, -n2, ior)
            tir = dr.squared_norm(d2) < 0.5
            d2 = dr.select(tir | ~ok, d1, d2)
            dev = dr.select(s.hit, dr.acos(dr.clip(-d2.z, -1.0, 1.0)), 0.0)
            dev = dr.select(s.hit & (tir | ~ok), 3.0, dev)
            inner = dr.select(ok, dr.norm(si2.p - s.surface.p) / r.length_scale_opaque, 0.0)
            trans = dr.select(ok & ~tir, (1.0 - f1) * (1.0 - f2), 0.0)
            refl = dr.select(s.hit, f1, 0.0)
        return {"dev": dev, "inner": inner, "trans": trans, "refl": refl}

    def shade(self, r, g, t, s):
        dr, mi = _mi()
        P = {**{k: mi.Float(v) for k, v in self.SHADE_PARAMS.items()}, **s}
        bg = P["background"] * (1.0 + P["background_texture"] * 2.0 * (t["substrate"] - 0.5))
        soft = dr.maximum(P["cone_softness"], 1e-3)
        accept = dr.rcp(1.0 + dr.exp(-(P["cone_angle"] - g["dev"]) / soft))
        transparent = P["background"] * g["trans"] * accept * dr.exp(-P["absorption"] * g["inner"] * 2.0 * t["absorption"])
        # A sphere is a lens: slightly out of focus, the light it gathers makes its centre brighter
        # than the field (the bright core of colloids in bright field); strongest for straight rays.
        transparent = transparent * (1.0 + P["focus_gain"] * dr.exp(-dr.square(g["dev"] / 0.15)))
        # Opaque particles scatter light of their own (bright or dark blobs): an absolute level.
        opaque = P["opaque_level"] * 2.0 * t["albedo"] * _second(P, g)
        # Smooth, differentiable choice: particles whose random attribute is below the share are transparent.
        w = dr.rcp(1.0 + dr.exp(-(P["transparent_share"] - g["attr"]) / 0.03))
        particle = w * transparent + (1.0 - w) * opaque + P["reflect_strength"] * g["refl"]
        return dr.select(g["hit"], particle, bg)

    def post(self, img, p, seed, noise=True):
        img = gaussian_blur(img, _p(p, "blur", self.POST_PARAMS), max_radius=24)
        # Diffraction ring: a dark ring around a bright core (skipped, with its blur, when off).
        fringe = _p(p, "fringe", self.POST_PARAMS)
        if float(fringe.detach()) != 0.0:
            img = defocus_fringe(img, fringe, _p(p, "fringe_width", self.POST_PARAMS), max_radius=24)
        radius = _p(p, "aperture_radius", self.POST_PARAMS)
        if float(radius.detach()) > 0:
            h, w = img.shape
            yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
            rr = torch.sqrt(xx ** 2 + yy ** 2)
            soft = torch.clamp(_p(p, "aperture_softness", self.POST_PARAMS), min=1e-3)
            inside = torch.sigmoid((radius - rr) / soft)
            img = img * inside + _p(p, "outside_level", self.POST_PARAMS) * (1 - inside)
        if noise:
            img = add_noise(img, p, noise_generator(seed))
        return torch.clamp(tone(img, p), 0.0, 1.0)


def _second(P, g):
    """Signal factor of a particle's population: 1 for the main particles, ``second_contrast``
    for the second population (``g["pop"]`` = 1)."""
    return 1.0 + (P["second_contrast"] - 1.0) * g["pop"]


def _refract(d, n, eta):
    """Refract direction d at a surface with normal n (facing against d), eta = n1/n2.
    Returns a zero vector on total internal reflection."""
    dr, mi = _mi()
    cos_i = -dr.dot(d, n)
    k = 1.0 - eta * eta * (1.0 - cos_i * cos_i)
    out = eta * d + (eta * cos_i - dr.safe_sqrt(k)) * n
    return dr.select(k < 0, mi.Vector3f(0, 0, 0), dr.normalize(out))


IMAGING_MODELS: dict[str, type[ImagingModel]] = {"sem": SEMModel, "tem": TEMModel, "optical": OpticalModel}
