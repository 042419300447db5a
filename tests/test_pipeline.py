"""The fit pipeline: events, top-3, refinement, determinism, cancel, recipe + CLI."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fitting.core.errors import Cancelled
from fitting.core.events import CancelToken
from fitting.fit.options import FitOptions
from fitting.fit.pipeline import fit_reference
from fitting.materials.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "resources" / "examples" / "example_sem.png"
SMALL = dict(size=128, spp=2, iterations=4, budget_s=60, scales=(256, 384),
             materials=["sem_sintered_agglomerates", "sem_polystyrene_spheres", "tem_carbon_black",
                        "optical_emulsion_droplets"])


@pytest.fixture(scope="module")
def small_fit():
    events = []
    # screening on (off by default): the 4 materials are refined briefly, then the best 3 in full
    res = fit_reference(EXAMPLE, FitOptions(**SMALL, seed=3, screen=4), on_event=events.append)
    return res, events


def test_fit_emits_events_and_ranks_the_true_material_first(small_fit):
    res, events = small_fit
    kinds = [e.kind for e in events]
    assert kinds[0] == "stage" and kinds[-1] == "finished"
    assert "candidates" in kinds and "iteration" in kinds and "preview" in kinds
    cands = [e for e in events if e.kind == "candidates"]
    # after ranking: the screening pool (all 4 materials); after screening: the final 3
    assert [e.stage for e in cands] == ["rank", "screen"]
    assert len(cands[0].data["ranking"]) == 4 and len(cands[0].data["thumbnails"]) == 4
    assert len(cands[1].data["thumbnails"]) == 3
    assert list(cands[1].data["thumbnails"]) == [r["material"] for r in cands[1].data["ranking"][:3]]
    screen_its = [e for e in events if e.kind == "iteration" and e.stage == "screen"]
    assert {e.data["candidate"] for e in screen_its} == {0, 1, 2, 3}
    it = next(e for e in events if e.kind == "iteration")
    assert {"loss", "distance", "params", "material", "iteration"} <= set(it.data)
    prev = next(e for e in events if e.kind == "preview")
    assert prev.data["image"].shape == (128, 128) and prev.data["image"].dtype == np.uint8
    progress = [e.progress for e in events]
    assert all(b >= a - 1e-9 for a, b in zip(progress, progress[1:])), "progress must not go backwards"
    # the example was rendered from sem_sintered_agglomerates
    assert res.ranking[0]["material"] == "sem_sintered_agglomerates"
    assert len(res.candidates) == 3
    for c in res.candidates:
        assert c.distance_final <= c.distance_initial + 1e-9
        assert c.iterations == len(c.history) and "screen:" in c.stopped   # screened, then refined
    kept = [r["material"] for r in res.ranking[:3]]
    assert [c.material_id for c in res.candidates] == kept
    assert all("distance_screened" in r for r in res.ranking)       # all 4 were screened
    assert [r["distance_screened"] for r in res.ranking] == sorted(r["distance_screened"] for r in res.ranking)
    assert res.best.material_id == min(res.candidates, key=lambda c: c.distance_final).material_id


def test_recipe_records_the_audit_trail(small_fit, tmp_path):
    res, _ = small_fit
    path = res.recipe.save(tmp_path / "fit.json")
    d = json.loads(path.read_text())
    assert d["schema_version"] == 1 and d["material"]["content_hash"]
    assert d["descriptor"]["backbone"] == "vgg16-hed"
    assert d["reference"]["sha256"] and d["reference"]["name"] == "example_sem.png"
    assert len(d["fit"]["top"]) == 3 and d["fit"]["timings"]["total"] > 0
    assert d["fit"]["loss_precision"] in ("float32", "bfloat16")
    assert any(p["refined"] for p in d["parameters"].values())
    assert all("initial" in p for p in d["parameters"].values())
    back = Recipe.load(path)
    assert back.values == pytest.approx(res.recipe.values)


def test_fit_is_deterministic_for_a_seed():
    opts = dict(SMALL, iterations=2, materials=SMALL["materials"][:2])
    a = fit_reference(EXAMPLE, FitOptions(**opts, seed=5))
    b = fit_reference(EXAMPLE, FitOptions(**opts, seed=5))
    assert [c.material_id for c in a.candidates] == [c.material_id for c in b.candidates]
    for ca, cb in zip(a.candidates, b.candidates):
        np.testing.assert_allclose(ca.x_final, cb.x_final, atol=1e-5)
        assert ca.history == pytest.approx(cb.history, rel=1e-4)


def test_cancel_stops_within_one_iteration():
    cancel = CancelToken()
    times = {}

    def on_event(ev):
        if ev.kind == "iteration" and "cancel" not in times:
            times["cancel"] = time.time()
            cancel.cancel()
        if ev.kind == "failed":
            times["failed"] = time.time()

    with pytest.raises(Cancelled):
        fit_reference(EXAMPLE, FitOptions(**dict(SMALL, iterations=50), seed=1), on_event=on_event, cancel=cancel)
    assert times["failed"] - times["cancel"] < 5.0


def test_cli_fit_json_and_compare(tmp_path):
    out = tmp_path / "r.json"
    prev = tmp_path / "side.png"
    cmd = [sys.executable, "-m", "fitting.cli.main", "fit", str(EXAMPLE), "-o", str(out), "--json", "--size", "128",
           "--spp", "2", "--iterations", "2", "--budget", "40",
           "--materials", "sem_sintered_agglomerates,sem_polystyrene_spheres,sem_nanorods",
           "--save-preview", str(prev)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["best"] and len(s["candidates"]) == 3
    # default: no screening; the three best ranked materials are refined straight away
    assert not any("screen" in c["stopped"] for c in s["candidates"])
    assert "screen" not in s["timings"]
    assert {"material", "distance_initial", "distance_final"} <= set(s["candidates"][0])
    assert "metrics" in s and "timings" in s
    assert out.exists() and prev.exists()
    assert "[" in p.stderr  # progress bar on stderr
    c = subprocess.run([sys.executable, "-m", "fitting.cli.main", "compare", str(EXAMPLE), str(out), "--json"],
                       capture_output=True, text=True, timeout=600)
    assert c.returncode == 0, c.stderr
    assert json.loads(c.stdout)["distance"] > 0


def test_cli_fit_bad_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    p = subprocess.run([sys.executable, "-m", "fitting.cli.main", "fit", str(bad), "-o", str(tmp_path / "x.json")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "notes.png" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "x.json").exists()


def test_refinement_loss_compares_crops_with_reference_tiles_of_the_same_size():
    """loss_crop: the loss describes a crop at native pixel scale, the reference is described by
    tiles of that side (no resampling on either side); loss_crop=1 is the whole render."""
    from fitting.describe.descriptor import TextureDescriptor, descriptor_distance
    from fitting.core.errors import MatfitError
    from fitting.reference.loading import load_reference
    from fitting.fit.target import ReferenceTarget
    from fitting.fit.refine import crop_loss_target
    desc = TextureDescriptor(work_size=128)
    target = ReferenceTarget(load_reference(EXAMPLE), desc, (256,), 128)
    tgt = target.by_scale[256]
    cdesc, vec, crop = crop_loss_target(desc, tgt, FitOptions(size=128, loss_crop=0.5))
    assert crop == 64 and cdesc.work_size == 64 and vec.shape == (desc.dim,)
    # the cached target is the reference described by 64 px tiles of its own working image
    again = cdesc.describe_reference(tgt["work"], max_tiles=16)
    assert torch_allclose(vec, again)
    # a 64 px crop of the reference is nearer to the crop target than to the whole-tile target
    work = tgt["work"]
    patch = cdesc.describe(np.ascontiguousarray(work[40:104, 60:124])[None, None].astype(np.float32))
    assert float(descriptor_distance(patch, vec)) < float(descriptor_distance(patch, tgt["descriptor"]))
    same, whole, none = crop_loss_target(desc, tgt, FitOptions(size=128, loss_crop=1.0))
    assert same is desc and none == 0 and whole is tgt["descriptor"]
    with pytest.raises(MatfitError, match="loss_crop"):
        FitOptions(loss_crop=2.0)
    with pytest.raises(MatfitError, match="screen_loss_crop"):
        FitOptions(screen_loss_crop=-0.1)
    with pytest.raises(MatfitError, match="screen"):
        FitOptions(screen_share=1.5)


def test_loss_precision_option():
    import torch
    from fitting.core.errors import MatfitError
    from fitting.fit.options import FitOptions
    from fitting.fit.refine import loss_precision
    from fitting.core.runtime import cpu_has_fast_bf16
    cpu = torch.device("cpu")
    assert loss_precision(FitOptions(loss_precision="float32"), cpu) == "float32"
    assert loss_precision(FitOptions(loss_precision="bfloat16"), cpu) == "bfloat16"
    assert loss_precision(FitOptions(), cpu) == ("bfloat16" if cpu_has_fast_bf16() else "float32")
    with pytest.raises(MatfitError, match="loss_precision"):
        FitOptions(loss_precision="float16")


def torch_allclose(a, b) -> bool:
    import torch
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-6))
