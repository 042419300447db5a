"""The particle measurement on real renders, against the truth of their instance masks.

The issue's target is +-15 % in geometric mean diameter and +-0.05 in coverage for every
material; benchmarks/results/measure_renders.json has the full picture (34 of 51 renders of
the 17 materials within 15 %, 42 of 51 within 0.05 coverage). This test holds the measurement to
the issue's targets on the materials of separate particles, so a regression shows. Compact
sintered agglomerates are measured as whole clusters (3x the primaries).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import measure

from fitting.core.runtime import init_mitsuba
from fitting.materials.library import get_material
from fitting.materials.scene import MaterialScene, RenderSettings
from fitting.measure.particles import measure_particles

# At the optical materials' default shot-noise dose (a clean camera field, since run 17) the
# measurement misses on these two: the colloids' outline takes in the dark rim (1.16x), the
# droplets' coverage is 0.0501 off. Known failures, held strict so a fix shows.
CLEAN_FIELD_MISS = pytest.mark.xfail(strict=True, reason="clean optical field: colloids 1.16x, droplets' coverage "
                                     "0.0501 off (measure_renders.json, open in #16)")
SEPARATE = [pytest.param("optical_brightfield_colloids", marks=CLEAN_FIELD_MISS),
            pytest.param("optical_emulsion_droplets", marks=CLEAN_FIELD_MISS), "sem_bumpy_spheres",
            "sem_carbonyl_iron", "sem_faceted_crystals", "sem_nanorods", "sem_polystyrene_spheres",
            "sem_raspberry_spheres", "tem_metal_nanoparticles"]


def _truth(scene, x, seed):
    parts = scene.split(torch.as_tensor(np.asarray(x, np.float32)))
    ids = scene.renderer(parts["geometry"], seed).instance_mask().astype(np.int32)
    border = set(np.unique(np.concatenate([ids[0], ids[-1], ids[:, 0], ids[:, -1]])).tolist())
    d = np.array([p.equivalent_diameter_area for p in measure.regionprops(ids) if p.label not in border])
    return float(np.exp(np.log(d).mean())), float((ids > 0).mean())


@pytest.mark.parametrize("material_id", SEPARATE)
def test_measured_size_and_coverage_of_a_render_match_its_instance_mask(material_id):
    init_mitsuba("cpu")
    mat = get_material(material_id)
    x = mat.default_vector()
    seed = 1000
    scene = MaterialScene(mat, RenderSettings(size=256, spp=4, layout_seed=seed))
    img = scene.render_numpy(x, seed=seed)
    gmean, coverage = _truth(scene, x, seed)
    m = measure_particles(np.clip(img, 0, 1))
    assert m.gmean_px == pytest.approx(gmean, rel=0.15), (m.gmean_px, gmean)
    assert abs(m.coverage - coverage) <= 0.05, (m.coverage, coverage)
    # bright-field colloids: a dark disc around a bright core, the look of a ring-shaped particle
    expected = {"sem": "bright", "tem": "dark"}.get(mat.imaging, "dark")
    assert m.polarity == ("outline" if material_id == "optical_brightfield_colloids" else expected)


def test_crossed_rods_are_measured_as_rods_not_as_branched_chains(monkeypatch):
    """Rods crossing each other make low-solidity components with several instances, like
    chains; their instances are elongated, so they keep the per-instance sizes (this layout
    measures 0.4x as branched chains without the rule)."""
    seed = 1001
    import fitting.measure.particles as particles
    init_mitsuba("cpu")
    mat = get_material("sem_nanorods")
    x = mat.default_vector()
    scene = MaterialScene(mat, RenderSettings(size=256, spp=4, layout_seed=seed))
    img = np.clip(scene.render_numpy(x, seed=seed), 0, 1)
    gmean, _ = _truth(scene, x, seed)
    m = measure_particles(img)
    assert m.method == "watershed" and m.shape["class"] == "elongated"
    assert m.gmean_px == pytest.approx(gmean, rel=0.15)
    monkeypatch.setattr(particles, "ELONGATED", float("inf"))
    assert measure_particles(img).method == "granulometry"
