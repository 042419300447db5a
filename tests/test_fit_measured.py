"""The fit steered by the measured particles: instrument choice, working scale, measured and
fitted size distributions in the recipe and the JSON summary, side-by-sides."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fitting.fit.options import FitOptions
from fitting.fit.pipeline import fit_reference
from fitting.fit.structure import (StructureTarget, impose_geometry, rendered_size_param, structure_distance,
                                   structure_terms, working_scale)
from fitting.fit.results import Candidate
from fitting.materials.library import get_material
from fitting.materials.scene import MaterialScene, RenderSettings
from fitting.materials.recipe import Recipe
from fitting.measure.instrument import guess_imaging

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "resources" / "examples" / "example_sem.png"
QUICK = dict(size=128, spp=2, iterations=2, budget_s=30)


def test_working_scale_puts_measured_particles_at_the_target_size():
    assert working_scale(2000, 100.0, 256, target_diameter=25.0) == 500          # 100 px -> 25 px
    assert working_scale(2000, 5.0, 256) == 2000                                 # never upsamples
    assert working_scale(2000, 900.0, 256) == 192                                # at least 3/4 of a render
    assert working_scale(2000, 100.0, 128) == 480                                # render size does not matter
    assert working_scale(800, None, 256) == 800


def test_impose_geometry_sets_size_and_coverage_within_the_specs():
    mat = get_material("sem_polystyrene_spheres")
    x = impose_geometry(mat, mat.default_vector(), 37.0, 0.42, gsd=1.1)
    phys = mat.physical(x)
    assert phys["size_mean"] == pytest.approx(37.0, rel=1e-4) and phys["coverage"] == pytest.approx(0.42, rel=1e-4)
    assert rendered_size_param(mat, x) == pytest.approx(37.0, rel=1e-4)
    x = impose_geometry(mat, mat.default_vector(), 1e4, 5.0)                      # clipped to the ranges
    assert mat.physical(x)["size_mean"] == pytest.approx(mat.spec("size_mean").max)
    agg = get_material("tem_carbon_black")
    x = impose_geometry(agg, agg.default_vector(), 20.0, 0.2, primary_count=60.0)
    assert agg.physical(x)["primary_size"] == pytest.approx(20.0, rel=1e-4)
    assert agg.physical(x)["primary_count"] == pytest.approx(60.0, rel=1e-4)


def _discs(size=256, d=20.0, n=30, seed=0, bright=True, halo=False):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size), 0.4 if bright else 0.8, np.float32)
    centres = rng.uniform(d, size - d, (n, 2))
    if halo:      # dark refraction rings around each particle (optical bright field)
        for cy, cx in centres:
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= (0.7 * d) ** 2] = 0.25
    for cy, cx in centres:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= (d / 2) ** 2] = 0.9 if bright else 0.25
    return img + rng.normal(0, 0.02, img.shape).astype(np.float32)


def _measured(img):
    from fitting.fit.candidates import measure_render
    return measure_render(img)


def test_structure_terms_are_zero_for_the_same_image_and_grow_with_size_error():
    target = StructureTarget(_measured(_discs()), 1.0)
    same = structure_terms(target, _measured(_discs(seed=1)))
    assert structure_distance(same) < 0.5
    bigger = structure_terms(target, _measured(_discs(d=40.0, n=8, seed=2)))
    assert bigger["size"] > 1.0                         # twice the diameter: well beyond a factor 1.5
    other = structure_terms(target, _measured(_discs(bright=False, seed=3)))
    assert other["polarity"] == 1.0


def test_dark_halos_are_found_on_the_reference_and_reported_not_imposed():
    """Ringed bright particles (optical bright field) are the "rings" cue: reported, never
    taking the other instruments' materials out of the fit."""
    from fitting.measure.instrument import ring_status
    ringed = _measured(_discs(halo=True))
    assert ring_status(_discs(halo=True), ringed) is True
    assert ring_status(_discs(seed=5), _measured(_discs(seed=5))) is False
    assert ring_status(_discs(bright=False), _measured(_discs(bright=False))) is None


