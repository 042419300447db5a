"""The material classifier end to end on tiny data: training on two materials' renders, what it
says about new renders, saving and staleness, `matfit train --classifier`, and the ranking rule
that keeps its choice among the refined candidates."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fitting.describe.descriptor import TextureDescriptor
from fitting.fit.candidates import classified_candidates
from fitting.fit.classifier import (classifier_status, classify_reference, load_classifier, train_classifier)
from fitting.fit.predictor import generate_dataset
from fitting.materials.library import load_library
from fitting.materials.scene import MaterialScene, RenderSettings

MIDS = ("sem_polystyrene_spheres", "tem_metal_nanoparticles")
SIZE = 64
SAMPLES = 100


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("clf")
    lib_dir = root / "lib"
    for mid in MIDS:
        shutil.copytree(load_library()[mid].folder, lib_dir / mid)
    mp = pytest.MonkeyPatch()
    mp.setenv("MATFIT_DATA", str(root / "data"))
    lib = load_library(lib_dir, reload=True)
    desc = TextureDescriptor("vgg16-hed", work_size=SIZE)
    features = {mid: generate_dataset(lib[mid], SAMPLES, size=SIZE, spp=1, workers=1, lib_path=str(lib_dir))[1]
                for mid in MIDS}
    clf, meta = train_classifier(features, desc.part_slices(), desc.backbone_id,
                                 {m: lib[m].content_hash for m in MIDS}, epochs=60)
    yield {"lib": lib, "lib_dir": lib_dir, "desc": desc, "clf": clf, "meta": meta, "root": root, "mp": mp}
    mp.undo()


def test_tiny_classifier_tells_two_materials_apart(tiny):
    meta = tiny["meta"]
    print(f"held-out top 1 {meta['heldout_top1']:.2f}: {meta['per_material']}")
    assert meta["materials"] == sorted(MIDS)
    assert meta["heldout_top1"] >= 0.85          # chance: 0.5
    assert set(meta["per_material"]) == set(MIDS)
    # new renders (other parameters and layouts than the training set) of each material: most
    # are told right through the fit's entry point (a descriptor per working scale)
    lib, desc, clf = tiny["lib"], tiny["desc"], tiny["clf"]
    right = 0
    for k, mid in enumerate(MIDS):
        mat = lib[mid]
        for j in range(4):
            x = mat.random_vector(np.random.default_rng(900 + 10 * k + j))
            scene = MaterialScene(mat, RenderSettings(size=SIZE, spp=1, layout_seed=77 + 10 * k + j))
            d = desc.describe(scene.render(torch.as_tensor(x), seed=5).reshape(1, 1, SIZE, SIZE))[0]
            p = classify_reference(clf, [d, d])
            right += list(p)[0] == mid
            assert abs(sum(p.values()) - 1.0) < 1e-5 and list(p.values()) == sorted(p.values(), reverse=True)
            # restricted to one candidate (an instrument choice), that one gets all the probability
            assert classify_reference(clf, [d], [MIDS[1 - k]]) == {MIDS[1 - k]: pytest.approx(1.0)}
    print(f"fresh renders told right: {right}/8")
    assert right >= 6


def test_saved_classifier_loads_and_goes_stale_when_a_material_changes(tiny, tmp_path):
    lib, clf = tiny["lib"], tiny["clf"]
    folder = tmp_path / "lib"
    for mid in MIDS:
        shutil.copytree(lib[mid].folder, folder / mid)
    assert classifier_status(lib, folder) == "missing"
    assert load_classifier(lib, folder) is None
    clf.save(folder)
    lib2 = load_library(folder, reload=True)
    assert classifier_status(lib2, folder) == "current"
    loaded = load_classifier(lib2, folder, backbone="vgg16-hed")
    f = np.random.default_rng(0).normal(size=(3, clf.mean.numel())).astype(np.float32)
    a, b = clf.probabilities_of_features(f), loaded.probabilities_of_features(f)
    for pa, pb in zip(a, b):
        assert pa == pytest.approx(pb, abs=1e-6)
    msgs = []
    assert load_classifier(lib2, folder, backbone="vgg19-imagenet", on_warning=msgs.append) is None
    assert "vgg16-hed" in msgs[0] and "matfit train --classifier" in msgs[0]
    # a changed material: the classifier's classes no longer match the library
    g = json.loads((folder / MIDS[0] / "graph.json").read_text())
    g["nodes"][0]["params"]["octaves"] = 2
    (folder / MIDS[0] / "graph.json").write_text(json.dumps(g))
    lib3 = load_library(folder, reload=True)
    assert classifier_status(lib3, folder) == "stale"
    msgs = []
    assert load_classifier(lib3, folder, on_warning=msgs.append) is None
    assert "matfit train --classifier" in msgs[0]


def test_train_command_writes_the_classifier(tiny, capsys):
    from fitting.cli.main import main
    tiny["mp"].setenv("MATFIT_LIBRARY", str(tiny["lib_dir"]))
    try:
        rc = main(["train", "--classifier", "--samples", str(SAMPLES), "--size", str(SIZE), "--workers", "1",
                   "--classifier-epochs", "30", "--json"])
    finally:
        tiny["mp"].delenv("MATFIT_LIBRARY")
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == {m: SAMPLES for m in MIDS} and 0.0 <= out["heldout_top1"] <= 1.0
    lib = load_library(tiny["lib_dir"], reload=True)
    assert classifier_status(lib, tiny["lib_dir"]) == "current"


def _ranking(*mids):
    return [{"material": m, "distance": float(i)} for i, m in enumerate(mids)]


def _ids(ranking):
    return [r["material"] for r in ranking]


def test_refined_candidates_are_the_rankings_best_and_the_classifiers_choices():
    ranking = _ranking("a", "b", "c", "d", "e")
    p = {"e": 0.6, "d": 0.3, "a": 0.1}
    assert _ids(classified_candidates(ranking, p, 3, 2)) == ["a", "e", "d", "b", "c"]
    # the ranking's best is never displaced, a classifier's choice already chosen is not taken
    # twice, and places the classifier leaves free go to the ranking's next best
    assert _ids(classified_candidates(ranking, {"a": 0.9, "e": 0.1}, 3, 2)) == ["a", "e", "b", "c", "d"]
    assert _ids(classified_candidates(ranking, p, 3, 1)) == ["a", "e", "b", "c", "d"]
    # a material the instrument excluded from the ranking is skipped
    assert _ids(classified_candidates(ranking, {"zz": 0.9, "c": 0.1}, 3, 2)) == ["a", "c", "b", "d", "e"]
    # no classifier, or none asked for: the ranking as it was
    assert classified_candidates(ranking, None, 3, 2) is ranking
    assert classified_candidates(ranking, p, 3, 0) is ranking
    # every entry is kept exactly once
    out = classified_candidates(ranking, p, 4, 3)
    assert sorted(_ids(out)) == sorted(_ids(ranking)) and _ids(out)[:4] == ["a", "e", "d", "b"]
