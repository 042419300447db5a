"""`matfit validate`: the detector's maps and instances, matching at IoU 0.5, annotations, and
the whole loop (render → train → detect → report) on real renders with a tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fitting.core.errors import Cancelled, MatfitError
from fitting.core.events import CancelToken
from fitting.validate.detector import instances_from_maps
from fitting.validate.metrics import common_bins, js_divergence, match_instances, size_distribution
from fitting.validate.trainset import centre_map


def disks(shape, centres, radius) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    lab = np.zeros(shape, np.int32)
    for k, (cy, cx) in enumerate(centres, start=1):
        lab[((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2) & (lab == 0)] = k
    return lab


def test_centre_map_peaks_at_each_particles_centre_and_keeps_overlapping_ones_apart():
    lab = disks((40, 60), [(20, 20), (20, 38)], 9)          # touching: centres 18 px apart
    c = centre_map(lab)
    assert c[20, 20] > 0.9 and c[20, 38] > 0.9
    assert c[lab == 0].max() == 0.0
    assert c[20, 29] < 0.15                                     # where the two meet
    # primaries overlapping by half (centres one radius apart), the second partly hidden: with
    # its true centre its cone still peaks there, and the saddle (0.5) stays below a core (0.6)
    hidden = disks((40, 60), [(20, 24), (20, 34)], 10)
    c = centre_map(hidden, {1: (20.0, 24.0, 10.0), 2: (20.0, 34.0, 10.0)})
    assert c[20, 34] == pytest.approx(1.0) and c[20, 29] == pytest.approx(0.5)
    small = centre_map(disks((40, 40), [(20, 20)], 3))
    assert small.max() == pytest.approx(1.0)                    # every size peaks at 1


def test_true_maps_give_back_touching_and_overlapping_instances():
    lab = disks((64, 96), [(20, 20), (20, 37), (45, 60), (45, 76)], 9)
    found = instances_from_maps((lab > 0).astype(np.float32), centre_map(lab))
    r = match_instances(lab, found)
    assert found.max() == 4 and r["precision"] == 1.0 and r["recall"] == 1.0
    assert r["mean_iou"] > 0.9
    chain = disks((40, 90), [(20, 15), (20, 30), (20, 45), (20, 60)], 10)   # a chain of fused primaries
    true = {k: (20.0, 15.0 * k, 10.0) for k in range(1, 5)}
    found = instances_from_maps((chain > 0).astype(np.float32), centre_map(chain, true))
    assert found.max() == 4 and match_instances(chain, found)["recall"] >= 0.75


def test_fragments_far_smaller_than_the_training_particles_are_dropped():
    from fitting.validate.detector import SegmentationSettings
    from fitting.validate.training import smallest_instance_area
    # training particles of radius 9 (area ~250 px), one cut by the frame (not counted)
    train = np.stack([disks((64, 96), [(20, 20), (40, 60), (2, 90)], 9)] * 3)
    floor = smallest_instance_area(train)
    assert 50 < floor < 70                                # a quarter of the whole particles' area
    assert smallest_instance_area(np.zeros((2, 32, 32), np.int32)) == SegmentationSettings().min_area
    # two particles, a 4 x 5 px sliver beside one of them and a particle's 4 x 5 px corner cut
    # by the frame: the sliver goes, the cut corner stays (a cut particle can show any area)
    fg = (disks((64, 96), [(20, 20), (40, 60)], 9) > 0).astype(np.float32)
    fg[5:9, 40:45] = 1.0
    fg[60:64, 0:5] = 1.0
    centre = centre_map(disks((64, 96), [(20, 20), (40, 60)], 9))
    assert instances_from_maps(fg, centre).max() == 4                   # the default keeps both
    found = instances_from_maps(fg, centre, SegmentationSettings(fragment_area=floor))
    assert found.max() == 3 and found[62, 2] > 0 and found[7, 42] == 0


def test_matching_at_iou_half():
    truth = disks((50, 100), [(25, 20), (25, 50), (25, 80)], 8)
    shifted = disks((50, 100), [(25, 21), (25, 58), (10, 10)], 8)   # exact-ish, IoU < 0.5, spurious
    r = match_instances(truth, shifted)
    assert r["true_positives"] == 1 and r["false_positives"] == 2 and r["false_negatives"] == 2
    assert r["precision"] == pytest.approx(1 / 3) and r["recall"] == pytest.approx(1 / 3)
    assert match_instances(truth, np.zeros_like(truth))["recall"] == 0.0
    with pytest.raises(ValueError):
        match_instances(truth, shifted, iou_threshold=0.3)


def test_size_distribution_and_jensen_shannon():
    d = np.array([10.0, 10.0, 20.0, 40.0])
    s = size_distribution(d)
    assert s["count"] == 4 and s["median"] == 15.0
    assert s["gmean"] == pytest.approx(np.exp(np.log(d).mean()))
    assert s["gsd"] == pytest.approx(np.exp(np.log(d).std()))
    bins = common_bins(d, d * 4)
    assert js_divergence(d, d, bins) == pytest.approx(0.0)
    assert js_divergence(d, d * 8, bins) == pytest.approx(1.0)
    assert js_divergence(d, [], bins) is None


# ---------------------------------------------------------------------------------- annotations
def _reference_png(tmp_path: Path, image: np.ndarray) -> Path:
    from fitting.core.files import atomic_save_png
    p = tmp_path / "ref.png"
    atomic_save_png(p, image)
    return p


def test_annotations_from_a_mask_png_and_from_coco(tmp_path):
    import cv2
    from pycocotools import mask as mask_utils

    from fitting.reference.loading import load_reference
    lab = disks((80, 120), [(30, 30), (40, 80)], 12)
    ref_path = _reference_png(tmp_path, np.where(lab > 0, 0.8, 0.2).astype(np.float32))
    ref = load_reference(ref_path, detect_bar=False)
    from fitting.validate.annotations import load_annotations
    cv2.imwrite(str(tmp_path / "mask.png"), lab.astype(np.uint16))
    assert np.array_equal(load_annotations(tmp_path / "mask.png", ref), lab)

    anns = []
    for k in (1, 2):
        rle = mask_utils.encode(np.asfortranarray((lab == k).astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        anns.append({"id": k, "image_id": 7, "category_id": 1, "iscrowd": 0, "segmentation": rle})
    anns.append({"id": 3, "image_id": 7, "category_id": 1, "iscrowd": 0,          # a polygon too
                 "segmentation": [[100, 60, 110, 60, 110, 70, 100, 70]]})
    coco = {"images": [{"id": 7, "file_name": "ref.png", "width": 120, "height": 80}],
            "annotations": anns, "categories": [{"id": 1, "name": "particle"}]}
    (tmp_path / "ref.json").write_text(json.dumps(coco))
    got = load_annotations(tmp_path / "ref.json", ref)
    assert got.max() == 3
    assert match_instances(lab, np.where(got == 3, 0, got))["recall"] == 1.0
    assert 90 <= (got == 3).sum() <= 130

    cv2.imwrite(str(tmp_path / "small.png"), lab[:40].astype(np.uint16))
    with pytest.raises(MatfitError, match="same image at its original size"):
        load_annotations(tmp_path / "small.png", ref)
    cv2.imwrite(str(tmp_path / "colour.png"), np.dstack([lab.astype(np.uint8)] * 3))
    with pytest.raises(MatfitError, match="colour channels"):
        load_annotations(tmp_path / "colour.png", ref)
    with pytest.raises(MatfitError, match="not found"):
        load_annotations(tmp_path / "nope.json", ref)


# ---------------------------------------------------------------------------------- training
TINY = dict(steps=120, batch=4, crop=64, channels=(8, 16, 32), checkpoint_every_s=0.0)


def test_training_can_be_cancelled_and_resumes_from_its_checkpoint(tmp_path):
    from fitting.validate.training import TrainingSettings, train_detector
    lab = np.stack([disks((64, 64), [(16 + 30 * (i % 2), 20), (40, 44)], 7) for i in range(4)])
    img = np.where(lab > 0, 0.8, 0.3).astype(np.float32)
    settings = TrainingSettings(**{**TINY, "steps": 40})
    cancel = CancelToken()

    def stop_at_20(ev):
        if ev.kind == "iteration" and ev.data.get("step", 0) >= 20:
            cancel.cancel()
    ck = tmp_path / "checkpoint.pt"
    with pytest.raises(Cancelled):
        train_detector(img, lab, settings, checkpoint=ck, on_event=stop_at_20, cancel=cancel)
    assert ck.is_file()
    logs = []
    det = train_detector(img, lab, settings, checkpoint=ck, on_event=lambda ev: logs.append(ev.message))
    assert det.meta["resumed_at"] >= 20 and any("resuming" in m for m in logs)
    assert not ck.exists()                            # a finished training leaves no checkpoint


@pytest.fixture(scope="module")
def rendered_reference(tmp_path_factory):
    """A recipe (spheres at the fit's pixel scale), one of its renders saved as the 'reference'
    and that render's instance mask as the user's annotations."""
    import cv2

    from fitting.core.files import atomic_save_png
    from fitting.materials.library import get_material
    from fitting.materials.recipe import Recipe
    from fitting.output.bulk import render_dataset
    from fitting.validate.trainset import load_training_set
    work = tmp_path_factory.mktemp("validate")
    mat = get_material("sem_polystyrene_spheres")
    x = mat.default_vector()
    rec = Recipe.from_vector(mat, x, render={"size": 96, "spp": 2, "layout_seed": 0},
                             reference={"working_scale": 96})
    rec.save(work / "recipe.json", mat)
    render_dataset(rec, work / "ref_set", 1, seed=99, workers=1, instances="primary")
    img, lab, disks = load_training_set(work / "ref_set")
    assert disks[0] and all(r > 3 for _, _, r in disks[0].values())
    for k, (cy, cx, r) in disks[0].items():          # an unhidden particle's centre is its mask's centroid
        ys, xs = np.nonzero(lab[0] == k)
        if len(ys) > 0.9 * np.pi * r * r and not ((ys == 0) | (xs == 0) | (ys == 95) | (xs == 95)).any():
            assert abs(ys.mean() - cy) < 1.0 and abs(xs.mean() - cx) < 1.0
    atomic_save_png(work / "reference.png", img[0])
    cv2.imwrite(str(work / "reference_mask.png"), lab[0].astype(np.uint16))
    return work


def test_validate_end_to_end_finds_the_particles_of_held_out_renders_and_the_reference(rendered_reference):
    """The whole command as a user runs it, with a tiny model: renders, training, detection,
    report, pictures; the detector finds the particles it was trained to find."""
    from fitting.cli.main import main
    work = rendered_reference
    out = work / "out"
    rc = main(["validate", str(work / "recipe.json"), str(work / "reference.png"), "-o", str(out),
               "--count", "12", "--steps", "250", "--quiet", "--annotations", str(work / "reference_mask.png")])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    for f in ("detector.pt", "detections.png", "detections.tif", "histogram.png"):
        assert (out / f).is_file(), f
    assert rep["training"]["train_images"] == 10 and rep["held_out"]["images"] == 2
    assert rep["held_out"]["precision"] >= 0.8 and rep["held_out"]["recall"] >= 0.8
    a = rep["annotations"]
    assert a["precision"] >= 0.8 and a["recall"] >= 0.8
    assert abs(a["gmean_error"]) < 0.15
    d = rep["detected"]
    assert d["count"] > 0 and sum(d["histogram"]["counts"]) == d["count"]
    assert rep["working_scale"] == 96 and rep["reference_px_per_work_px"] == pytest.approx(1.0)
    assert not (out / "checkpoint.pt").exists()


def test_validate_reuses_its_detector_and_rejects_bad_input(rendered_reference, capsys):
    from fitting.validate.run import ValidationSettings, validate_recipe
    from fitting.validate.training import TrainingSettings
    work = rendered_reference
    out = work / "out"
    assert (out / "detector.pt").is_file(), "runs after the end-to-end test"
    logs = []
    rep = validate_recipe(work / "recipe.json", work / "reference.png", out,
                          ValidationSettings(count=12, training=TrainingSettings(steps=250)),
                          on_event=lambda ev: logs.append(ev.message))
    assert any("reusing the detector" in m for m in logs) and rep.annotations is None
    with pytest.raises(MatfitError, match="at least 4"):
        validate_recipe(work / "recipe.json", work / "reference.png", out, ValidationSettings(count=2))
    with pytest.raises(MatfitError, match="not found"):
        validate_recipe(work / "recipe.json", work / "reference.png", out, annotations=work / "missing.png")
