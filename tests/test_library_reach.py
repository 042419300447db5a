"""The looks added to the library: settled piles, lumpy outlines, a second population, TEM
diffraction and thickness contrast, bright-field lens cores and diffraction rings."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fitting.materials.library import load_library
from fitting.materials.scene import MaterialScene, RenderSettings
from fitting.render.geometry.kinds import generate_layout
from fitting.render.geometry.meshes import _bumpy_sphere_template
from fitting.render.geometry.mixture import free_distance
from fitting.render.geometry.spheres import settled_heights

LIB = load_library()
NEW_MATERIALS = ["optical_brightfield_colloids", "sem_powder_pile",
                 "sem_bumpy_spheres", "tem_large_crystals", "tem_nanoparticle_monolayer", "sem_islands_droplets",
                 "optical_emulsion_polydisperse"]


def _sphere_overlaps(layout, tol=1e-3):
    """Pairs of spheres (centres, volume radii) that interpenetrate by more than ``tol`` px."""
    c, r = layout.centers.astype(np.float64), layout.radii.astype(np.float64)
    d = np.linalg.norm(c[:, None] - c[None], axis=-1)
    gap = d - (r[:, None] + r[None])
    np.fill_diagonal(gap, np.inf)
    return np.argwhere(gap < -tol)


def test_library_holds_the_new_looks():
    assert len(LIB) >= 16      # 10 + 7 (+ one set aside: benchmarks/materials_set_aside/)
    assert set(NEW_MATERIALS) <= set(LIB)


def test_a_bead_dropped_on_another_rests_at_contact():
    below = np.array([[10.0, 10.0, 5.0]])
    z = settled_heights(np.array([[13.0, 10.0], [40.0, 40.0]]), np.array([5.0, 5.0]), below, np.array([5.0]))
    assert z[0] == pytest.approx(5.0 + np.sqrt(10.0 ** 2 - 3.0 ** 2))
    assert z[1] == pytest.approx(5.0)            # nothing below: rests on the substrate


def test_pile_layers_stack_without_interpenetration_and_cover_the_gaps():
    mono = generate_layout("spheres", {"size_mean": 20, "size_gsd": 1.2, "coverage": 0.45}, 192, 3)
    pile = generate_layout("spheres", {"size_mean": 20, "size_gsd": 1.2, "coverage": 0.45, "layers": 3}, 192, 3)
    assert pile.n_particles > 2.5 * mono.n_particles
    assert pile.z_max > 2.0 * mono.z_max
    assert pile.projected_coverage(192) > mono.projected_coverage(192) + 0.2
    assert len(_sphere_overlaps(pile)) == 0
    # every bead rests on the substrate or on a bead below it: none floats
    c, r = pile.centers.astype(np.float64), pile.radii.astype(np.float64)
    gap = np.linalg.norm(c[:, None] - c[None], axis=-1) - (r[:, None] + r[None])
    np.fill_diagonal(gap, np.inf)
    resting = (np.abs(c[:, 2] - r) < 1e-3) | (np.abs(gap).min(1) < 1e-3)
    assert resting.all()


def test_lumpy_spheres_have_lumpy_outlines_and_rest_on_the_substrate():
    p, n, f = _bumpy_sphere_template(3, 0.2, 0)
    radius = np.linalg.norm(p - p.mean(0), axis=1)
    assert radius.std() / radius.mean() > 0.03          # the outline is not a circle
    assert p[:, 2].min() == pytest.approx(-1.0)
    assert np.allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-5)
    smooth = generate_layout("spheres", {"size_mean": 30, "coverage": 0.3}, 256, 2)
    lumpy = generate_layout("spheres", {"size_mean": 30, "coverage": 0.3, "bumps": 0.25}, 256, 2)
    # same centres; the lumpy top view differs from the discs along the outlines only
    assert np.allclose(smooth.centers[:, :2], lumpy.centers[:, :2])
    _, pid_s, _ = smooth.top_view(256)
    _, pid_l, _ = lumpy.top_view(256)
    changed = (pid_s > 0) != (pid_l > 0)
    assert 0.01 < changed.mean() < 0.2


@pytest.mark.parametrize("kind,params", [
    ("spheres", {"size_mean": 24, "coverage": 0.3}),
    ("crystals", {"size_mean": 40, "coverage": 0.3, "hex_fraction": 1.0, "hex_aspect": 0.15}),
])
def test_second_population_fills_free_space_only(kind, params):
    size = 256
    base = generate_layout(kind, params, size, 5)
    mixed = generate_layout(kind, {**params, "second_size": 6, "second_coverage": 0.08}, size, 5)
    n0 = base.n_particles
    # the main particles do not move when a second population is added
    assert np.allclose(mixed.centers[:n0], base.centers)
    pop = mixed.populations
    assert (pop[:n0] == 0).all() and (pop[n0:] == 1).all() and pop.sum() > 50
    info = mixed.info["second_population"]
    assert info["coverage_estimate"] == pytest.approx(0.08, rel=0.15)
    # every second-population sphere sits where the main particles leave room for it
    free, pixel = free_distance(base, size)
    c, r = mixed.centers[n0:], mixed.radii[n0:]
    col = np.clip((c[:, 0] / pixel).astype(int), 0, size - 1)
    row = np.clip(((size - c[:, 1]) / pixel).astype(int), 0, size - 1)
    assert (free[row, col] >= r - 1.5 * pixel).all()
    # the second population's spheres never interpenetrate each other (nor main spheres)
    overlaps = _sphere_overlaps(mixed)
    assert not any(pop[i] == 1 and (pop[j] == 1 or kind == "spheres") for i, j in overlaps)
    # the instance mask labels the second population with its own particle ids
    _, pid, _ = mixed.top_view(size)
    assert (pid > n0).any() and (pid[(pid > 0) & (pid <= n0)] > 0).any()


def _particle_means(scene, x, img):
    mask = scene.instance_mask(x)
    ids = np.unique(mask[mask > 0])
    return np.array([img[mask == i].mean() for i in ids if (mask == i).sum() > 20])


def _two_settings(mid, name, lo, hi, layout_seed):
    """A 192 px scene of a material at defaults, and its vectors with ``name`` at ``lo`` and ``hi``."""
    mat = LIB[mid]
    scene = MaterialScene(mat, RenderSettings(size=192, spp=2, layout_seed=layout_seed))
    x = torch.as_tensor(mat.default_vector())
    i = mat.names.index(name)
    x_lo, x_hi = x.clone(), x.clone()
    x_lo[i], x_hi[i] = lo, hi
    return scene, x, x_lo, x_hi


def test_tem_diffraction_contrast_varies_darkness_between_particles():
    scene, _, flat, strong = _two_settings("tem_nanoparticle_monolayer", "diffraction", 0.0, 1.0, 1)
    spread = [np.std(_particle_means(scene, v, scene.render_numpy(v, seed=0, noise=False))) for v in (flat, strong)]
    assert spread[1] > 2.0 * spread[0] + 0.01


def test_brightfield_colloids_have_bright_cores_inside_dark_rims():
    mat = LIB["optical_brightfield_colloids"]
    scene = MaterialScene(mat, RenderSettings(size=192, spp=4, layout_seed=2))
    x = torch.as_tensor(mat.default_vector())
    i = mat.names.index("coverage")
    x[i] = 0.6                                   # a few more beads in a small test field
    img = scene.render_numpy(x, seed=0, noise=False)
    layout = scene.layout_for(scene.split(x)["geometry"])
    bg = np.median(img)
    cores, rims = [], []
    yy, xx = np.mgrid[0:192, 0:192] + 0.5
    for (cx, cy, _), r in zip(layout.centers, layout.radii):
        d = np.hypot(xx - cx, yy - (192 - cy))
        if r < 4 or d.min() > 1:
            continue
        cores.append(img[d < 0.3 * r].mean())
        rims.append(img[(d > 0.8 * r) & (d < 1.05 * r)].mean())
    assert len(cores) >= 3
    assert np.median(cores) > bg + 0.05
    assert np.median(rims) < bg - 0.05


def test_second_contrast_changes_only_the_second_population():
    scene, x, lo, hi = _two_settings("sem_islands_droplets", "second_contrast", 0.1, 0.9, 3)
    a, b = scene.render_numpy(lo, seed=0, noise=False), scene.render_numpy(hi, seed=0, noise=False)
    layout = scene.layout_for(scene.split(x)["geometry"])
    mask = scene.instance_mask(x)
    pop = np.concatenate([[0], layout.populations + 1])[mask]       # 0 field, 1 main, 2 second
    assert (pop == 2).sum() > 100
    assert b[pop == 2].mean() > a[pop == 2].mean() + 0.05
    # the main particles change only where blur mixes in their neighbours' light
    assert np.abs(b - a)[pop == 1].mean() < 0.25 * np.abs(b - a)[pop == 2].mean()


@pytest.mark.parametrize("mid,name", [("tem_large_crystals", "diffraction"), ("tem_large_crystals", "thickness_fringes"),
                                      ("optical_brightfield_colloids", "focus_gain"),
                                      ("optical_brightfield_colloids", "fringe"),
                                      ("sem_islands_droplets", "second_contrast")])
def test_new_shading_gradients_match_finite_differences(mid, name):
    """AD vs central differences (same seed) for the new shading parameters, within 5 %."""
    mat = LIB[mid]
    scene = MaterialScene(mat, RenderSettings(size=128, spp=4, layout_seed=1))
    x0 = torch.as_tensor(mat.default_vector())
    w = torch.linspace(0.5, 1.5, 128 * 128, dtype=torch.float64).reshape(128, 128)

    def loss(x):
        return (scene.render(x, seed=3, noise=False).double() * w).mean()

    x = x0.clone().requires_grad_(True)
    loss(x).backward()
    i = mat.names.index(name)
    h = 2e-3
    xp, xm = x0.clone(), x0.clone()
    xp[i] += h
    xm[i] -= h
    with torch.no_grad():
        fd = (float(loss(xp)) - float(loss(xm))) / (2 * h)
    ad = float(x.grad[i])
    assert fd != 0.0
    assert abs(ad - fd) <= 0.05 * abs(fd) + 1e-7, (ad, fd)


def test_bulk_labels_give_the_second_population_its_own_category(tmp_path):
    from fitting.materials.recipe import Recipe
    from fitting.output.bulk.run import render_dataset
    mat = LIB["sem_islands_droplets"]
    Recipe.from_vector(mat, mat.default_vector()).save(tmp_path / "islands.json", mat)
    out = tmp_path / "set"
    render_dataset(tmp_path / "islands.json", out, 2, size=192, workers=1)
    coco = json.loads((out / "annotations.json").read_text())
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    assert cats == {1: "particle", 2: "second population"}
    used = {a["category_id"] for a in coco["annotations"]}
    assert used == {1, 2}
    csv_lines = (out / "particles.csv").read_text().splitlines()
    assert csv_lines[0].endswith("category_id")
    assert {line.rsplit(",", 1)[1] for line in csv_lines[1:]} == {"1", "2"}


@pytest.mark.parametrize("mid", NEW_MATERIALS)
def test_new_materials_ship_a_current_predictor_trained_on_2000_samples(mid):
    from fitting.fit.predictor import predictor_status
    mat = LIB[mid]
    assert predictor_status(mat) == "current", mid
    meta = json.loads((mat.folder / "predictor.json").read_text())
    assert meta["samples"] == 2000
    assert meta["heldout_mae"] < 0.95 * meta["heldout_mean_baseline"]     # it learned from the descriptor


def test_a_branched_reference_keeps_an_aggregate_material_among_the_refined():
    from fitting.fit.candidates import keep_branched_candidate
    ranking = [{"material": m} for m in ("tem_metal_nanoparticles", "optical_emulsion_droplets",
                                          "tem_nanoparticle_monolayer", "tem_carbon_black", "sem_nanorods")]
    moved = [r["material"] for r in keep_branched_candidate(ranking, LIB, "branched", 3)]
    assert moved == ["tem_metal_nanoparticles", "optical_emulsion_droplets", "tem_carbon_black",
                     "tem_nanoparticle_monolayer", "sem_nanorods"]
    # compact particles, or an aggregate material already among the three: the ranking stands
    assert keep_branched_candidate(ranking, LIB, "round", 3) == ranking
    assert keep_branched_candidate(ranking[2:] + ranking[:2], LIB, "branched", 3) == ranking[2:] + ranking[:2]


def test_imposed_coverage_is_shared_between_the_two_populations():
    from fitting.fit.structure import impose_geometry
    mat = LIB["sem_islands_droplets"]
    x = impose_geometry(mat, mat.default_vector(), 20.0, 0.3)
    phys = mat.physical(x)
    default = mat.physical(mat.default_vector())
    assert phys["coverage"] + phys["second_coverage"] == pytest.approx(0.3, rel=1e-3)
    assert phys["second_coverage"] / phys["coverage"] == pytest.approx(
        default["second_coverage"] / default["coverage"], rel=1e-3)
