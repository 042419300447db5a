"""Bulk rendering of labelled sets (fitting.bulk, `matfit bulk`) and FID/KID (fitting.quality).

Small on purpose: 128 px images, 1-2 spp, 2-4 images, one SEM material of single spheres and the
TEM carbon-black agglomerates. Two module-scoped sets are rendered once in this process and every
other path (resume, Dask LocalCluster, local process pool via the CLI) is compared against them
byte for byte.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.timeout(600)

SEM = "sem_polystyrene_spheres"
TEM = "tem_carbon_black"
SIZE = 128


# ----------------------------------------------------------------------------------------------
# PNG encoding of the set's files (OpenCV, fixed filter): lossless, the modes PIL readers expect
# ----------------------------------------------------------------------------------------------
def test_png_bytes_are_lossless_8_and_16_bit():
    import io
    from fitting.output.bulk.files import png_bytes
    rng = np.random.default_rng(3)
    img8 = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    mask16 = rng.integers(0, 65536, (37, 53), dtype=np.uint16)
    gray = rng.random((37, 53)).astype(np.float32) * 1.2 - 0.1       # out-of-range values clip
    expected_gray = (np.clip(gray, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    for arr, mode, expected in ((img8, "L", img8), (mask16, "I;16", mask16), (gray, "L", expected_gray)):
        im = Image.open(io.BytesIO(png_bytes(arr)))
        assert im.format == "PNG" and im.mode == mode and im.size == (53, 37)
        np.testing.assert_array_equal(np.asarray(im), expected)
    with pytest.raises(ValueError, match="2-D gray"):
        png_bytes(np.zeros((4, 4, 3), np.uint8))


# ----------------------------------------------------------------------------------------------
# quality metrics (numpy only)
# ----------------------------------------------------------------------------------------------
def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift():
    from fitting.describe.quality import fid
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    fids = [fid(a, rng.normal(size=(400, 8)) + s) for s in (0.0, 0.5, 1.0, 2.0)]
    assert fids == sorted(fids) and fids[0] < 0.2 < fids[1]
    # a change of spread (same mean) is seen too
    assert fid(a, rng.normal(size=(400, 8)) * 2.0) > 5 * fids[0]


def test_fid_matches_closed_form_for_1d_gaussians():
    from fitting.describe.quality import frechet_distance
    m1, v1, m2, v2 = 1.0, 4.0, -0.5, 0.25
    expect = (m1 - m2) ** 2 + v1 + v2 - 2 * np.sqrt(v1 * v2)
    assert frechet_distance(np.array([m1]), np.array([[v1]]), np.array([m2]), np.array([[v2]])) == \
        pytest.approx(expect, rel=1e-9)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_grows_with_shift():
    from fitting.describe.quality import kid
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    same, same_std = kid(a, b, subsets=50, subset_size=100)
    assert abs(same) < 3 * same_std + 1e-3       # unbiased: ~0, may be negative
    near, _ = kid(a, rng.normal(size=(300, 16)) + 0.3, subsets=50, subset_size=100)
    far, _ = kid(a, rng.normal(size=(300, 16)) + 1.0, subsets=50, subset_size=100)
    assert same < near < far and near > 3 * same_std


def test_rle_of_a_label_image_equals_pycocotools_encode():
    """Edge cases: an instance at the first and one at the last pixel, runs that wrap from the
    bottom of a column to the top of the next, a split instance, an id missing from the image."""
    from pycocotools import mask as mask_utils
    from fitting.output.bulk.labels import rle_counts_all
    lab = np.zeros((6, 5), np.int32)
    lab[0, 0] = 1
    lab[-1, -1] = 2
    lab[4:, 1] = 3
    lab[:2, 2] = 3
    lab[1:4, 3] = 4
    lab[5, 3] = 4
    rng = np.random.default_rng(0)
    big = rng.integers(0, 4, (40, 30)).astype(np.int32)
    for labels in (lab, big, np.full((4, 4), 1, np.int32)):
        k = int(labels.max())
        for i, counts in enumerate(rle_counts_all(labels, k), start=1):
            binary = np.asfortranarray((labels == i).astype(np.uint8))
            enc = mask_utils.encode(binary)
            got = mask_utils.frPyObjects({"size": list(labels.shape), "counts": counts}, *labels.shape)
            assert got["counts"] == enc["counts"], (i, counts)
            assert sum(counts) == labels.size
    assert rle_counts_all(lab, 5)[4] == [lab.size]          # id 5 is not in the image


# ----------------------------------------------------------------------------------------------
# rendered sets
# ----------------------------------------------------------------------------------------------
def _recipe(mid: str, path: Path, spp: int):
    from fitting.materials.library import get_material
    from fitting.materials.recipe import Recipe
    mat = get_material(mid)
    x = mat.default_vector()
    rec = Recipe.from_vector(mat, x, render={"size": SIZE, "spp": spp, "layout_seed": 0})
    rec.save(path, mat)
    return rec


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bulk")


@pytest.fixture(scope="module")
def sem_set(work):
    from fitting.output.bulk.run import render_dataset
    _recipe(SEM, work / "sem.json", spp=1)
    res = render_dataset(work / "sem.json", work / "sem", 4, workers=1)
    return res, work / "sem"


@pytest.fixture(scope="module")
def tem_set(work):
    from fitting.output.bulk.run import render_dataset
    _recipe(TEM, work / "tem.json", spp=2)
    res = render_dataset(work / "tem.json", work / "tem", 3, workers=1)
    return res, work / "tem"


def _files(d: Path) -> dict[str, bytes]:
    """Every image, mask and sidecar of a set, plus the set files, by relative path."""
    out = {}
    for sub in ("images", "masks", "meta"):
        for p in sorted((d / sub).iterdir()):
            out[f"{sub}/{p.name}"] = p.read_bytes()
    for name in ("annotations.json", "particles.csv"):
        out[name] = (d / name).read_bytes()
    return out


def _read(d: Path, i: int):
    img = np.asarray(Image.open(d / "images" / f"{i:06d}.png"))
    mim = Image.open(d / "masks" / f"{i:06d}.png")
    side = json.loads((d / "meta" / f"{i:06d}.json").read_text())
    return img, mim, side


@pytest.mark.parametrize("which", ["sem", "tem"])
def test_masks_agree_with_the_rendered_particles(which, sem_set, tem_set):
    res, d = sem_set if which == "sem" else tem_set
    assert res.rendered == res.count and res.images == res.count and not res.cancelled
    assert sorted(p.name for p in d.iterdir()) == ["annotations.json", "dataset.json", "images", "masks",
                                                   "meta", "particles.csv"]
    for i in range(res.count):
        img, mim, side = _read(d, i)
        assert img.dtype == np.uint8 and img.shape == (SIZE, SIZE)
        assert mim.mode.startswith("I;16")                  # 16-bit PNG
        mask = np.asarray(mim).astype(np.int64)
        k = len(side["instances"])
        assert k > 0
        assert set(np.unique(mask).tolist()) == set(range(k + 1))   # ids 1..K, all visible
        assert [a["instance_id"] for a in side["instances"]] == list(range(1, k + 1))
        for a in side["instances"]:
            x, y, w, h = a["bbox"]
            assert a["area"] > 0 and a["area"] == int((mask == a["instance_id"]).sum())
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= SIZE and y + h <= SIZE
        inside, outside = img[mask > 0].mean(), img[mask == 0].mean()
        # SEM: particles are brighter than the substrate; TEM (bright field): darker
        if which == "sem":
            assert inside > outside + 40
        else:
            assert inside < outside - 40
        big = [a for a in side["instances"] if a["area"] >= 40]
        for a in big:   # every (not tiny) instance on its own differs from the substrate
            m = img[mask == a["instance_id"]].mean()
            assert (m > outside + 20) if which == "sem" else (m < outside - 20)


@pytest.mark.parametrize("which", ["sem", "tem"])
def test_image_and_mask_are_the_scene_render_and_instance_mask(which, sem_set, tem_set):
    """Image 0 equals MaterialScene.render_numpy with the recorded seeds, and its mask is the
    majority particle of that render's own samples, relabelled (per agglomerate for TEM); it
    agrees with the pixel-centre instance mask except along particle outlines."""
    import torch
    from fitting.output.bulk.labels import relabel
    from fitting.materials.recipe import Recipe
    from fitting.materials.scene import MaterialScene, RenderSettings
    res, d = sem_set if which == "sem" else tem_set
    rec = Recipe.load(d.parent / f"{which}.json")
    mat = rec.material()
    x = rec.vector(mat)
    img, mim, side = _read(d, 0)
    scene = MaterialScene(mat, RenderSettings(size=SIZE, spp=int(rec.render["spp"])))
    again = scene.render_numpy(x, seed=side["render_seed"], layout_seed=side["layout_seed"],
                               texture_seed=side["texture_seed"])
    assert np.array_equal((np.clip(again, 0, 1) * 255 + 0.5).astype(np.uint8), img)
    r = scene.renderer(scene.split(torch.as_tensor(x))["geometry"], side["layout_seed"])
    pid = r.sample_mask()                                   # the samples of the render just made
    labels, groups = relabel(pid, r.layout, "cluster")
    assert np.array_equal(labels, np.asarray(mim))
    assert np.array_equal(labels > 0, pid > 0)
    centre = r.instance_mask()
    disagree = pid != centre
    assert disagree.mean() < 0.05
    # where they disagree, the pixel lies on an outline: a neighbour of it is another particle
    edge = np.zeros_like(disagree)
    for axis in (0, 1):
        for shift in (1, -1):
            edge |= np.roll(centre, shift, axis) != centre
    assert edge[disagree].mean() > 0.95
    layout = r.layout
    prim, _ = relabel(pid, layout, "primary")
    assert np.array_equal(prim > 0, pid > 0)
    if which == "tem":
        # agglomerates: one instance holds many primaries, the primary labelling has more instances
        assert max(a["n_primaries"] for a in side["instances"]) > 3
        assert prim.max() > labels.max()
        for a, g in zip(side["instances"], groups):
            assert len(set(layout.cluster[g - 1].tolist())) == 1
            assert a["eq_diameter_3d_px"] > 2 * float(layout.radii[g - 1].max()) - 1e-3
    else:
        assert prim.max() == labels.max()
        assert all(a["n_primaries"] == 1 for a in side["instances"])


def test_sample_mask_is_the_majority_of_the_pixel_samples():
    from fitting.render.tracing import SceneRenderer
    r = SceneRenderer.__new__(SceneRenderer)
    r.resolution, r.spp = 2, 4
    r._last_particle = np.array([3, 3, 0, 5,   0, 0, 7, 0,   2, 4, 4, 2,   9, 9, 9, 9], np.uint32)
    m = r.sample_mask()
    assert m.tolist() == [[3, 0], [2, 9]]        # 2-1-1 -> 3; 3-1 -> 0; 2-2 tie -> earliest (2); 4 -> 9


def test_coco_file_loads_and_decodes_back_to_the_masks(sem_set, tem_set):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    for res, d in (sem_set, tem_set):
        coco = COCO(str(d / "annotations.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["particle"]
        assert sorted(coco.getImgIds()) == list(range(1, res.count + 1))
        ann_ids = coco.getAnnIds()
        assert len(ann_ids) == len(set(ann_ids)) == res.annotations
        for img_id in coco.getImgIds():
            info = coco.loadImgs(img_id)[0]
            assert (d / "images" / info["file_name"]).is_file()
            assert (info["width"], info["height"]) == (SIZE, SIZE)
            mask = np.asarray(Image.open(d / info["mask_file"]))
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
            assert len(anns) == mask.max()
            for a in anns:
                assert a["iscrowd"] == 0 and a["category_id"] == 1 and a["area"] > 0
                binary = coco.annToMask(a)
                assert np.array_equal(binary, (mask == a["instance_id"]).astype(np.uint8))
                # the uncompressed RLE is exactly what pycocotools.mask.encode compresses
                enc = mask_utils.encode(np.asfortranarray(binary))
                assert mask_utils.frPyObjects(a["segmentation"], SIZE, SIZE)["counts"] == enc["counts"]
                assert list(mask_utils.toBbox(enc)) == a["bbox"]
    # the compact variant (pycocotools' string counts) decodes to the same masks
    from fitting.output.bulk.annotations import build_coco, read_sidecars
    res, d = tem_set
    path = d.parent / "tem_compressed.json"
    path.write_text(json.dumps(build_coco(read_sidecars(d), rle="compressed")))
    plain, compact = COCO(str(d / "annotations.json")), COCO(str(path))
    for aid in plain.getAnnIds():
        assert isinstance(compact.anns[aid]["segmentation"]["counts"], str)
        assert np.array_equal(plain.annToMask(plain.anns[aid]), compact.annToMask(compact.anns[aid]))


def test_torchvision_detection_reference_reads_the_set(sem_set):
    """What torchvision's references/detection/coco_utils.py does: CocoDetection, then
    frPyObjects + decode per annotation (convert_coco_poly_to_mask)."""
    import torch
    from pycocotools import mask as mask_utils
    from torchvision.datasets import CocoDetection
    res, d = sem_set
    ds = CocoDetection(str(d / "images"), str(d / "annotations.json"))
    assert len(ds) == res.count
    img, target = ds[1]
    assert img.size == (SIZE, SIZE) and target
    masks = []
    for obj in target:
        m = mask_utils.decode(mask_utils.frPyObjects(obj["segmentation"], img.size[1], img.size[0]))
        if m.ndim < 3:
            m = m[..., None]
        masks.append(torch.as_tensor(m, dtype=torch.uint8).any(dim=2))
    stacked = torch.stack(masks).numpy()
    ref = np.asarray(Image.open(d / "masks" / "000001.png"))
    assert np.array_equal(stacked.argmax(0) + 1, np.where(ref > 0, ref, 1)) and stacked.sum() == (ref > 0).sum()


def test_particle_features_csv(sem_set, tem_set):
    for res, d in (sem_set, tem_set):
        rows = list(csv.DictReader((d / "particles.csv").open()))
        assert len(rows) == res.annotations
        for r in rows:
            area = int(r["area_px"])
            assert float(r["eq_diameter_mask_px"]) == pytest.approx(2 * np.sqrt(area / np.pi), abs=1e-3)
            x, y, w, h = (int(r[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
            assert x <= float(r["centroid_x"]) <= x + w and y <= float(r["centroid_y"]) <= y + h
            assert int(r["touches_border"]) == int(x == 0 or y == 0 or x + w == SIZE or y + h == SIZE)
            assert float(r["eq_diameter_3d_px"]) > 0
    # SEM spheres: the visible-area diameter of an unclipped sphere is close to its 3-D diameter
    rows = [r for r in csv.DictReader((sem_set[1] / "particles.csv").open()) if r["touches_border"] == "0"]
    ratio = np.median([float(r["eq_diameter_mask_px"]) / float(r["eq_diameter_3d_px"]) for r in rows])
    assert 0.85 < ratio < 1.1


def test_resumed_runs_give_the_uninterrupted_set(sem_set, work):
    from fitting.output.bulk.run import render_dataset
    _, full = sem_set
    d = work / "sem_resumed"
    r2 = render_dataset(work / "sem.json", d, 2, workers=1)       # "interrupted" after 2 images
    assert r2.rendered == 2
    assert len(json.loads((d / "annotations.json").read_text())["images"]) == 2
    r4 = render_dataset(work / "sem.json", d, 4, workers=1)
    assert (r4.rendered, r4.skipped) == (2, 2)
    assert _files(d) == _files(full)
    # lose one image's files (and leave a killed writer's temporary file): only it is redone
    (d / "images" / "000001.png").unlink()
    (d / "masks" / "000001.png").unlink()
    (d / "meta" / ".000002.json.x1y2.tmp").write_bytes(b"{partial")
    again = render_dataset(work / "sem.json", d, 4, workers=1)
    assert (again.rendered, again.skipped) == (1, 3)
    assert not list((d / "meta").glob(".*.tmp"))
    assert _files(d) == _files(full)


def test_cancel_stops_between_images_and_the_coco_matches(work, sem_set):
    from fitting.output.bulk.run import render_dataset
    from fitting.core.events import CancelToken
    d = work / "sem_cancel"
    tok = CancelToken()
    res = render_dataset(work / "sem.json", d, 4, workers=1, cancel=tok,
                         on_event=lambda ev: tok.cancel() if ev.kind == "iteration" else None)
    assert res.cancelled and res.rendered == 1
    coco = json.loads((d / "annotations.json").read_text())
    assert [im["file_name"] for im in coco["images"]] == ["000000.png"]
    assert not [p for p in d.rglob("*") if p.name.startswith(".")]
    assert (d / "images" / "000000.png").read_bytes() == (sem_set[1] / "images" / "000000.png").read_bytes()


def test_a_folder_of_another_set_is_refused(work, sem_set):
    from fitting.output.bulk.run import render_dataset
    from fitting.core.errors import MatfitError
    with pytest.raises(MatfitError, match="other settings"):
        render_dataset(work / "sem.json", sem_set[1], 4, workers=1, spp=2)
    with pytest.raises(MatfitError, match="other settings"):
        render_dataset(work / "sem.json", sem_set[1], 4, workers=1, instances="primary")


def test_dask_local_cluster_writes_the_same_files(work, sem_set):
    from distributed import LocalCluster
    from fitting.output.bulk.run import render_dataset
    d = work / "sem_dask"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        res = render_dataset(work / "sem.json", d, 4, scheduler=cluster.scheduler_address, chunk_size=2)
    assert res.backend == "dask" and res.rendered == 4 and res.workers == 2
    assert _files(d) == _files(sem_set[1])


def test_cli_bulk_local_pool_and_bad_recipe(work, sem_set, capsys):
    from fitting.cli.main import main
    d = work / "sem_cli"
    rc = main(["bulk", str(work / "sem.json"), "--count", "3", "--out", str(d), "--workers", "2", "--quiet"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "3 images" in err and "pool x2" in err
    full = _files(sem_set[1])
    assert all(full[k] == v for k, v in _files(d).items() if not k.endswith((".json", ".csv")) or k.startswith("meta"))
    rc = main(["bulk", str(work / "missing.json"), "--count", "2", "--out", str(work / "never")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.json: no such recipe file" in err
    assert not (work / "never").exists()
    # a bad --reference fails before anything is rendered
    rc = main(["bulk", str(work / "sem.json"), "--count", "2", "--out", str(work / "never"),
               "--reference", str(work / "missing.png")])
    assert rc == 2 and "missing.png" in capsys.readouterr().err
    assert not (work / "never").exists()


def test_cli_score_prints_fid_and_kid(tem_set, reference_dir, capsys):
    from fitting.cli.main import main
    ref = reference_dir / "CarbonBlackSegmentation__20180529_A9_003.png"
    assert ref.is_file()
    rc = main(["score", str(ref), str(tem_set[1]), "--crops", "8", "--crop-min", "96", "--crop-max", "96"])
    out = capsys.readouterr().out
    assert rc == 0
    fid_line = next(line for line in out.splitlines() if line.startswith("FID "))
    kid_line = next(line for line in out.splitlines() if line.startswith("KID "))
    assert float(fid_line.split()[1]) > 0 and np.isfinite(float(kid_line.split()[1]))
    # `bulk --reference` on the finished set only scores it
    rc = main(["bulk", str(tem_set[1].parent / "tem.json"), "--count", "3", "--out", str(tem_set[1]),
               "--workers", "1", "--quiet", "--reference", str(ref), "--score-crops", "6"])
    out = capsys.readouterr().out
    assert rc == 0 and "FID " in out and "KID " in out


def test_texture_variants_cycle_and_zero_means_one_texture_per_image():
    from fitting.output.bulk.jobs import make_job, seeds_for, texture_seed_for
    from fitting.materials.library import get_material
    from fitting.materials.recipe import Recipe
    mat = get_material("sem_polystyrene_spheres")
    rec = Recipe.from_vector(mat, mat.default_vector())
    job = make_job(rec, size=64, spp=1, seed=3, texture_variants=4)
    seeds = [texture_seed_for(job, seeds_for(3, i)[1]) for i in range(64)]
    assert 1 < len(set(seeds)) <= 4                       # a bank of at most 4 realisations, all used
    job0 = make_job(rec, size=64, spp=1, seed=3, texture_variants=0)
    rs = [seeds_for(3, i)[1] for i in range(16)]
    assert [texture_seed_for(job0, r) for r in rs] == rs   # 0: the texture follows the render seed
    from fitting.output.bulk.jobs import job_key
    assert job_key(job) != job_key(job0)                   # a set never mixes the two
    with pytest.raises(Exception, match="texture-variants"):
        make_job(rec, size=64, spp=1, texture_variants=-1)


def test_filled_texture_bank_serves_every_image_without_new_graph_evaluations(tmp_path, monkeypatch):
    """fill_texture_bank evaluates each variant once; the set's images then only read the bank,
    and an image is the same whether its variant came from the bank or was evaluated for it."""
    from fitting.output.bulk import jobs as bulk
    from fitting.materials.library import get_material
    from fitting.materials.recipe import Recipe
    mat = get_material("sem_polystyrene_spheres")
    rec = Recipe.from_vector(mat, mat.default_vector())
    job = bulk.make_job(rec, size=64, spp=1, seed=5, texture_variants=3)
    bulk.render_index(job, 0, tmp_path / "lazy")               # variant evaluated on demand
    bulk._STATE.clear()
    assert bulk.fill_texture_bank(job) == 3
    assert bulk.fill_texture_bank(job) == 0                    # all cached now
    scene, _ = bulk._worker_scene(job)
    calls = []
    real_maps = scene.maps
    monkeypatch.setattr(scene, "maps", lambda *a, **k: calls.append(a) or real_maps(*a, **k))
    for i in range(4):
        bulk.render_index(job, i, tmp_path / "banked")
    assert calls == []
    same = [np.asarray(Image.open(tmp_path / d / "images" / "000000.png")) for d in ("lazy", "banked")]
    np.testing.assert_array_equal(*same)


def test_heap_frozen_only_while_an_image_renders_and_nested_use_keeps_the_outer_freeze():
    import gc
    from fitting.output.bulk.files import long_lived_heap_frozen
    assert gc.get_freeze_count() == 0
    with long_lived_heap_frozen():
        frozen = gc.get_freeze_count()
        assert frozen > 1000                       # torch, Mitsuba, numpy objects
        with long_lived_heap_frozen():
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen    # the inner exit did not unfreeze
        cyc = []
        cyc.append(cyc)                            # new cyclic garbage is still collected
        del cyc
        assert gc.collect() >= 1
    assert gc.get_freeze_count() == 0
