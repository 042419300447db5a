"""The particles' ring profile: measured on images with known rings, differentiable through a
real render (checked against finite differences), and steering refinement of a sparse field."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fitting.fit.appearance import AppearanceTerm, reference_profile
from fitting.materials.library import get_material
from fitting.materials.scene import MaterialScene, RenderSettings
from fitting.measure.appearance import BACKGROUND_FROM, PROFILE_EDGES, particle_profile, profile_zones
from fitting.measure.particles import measure_particles


def _cored_discs(size=192, radius=10.0, centres=((48, 48), (48, 144), (144, 96)), core=0.95, body=0.8,
                 ring=0.2, background=0.5):
    """Bright discs (a brighter core inside half the radius) in a dark ring 0.3 radii wide."""
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size), background)
    labels = np.zeros((size, size), int)
    for i, (cy, cx) in enumerate(centres, 1):
        r = np.hypot(yy - cy, xx - cx)
        img[(r >= radius) & (r < 1.3 * radius)] = ring
        img[r < radius] = body
        img[r < radius / 2] = core
        labels[r < radius] = i
    return img, labels


def test_the_profile_reads_a_bright_core_a_body_and_a_dark_ring_around_it():
    img, labels = _cored_discs()
    zones = profile_zones(labels)
    assert zones.shape == (len(PROFILE_EDGES), *img.shape)
    p = particle_profile(img, zones)
    core, inner, rim_in, rim_out, halo, near, background = p
    assert core == pytest.approx(0.95, abs=0.01)          # inside 0.6 radii of the outline: the core
    assert rim_in == pytest.approx(0.8, abs=0.01)         # just inside the outline: the body
    assert rim_out == pytest.approx(0.2, abs=0.03)        # just outside: the dark ring
    assert background == pytest.approx(0.5, abs=1e-6)
    assert near == pytest.approx(0.5, abs=0.01)           # past the ring, background again
    # distance in radii: the same particles twice as large give the same profile
    img2, labels2 = _cored_discs(size=384, radius=20.0, centres=((96, 96), (96, 288), (288, 192)))
    np.testing.assert_allclose(particle_profile(img2, profile_zones(labels2)), p, atol=0.02)


def test_zones_are_disjoint_leave_out_invalid_pixels_and_skip_empty_rings():
    img, labels = _cored_discs()
    valid = np.ones(img.shape, bool)
    valid[:, :20] = False
    zones = profile_zones(labels, valid)
    assert zones.sum(axis=0).max() == 1                      # no pixel in two zones
    assert not zones[:, ~valid].any()
    # between 1.0 and BACKGROUND_FROM radii outside: in no zone (neither near nor background)
    assert BACKGROUND_FROM > PROFILE_EDGES[-1]
    assert zones[:, 48, 66].sum() == 1 and not zones[:, 48, 70].any()   # ~0.85 and ~1.25 radii out
    assert profile_zones(np.zeros((32, 32), int)) is None
    tiny = np.zeros((64, 64), int)
    tiny[30:32, 30:32] = 1                                   # a 2x2 particle: no core pixels
    p = particle_profile(np.full((64, 64), 0.5), profile_zones(tiny))
    assert np.isnan(p[0]) and np.isfinite(p[-1])


def test_no_reference_profile_for_dense_or_nearly_empty_fields():
    img, labels = _cored_discs()
    m = measure_particles(img.astype(np.float32))
    assert m.count == 3
    assert reference_profile(m, img) is not None
    # particles covering most of the field: which phase is particle is the doubtful call there
    assert reference_profile(dataclasses.replace(m, coverage=0.6), img) is None
    one, _ = _cored_discs(centres=((96, 96),))
    assert reference_profile(measure_particles(one.astype(np.float32)), one) is None


def _colloid_scene(size=96):
    mat = get_material("optical_brightfield_colloids")
    return mat, MaterialScene(mat, RenderSettings(size=size, spp=4, layout_seed=3))


def _with(mat, x, **values):
    x = x.copy()
    for k, v in values.items():
        x[mat.names.index(k)] = mat.spec(k).to_normalized(v)
    return x


def test_appearance_gradient_through_a_render_matches_finite_differences():
    """d(term)/d(parameter) by AD through Mitsuba and the imaging model vs central differences,
    same seeds: the lens focusing of the beads (traced) and the tone contrast (post)."""
    mat, scene = _colloid_scene()
    # no pixel clipped at 0 or 1, where the gradient has a kink
    x = _with(mat, mat.default_vector(), coverage=0.08, noise_gauss=0.0, noise_dose=30000.0, contrast=0.6,
              focus_gain=0.8)
    target = np.array([0.95, 0.85, 0.6, 0.35, 0.45, 0.55, 0.55])
    term = AppearanceTerm.for_candidate(scene, x, target, weight=1.0, seed=7)
    assert term is not None and term.target.numel() >= 5
    img = scene.render_numpy(x, seed=7, noise=False)
    assert 0.0 < img.min() and img.max() < 1.0

    def loss(xv):
        return term.distance(scene.render(xv, seed=7, noise=False))

    for name, h in (("focus_gain", 0.02), ("contrast", 0.02)):
        i = mat.names.index(name)
        xt = torch.as_tensor(x, dtype=torch.float32).clone().requires_grad_(True)
        loss(xt).backward()
        ad = float(xt.grad[i])
        plus, minus = x.copy(), x.copy()
        plus[i] += h
        minus[i] -= h
        with torch.no_grad():
            fd = (float(loss(torch.as_tensor(plus))) - float(loss(torch.as_tensor(minus)))) / (2 * h)
        assert ad != 0.0, name
        assert abs(ad - fd) <= 0.05 * abs(fd) + 1e-4, (name, ad, fd)


def test_optical_materials_can_render_a_clean_background():
    """Every optical material has a shot-noise dose: a camera at high exposure gives a smooth
    field that low contrast alone could only fake by flattening the particles too."""
    for mid in ("optical_brightfield_colloids", "optical_emulsion_droplets", "optical_emulsion_polydisperse",
                "optical_insitu_probe"):
        mat = get_material(mid)
        assert "noise_dose" in mat.names, mid
    mat, scene = _colloid_scene(size=64)
    x = _with(mat, mat.default_vector(), coverage=0.002, noise_gauss=0.0, background_texture=0.0)
    plain = scene.render_numpy(x, seed=1, noise=False)
    noisy = scene.render_numpy(_with(mat, x, noise_dose=100.0), seed=1) - plain
    clean = scene.render_numpy(_with(mat, x, noise_dose=30000.0), seed=1) - plain
    assert clean.std() < 0.25 * noisy.std()


def test_refinement_brings_a_sparse_field_s_particles_to_the_reference_look():
    """Colloids covering 3 % of the field: from dull cores (focus 0.3) the refinement with the
    ring-profile term ends closer to the reference's bright cores than without it."""
    from fitting.core.events import CancelToken, null_sink
    from fitting.describe.descriptor import TextureDescriptor
    from fitting.fit.candidates import measure_render
    from fitting.fit.options import FitOptions
    from fitting.fit.refine import refine
    from fitting.fit.results import Candidate
    from fitting.fit.target import sorted_pixels

    mat, scene = _colloid_scene(size=128)
    x_true = _with(mat, mat.default_vector(), coverage=0.03, focus_gain=2.5, contrast=0.8, noise_dose=30000.0,
                   noise_gauss=0.005)
    reference = MaterialScene(mat, RenderSettings(size=128, spp=4, layout_seed=5)).render_numpy(x_true, seed=11)
    desc = TextureDescriptor(work_size=128)
    tgt = {"descriptor": desc.describe_reference(reference).detach(),
           "quantiles": sorted_pixels(torch.as_tensor(reference)),
           "profile": reference_profile(measure_render(reference), reference)}
    assert tgt["profile"] is not None
    x_start = _with(mat, x_true, focus_gain=0.3)
    judge = AppearanceTerm.for_candidate(scene, x_start, tgt["profile"], 1.0, seed=7)

    def look_distance(x):
        return float(judge.distance(scene.render(x, seed=7)))

    ends = {}
    for weight in (0.0, 1.0):
        cand = Candidate(mat.id, 128, x_start.copy(), float("nan"))
        opts = FitOptions(appearance_weight=weight, iterations=30, patience=100, size=128)
        refine(scene, tgt, desc, cand, opts, 120.0, null_sink, CancelToken(), 0, 1)
        assert (cand.appearance is None) == (weight == 0.0)
        ends[weight] = look_distance(cand.x_final)
    start = look_distance(x_start)
    assert ends[1.0] < 0.6 * start, (start, ends)
    assert ends[1.0] < ends[0.0], (start, ends)
