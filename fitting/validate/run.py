"""``validate_recipe``: render a training set from a recipe, train a detector on it, apply the
detector to the reference and report what it finds beside the fit's own and the classical
measurement's particle sizes (and, with the user's annotations, how right it is).

Output folder::

    OUT/
      renders/          the bulk set (images, masks, COCO); resumable like ``matfit bulk``
      checkpoint.pt     while training only (a re-run resumes from it)
      detector.pt       the trained detector (a re-run with the same renders reuses it)
      detections.png    the detected particles outlined on the reference's working image
      detections.tif    their instance labels (16-bit, working-image pixels)
      histogram.png     diameters: detected, classical measurement, fit (and annotations)
      report.json       everything in numbers; written last

Every file is written atomically, so a cancelled or failed run leaves only whole files.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fitting.core.errors import MatfitError
from fitting.core.events import CancelToken, EventSink, FitEvent, _emit, null_sink
from fitting.validate.detector import ParticleDetector, equivalent_diameters
from fitting.validate.metrics import common_bins, js_divergence, match_instances, relative_error, size_distribution
from fitting.validate.training import TrainingSettings, train_detector, training_key

REPORT_FILE = "report.json"
DETECTOR_FILE = "detector.pt"
CHECKPOINT_FILE = "checkpoint.pt"

#: Share of the overall progress of each stage.
STAGES = {"render": (0.0, 0.35), "train": (0.35, 0.92), "detect": (0.92, 1.0)}


@dataclass
class ValidationSettings:
    """What ``validate_recipe`` renders and trains.

    Attributes
    ----------
    count : int
        Renders in the training set (the last ``held_out`` share is kept out of training).
    size : int or None
        Render side in px (default: the recipe's render size), at the fit's pixel scale.
    held_out : float
        Share of the renders the detector is tested on and not trained on (at least 2).
    seed : int
        Seed of the rendered set.
    workers : int or None
        Render processes (default: one per core).
    training : TrainingSettings
    """

    count: int = 200
    size: int | None = None
    held_out: float = 0.1
    seed: int = 0
    workers: int | None = None
    training: TrainingSettings = field(default_factory=TrainingSettings)


@dataclass
class ValidationReport:
    """The result of :func:`validate_recipe` (``to_dict`` is ``report.json``)."""

    out_dir: str
    material: str
    reference: str
    working_scale: int | None
    reference_px_per_work_px: float
    pixel_size_nm: float | None
    training: dict
    held_out: dict
    detected: dict
    measured: dict | None
    fitted: dict | None
    annotations: dict | None
    timings: dict
    files: dict
    labels: np.ndarray | None = field(default=None, repr=False)     # working-image instance labels
    overlay: np.ndarray | None = field(default=None, repr=False)    # RGB of detections.png
    histogram: np.ndarray | None = field(default=None, repr=False)  # RGB of histogram.png

    def to_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("labels", "overlay", "histogram")}
        d["format"] = "matfit-validation/1"
        return d


def validate_recipe(recipe, reference, out_dir, settings: ValidationSettings | None = None, *,
                    annotations: str | Path | None = None, on_event: EventSink | None = None,
                    cancel: CancelToken | None = None) -> ValidationReport:
    """Render, train, detect, report (see the module docstring for the files).

    Parameters
    ----------
    recipe : Recipe or path
        A fitted recipe (its ``reference.working_scale`` sets the pixel scale of detection).
    reference : path or ReferenceImage
        The micrograph the recipe was fitted to.
    out_dir : path
        Output folder (created; a re-run resumes the renders and the training).
    settings : ValidationSettings
    annotations : path, optional
        The user's labels of the reference (COCO JSON or 16-bit instance-mask PNG): adds
        precision and recall at IoU 0.5, the geometric-mean diameter's error and the
        Jensen-Shannon divergence of the diameter histograms.
    on_event, cancel
        Progress events (stages ``render``, ``train``, ``detect``) and cancellation.

    Returns
    -------
    ValidationReport
    """
    from fitting.core.files import atomic_write_text
    from fitting.materials.recipe import Recipe
    from fitting.output.bulk import render_dataset
    from fitting.validate.trainset import load_training_set
    s = settings or ValidationSettings()
    sink = on_event or null_sink
    cancel = cancel or CancelToken()
    if int(s.count) < 4:
        raise MatfitError(f"--count must be at least 4 (training and held-out renders), got {s.count}")
    if not isinstance(recipe, Recipe):
        recipe = Recipe.load(recipe)
    ref = _reference_for(recipe, reference)
    annotated = None
    if annotations is not None:       # a bad annotation file fails now, not after training
        from fitting.validate.annotations import load_annotations
        annotated = load_annotations(annotations, ref)
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    # ---------------------------------------------------------------- render
    t0 = time.time()
    _emit(sink, "stage", stage="render", progress=0.0, message=f"rendering {s.count} training images")
    render_dataset(recipe, out / "renders", s.count, size=s.size, seed=s.seed, workers=s.workers,
                   instances="primary", on_event=_scaled(sink, *STAGES["render"]), cancel=cancel)
    cancel.check("the validation")
    images, labels, disks = load_training_set(out / "renders", list(range(s.count)))
    timings["render"] = time.time() - t0

    # ---------------------------------------------------------------- train
    t0 = time.time()
    n_held = held_out_count(s)
    train_img, train_lab, train_disks = images[:-n_held], labels[:-n_held], disks[:-n_held]
    held_img, held_lab = images[-n_held:], labels[-n_held:]
    key = training_key(train_img, train_lab, s.training)
    detector = _reusable_detector(out / DETECTOR_FILE, key)
    if detector is None:
        _emit(sink, "stage", stage="train", progress=STAGES["train"][0],
              message=f"training the detector on {len(train_img)} renders ({s.training.steps} steps)")
        detector = train_detector(train_img, train_lab, s.training, disks=train_disks,
                                  checkpoint=out / CHECKPOINT_FILE,
                                  on_event=sink, cancel=cancel, progress_range=STAGES["train"])
        detector.meta.update(key=key, material=recipe.material_id, working_scale=_working_scale(recipe))
        detector.save(out / DETECTOR_FILE)
    else:
        _emit(sink, "log", stage="train", progress=STAGES["train"][1],
              message=f"reusing the detector trained on these renders ({out / DETECTOR_FILE})")
    timings["train"] = time.time() - t0

    # ---------------------------------------------------------------- detect
    t0 = time.time()
    _emit(sink, "stage", stage="detect", progress=STAGES["detect"][0],
          message=f"detecting particles in {n_held} held-out renders and the reference")
    held = held_out_scores(detector, held_img, held_lab)
    cancel.check("the validation")
    scale = _working_scale(recipe)
    if not scale:
        _emit(sink, "log", stage="detect", message="the recipe records no working scale (not a fit's recipe?): "
              "detecting at the reference's full resolution, where its particles may differ in size from the renders'")
    work = ref.working(max_side=scale) if scale else ref.cropped
    valid = ref.working_mask(max_side=scale) if scale else ref.cropped_mask
    found = detector.segment(work, valid)
    f = float(max(ref.cropped.shape)) / float(max(work.shape))      # reference px per working px
    d_found = equivalent_diameters(found, valid) * f
    measured, fitted = _fit_distributions(recipe, ref)
    pixel_size = (recipe.reference or {}).get("pixel_size_nm") or ref.pixel_size_nm
    samples = [d_found] + [np.asarray(x["diameters"]) for x in (measured, fitted) if x and x.get("diameters")]
    d_truth = None if annotated is None else equivalent_diameters(annotated, ref.cropped_mask)
    if d_truth is not None:
        samples.append(d_truth)
    bins = common_bins(*samples)
    ann = None if annotated is None else _annotation_scores(found, annotated, d_found, d_truth, bins)
    detected = {**size_distribution(d_found, bins), "instances": int(found.max()), "unit": "reference px"}
    detected["diameter_nm"] = _in_nm(detected, pixel_size)
    for dist in (measured, fitted):
        if dist is not None and dist.get("diameters"):
            dist["histogram"] = size_distribution(dist["diameters"], bins)["histogram"]
            dist["js_divergence_to_detected"] = js_divergence(d_found, dist["diameters"], bins)
            dist["gmean_ratio_detected"] = (None if not dist.get("gmean") or detected["gmean"] is None
                                            else detected["gmean"] / dist["gmean"])
    timings["detect"] = time.time() - t0

    # ---------------------------------------------------------------- write
    from fitting.core.files import atomic_save_png
    from fitting.measure.overlay import overlay_outlines
    from fitting.validate.figures import diameter_histogram_png
    overlay = overlay_outlines(work, found, valid=valid, thickness=2 if max(work.shape) > 600 else 1)
    atomic_save_png(out / "detections.png", overlay)
    _save_labels(out / "detections.tif", found)
    series = [("detected", d_found, (230, 70, 60))]
    if measured and measured.get("diameters"):
        series.append(("classical measurement", measured["diameters"], (70, 140, 230)))
    if fitted and fitted.get("diameters"):
        series.append(("fit", fitted["diameters"], (90, 190, 110)))
    if annotated is not None:
        series.append(("annotations", d_truth, (235, 190, 60)))
    histogram = diameter_histogram_png(series, bins)
    atomic_save_png(out / "histogram.png", histogram)
    files = {"renders": "renders", "detector": DETECTOR_FILE, "detections": "detections.png",
             "labels": "detections.tif", "histogram": "histogram.png", "report": REPORT_FILE}
    report = ValidationReport(
        out_dir=str(out), material=recipe.material_id, reference=str(ref.path), working_scale=scale,
        reference_px_per_work_px=f, pixel_size_nm=None if pixel_size is None else float(pixel_size),
        training={**{k: v for k, v in detector.meta.items() if k != "settings"},
                  "train_images": int(len(train_img)), "held_out_images": int(n_held)},
        held_out=held, detected=detected, measured=_strip(measured), fitted=_strip(fitted), annotations=ann,
        timings={k: round(v, 2) for k, v in timings.items()}, files=files, labels=found, overlay=overlay,
        histogram=histogram)
    import json
    atomic_write_text(out / REPORT_FILE, json.dumps(report.to_dict(), indent=1, default=_json_default) + "\n")
    _emit(sink, "finished", stage="detect", progress=1.0,
          message=_summary_line(report), data={"report": report.to_dict()})
    return report


def held_out_count(settings: ValidationSettings) -> int:
    """How many of the rendered images are kept out of training (the last ones)."""
    return max(2, int(round(settings.held_out * settings.count)))


def _scaled(sink: EventSink, p0: float, p1: float) -> EventSink:
    """``sink`` with each event's progress mapped from 0..1 into ``p0..p1``."""
    def scaled(ev: FitEvent) -> None:
        ev.progress = p0 + (p1 - p0) * float(ev.progress)
        sink(ev)
    return scaled


def _working_scale(recipe) -> int | None:
    v = (recipe.reference or {}).get("working_scale")
    return int(v) if v else None


def _reference_for(recipe, reference):
    """The reference as the fit saw it: the recipe's fitting region when the image has the size
    the recipe recorded (a region chosen in the window), else the automatic one."""
    from fitting.reference.loading import ReferenceImage, load_reference
    if isinstance(reference, ReferenceImage):
        return reference
    rec = recipe.reference or {}
    box, size = rec.get("crop_box"), rec.get("original_size")
    ref = load_reference(reference)
    if box and size and tuple(int(v) for v in size) == tuple(ref.original_size) and \
            tuple(int(v) for v in box) != tuple(ref.crop_box):
        ref = load_reference(reference, crop=tuple(int(v) for v in box))
    return ref


def _reusable_detector(path: Path, key: str) -> ParticleDetector | None:
    if not path.is_file():
        return None
    try:
        det = ParticleDetector.load(path)
    except MatfitError:
        return None
    return det if det.meta.get("key") == key else None


def held_out_scores(detector: ParticleDetector, images: np.ndarray, labels: np.ndarray) -> dict:
    """Precision and recall at IoU 0.5 over the held-out renders (instances pooled), and the
    detected against the true geometric-mean diameter."""
    tp = fp = fn = 0
    d_true, d_found = [], []
    for img, lab in zip(images, labels):
        found = detector.segment(img)
        r = match_instances(lab, found)
        tp, fp, fn = tp + r["true_positives"], fp + r["false_positives"], fn + r["false_negatives"]
        d_true.append(equivalent_diameters(lab))
        d_found.append(equivalent_diameters(found))
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 1.0
    st, sf = size_distribution(np.concatenate(d_true)), size_distribution(np.concatenate(d_found))
    return {"images": int(len(images)), "true_positives": tp, "false_positives": fp, "false_negatives": fn,
            "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "gmean_true_px": st["gmean"], "gmean_detected_px": sf["gmean"],
            "gmean_error": relative_error(sf["gmean"], st["gmean"])}


def _fit_distributions(recipe, ref) -> tuple[dict | None, dict | None]:
    """The classical measurement's and the fit's particle sizes (reference px) as the recipe
    recorded them; the classical measurement is made now when the recipe has none."""
    fit = recipe.fit or {}
    measured, fitted = fit.get("measured"), fit.get("fitted")
    if not measured or not measured.get("diameters"):
        from fitting.measure.particles import measure_particles
        m = measure_particles(ref.cropped, ref.cropped_mask)
        measured = {"diameters": [float(v) for v in m.diameters_px], **size_distribution(m.diameters_px)}
    return dict(measured), (dict(fitted) if fitted else None)


def _annotation_scores(found: np.ndarray, truth: np.ndarray, d_found, d_truth, bins) -> dict:
    """Detection against the user's labels at the labels' resolution (the detected labels are
    scaled up by nearest neighbour)."""
    h, w = truth.shape
    ys = (np.arange(h) * found.shape[0] / h).astype(np.int64)
    xs = (np.arange(w) * found.shape[1] / w).astype(np.int64)
    up = found[ys][:, xs]
    r = match_instances(truth, up)
    st, sf = size_distribution(d_truth), size_distribution(d_found)
    return {**r, "gmean_truth_px": st["gmean"], "gmean_detected_px": sf["gmean"],
            "median_truth_px": st["median"], "median_detected_px": sf["median"],
            "gmean_error": relative_error(sf["gmean"], st["gmean"]),
            "js_divergence": js_divergence(d_found, d_truth, bins)}


def _in_nm(d: dict, pixel_size_nm: float | None) -> dict | None:
    if pixel_size_nm is None:
        return None
    return {k: None if d.get(k) is None else d[k] * float(pixel_size_nm) for k in ("median", "gmean")}


def _strip(d: dict | None) -> dict | None:
    """A distribution without its per-particle list (the histogram keeps its shape)."""
    if d is None:
        return None
    return {k: v for k, v in d.items() if k != "diameters"}


def _save_labels(path: Path, labels: np.ndarray) -> None:
    import cv2

    from fitting.core.files import atomic_write_bytes
    if labels.max() > 65535:
        raise MatfitError("more than 65535 particles detected: the label image cannot hold them")
    ok, buf = cv2.imencode(".tif", labels.astype(np.uint16))
    if not ok:
        raise MatfitError("OpenCV could not encode the label image")
    atomic_write_bytes(path, buf.tobytes())


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _summary_line(r: ValidationReport) -> str:
    d = r.detected

    def f(v, fmt=".1f"):
        return "?" if v is None else format(v, fmt)
    line = (f"held-out renders: precision {r.held_out['precision']:.2f}, recall {r.held_out['recall']:.2f}; "
            f"reference: {d['count']} particles measured, median {f(d['median'])} px, "
            f"geometric mean {f(d['gmean'])} px, GSD {f(d['gsd'], '.2f')}")
    if r.annotations:
        a = r.annotations
        line += (f"; against the annotations: precision {a['precision']:.2f}, recall {a['recall']:.2f}, "
                 f"geometric mean off by {f(100 * a['gmean_error'] if a['gmean_error'] is not None else None, '+.0f')} %")
    return line
