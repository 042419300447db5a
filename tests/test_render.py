"""Render bridge: gradients through Mitsuba agree with finite differences; long loops stay healthy."""
from __future__ import annotations

import gc
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fitting.render.imaging import IMAGING_MODELS
from fitting.render.tracing import SceneRenderer, TEXTURE_CHANNELS, stack_maps


def icosphere(subdivisions: int = 2) -> tuple[np.ndarray, np.ndarray]:
    t = (1 + 5 ** 0.5) / 2
    v = np.array([(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t), (0, -1, -t), (0, 1, -t),
                  (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)], float)
    f = np.array([(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2),
                  (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5),
                  (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1)])
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    for _ in range(subdivisions):
        cache: dict = {}
        verts = list(v)
        faces = []

        def mid(a, b):
            key = (min(a, b), max(a, b))
            if key not in cache:
                m = verts[a] + verts[b]
                cache[key] = len(verts)
                verts.append(m / np.linalg.norm(m))
            return cache[key]
        for a, b, c in f:
            ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
            faces += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        v, f = np.array(verts), np.array(faces)
    return v, f


@dataclass
class TinyLayout:
    vertices: np.ndarray
    normals: np.ndarray
    faces: np.ndarray
    face_particle: np.ndarray
    centers: np.ndarray
    radii: np.ndarray
    attributes: np.ndarray
    size: float

    @property
    def n_triangles(self) -> int:
        return len(self.faces)

    @property
    def z_max(self) -> float:
        return float(self.vertices[:, 2].max())


def sphere_layout(size: int = 64, n: int = 5, seed: int = 0) -> TinyLayout:
    """A handful of spheres resting on the substrate (independent of fitting.geometry)."""
    rng = np.random.default_rng(seed)
    sv, sf = icosphere(3)
    V, Nn, F, FP, C, R = [], [], [], [], [], []
    for i in range(n):
        r = rng.uniform(size * 0.08, size * 0.16)
        c = np.array([rng.uniform(0, size), rng.uniform(0, size), r])
        F.append(sf + sum(len(x) for x in V))
        V.append(sv * r + c)
        Nn.append(sv)
        FP.append(np.full(len(sf), i + 1))
        C.append(c)
        R.append(r)
    return TinyLayout(np.concatenate(V).astype(np.float32), np.concatenate(Nn).astype(np.float32),
                      np.concatenate(F).astype(np.int32), np.concatenate(FP).astype(np.int32),
                      np.array(C, np.float32), np.array(R, np.float32),
                      np.linspace(0.05, 0.95, n).astype(np.float32), float(size))