def test_terms_the_measurement_doubts_weigh_less():
    from fitting.fit.structure import CONFIDENCE_FLOOR, STRUCTURE_TERMS, confidence_weights
    w = confidence_weights({"diameter": 0.0, "coverage": 1.0, "polarity": 1.0, "shape": 0.5})
    assert w["size"] == pytest.approx(CONFIDENCE_FLOOR * STRUCTURE_TERMS["size"])
    assert w["coverage"] == pytest.approx(STRUCTURE_TERMS["coverage"])
    assert CONFIDENCE_FLOOR * STRUCTURE_TERMS["shape"] < w["shape"] < STRUCTURE_TERMS["shape"]


def test_finish_geometry_brings_a_refined_candidate_to_the_measured_size():
    """A candidate whose particles render 1.7x too large is corrected after refinement, and
    the correction is kept only because it scores better."""
    from fitting.describe.descriptor import TextureDescriptor
    from fitting.fit.candidates import measure_render
    from fitting.fit.pipeline import finish_geometry, judge_structure
    from fitting.fit.refine import evaluate_distance
    from fitting.fit.results import Candidate
    from fitting.materials.scene import MaterialScene, RenderSettings
    mat = get_material("sem_polystyrene_spheres")
    scene = MaterialScene(mat, RenderSettings(size=128, spp=2, layout_seed=3))
    x_true = impose_geometry(mat, mat.default_vector(), 14.0, 0.3)
    reference = scene.render_numpy(x_true, seed=11)
    target = StructureTarget(measure_render(reference), 1.0)
    desc = TextureDescriptor(work_size=128)
    tgt_desc = desc.describe_reference(reference)
    x_big = impose_geometry(mat, x_true, 24.0, 0.3)
    d_big = evaluate_distance(scene, x_big, desc, tgt_desc)
    cand = Candidate(mat.id, 128, x_big, d_big, x_final=x_big.copy(), distance_final=d_big)
    judge_structure(cand, scene, target, FitOptions())
    before = dict(cand.structure_terms)
    score_before = cand.score
    finish_geometry(cand, scene, target, FitOptions(), 1.0, desc, tgt_desc)
    assert before["size"] > 0.5
    assert cand.structure_terms["size"] < 0.5 * before["size"]
    assert cand.score < score_before and "geometry corrected" in cand.stopped
    assert rendered_size_param(mat, cand.x_final) < 20.0


def test_finish_geometry_grows_aggregates_to_the_reference_s_aggregate_size():
    """Aggregates of a quarter of the reference's primaries are corrected after refinement on
    the judged field (larger than the ranking render): more primaries per aggregate, a smaller
    cluster term, kept only because it scores better. On the ranking render itself the
    primaries per aggregate are left alone."""
    from fitting.describe.descriptor import TextureDescriptor
    from fitting.fit.candidates import measure_render
    from fitting.fit.pipeline import finish_geometry, judge_field_scene, judge_structure
    from fitting.fit.refine import evaluate_distance
    from fitting.fit.structure import correct_geometry, physical_value
    mat = get_material("tem_carbon_black")
    scene = MaterialScene(mat, RenderSettings(size=128, spp=2, layout_seed=3))
    x_true = impose_geometry(mat, mat.default_vector(), 9.0, 0.12, primary_count=80.0)
    reference = MaterialScene(mat, RenderSettings(size=256, spp=2, layout_seed=5)).render_numpy(x_true, seed=11)
    target = StructureTarget(measure_render(reference), 1.0)
    assert target.shape_class == "branched"
    field = judge_field_scene(scene, target)
    assert field is not scene
    desc = TextureDescriptor(work_size=128)
    tgt_desc = desc.describe_reference(reference)
    x_small = impose_geometry(mat, x_true, None, None, primary_count=20.0)
    m_small = measure_render(field.render_numpy(x_small, seed=1001))
    # the step alone: more primaries where the render's aggregates measure smaller
    stepped = correct_geometry(mat, x_small, target, m_small, clusters=True)
    assert physical_value(mat, stepped, "primary_count") > 30.0
    assert physical_value(mat, correct_geometry(mat, x_small, target, m_small), "primary_count") == \
        pytest.approx(20.0, rel=1e-3)
    d_small = evaluate_distance(scene, x_small, desc, tgt_desc)
    cand = Candidate(mat.id, 128, x_small, d_small, x_final=x_small.copy(), distance_final=d_small)
    judge_structure(cand, scene, target, FitOptions())
    before, score_before = dict(cand.structure_terms), cand.score
    finish_geometry(cand, scene, target, FitOptions(), 1.0, desc, tgt_desc)
    assert before["cluster"] > 0.3
    assert physical_value(mat, cand.x_final, "primary_count") > 30.0
    assert cand.structure_terms["cluster"] < before["cluster"] and cand.score < score_before


