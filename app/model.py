"""The window's state, separate from its widgets: widgets render it and call its methods.

Holds the reference and its region of interest, the fit's progress, the candidates (with the
loss history and the live preview), the material and parameter vector shown, and the fit
options. Engine replies and FitEvents are applied here; every change is announced by a signal.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from PySide6.QtCore import QObject, Signal

from fitting.reference.loading import ReferenceImage
from fitting.materials.params import GROUPS, ParamSpec


Box = tuple[int, int, int, int]   # x0, y0, x1, y1 (end exclusive), full-image pixels

# Options the window uses unless the settings (or a test) say otherwise. preview_every=1: the
# live render is the point of watching a fit, and a preview costs the engine only a copy.
DEFAULT_FIT_OPTIONS: dict = {"budget_s": 120.0, "iterations": 60, "size": 256, "preview_every": 1}


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

    # ------------------------------------------------------------------ reference + ROI
    def set_reference(self, ref: ReferenceImage) -> None:
        self.reference = ref
        self.roi = tuple(int(v) for v in ref.crop_box)
        self.referenceChanged.emit()
        self.roiChanged.emit()

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

    def begin_fit(self) -> None:
        # What the views showed, given back if this fit does not finish.
        self._before_fit = (self.candidates, self.selected, self.preview, self.reference_tile)
        self.progress = FitProgress(state="running", stage="start", message="starting the engine",
                                    started_at=time.monotonic())
        self.candidates = []
        self.selected = None
        self.preview = None
        self.reference_tile = None
        self.candidatesChanged.emit()
        self.previewChanged.emit()
        self.referenceTileChanged.emit()
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
            self.candidates, self.selected, self.preview, self.reference_tile = self._before_fit
            self.candidatesChanged.emit()
            self.previewChanged.emit()
            self.referenceTileChanged.emit()
        self._before_fit = None
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
            self.logMessage.emit(ev.message)
        self.progressChanged.emit()

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
        best = (self.fit_summary or {}).get("best")
        self.end_fit("finished", f"best: {best}" if best else "")
        self.select_candidate(int(result["best"]), preview=result.get("preview"))

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
        self.candidatesChanged.emit()
        self.referenceTileChanged.emit()
        self.documentChanged.emit()
        self.previewChanged.emit()

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