def textured_maps(size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    maps = stack_maps({"albedo": 0.5 + 0.3 * torch.rand(size, size, generator=g),
                       "substrate": 0.5 + 0.2 * torch.rand(size, size, generator=g),
                       "absorption": 0.5 + 0.2 * torch.rand(size, size, generator=g)}, size)
    return maps


def weighted_loss(img: torch.Tensor) -> torch.Tensor:
    w = torch.linspace(0.5, 1.5, img.numel()).reshape(img.shape)
    return (img * w).sum() / img.numel()


# The light-intensity-like scalar of each imaging model and one texture channel it reads.
LIGHT = {"sem": "particle_brightness", "tem": "film_level", "optical": "background"}
TEXEL_CHANNEL = {"sem": "albedo", "tem": "substrate", "optical": "substrate"}


@pytest.mark.parametrize("kind", ["sem", "tem", "optical"])
def test_gradients_match_finite_differences(kind):
    """AD through Dr.Jit (dr.wrap) vs central differences, same seed (= same samples), 16 spp.

    Tolerance: 3 % relative (float32 renders; the shading is smooth in these inputs)."""
    size = 64
    model = IMAGING_MODELS[kind]()
    r = SceneRenderer(sphere_layout(size), model, resolution=size, spp=16)
    g = r.trace(seed=5, trace_params={})
    maps = textured_maps(size)
    scalars = {k: torch.tensor(float(v)) for k, v in model.SHADE_PARAMS.items()}

    def loss_of(maps_, scalars_):
        return weighted_loss(r.render(maps_, scalars_, seed=5, g=g))

    # light intensity
    light = LIGHT[kind]
    s_ad = {k: v.clone().requires_grad_(k == light) for k, v in scalars.items()}
    loss_of(maps, s_ad).backward()
    ad = float(s_ad[light].grad)
    h = 1e-2 * float(scalars[light])
    plus = {**scalars, light: scalars[light] + h}
    minus = {**scalars, light: scalars[light] - h}
    fd = (float(loss_of(maps, plus)) - float(loss_of(maps, minus))) / (2 * h)
    assert ad != 0.0
    assert abs(ad - fd) <= 0.03 * abs(fd), (light, ad, fd)

    # one texel: a 3x3 patch of texels (sum) so enough samples read it
    ch = TEXTURE_CHANNELS.index(TEXEL_CHANNEL[kind])
    m_ad = maps.clone().requires_grad_(True)
    loss_of(m_ad, scalars).backward()
    mask = r.instance_mask()
    want_particle = TEXEL_CHANNEL[kind] in ("albedo", "absorption")
    inside = (mask > 0) if want_particle else (mask == 0)
    rows, cols = np.nonzero(inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1]
                            & inside[1:-1, :-2] & inside[1:-1, 2:])
    y, x = int(rows[len(rows) // 2]), int(cols[len(cols) // 2])   # centre of a 3x3 block fully inside
    patch = (ch, slice(y, y + 3), slice(x, x + 3))
    ad_t = float(m_ad.grad[patch].sum())
    eps = 0.05
    mp, mm = maps.clone(), maps.clone()
    mp[patch] += eps
    mm[patch] -= eps
    fd_t = (float(loss_of(mp, scalars)) - float(loss_of(mm, scalars))) / (2 * eps)
    assert ad_t != 0.0
    assert abs(ad_t - fd_t) <= 0.03 * abs(fd_t) + 1e-7, (ad_t, fd_t)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.slow
def test_500_render_backward_iterations_no_jit_failure_no_growth():
    """Mitsuba issue #662 reports JIT parse failures after hundreds of texture renders."""
    size = 64
    model = IMAGING_MODELS["sem"]()
    r = SceneRenderer(sphere_layout(size), model, resolution=size, spp=2)
    base_maps = textured_maps(size)
    scalars = {k: torch.tensor(float(v), requires_grad=True) for k, v in model.SHADE_PARAMS.items()}
    rss = []
    for it in range(500):
        maps = base_maps.clone().requires_grad_(True)
        img = model.post(r.render(maps, scalars, seed=it), {}, seed=it)
        loss = weighted_loss(img)
        loss.backward()
        assert torch.isfinite(maps.grad).all()
        for v in scalars.values():
            v.grad = None
        if it == 50:
            gc.collect()
            rss.append(_rss_mb())
    gc.collect()
    rss.append(_rss_mb())
    growth = (rss[1] - rss[0]) / rss[0]
    print(f"RSS after warm-up {rss[0]:.0f} MB, after 500 iterations {rss[1]:.0f} MB ({growth * 100:+.1f} %)")
    assert growth < 0.10


def test_instance_mask_matches_hits_and_substrate():
    size = 64
    r = SceneRenderer(sphere_layout(size), IMAGING_MODELS["sem"](), resolution=size, spp=1)
    mask = r.instance_mask()
    assert mask.shape == (size, size)
    ids = set(np.unique(mask)) - {0}
    assert ids and ids <= set(range(1, 6))
    assert (mask == 0).any()


def test_new_seed_changes_samples_same_seed_repeats():
    size = 48
    model = IMAGING_MODELS["sem"]()
    r = SceneRenderer(sphere_layout(size), model, resolution=size, spp=2)
    maps = textured_maps(size)
    s = {k: torch.tensor(float(v)) for k, v in model.SHADE_PARAMS.items()}
    a = r.render(maps, s, seed=1)
    b = r.render(maps, s, seed=1)
    c = r.render(maps, s, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # same scene, a different Monte-Carlo estimate: close on average
    assert abs(float(a.mean()) - float(c.mean())) < 0.05 * float(a.mean())


# ------------------------------------------------------------------ instanced scenes
def _library_ids() -> list[str]:
    from fitting.materials.library import load_library
    return sorted(load_library())


def default_scene(material_id: str, size: int, spp: int):
    """A library material at its default parameters: (material, MaterialScene, split parts)."""
    from fitting.materials.library import get_material
    from fitting.materials.scene import MaterialScene, RenderSettings
    mat = get_material(material_id)
    scene = MaterialScene(mat, RenderSettings(size=size, spp=spp))
    return mat, scene, scene.split(torch.as_tensor(mat.default_vector()))


@pytest.mark.parametrize("material_id", _library_ids())
def test_instanced_scene_renders_like_the_merged_mesh(material_id):
    """Affine particle copies become Mitsuba instances (fast BVH build); the frame, the hit
    normals and the instance mask must be those of the merged triangle soup."""
    mat, scene, parts = default_scene(material_id, 96, 2)
    layout = scene.layout_for(parts["geometry"], 3)
    assert layout.n_particles > 0
    covered = sum(len(g.pids) for g in layout.instances)
    if mat.geometry_kind != "rods":            # capsules of varying length are not affine copies
        assert covered == layout.n_particles and layout.loose_faces.size == 0
    frames, masks = [], []
    with torch.no_grad():
        maps = scene.maps(parts["graph"], 5)
        for instancing in (False, True):
            r = SceneRenderer(layout, scene.model, 96, 2, instancing=instancing, cull=False)
            assert r.particles.n_instances == (covered if instancing else 0)
            frames.append(r.render(maps, parts["shade"], 9, trace_params=parts["trace"]).numpy())
            masks.append(r.instance_mask())
    assert np.array_equal(masks[0], masks[1])
    diff = np.abs(frames[0] - frames[1])
    # identical up to float round-off; a silhouette sample may flip hit/miss in a rare pixel
    assert float(np.mean(diff)) < 1e-3 * max(1.0, float(np.abs(frames[0]).mean()))
    assert float(np.mean(diff > 1e-2)) < 0.002


@pytest.mark.parametrize("material_id", ["tem_carbon_black", "sem_polystyrene_spheres", "optical_emulsion_droplets",
                                         "sem_nanorods"])
def test_a_new_layout_reuses_the_compiled_kernels(material_id):
    """Every image of a bulk set (and every candidate of a fit) is a new layout: its kernels must
    be the ones already compiled. A per-layout number written into a kernel as a literal (ray
    height, length scale), or a one-element input whose alignment follows the numpy buffer's
    address, changes the kernel's hash: an LLVM compile per image (~45 ms at 512 px), hidden by
    Dr.Jit's on-disk cache whenever the same seeds were rendered before. Still specialised, and
    left so: an array of width one is read with a scalar load, so a layout of ONE particle
    (Mitsuba's shape table) and a TEM crossing step with one ray left compile kernels of their
    own -- once per process, not per image. TEM runs two crossings here to stay clear of that."""
    import drjit as dr
    _, scene, parts = default_scene(material_id, 128, 1)
    trace = {**parts["trace"], "max_crossings": 2} if scene.model.name == "tem" else parts["trace"]
    hashes = []
    flag = dr.flag(dr.JitFlag.KernelHistory)
    dr.set_flag(dr.JitFlag.KernelHistory, True)
    try:
        with torch.no_grad():
            maps = scene.maps(parts["graph"], 5)
            for layout_seed in (11, 12, 13, 14, 15):
                layout = scene.layout_for(parts["geometry"], layout_seed)
                assert layout.n_particles >= 2
                r = SceneRenderer(layout, scene.model, 128, 1)
                dr.kernel_history_clear()
                r.render(maps, parts["shade"], layout_seed, trace_params=trace)
                hashes.append({k["hash"] for k in dr.kernel_history() if k["type"] == dr.KernelType.JIT})
    finally:
        dr.set_flag(dr.JitFlag.KernelHistory, flag)
    assert hashes[0], "the render launched no kernel"
    # after two layouts (a loop may stop early in one), a new layout brings no new kernel
    new = [len(h - set().union(*hashes[:i])) for i, h in enumerate(hashes) if i >= 2]
    assert new == [0] * len(new), new


def test_tem_scene_leaves_out_particles_outside_the_field_and_no_pixel_changes():
    """A parallel beam never crosses a particle outside the field, so the TEM scene does not
    build those (carbon-black aggregates touching the field reach far beyond it); the frame and
    the mask are those of the full scene."""
    _, scene, parts = default_scene("tem_carbon_black", 128, 2)
    layout = scene.layout_for(parts["geometry"], 2)
    c, rad = layout.centers, layout.radii
    outside = np.any((c[:, :2] + rad[:, None] < 0) | (c[:, :2] - rad[:, None] > layout.size), axis=1)
    assert outside.sum() >= 10                     # the case this is about
    frames, masks, built = [], [], []
    with torch.no_grad():
        maps = scene.maps(parts["graph"], 5)
        for cull in (False, True):
            r = SceneRenderer(layout, scene.model, 128, 2, cull=cull)
            built.append(r.particles.n_instances)
            frames.append(r.render(maps, parts["shade"], 9, trace_params=parts["trace"]).numpy())
            masks.append(r.sample_mask())
    assert built[0] == layout.n_particles
    assert built[1] <= layout.n_particles - outside.sum()
    assert np.array_equal(masks[0], masks[1])
    np.testing.assert_allclose(frames[1], frames[0], rtol=0, atol=1e-6)


def test_sample_mask_is_the_majority_vote_of_each_pixels_samples():
    """The vote only runs on pixels whose samples disagree; the result must equal a brute-force
    majority (ties: the earliest sample among the most frequent ids) on every pixel."""
    from types import SimpleNamespace
    from fitting.render.tracing import SceneRenderer
    rng = np.random.default_rng(3)
    res, spp = 24, 5
    ids = rng.integers(0, 4, (res * res, spp)).astype(np.int32)
    ids[: res * res // 2] = ids[: res * res // 2, :1]          # half the pixels agree
    fake = SimpleNamespace(resolution=res, spp=spp, _last_particle=ids.ravel())
    got = SceneRenderer.sample_mask(fake)
    want = np.empty(res * res, np.int32)
    for p, row in enumerate(ids):
        counts = [int((row == v).sum()) for v in row]
        want[p] = row[int(np.argmax(counts))]
    assert np.array_equal(got.ravel(), want)


def test_gaussian_blur_matches_a_reference_convolution_and_its_gradient():
    import torch
    import torch.nn.functional as F
    from fitting.render.imaging import gaussian_blur
    img = torch.rand(37, 41, dtype=torch.float64, requires_grad=True)
    for sigma in (0.4, 1.7, 5.0):
        s = torch.tensor(sigma, dtype=torch.float64, requires_grad=True)
        out = gaussian_blur(img, s)
        r = int(min(12, max(1, np.ceil(3 * sigma))))
        xs = torch.arange(-r, r + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (xs / s) ** 2)
        k = k / k.sum()
        ref = F.pad(img[None, None], (r, r, 0, 0), mode="reflect")
        ref = F.conv2d(ref, k.view(1, 1, 1, -1))
        ref = F.pad(ref, (0, 0, r, r), mode="reflect")
        ref = F.conv2d(ref, k.view(1, 1, -1, 1))[0, 0]
        assert torch.allclose(out, ref, atol=1e-12)
        g_out = torch.autograd.grad((out * out).sum(), (img, s))
        g_ref = torch.autograd.grad((ref * ref).sum(), (img, s))
        for a, b in zip(g_out, g_ref):
            assert torch.allclose(a, b, atol=1e-10)
        with torch.no_grad():                    # bulk's in-place path: same values
            assert torch.allclose(gaussian_blur(img, s), ref, atol=1e-12)
            assert torch.allclose(gaussian_blur(img.float(), s.float()), ref.float(), atol=1e-6)


def test_detector_noise_has_the_shot_plus_readout_variance_and_its_gradient():
    """One Gaussian draw per pixel stands for shot noise (variance level / dose) plus read-out
    noise (sigma^2): the spread of the result and the reparameterised gradient of its energy
    (d/d sigma E[(out - img)^2] = 2 sigma, d/d dose = -level / dose^2) match those laws."""
    from fitting.render.imaging import add_noise, noise_generator
    for level in (0.2, 0.8):
        img = torch.full((512, 512), level)
        sigma = torch.tensor(0.05, requires_grad=True)
        dose = torch.tensor(100.0, requires_grad=True)
        out = add_noise(img, {"noise_gauss": sigma, "noise_dose": dose}, noise_generator(3))
        d = out - img
        expected_var = level / 100.0 + 0.05 ** 2
        assert abs(float(d.detach().mean())) < 4 * (expected_var / img.numel()) ** 0.5
        assert abs(float(d.detach().var()) / expected_var - 1.0) < 0.02
        (d ** 2).mean().backward()
        assert abs(float(sigma.grad) / (2 * 0.05) - 1.0) < 0.03
        assert abs(float(dose.grad) / (-level / 100.0 ** 2) - 1.0) < 0.03


def test_tem_path_length_is_the_union_chord_of_overlapping_spheres():
    """TEM's trace (live rays compacted after every crossing) measures the length of the beam
    inside the union of the particles: compared with the analytic chord through overlapping
    spheres, away from silhouettes where the mesh differs from the sphere."""
    import drjit as dr
    layout = sphere_layout(size=64, n=12, seed=6)                # independent draws: several overlap
    r = SceneRenderer(layout, IMAGING_MODELS["tem"](), resolution=64, spp=2)
    g = r.trace(7, {})
    x, y = np.array(g["x"]), np.array(g["y"])
    length = np.array(g["length"]) * r.length_scale
    d = np.hypot(x[:, None] - layout.centers[None, :, 0], y[:, None] - layout.centers[None, :, 1])
    R = layout.radii[None, :]
    clear = np.all((d < 0.9 * R) | (d > 1.1 * R), axis=1)
    half = np.sqrt(np.clip(R ** 2 - d ** 2, 0, None))
    lo, hi = layout.centers[None, :, 2] - half, layout.centers[None, :, 2] + half
    expected = np.zeros(len(x))
    for k in np.flatnonzero(clear):                              # union of the chords along z
        iv = sorted((a, b) for a, b, inside in zip(lo[k], hi[k], d[k] < R[0]) if inside)
        end = -np.inf
        for a, b in iv:
            expected[k] += max(0.0, b - max(a, end))
            end = max(end, b)
    overlapping = clear & ((d < R).sum(1) >= 2)
    assert overlapping.sum() > 200 and (clear & (d < R).any(1)).sum() > 1000
    err = np.abs(length[clear] - expected[clear]) / float(layout.radii.max())
    # facets sit inside the sphere: ~1 % of R near the rim, more where two spheres' creases meet
    assert np.mean(err > 0.02) < 0.001 and err.max() < 0.06, (np.mean(err > 0.02), err.max())
    assert dr.width(g["length"]) == 64 * 64 * 2