def test_settle_geometry_corrects_a_ranked_candidate_on_the_judged_field():
    """Before refinement, a candidate whose particles render 1.7x too large on the judged field
    is brought to the measured size; the returned measurement is of the settled render."""
    from fitting.fit.candidates import measure_render
    from fitting.fit.pipeline import settle_geometry
    from fitting.materials.scene import MaterialScene, RenderSettings
    mat = get_material("sem_polystyrene_spheres")
    scene = MaterialScene(mat, RenderSettings(size=128, spp=2, layout_seed=3))
    x_true = impose_geometry(mat, mat.default_vector(), 14.0, 0.3)
    target = StructureTarget(measure_render(scene.render_numpy(x_true, seed=11)), 1.0)
    x_big = impose_geometry(mat, x_true, 24.0, 0.3)
    before = structure_terms(target, measure_render(scene.render_numpy(x_big, seed=1001)))
    x, m = settle_geometry(scene, target, x_big, field=scene)
    after = structure_terms(target, m)
    assert before["size"] > 0.5 and after["size"] < 0.5 * before["size"]
    assert rendered_size_param(mat, x) < 20.0
    # past its deadline it measures and changes nothing
    x_same, _ = settle_geometry(scene, target, x_big, field=scene, deadline=0.0)
    assert np.allclose(x_same, x_big)


def test_branched_references_are_judged_on_a_larger_field():
    """Aggregates larger than a ranking render are judged on a render of at least twice the
    side at the same pixel scale, large enough to hold several aggregates; separate particles
    on the ranking render itself."""
    from types import SimpleNamespace
    from fitting.fit.pipeline import (JUDGE_FIELD, JUDGE_FIELD_MAX, JUDGE_MIN_CLUSTERS, expected_clusters,
                                      judge_field_scene, judge_field_size)
    from fitting.materials.scene import MaterialScene, RenderSettings
    scene = MaterialScene(get_material("tem_carbon_black"), RenderSettings(size=128, spp=2, layout_seed=4))

    def measured(shape, d=10.0, coverage=0.3, cluster=None):
        m = SimpleNamespace(shape={"class": shape}, median_px=d, coverage=coverage, _cluster_area=cluster)
        return StructureTarget(m, 1.0)
    field = judge_field_scene(scene, measured("branched"))
    assert field.settings.size == JUDGE_FIELD * 128 and field.settings.layout_seed == 4
    assert judge_field_scene(scene, measured("round")) is scene
    assert judge_field_scene(scene, None) is scene
    # a TEM field of large aggregates: a 256 px render would hold about one of them
    sparse_chains = measured("branched", d=24.0, coverage=0.07, cluster=16000.0)
    assert expected_clusters(sparse_chains, 256) < 1.0
    side = judge_field_size(sparse_chains, 256)
    assert JUDGE_FIELD * 256 < side <= JUDGE_FIELD_MAX * 256 and side % 32 == 0
    assert expected_clusters(sparse_chains, side) >= JUDGE_MIN_CLUSTERS


def test_sparse_references_are_judged_on_a_field_that_holds_their_particles():
    """A field so sparse that a ranking render holds about one particle is judged on a larger
    render (same pixel scale) that holds several at the measured coverage, up to a limit."""
    from types import SimpleNamespace
    from fitting.fit.pipeline import (JUDGE_FIELD_MAX, JUDGE_MIN_COUNT, expected_count, judge_field_factor,
                                      judge_field_size)
    sparse = StructureTarget(SimpleNamespace(shape={"class": "round"}, median_px=14.6, coverage=0.0033), 1.0)
    assert expected_count(sparse, 256) == pytest.approx(0.0033 * 256 ** 2 / (np.pi / 4 * 14.6 ** 2))
    k = judge_field_factor(sparse, 256)
    assert 1 < k <= JUDGE_FIELD_MAX
    assert expected_count(sparse, judge_field_size(sparse, 256)) >= JUDGE_MIN_COUNT
    empty_ish = StructureTarget(SimpleNamespace(shape={"class": "round"}, median_px=20.0, coverage=1e-5), 1.0)
    assert judge_field_factor(empty_ish, 256) == JUDGE_FIELD_MAX
    unknown = StructureTarget(SimpleNamespace(shape={"class": None}, median_px=None, coverage=0.2), 1.0)
    assert judge_field_factor(unknown, 256) == 1


