"""Predictors end to end on tiny data: dataset (cached, resumable), training, status, staleness."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from fitting.describe.descriptor import TextureDescriptor
from fitting.materials.library import load_library, load_material
from fitting.fit.predictor import (dataset_dir, generate_dataset, load_predictor, predictor_status, reduce_descriptor, train_predictor)

MID = "sem_polystyrene_spheres"
SIZE = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    lib = root / "lib"
    shutil.copytree(load_library()[MID].folder, lib / MID)
    for f in ("predictor.pt", "predictor.json"):
        (lib / MID / f).unlink(missing_ok=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("MATFIT_DATA", str(root / "data"))
    mat = load_material(lib / MID)
    desc = TextureDescriptor("vgg16-hed", work_size=SIZE)
    calls = []
    x, f = generate_dataset(mat, 100, size=SIZE, spp=1, workers=1, lib_path=str(lib),
                            progress=lambda d, t, e: calls.append((d, t)))
    yield {"mat": mat, "lib": lib, "desc": desc, "x": x, "f": f, "calls": calls, "root": root}
    mp.undo()


def test_dataset_is_cached_and_resumable(tiny):
    mat = tiny["mat"]
    assert tiny["x"].shape == (100, len(mat.specs)) and np.isfinite(tiny["f"]).all()
    assert tiny["calls"][-1] == (100, 100)
    chunks = sorted(dataset_dir(mat, "vgg16-hed", SIZE).glob("chunk_*.npz"))
    assert len(chunks) == 4
    # an interrupted run: drop one chunk; the next run renders only that one, same data
    chunks[1].unlink()
    calls = []
    x2, f2 = generate_dataset(mat, 100, size=SIZE, spp=1, workers=1, lib_path=str(tiny["lib"]),
                              progress=lambda d, t, e: calls.append(d))
    assert calls[0] == 75          # three chunks were already there
    np.testing.assert_array_equal(np.sort(x2, axis=0), np.sort(tiny["x"], axis=0))


def test_tiny_predictor_beats_the_mean_predictor(tiny):
    mat, desc = tiny["mat"], tiny["desc"]
    meta = train_predictor(mat, tiny["x"], tiny["f"], desc.part_slices(), desc.backbone_id, epochs=150)
    print(f"held-out MAE {meta['heldout_mae']:.4f} vs mean predictor {meta['heldout_mean_baseline']:.4f}")
    assert meta["heldout_mae"] < meta["heldout_mean_baseline"]
    assert meta["per_group"]["geometry"]["mae"] < meta["per_group"]["geometry"]["mean_baseline"]
    saved = json.loads((mat.folder / "predictor.json").read_text())
    for key in ("backbone", "content_hash", "library_version", "samples", "per_parameter", "per_group"):
        assert key in saved
    assert saved["backbone"] == "vgg16-hed" and saved["samples"] == 100
    assert predictor_status(mat) == "current"
    pred = load_predictor(mat, backbone="vgg16-hed")
    y = pred.predict(desc.describe(torch.rand(1, 1, SIZE, SIZE))[0], desc.part_slices())
    assert y.shape == (len(mat.specs),) and ((0 <= y) & (y <= 1)).all()


def test_changed_material_is_stale_and_warns(tiny):
    mat = tiny["mat"]
    if predictor_status(mat) != "current":
        pytest.skip("needs the trained tiny predictor")
    g = json.loads((mat.folder / "graph.json").read_text())
    g["nodes"][0]["params"]["octaves"] = 2
    (mat.folder / "graph.json").write_text(json.dumps(g))
    changed = load_material(mat.folder)
    assert predictor_status(changed) == "stale"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert load_predictor(changed, backbone="vgg16-hed") is not None
    assert any("stale" in str(x.message) and "matfit train" in str(x.message) for x in w)
    msgs = []
    assert load_predictor(changed, backbone="vgg19-imagenet", on_warning=msgs.append) is None
    assert "vgg16-hed" in msgs[0]


def test_reduction_keeps_each_part_and_is_fixed(tiny):
    desc = tiny["desc"]
    d = desc.describe(torch.rand(2, 1, SIZE, SIZE))
    a = reduce_descriptor(d, desc.part_slices())
    b = reduce_descriptor(d, desc.part_slices())
    assert torch.equal(a, b) and a.shape[1] < d.shape[1] / 50
