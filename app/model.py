"""The window's state, separate from its widgets: widgets render it and call its methods.

Holds the reference and its region of interest, the fit's progress, the candidates (with the
loss history and the live preview), the material and parameter vector shown, the fit options,
the fit's instrument decision, the measured particles (outlines and size distribution) and the
same-scale reference/render fields of the result. Engine replies and FitEvents are applied here;
every change is announced by a signal.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from PySide6.QtCore import QObject, Signal

from fitting.reference.loading import ReferenceImage
from fitting.materials.params import GROUPS, ParamSpec


Box = tuple[int, int, int, int]   # x0, y0, x1, y1 (end exclusive), full-image pixels

# Options the window uses unless the settings (or a test) say otherwise. preview_every=1: the
# live render is the point of watching a fit, and a preview costs the engine only a copy.
DEFAULT_FIT_OPTIONS: dict = {"budget_s": 120.0, "iterations": 60, "size": 256, "preview_every": 1,
                             "imaging": "auto", "pixel_size_nm": None}
# FitOptions.imaging (fitting.measure.instrument.IMAGING_CHOICES, not imported: it loads scipy).
IMAGING_CHOICES = ("auto", "sem", "tem", "optical")


# The engine's own spec class: the window maps normalised values to physical ones exactly as
# the fit did (fitting.materials.params does not load torch).
ParamInfo = ParamSpec


@dataclass
class MaterialInfo:
    id: str
    title: str
    imaging: str
    geometry: str
    specs: list[ParamInfo]

    @classmethod
    def from_dict(cls, d: dict) -> "MaterialInfo":
        return cls(id=d["id"], title=d["title"], imaging=d["imaging"], geometry=d["geometry"],
                   specs=[ParamInfo(**s) for s in d["specs"]])

    def groups(self) -> dict[str, list[int]]:
        """Spec indices by group, groups in panel order."""
        out: dict[str, list[int]] = {g: [] for g in GROUPS}
        for i, s in enumerate(self.specs):
            out.setdefault(s.group, []).append(i)
        return out


@dataclass
class Candidate:
    """One of the fit's top materials as the window tracks it (during and after the fit)."""
    material_id: str
    title: str = ""
    distance: float | None = None          # ranking distance
    distance_final: float | None = None
    scale: int | None = None
    thumbnail: np.ndarray | None = None    # uint8, from the "candidates" event
    reference_tile: np.ndarray | None = None
    losses: list[float] = field(default_factory=list)
    material: MaterialInfo | None = None   # after the fit
    x_initial: np.ndarray | None = None
    x_final: np.ndarray | None = None


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass
class SizeStats:
    """One particle population of the size panel, in reference pixels (nm when the pixel size is known)."""
    count: int
    gmean: float | None            # geometric mean diameter, reference px
    gsd: float | None
    coverage: float | None
    diameters: list[float]         # reference px
    pixel_size_nm: float | None = None

    @property
    def gmean_nm(self) -> float | None:
        return None if self.gmean is None or not self.pixel_size_nm else self.gmean * self.pixel_size_nm

    @classmethod
    def from_measurement(cls, d: dict, pixel_size_nm: float | None = None) -> "SizeStats":
        """From the measurement event's ``measured`` (``diameter_px`` {median, gmean, gsd}, ``diameters_px``)."""
        dp = d.get("diameter_px") or {}
        return cls(count=int(d.get("count") or 0), gmean=_num(dp.get("gmean")), gsd=_num(dp.get("gsd")),
                   coverage=_num(d.get("coverage")), diameters=[float(v) for v in d.get("diameters_px") or []],
                   pixel_size_nm=_num(pixel_size_nm))

    @classmethod
    def from_summary(cls, d: dict) -> "SizeStats":
        """From a fit summary's (or recipe's) ``measured`` / ``fitted`` dict."""
        return cls(count=int(d.get("count") or 0), gmean=_num(d.get("gmean")), gsd=_num(d.get("gsd")),
                   coverage=_num(d.get("coverage")), diameters=[float(v) for v in d.get("diameters") or []],
                   pixel_size_nm=_num(d.get("pixel_size_nm")))


@dataclass
class Outline:
    """The measured particles' outlines over the reference: ``image`` (uint8, non-zero = outline)
    pixel (r, c) is reference pixel (offset_y + r * step, offset_x + c * step)."""
    image: np.ndarray
    step: int
    offset: tuple[int, int]   # x0, y0 of the fitting region