def test_refinement_that_empties_the_render_is_undone(monkeypatch):
    """A refined render with no measurable particle, where the initial render had some, is
    never the result, however much closer its texture distance came."""
    from types import SimpleNamespace
    import fitting.fit.candidates as candidates_module
    from fitting.fit.pipeline import judge_structure
    mat = get_material("optical_brightfield_colloids")
    scene = MaterialScene(mat, RenderSettings(size=64, spp=1, layout_seed=0))
    ref = SimpleNamespace(shape={"class": "round"}, median_px=14.0, coverage=0.05, polarity="dark",
                          count=20, confidence={})
    structure = StructureTarget(ref, 1.0)
    x0, x1 = mat.default_vector(), mat.default_vector()
    x1[0] = min(1.0, x1[0] + 0.1)
    particles = SimpleNamespace(count=20, median_px=14.0, coverage=0.05, polarity="dark", shape={"class": "round"})
    empty = SimpleNamespace(count=0, median_px=None, coverage=0.0, polarity="dark", shape={"class": None})
    seen = iter([empty, particles])                 # the final render first, then the initial one
    monkeypatch.setattr(candidates_module, "measure_render", lambda img, method="auto": next(seen))
    cand = Candidate(material_id=mat.id, scale=256, x_initial=x0, distance_initial=1.0, predictor="default")
    cand.x_final, cand.distance_final = x1, 0.01   # a hundred times closer in texture, and empty
    judge_structure(cand, scene, structure, FitOptions(final_structure_weight=0.0))
    assert np.allclose(cand.x_final, x0) and cand.distance_final == 1.0
    assert "no measurable particles" in cand.stopped


def test_judging_reuses_the_settled_measurement_when_refinement_kept_the_start(monkeypatch):
    """A candidate whose refinement kept its settled start is judged on the measurement
    settle_geometry made of that very render, not on a second render of it."""
    from types import SimpleNamespace
    import fitting.fit.candidates as candidates_module
    from fitting.fit.pipeline import judge_structure

    def no_render(*args, **kwargs):
        raise AssertionError("the settled render was measured again")
    monkeypatch.setattr(candidates_module, "measure_render", no_render)
    mat = get_material("optical_brightfield_colloids")
    scene = MaterialScene(mat, RenderSettings(size=64, spp=1, layout_seed=0))
    ref = SimpleNamespace(shape={"class": "round"}, median_px=14.0, coverage=0.05, polarity="dark",
                          count=20, confidence={})
    settled = SimpleNamespace(count=20, median_px=21.0, coverage=0.05, polarity="dark", shape={"class": "round"})
    x0 = mat.default_vector()
    cand = Candidate(material_id=mat.id, scale=64, x_initial=x0, distance_initial=0.5, predictor="default",
                     x_final=x0.copy(), distance_final=0.5)
    cand.initial_measurement = settled
    judge_structure(cand, scene, StructureTarget(ref, 1.0), FitOptions())
    assert cand.structure_terms["size"] == pytest.approx(math.log(21.0 / 14.0) / math.log(1.5))


def test_imaging_guess_says_which_cue_decided():
    assert guess_imaging("tem").cue == "user" and guess_imaging("tem").kinds == ("tem",)
    assert guess_imaging("auto", tag_kind="sem", tag_cue="Zeiss").cue == "tags"
    g = guess_imaging("auto", aperture=True, polarity="bright", polarity_confidence=1.0)
    assert g.kinds == ("optical",) and g.cue == "aperture" and g.hard
    g = guess_imaging("auto", polarity="dark", polarity_confidence=0.9)
    assert set(g.kinds) == {"tem", "optical"} and g.cue == "polarity" and not g.hard
    g = guess_imaging("auto", polarity="bright", polarity_confidence=0.9, dark_rings=True)
    assert g.kinds == ("optical",) and g.cue == "rings" and not g.hard        # never excludes
    assert not guess_imaging("auto", polarity="outline", polarity_confidence=0.9).hard
    with pytest.raises(Exception, match="imaging must be one of"):
        FitOptions(imaging="xray")


def test_a_chosen_imaging_kind_restricts_the_candidates():
    events = []
    res = fit_reference(EXAMPLE, FitOptions(**QUICK, imaging="tem"), on_event=events.append)
    assert res.imaging["cue"] == "user" and res.imaging["kinds"] == ["tem"]
    assert res.ranking and all(r["material"].startswith("tem_") for r in res.ranking)
    assert all(c.material_id.startswith("tem_") for c in res.candidates)
    assert res.recipe.fit["imaging"]["kind"] == "tem"
    # the library's classifier is asked among the TEM materials only, and its two most probable
    # materials are refined beside the ranking's best
    probs = res.classifier["probabilities"]
    assert res.classifier == res.recipe.fit["classifier"] and all(m.startswith("tem_") for m in probs)
    assert abs(sum(probs.values()) - 1.0) < 0.01 and list(probs)[0] == res.classifier["choice"]
    refined = [c.material_id for c in res.candidates]
    assert refined[0] == res.ranking[0]["material"] and set(list(probs)[:2]) <= set(refined)
    # ... and its probability of each refined material weighed that candidate's final score
    for c in res.candidates:
        assert c.classifier_probability is not None and c.classifier_probability >= 1e-4
        assert c.summary()["classifier_probability"] == c.classifier_probability
        if c.material_id in probs:     # the summary keeps the five most probable
            assert c.classifier_probability == pytest.approx(max(probs[c.material_id], 1e-4))
    assert any(e.message and e.message.startswith("material classifier: ") for e in events)
    measured = [e for e in events if e.stage == "measure" and "measured" in e.data]
    assert measured and measured[0].data["measured"]["outline"].dtype == np.uint8


def test_later_working_scales_visit_the_closest_materials_first(monkeypatch):
    """Every material is ranked at the first working scale; the second scale visits a fixed
    number of them (``LATER_SCALE_MATERIALS``, 2 here) in the order of their first-scale
    distance, however much ranking time is left, so which materials reach it does not depend
    on the machine's speed."""
    from fitting.core.events import CancelToken
    from fitting.fit import candidates
    from fitting.fit.candidates import rank_materials
    monkeypatch.setattr(candidates, "LATER_SCALE_MATERIALS", 2)
    from fitting.fit.pipeline import prepare_target
    from fitting.reference.loading import load_reference
    names = ["tem_carbon_black", "sem_polystyrene_spheres", "sem_faceted_crystals", "optical_insitu_probe"]
    lib = {n: get_material(n) for n in names}
    opts = FitOptions(**QUICK)
    prep = prepare_target(load_reference(EXAMPLE), opts, lib)
    assert len(prep.target.scales) == 2
    visits = []

    def sink(ev):
        if ev.stage == "rank" and " at scale " in (ev.message or ""):
            visits.append((ev.message.split(":")[0], int(ev.message.rsplit(" ", 1)[-1])))
    entries = []
    scenes = {n: MaterialScene(m, RenderSettings(size=opts.size, spp=opts.spp)) for n, m in prep.library.items()}
    rank_materials(prep.library, scenes, prep.target, prep.descriptor, opts, sink, CancelToken(),
                   structures=prep.structures, all_entries=entries)
    n = len(prep.library)
    assert len(visits) == n + 2
    first = prep.target.scales[0]
    assert [m for m, _ in visits[:n]] == list(prep.library)
    at_first = {m: min(e["distance"] for e in entries if e["material"] == m and e["scale"] == first)
                for m in prep.library}
    assert [m for m, _ in visits[n:]] == sorted(prep.library, key=at_first.get)[:2]