@dataclass
class FitProgress:
    state: str = "idle"        # idle, running, finished, failed, cancelled
    stage: str = ""
    message: str = ""
    progress: float = 0.0
    eta_s: float | None = None
    started_at: float = 0.0
    refining: int | None = None   # index of the candidate being refined


class AppModel(QObject):
    referenceChanged = Signal()
    roiChanged = Signal()
    progressChanged = Signal()
    fitStateChanged = Signal(str)
    candidatesChanged = Signal()
    candidatesReset = Signal()               # a new candidate list during a fit (loss curves redrawn)
    lossAppended = Signal(int, float)        # candidate index, loss
    previewChanged = Signal()                # the render shown beside the reference
    referenceTileChanged = Signal()          # the reference crop shown beside the render
    documentChanged = Signal()               # material / parameter set replaced (rebuild panel)
    parameterEdited = Signal(int)            # one value changed by the user (index)
    logMessage = Signal(str)
    measurementChanged = Signal()            # instrument decision and measured outlines
    sizesChanged = Signal()                  # measured / fitted size distributions
    fieldsChanged = Signal()                 # the result's same-scale reference and render fields

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.reference: ReferenceImage | None = None
        self.roi: Box | None = None
        self.fit_options: dict = dict(DEFAULT_FIT_OPTIONS)
        self.progress = FitProgress()
        self._before_fit: tuple | None = None
        self.candidates: list[Candidate] = []
        self.selected: int | None = None           # candidate shown after the fit
        self.preview: np.ndarray | None = None     # uint8 render beside the reference
        self.reference_tile: np.ndarray | None = None
        # The document: what the parameter panel edits and the exports write.
        self.material: MaterialInfo | None = None
        self.x: np.ndarray | None = None           # normalised parameter vector shown
        self.x_fitted: np.ndarray | None = None    # what "reset" returns to
        self.render_settings: dict = {}            # size, spp, layout_seed of the document
        self.render_seed: int = 0
        self.document_source: str = ""             # "fit" or a recipe path
        self.base_recipe: dict | None = None       # the fit's or the opened recipe (JSON dict)
        self.working_scale: int | None = None      # reference scale the document was fitted at
        self.fit_summary: dict | None = None
        # Measurement and result views of the last fit.
        self.imaging: dict | None = None           # the instrument decision {kind, kinds, cue, reason, ...}
        self.imaging_choice: str = "auto"          # what that fit was asked for
        self.outline: Outline | None = None        # measured particles, over the reference
        self.measured_sizes: SizeStats | None = None
        self.fitted_sizes: SizeStats | None = None
        self.refinement_gained: bool | None = None
        self.reference_field: np.ndarray | None = None   # uint8, the reference's working field
        self.render_field: np.ndarray | None = None      # uint8, same shape, pixel size and scale
        self.field_material: str | None = None           # the material render_field shows
        self._fit_crop: Box | None = None
        self._fit_pixel_size_nm: float | None = None
        self._finished_data: dict = {}

    # ------------------------------------------------------------------ reference + ROI
    def set_reference(self, ref: ReferenceImage) -> None:
        self.reference = ref
        self.roi = tuple(int(v) for v in ref.crop_box)
        # A typed pixel size was for the previous image; the new one's own (if any) is used.
        self.fit_options["pixel_size_nm"] = None
        # The measurement belongs to the previous image.
        self.outline, self.measured_sizes, self.fitted_sizes, self.imaging = None, None, None, None
        self.referenceChanged.emit()
        self.roiChanged.emit()
        self.measurementChanged.emit()
        self.sizesChanged.emit()

    # ------------------------------------------------------------------ instrument + pixel size
    def set_imaging(self, choice: str) -> None:
        """The instrument for the next fits: "auto", or "sem" / "tem" / "optical" (candidates of that kind only)."""
        choice = (choice or "auto").lower()
        if choice not in IMAGING_CHOICES:
            raise ValueError(f"imaging must be one of {', '.join(IMAGING_CHOICES)}, got {choice!r}")
        self.fit_options["imaging"] = choice

    def set_pixel_size(self, nm: float | None) -> None:
        """The pixel size the user typed (nm); None or 0 = unknown. The file's own value is left
        to the file (None is sent, and the recipe records it as from the file's tags)."""
        v = _num(nm)
        v = v if v is not None and v > 0 else None
        own = self.reference.pixel_size_nm if self.reference is not None else None
        if v is not None and own and math.isclose(v, float(own), rel_tol=1e-3):
            v = None
        self.fit_options["pixel_size_nm"] = v

    def pixel_size_nm(self) -> float | None:
        """The pixel size the next fit uses: the typed one, else the file's, else None."""
        typed = _num(self.fit_options.get("pixel_size_nm"))
        if typed:
            return typed
        return _num(self.reference.pixel_size_nm) if self.reference is not None else None

    def set_roi(self, box: Box) -> None:
        """Clamp to the image and keep at least 16 px a side (what load_reference accepts)."""
        if self.reference is None:
            return
        w, h = self.reference.original_size
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        x0, x1 = sorted((max(0, min(w, x0)), max(0, min(w, x1))))
        y0, y1 = sorted((max(0, min(h, y0)), max(0, min(h, y1))))
        if x1 - x0 < 16 or y1 - y0 < 16:
            return
        if (x0, y0, x1, y1) != self.roi:
            self.roi = (x0, y0, x1, y1)
            self.roiChanged.emit()

    def reset_roi(self) -> None:
        if self.reference is not None:
            self.set_roi(self.reference.crop_box)

    def crop_for_engine(self) -> Box | None:
        """None when the ROI is the automatic one, so the engine records its own detection."""
        if self.reference is None or self.roi == tuple(self.reference.crop_box):
            return None
        return self.roi

    # ------------------------------------------------------------------ fit progress
    @property
    def fitting(self) -> bool:
        return self.progress.state == "running"

    _VIEW_STATE = ("candidates", "selected", "preview", "reference_tile", "imaging", "imaging_choice", "outline",
                   "measured_sizes", "fitted_sizes", "refinement_gained", "reference_field", "render_field",
                   "field_material")

    def begin_fit(self) -> None:
        # What the views showed, given back if this fit does not finish.
        self._before_fit = tuple(getattr(self, k) for k in self._VIEW_STATE)
        self.progress = FitProgress(state="running", stage="start", message="starting the engine",
                                    started_at=time.monotonic())
        self.candidates = []
        self.selected = None
        self.preview = None
        self.reference_tile = None
        self.imaging_choice = str(self.fit_options.get("imaging") or "auto")
        self.imaging = self.outline = self.measured_sizes = self.fitted_sizes = None
        self.refinement_gained = None
        self.reference_field = self.render_field = self.field_material = None
        self._finished_data = {}
        self._fit_crop = self.roi
        self._fit_pixel_size_nm = self.pixel_size_nm()
        self.candidatesChanged.emit()
        self.previewChanged.emit()
        self.referenceTileChanged.emit()
        self.measurementChanged.emit()
        self.sizesChanged.emit()
        self.fieldsChanged.emit()
        self.fitStateChanged.emit("running")
        self.progressChanged.emit()

    def end_fit(self, state: str, message: str = "") -> None:
        self.progress.state = state
        self.progress.refining = None
        if message:
            self.progress.message = message
        if state == "finished":
            self.progress.progress = 1.0
        elif self._before_fit is not None:
            for k, v in zip(self._VIEW_STATE, self._before_fit):
                setattr(self, k, v)
            self.candidatesChanged.emit()
            self.previewChanged.emit()
            self.referenceTileChanged.emit()
            self.measurementChanged.emit()
            self.sizesChanged.emit()
            self.fieldsChanged.emit()
        self._before_fit = None
        self._finished_data = {}
        self.progress.eta_s = None
        self.fitStateChanged.emit(state)
        self.progressChanged.emit()

    def eta_s(self) -> float | None:
        """The engine's ETA when it gives one, else what is left of the time budget."""
        p = self.progress
        if p.eta_s is not None:
            return p.eta_s
        if p.state != "running":
            return None
        budget = float(self.fit_options.get("budget_s", DEFAULT_FIT_OPTIONS["budget_s"]))
        return max(0.0, budget - (time.monotonic() - p.started_at))

    def apply_event(self, ev) -> None:
        """Fold one fitting.events.FitEvent of the running fit into the state."""
        if self.progress.state != "running":
            return   # a late event of a cancelled fit
        p = self.progress
        p.stage = ev.stage or p.stage
        if ev.message:
            p.message = ev.message
        p.progress = max(p.progress, float(ev.progress))
        p.eta_s = ev.eta_s
        data = ev.data or {}
        if ev.kind == "candidates":
            # sent after ranking (the materials to screen) and again after screening (the ones
            # refined in full): a material that stays keeps its loss curve
            tiles = data.get("reference_tiles", {})
            thumbs = data.get("thumbnails", {})
            before = {c.material_id: c.losses for c in self.candidates}
            self.candidates = [Candidate(material_id=r["material"], title=r.get("title", ""),
                                         distance=r.get("distance"), scale=r.get("scale"),
                                         thumbnail=thumbs.get(r["material"]),
                                         reference_tile=tiles.get(r["material"]),
                                         losses=list(before.get(r["material"], [])))
                               for r in data.get("ranking", []) if r["material"] in thumbs]
            self.progress.refining = None
            self.candidatesReset.emit()
            self.candidatesChanged.emit()
        elif ev.kind == "stage" and "candidate" in data:
            self._set_refining(int(data["candidate"]))
        elif ev.kind == "iteration":
            i = int(data.get("candidate", 0))
            self._set_refining(i)
            if i < len(self.candidates):
                self.candidates[i].losses.append(float(data["loss"]))
                self.lossAppended.emit(i, float(data["loss"]))
        elif ev.kind == "preview" and "image" in data:
            self._set_refining(int(data.get("candidate", 0)))
            self.preview = data["image"]
            self.previewChanged.emit()
        elif ev.kind == "log":
            if "measured" in data or "imaging" in data:
                self._apply_measurement(data)
            self.logMessage.emit(ev.message)
        elif ev.kind == "finished":
            self._finished_data = data   # the same-scale fields; the result follows
        self.progressChanged.emit()

    def _apply_measurement(self, data: dict) -> None:
        """The measurement event: the instrument decision, the outlines, the measured sizes."""
        self.imaging = data.get("imaging") or self.imaging
        measured = data.get("measured")
        if measured:
            outline = measured.get("outline")
            if outline is not None and np.asarray(outline).ndim == 2:
                crop = self._fit_crop or (0, 0, 0, 0)
                self.outline = Outline(np.asarray(outline), max(1, int(measured.get("outline_step") or 1)),
                                       (int(crop[0]), int(crop[1])))
            self.measured_sizes = SizeStats.from_measurement(measured, self._fit_pixel_size_nm)
            self.fitted_sizes = None
        self.measurementChanged.emit()
        self.sizesChanged.emit()

    def _set_refining(self, i: int) -> None:
        if i == self.progress.refining:
            return
        self.progress.refining = i
        if i < len(self.candidates) and self.candidates[i].reference_tile is not None:
            self.reference_tile = self.candidates[i].reference_tile
            self.referenceTileChanged.emit()
        self.candidatesChanged.emit()

    def apply_fit_result(self, result: dict) -> None:
        """The engine's fit result: candidates become selectable, the best one is shown."""
        by_id = {c.material_id: c for c in self.candidates}
        merged: list[Candidate] = []
        for r in result["candidates"]:
            mat = MaterialInfo.from_dict(r["material"])
            c = by_id.get(mat.id) or Candidate(material_id=mat.id, title=mat.title)
            c.title = mat.title
            c.material = mat
            c.x_initial = np.asarray(r["x_initial"], np.float32)
            c.x_final = np.asarray(r["x_final"], np.float32)
            # Both distances on the fit's fixed evaluation seeds: comparable, unlike the ranking's.
            c.distance = r["distance_initial"]
            c.distance_final = r["distance_final"]
            c.scale = r["scale"]
            c.losses = list(r["history"])
            if r.get("reference_tile") is not None:
                c.reference_tile = r["reference_tile"]
            merged.append(c)
        self.candidates = merged
        self.fit_summary = result.get("summary")
        self.render_settings = dict(result["render"])
        self.render_seed = int(result["seed"])
        self.document_source = "fit"
        self.base_recipe = result["recipe"]
        summary = self.fit_summary or {}
        self._apply_result_views(result, summary)
        best = summary.get("best")
        self.end_fit("finished", f"best: {best}" if best else "")
        self.select_candidate(int(result["best"]), preview=result.get("preview"))
        self.measurementChanged.emit()
        self.sizesChanged.emit()
        self.fieldsChanged.emit()

    def _apply_result_views(self, result: dict, summary: dict) -> None:
        """Sizes, instrument and the same-scale fields of a finished fit (from its result, else
        from its "finished" event)."""
        fin = self._finished_data or {}
        ref_field = result.get("reference_field")
        ren_field = result.get("render_field")
        if ref_field is None or ren_field is None:
            ref_field, ren_field = fin.get("reference_field"), fin.get("render_field")
        if ref_field is not None and ren_field is not None and np.shape(ref_field) == np.shape(ren_field):
            self.reference_field, self.render_field = np.asarray(ref_field), np.asarray(ren_field)
            self.field_material = summary.get("best")
        else:
            self.reference_field = self.render_field = self.field_material = None
        self.imaging = summary.get("imaging") or self.imaging
        if summary.get("measured"):
            self.measured_sizes = SizeStats.from_summary(summary["measured"])
        self.fitted_sizes = SizeStats.from_summary(summary["fitted"]) if summary.get("fitted") else None
        self.refinement_gained = (summary.get("metrics") or {}).get("refinement_gained")
        self._finished_data = {}

    @property
    def fields_shown(self) -> bool:
        """Whether the comparison shows the result's whole fields (the fit's best, unedited)
        rather than the reference tile and the (slider) preview."""
        if self.reference_field is None or self.render_field is None or self.fitting:
            return False
        if self.selected is None or self.selected >= len(self.candidates):
            return False
        return self.candidates[self.selected].material_id == self.field_material and not self.edited

    def comparison(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(reference, render) for the side-by-side: the same-scale whole fields of the result
        when :attr:`fields_shown`, else the reference tile and the preview."""
        if self.fields_shown:
            return self.reference_field, self.render_field
        return self.reference_tile, self.preview

    def select_candidate(self, i: int, preview: np.ndarray | None = None) -> None:
        c = self.candidates[i]
        if c.material is None:
            return
        self.selected = i
        self.material = c.material
        self.x = c.x_final.copy()
        self.x_fitted = c.x_final.copy()
        self.reference_tile = c.reference_tile
        self.working_scale = c.scale
        self.preview = preview
        self.candidatesChanged.emit()
        self.referenceTileChanged.emit()
        self.documentChanged.emit()
        self.previewChanged.emit()

    # ------------------------------------------------------------------ document
    def open_recipe_result(self, result: dict) -> None:
        """A recipe opened by the engine becomes the document (the fit's candidates go)."""
        self.candidates = []
        self.selected = None
        self.material = MaterialInfo.from_dict(result["material"])
        self.x = np.asarray(result["x"], np.float32).copy()
        self.x_fitted = self.x.copy()
        self.render_settings = dict(result["render"])
        self.render_seed = int(result["seed"])
        self.document_source = result["path"]
        self.base_recipe = result["recipe"]
        self.preview = result["image"]
        self.reference_tile = result.get("reference_tile")
        self.working_scale = result.get("working_scale")
        self.reference_field = self.render_field = self.field_material = None
        # The recipe's own record of its fit, when it has one: sizes and instrument.
        fit = (self.base_recipe or {}).get("fit") or {}
        if isinstance(fit, dict) and fit.get("measured"):
            self.measured_sizes = SizeStats.from_summary(fit["measured"])
            self.fitted_sizes = SizeStats.from_summary(fit["fitted"]) if fit.get("fitted") else None
            self.refinement_gained = fit.get("refinement_gained")
        else:   # the measured sizes (of the open reference) stay; the last fit's result does not
            self.fitted_sizes, self.refinement_gained = None, None
        self.candidatesChanged.emit()
        self.referenceTileChanged.emit()
        self.documentChanged.emit()
        self.previewChanged.emit()
        self.sizesChanged.emit()
        self.fieldsChanged.emit()

    @property
    def has_document(self) -> bool:
        return self.material is not None and self.x is not None

    def set_parameter(self, index: int, u: float) -> None:
        if self.x is None:
            return
        u = min(max(float(u), 0.0), 1.0)
        if abs(float(self.x[index]) - u) < 1e-7:
            return
        self.x[index] = u
        self.parameterEdited.emit(index)

    def reset_parameters(self) -> None:
        if self.x_fitted is None:
            return
        self.x = self.x_fitted.copy()
        self.documentChanged.emit()

    @property
    def edited(self) -> bool:
        return self.x is not None and self.x_fitted is not None and not np.allclose(self.x, self.x_fitted)

    def recipe_request(self) -> dict:
        """What the engine needs to write the shown document as a recipe (save, export, autosave)."""
        c = self.candidates[self.selected] if self.selected is not None else None
        candidate = None if c is None else {"x_initial": c.x_initial, "x_final": c.x_final, "scale": c.scale}
        return {"material": self.material.id, "x": self.x.copy(), "base": self.base_recipe, "candidate": candidate}

    def set_preview(self, image: np.ndarray) -> None:
        self.preview = image
        self.previewChanged.emit()