def test_a_sparse_reference_also_starts_each_material_from_its_default_appearance(reference_dir):
    """trackpy's five bright-cored colloids fill a mostly empty field: the colloid predictor's
    appearance renders dark discs there, and the ranking's third start (the material's default
    appearance with the measured geometry) measures like the reference; a dense reference gets
    no third start."""
    from fitting.core.events import CancelToken
    from fitting.fit.candidates import rank_materials
    from fitting.fit.pipeline import is_sparse, prepare_target
    from fitting.reference.loading import load_reference
    lib = {"optical_brightfield_colloids": get_material("optical_brightfield_colloids")}
    opts = FitOptions()
    prep = prepare_target(load_reference(reference_dir / "trackpy-examples__bf_0000.png"), opts, lib)
    assert prep.measurement.polarity == "outline"
    assert is_sparse(prep.structures, list(prep.structures), opts.size)
    scenes = {n: MaterialScene(m, RenderSettings(size=opts.size, spp=opts.spp, layout_seed=opts.seed))
              for n, m in prep.library.items()}
    first = prep.target.scales[0]
    entries = []
    rank_materials(prep.library, scenes, prep.target, prep.descriptor, opts, lambda ev: None, CancelToken(),
                   structures=prep.structures, all_entries=entries, sparse=True)
    by_start = {e["start"]: e for e in entries if e["scale"] == first}
    assert set(by_start) == {"predictor", "measured", "default"}
    assert by_start["measured"]["render_measurement"].polarity != "outline"
    assert by_start["default"]["render_measurement"].polarity == "outline"
    assert by_start["default"]["structure_distance"] < by_start["measured"]["structure_distance"]
    dense = []
    rank_materials(prep.library, scenes, prep.target, prep.descriptor, opts, lambda ev: None, CancelToken(),
                   structures=prep.structures, all_entries=dense)
    assert {e["start"] for e in dense} == {"predictor", "measured"}


def test_a_later_scale_s_baseline_does_not_depend_on_which_materials_visited_it():
    """The first scale's baseline is the median over every material; a later scale's is that
    times the median ratio of the same materials' distances at both scales, so visiting one
    more (worse) material at the later scale does not move it."""
    from fitting.fit.candidates import scale_baselines

    def e(m, s, d):
        return {"material": m, "scale": s, "descriptor_distance": d}
    first = [e("a", 300, 1.0), e("b", 300, 2.0), e("c", 300, 4.0), e("d", 300, 8.0), e("a", 300, 1.5)]
    later = [e("a", 600, 0.5), e("b", 600, 1.0)]
    base = scale_baselines(first + later)
    assert base[300] == pytest.approx(3.0)            # median of the best per material: 1, 2, 4, 8
    assert base[600] == pytest.approx(1.5)            # 3.0 x median(0.5, 0.5)
    assert scale_baselines(first + later + [e("d", 600, 4.0)])[600] == pytest.approx(1.5)
    assert scale_baselines(later) == {600: pytest.approx(0.75)}
    assert scale_baselines([]) == {}


@pytest.fixture(scope="module")
def cli_fit(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    cmd = [sys.executable, "-m", "fitting.cli.main", "fit", str(EXAMPLE), "-o", str(out / "r.json"), "--json",
           "--size", "128", "--spp", "2", "--iterations", "2", "--budget", "30", "--pixel-size", "2.5",
           "--materials", "sem_sintered_agglomerates,sem_polystyrene_spheres,tem_carbon_black",
           "--save-preview", str(out / "side.png")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), Recipe.load(out / "r.json"), out


def test_fit_json_and_recipe_carry_measured_and_fitted_sizes(cli_fit):
    summary, recipe, _ = cli_fit
    for key in ("measured", "fitted"):
        d = summary[key]
        assert {"count", "median", "gmean", "gsd", "coverage", "diameter_nm", "pixel_size_nm"} <= set(d)
        assert d["count"] > 0 and d["gmean"] > 0 and d["gsd"] >= 1.0 and 0 < d["coverage"] < 1
        assert d["pixel_size_nm"] == 2.5
        assert d["diameter_nm"]["gmean"] == pytest.approx(d["gmean"] * 2.5)
        assert recipe.fit[key]["gmean"] == pytest.approx(d["gmean"])
        # the distribution behind the summary: its geometric mean is the summary's
        ds = np.asarray(d["diameters"], float)
        assert math.exp(np.log(ds).mean()) == pytest.approx(d["gmean"], rel=0.02)
    assert summary["imaging"]["cue"] in ("tags", "aperture", "rings", "polarity", "none")
    assert recipe.reference["pixel_size_nm"] == 2.5 and recipe.reference["pixel_size_source"] == "user"
    assert summary["metrics"]["refinement_gained"] in (True, False)
    # the example's particles and the fitted ones: same size within a factor 1.5
    assert 1 / 1.5 < summary["fitted"]["gmean"] / summary["measured"]["gmean"] < 1.5


def test_side_by_side_shows_the_whole_field_at_one_pixel_scale(cli_fit):
    from PIL import Image
    _, recipe, out = cli_fit
    side = np.asarray(Image.open(out / "side.png"))
    ref_h, ref_w = Image.open(EXAMPLE).size[::-1]
    scale = recipe.reference["working_scale"]
    # two halves of the working image's size (the example is square) and a 6 px gap
    assert side.shape[0] == min(ref_h, scale) and side.shape[1] == 2 * min(ref_w, scale) + 6


def test_matfit_measure_json_and_overlay(tmp_path, reference_dir):
    img = reference_dir / "trackpy-examples__bf_0000.png"
    over = tmp_path / "outlines.png"
    p = subprocess.run([sys.executable, "-m", "fitting.cli.main", "measure", str(img), "--json", "--pixel-size",
                        "151.93", "--overlay", str(over)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert {"count", "diameter_px", "coverage", "shape", "imaging", "pixel_size_nm"} <= set(d)
    assert set(d["diameter_px"]) == {"median", "gmean", "gsd"}
    assert 4 <= d["count"] <= 6                                   # five colloids
    assert d["pixel_size_nm"] == pytest.approx(151.93) and d["pixel_size_source"] == "user"
    assert d["diameter_nm"]["gmean"] == pytest.approx(d["diameter_px"]["gmean"] * 151.93)
    assert d["imaging"]["kind"] == "optical" and d["imaging"]["cue"]
    from PIL import Image
    assert Image.open(over).size == Image.open(img).size
    p = subprocess.run([sys.executable, "-m", "fitting.cli.main", "measure", str(img)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "particles" in p.stdout and "instrument:" in p.stdout
    assert json.loads(subprocess.run([sys.executable, "-m", "fitting.cli.main", "measure", str(img), "--json"],
                                     capture_output=True, text=True, timeout=300).stdout)["diameter_nm"] is None


def test_the_result_shows_the_references_kind_of_specimen():
    """A compact-particle candidate that scores a little better than the aggregate material on
    a branched reference (shape term 1: another kind of specimen) is not the result; with no
    candidate of the right kind, the best score decides."""
    from fitting.fit.pipeline import choose_result
    from fitting.fit.results import Candidate

    def cand(mid, score, shape):
        c = Candidate(material_id=mid, scale=512, x_initial=np.zeros(3), distance_initial=0.1)
        c.score, c.structure_terms = score, {"size": 0.2, "shape": shape, "cluster": 0.0}
        return c
    compact, chains, crystals = cand("compact", 0.287, 1.0), cand("chains", 0.296, 0.0), cand("big", 0.6, 1.0)
    assert choose_result([compact, chains, crystals]) is chains
    assert choose_result([compact, crystals]) is compact
    # round against faceted (0.3) is a matter of degree: the score decides
    assert choose_result([cand("a", 0.2, 0.3), cand("b", 0.3, 0.0)]).material_id == "a"
    # beyond KIND_MARGIN the score decides: the reference's shape class is the doubtful number
    from fitting.fit.pipeline import KIND_MARGIN
    assert choose_result([compact, cand("chains", 0.287 * KIND_MARGIN * 1.01, 0.0)]) is compact
    assert choose_result([compact, cand("chains", 0.287 * KIND_MARGIN * 0.99, 0.0)]).material_id == "chains"


def test_a_sparse_reference_is_judged_by_its_measured_structure():
    """Where a ranking render holds fewer than JUDGE_MIN_COUNT of the reference's particles,
    the candidate whose render measures closest wins even against a much lower score (a
    field of another instrument's particles, many times too many, that the descriptor rates
    close to a mostly empty reference); equal structure distances fall back to the score."""
    from types import SimpleNamespace
    from fitting.fit.pipeline import JUDGE_MIN_COUNT, choose_result, expected_count, is_sparse

    def cand(mid, score, structure):
        c = Candidate(material_id=mid, scale=500, x_initial=np.zeros(3), distance_initial=0.1)
        c.score, c.structure_distance, c.structure_terms = score, structure, {"shape": 0.0}
        return c
    droplets, chains = cand("droplets", 2.24, 1.98), cand("chains", 0.64, 2.77)
    assert choose_result([droplets, chains]) is chains
    assert choose_result([droplets, chains], sparse=True) is droplets
    assert choose_result([cand("a", 0.3, 0.0), cand("b", 0.2, 0.0)], sparse=True).material_id == "b"

    def structure(coverage, d):
        return StructureTarget(SimpleNamespace(median_px=d, coverage=coverage, shape={"class": "round"}), 1.0)
    few, many = structure(0.003, 14.0), structure(0.2, 14.0)
    assert expected_count(few, 256) < JUDGE_MIN_COUNT < expected_count(many, 256)
    assert is_sparse({500: few}, [500], 256) and not is_sparse({500: many}, [500], 256)
    assert not is_sparse({500: few, 250: many}, [500, 250], 256)
    assert not is_sparse({500: None}, [500], 256) and not is_sparse({}, [], 256)


def test_a_sparse_reference_gives_the_ranking_s_place_to_its_closest_measured_material():
    """For a sparse reference the ranking's place among the refined (the classifier fills the
    others) goes to the material whose render measures closest, as the final choice judges it;
    the other entries keep their order."""
    from fitting.fit.candidates import classified_candidates, structure_first

    def entry(mid, distance, structure):
        return {"material": mid, "distance": distance, "structure_distance": structure}
    ranking = [entry("rods", 1.44, 2.03), entry("droplets", 1.52, 2.01), entry("colloids", 1.61, 1.04),
               entry("spheres", 2.53, 2.04)]
    first = structure_first(ranking)
    assert [r["material"] for r in first] == ["colloids", "rods", "droplets", "spheres"]
    chosen = classified_candidates(first, {"spheres": 0.9, "rods": 0.05}, top_k=3, from_classifier=2)
    assert [r["material"] for r in chosen[:3]] == ["colloids", "spheres", "rods"]
    # equal structure distances (to 3 decimals): the ranking distance decides
    tied = [entry("a", 0.9, 1.0002), entry("b", 0.5, 1.0004)]
    assert structure_first(tied)[0]["material"] == "b"
    assert structure_first([entry("a", 0.9, None), entry("b", 0.5, 0.1)])[0]["material"] == "a"


def test_the_classifier_weighs_the_final_choice_between_near_tied_candidates():
    """Each refined candidate's score is multiplied by 1 + w x -ln p: of two siblings within
    10 % of each other the one the classifier finds more probable wins, a clearly better score
    still wins against the classifier, and without a classifier or at weight 0 nothing changes."""
    from fitting.fit.pipeline import CLASSIFIER_FLOOR, choose_result, weigh_by_classifier

    def cand(mid, score):
        c = Candidate(material_id=mid, scale=500, x_initial=np.zeros(3), distance_initial=0.1)
        c.score, c.structure_distance, c.structure_terms = score, 0.2, {"shape": 0.0}
        return c
    probs = {"raspberry": 0.7, "polystyrene": 0.2, "nanorods": 0.0}
    a, b, far = cand("polystyrene", 0.30), cand("raspberry", 0.32), cand("nanorods", 0.10)
    for c in (a, b, far):
        weigh_by_classifier(c, probs, 0.3)
    assert a.score == pytest.approx(0.30 * (1 + 0.3 * -math.log(0.2)))
    assert b.classifier_probability == 0.7 and far.classifier_probability == CLASSIFIER_FLOOR
    assert choose_result([a, b]) is b
    assert far.score == pytest.approx(0.10 * (1 + 0.3 * -math.log(CLASSIFIER_FLOOR)))
    assert choose_result([cand("polystyrene", 0.30), cand("nanorods", 0.05)]).material_id == "nanorods"
    for probabilities, weight in ((None, 0.3), (probs, 0.0)):
        c = cand("polystyrene", 0.30)
        weigh_by_classifier(c, probabilities, weight)
        assert c.score == 0.30 and c.classifier_probability is None
    assert FitOptions().final_classifier_weight == 0.3
    with pytest.raises(Exception, match="final_classifier_weight"):
        FitOptions(final_classifier_weight=-1)
