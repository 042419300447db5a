"""The matfit main window: drop a micrograph, press Fit, watch it, tune and export the recipe.

The window owns the model (state), the engine client (the engine process) and the widgets; it
turns user actions into engine requests and engine replies into model updates. All engine work
runs in the engine process, so nothing here blocks the event loop for long.
"""
from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path

from PySide6.QtCore import QObject, QRegularExpression, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence, QRegularExpressionValidator
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QHBoxLayout, QLabel, QLineEdit, QMainWindow,
                               QMessageBox, QProgressBar, QPushButton, QSizePolicy, QSpinBox, QSplitter,
                               QToolButton, QVBoxLayout, QWidget)

from . import state
from .engine import EngineClient, EngineError
from .model import DEFAULT_FIT_OPTIONS, IMAGING_CHOICES, AppModel
from .qtfix import protect_singletons
from .widgets.banner import Banner
from .widgets.bulk_preview import BulkPreviewDialog
from .widgets.candidates import CandidateStrip
from .widgets.image_view import ImageView, ReferenceView, link_views
from .widgets.loss_plot import LossPlot
from .widgets.params import ParameterPanel
from .widgets.settings_dialog import SettingsDialog
from .widgets.size_plot import SizePanel
from .widgets.text import format_eta
from .widgets.validate_dialog import ValidateDialog

IMAGE_FILTER = "Micrographs (*.png *.tif *.tiff *.jpg *.jpeg *.bmp *.webp);;All files (*)"
RECIPE_FILTER = "matfit recipes (*.json);;All files (*)"
RENDER_DEBOUNCE_MS = 150
SETTINGS_KEYS = ("budget_s", "iterations", "size", "backbone")   # persisted FitOptions fields
NO_EXPORT_TIP = "This matfit cannot export Mitsuba scenes yet (fitting.output.export.export_mitsuba_scene is missing)."
IMAGING_LABELS = {"auto": "Auto", "sem": "SEM", "tem": "TEM", "optical": "Optical"}
IMAGING_TIP = ("The instrument that made the micrograph. Auto: the file's tags, else the image's own cues "
               "(the decision is shown beside this box after the fit has measured the particles). "
               "SEM, TEM or Optical: only that instrument's materials are candidates.")
PIXEL_SIZE_TIP = ("Pixel size of the micrograph in nanometres, for particle sizes in nm. Filled in from the "
                  "file's tags when it has them; empty = unknown (sizes in pixels).")
DECISION_WIDTH = 250   # two short lines beside the instrument box (the tooltip has the whole reason)
NOTHING_GAINED = "refinement gained nothing: the initial guess is the result"


def imaging_decision_text(choice: str, imaging: dict | None, short: bool = False) -> str:
    """'Auto → TEM/OPTICAL: particles darker than a light background (bright-field transmission)',
    or the user's choice ('TEM chosen by the user'); ``short`` drops a closing parenthesis."""
    if not imaging:
        return ""
    reason = str(imaging.get("reason") or "/".join(k.upper() for k in imaging.get("kinds") or []))
    if short and reason.endswith(")") and " (" in reason:
        reason = reason[:reason.rindex(" (")]
    if imaging.get("cue") == "user":
        return reason
    return f"{IMAGING_LABELS.get(choice, choice)} → {reason}"


def parse_pixel_size(text: str) -> float | None:
    """The pixel size field's value: a positive number of nm (comma or point), else None."""
    try:
        v = float(text.strip().replace(",", "."))
    except ValueError:
        return None
    return v if v > 0 else None


def _label(text: str, muted: bool = False) -> QLabel:
    label = QLabel(text)
    label.setStyleSheet("color: #909096;" if muted else "font-weight: 600;")
    return label


class _ReferenceLoader(QObject):
    """Loads a reference in a Python thread (image decoding and bar detection are numpy/PIL
    work that releases the GIL), and hands the result to the GUI thread by a queued signal."""

    loaded = Signal(int, object)   # ticket, ReferenceImage
    failed = Signal(int, object)   # ticket, exception

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.ticket = 0

    def load(self, path: str) -> int:
        self.ticket += 1
        ticket = self.ticket

        def work() -> None:
            from fitting.reference.loading import load_reference
            try:
                ref = load_reference(path)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a dialog
                self.failed.emit(ticket, exc)
            else:
                self.loaded.emit(ticket, ref)

        threading.Thread(target=work, name="matfit-load-reference", daemon=True).start()
        return ticket


class MainWindow(QMainWindow):
    referenceLoadFailed = Signal(str)   # the dialog's message

    def __init__(self, engine: EngineClient | None = None, start_engine: bool = True) -> None:
        protect_singletons()   # PySide6 6.12.0 on Python < 3.12: see app/qtfix.py
        super().__init__()
        self.setWindowTitle("matfit")
        self.resize(1400, 900)
        self.setAcceptDrops(True)
        self.model = AppModel(self)
        self.user_settings = self._load_user_settings()
        self.model.fit_options.update({k: self.user_settings[k] for k in SETTINGS_KEYS})
        self.model.set_imaging(self.user_settings["imaging"])
        self._owns_engine = engine is None   # a shared engine outlives this window
        self.engine = engine or EngineClient(self, device=self.user_settings["device"])
        self._loader = _ReferenceLoader(self)
        self._fit_request: int | None = None
        self._render_request: int | None = None
        self._render_again = False
        self._bulk_request: int | None = None
        self._bulk_dialog: BulkPreviewDialog | None = None
        self._validate_request: int | None = None
        self._validate_dialog: ValidateDialog | None = None
        self._restart_engine_when_idle = False
        self._shown_key: tuple | None = None     # (material, x) of the render on screen
        self._render_timer = QTimer(self, singleShot=True, interval=RENDER_DEBOUNCE_MS)
        self._render_timer.timeout.connect(self._render_preview)
        self._eta_timer = QTimer(self, interval=1000)
        self._eta_timer.timeout.connect(self._show_progress)
        self._shown_pair: tuple = (None, None)   # the arrays in the comparison views

        self._build_actions()
        self._build_ui()
        self._connect()
        self._update_actions()
        self._offer_autosave()
        if start_engine:
            self.engine.start()
            self._set_engine_label("engine: starting…")

    # ================================================================== construction
    def _build_actions(self) -> None:
        def action(text: str, slot, shortcut=None, tip: str = "") -> QAction:
            a = QAction(text, self)
            a.triggered.connect(lambda _=False: slot())
            if shortcut is not None:
                a.setShortcut(shortcut)
            if tip:
                a.setToolTip(tip)
                a.setStatusTip(tip)
            return a

        self.open_action = action("Open image…", self.open_image_dialog, QKeySequence.StandardKey.Open,
                                  "Open a micrograph (or drop one anywhere on the window)")
        self.open_recipe_action = action("Open recipe…", self.open_recipe_dialog, "Ctrl+Shift+O",
                                         "Open a recipe JSON: render it and show its parameters")
        self.fit_action = action("Fit", self.start_fit, "Ctrl+Return",
                                 "Fit the material library to the reference (no parameters needed)")
        self.cancel_action = action("Cancel", self.cancel_fit, "Esc", "Stop the running fit")
        self.export_recipe_action = action("Export recipe…", self.export_recipe_dialog, QKeySequence.StandardKey.Save,
                                           "Save the shown material and parameters as a recipe JSON")
        self.export_scene_action = action("Export Mitsuba scene…", self.export_scene_dialog,
                                          tip="Write the recipe as a Mitsuba scene folder")
        self.bulk_action = action("Preview bulk rendering…", self.show_bulk_preview,
                                  tip="Render the recipe with new particle layouts, with instance outlines")
        self.validate_action = action("Validate with a detector…", self.show_validate,
                                      tip="Train a particle detector on the recipe's renders and run it on the "
                                          "reference: does the recipe make useful training data?")
        self.validate_action.setIconText("Validate…")
        # Shorter words on the toolbar (the menus keep the full ones): the instrument controls
        # need the room.
        self.export_scene_action.setIconText("Export scene…")
        self.bulk_action.setIconText("Bulk preview…")
        self.settings_action = action("Settings…", self.show_settings, QKeySequence.StandardKey.Preferences,
                                      "Time budget, quality, CPU or GPU, descriptor backbone")
        self.quit_action = action("Quit", self.close, QKeySequence.StandardKey.Quit)
        self.fit_view_action = action("Fit images to view", self._fit_all_views, "Ctrl+0")
        self.scene_export_available = importlib.util.find_spec("fitting.output.export") is not None

        menu = self.menuBar().addMenu("&File")
        menu.addAction(self.open_action)
        self.recent_menu = menu.addMenu("Open &recent")
        self.recent_menu.aboutToShow.connect(self._fill_recent_menu)
        menu.addAction(self.open_recipe_action)
        menu.addSeparator()
        menu.addAction(self.export_recipe_action)
        menu.addAction(self.export_scene_action)
        menu.addSeparator()
        menu.addAction(self.settings_action)
        menu.addAction(self.quit_action)
        menu = self.menuBar().addMenu("F&it")
        menu.addAction(self.fit_action)
        menu.addAction(self.cancel_action)
        menu.addSeparator()
        menu.addAction(self.bulk_action)
        menu.addAction(self.validate_action)
        menu = self.menuBar().addMenu("&View")
        menu.addAction(self.fit_view_action)

        tb = self.addToolBar("Main")
        tb.setObjectName("mainToolbar")
        tb.setMovable(False)
        tb.setIconSize(QSize(16, 16))
        tb.addAction(self.open_action)
        tb.addAction(self.open_recipe_action)
        tb.addSeparator()
        self.fit_button = QToolButton()
        self.fit_button.setObjectName("fitButton")
        self.fit_button.setDefaultAction(self.fit_action)
        self.fit_button.setStyleSheet(
            "QToolButton#fitButton { background: #2f8a57; color: white; font-weight: bold; font-size: 14px;"
            " padding: 6px 26px; border-radius: 5px; }"
            "QToolButton#fitButton:hover { background: #36a064; }"
            "QToolButton#fitButton:disabled { background: #3a3a3e; color: #77777c; }")
        tb.addWidget(self.fit_button)
        tb.addAction(self.cancel_action)
        tb.addSeparator()
        # The instrument (one click) and the pixel size: what the fit is told about the micrograph.
        self.imaging_combo = QComboBox()
        self.imaging_combo.setObjectName("imagingCombo")
        for key in IMAGING_CHOICES:
            self.imaging_combo.addItem(IMAGING_LABELS[key], key)
        self.imaging_combo.setCurrentIndex(max(0, self.imaging_combo.findData(self.model.fit_options["imaging"])))
        self.imaging_combo.setToolTip(IMAGING_TIP)
        self.imaging_combo.currentIndexChanged.connect(
            lambda _i: self.model.set_imaging(self.imaging_combo.currentData()))
        self.imaging_combo.activated.connect(lambda _i: self._save_imaging())   # a user's choice is kept
        self.imaging_label = QLabel("")
        self.imaging_label.setObjectName("imagingDecision")
        self.imaging_label.setStyleSheet("color: #a8c8e8; font-size: 11px; padding-left: 4px;")
        self.imaging_label.setWordWrap(True)
        self.imaging_label.setFixedWidth(DECISION_WIDTH)
        self.pixel_size_edit = QLineEdit()
        self.pixel_size_edit.setObjectName("pixelSize")
        self.pixel_size_edit.setPlaceholderText("unknown")
        self.pixel_size_edit.setFixedWidth(72)
        self.pixel_size_edit.setToolTip(PIXEL_SIZE_TIP)
        self.pixel_size_edit.setValidator(QRegularExpressionValidator(
            QRegularExpression(r"^\s*\d{0,7}([.,]\d{0,7})?\s*$"), self.pixel_size_edit))
        self.pixel_size_edit.textChanged.connect(lambda text: self.model.set_pixel_size(parse_pixel_size(text)))
        tb.addWidget(_label("  Instrument ", muted=True))
        tb.addWidget(self.imaging_combo)
        tb.addWidget(self.imaging_label)
        tb.addWidget(_label(" Pixel size ", muted=True))
        tb.addWidget(self.pixel_size_edit)
        tb.addWidget(_label(" nm ", muted=True))
        tb.addSeparator()
        tb.addAction(self.export_recipe_action)
        tb.addAction(self.export_scene_action)
        tb.addAction(self.bulk_action)
        tb.addAction(self.validate_action)
        tb.addSeparator()
        tb.addAction(self.settings_action)

    def _build_ui(self) -> None:
        m = self.model
        # --- left: the reference and its region of interest
        self.reference_view = ReferenceView("Drop a micrograph here\nor use File › Open image…")
        self.roi_spins: list[QSpinBox] = []
        roi_row = QHBoxLayout()
        roi_row.addWidget(_label("Region", muted=True))
        for name in ("x0", "y0", "x1", "y1"):
            spin = QSpinBox()
            spin.setRange(0, 0)
            spin.setToolTip(f"Region of interest {name} (pixels; x1/y1 exclusive). Shift+drag on the image too.")
            spin.setKeyboardTracking(False)
            spin.valueChanged.connect(self._roi_spin_changed)
            self.roi_spins.append(spin)
            roi_row.addWidget(spin)
        self.roi_reset = QPushButton("Auto")
        self.roi_reset.setToolTip("Back to the automatic region (the data bar excluded)")
        self.roi_reset.clicked.connect(m.reset_roi)
        roi_row.addWidget(self.roi_reset)
        self.reference_info = QLabel("")
        self.reference_info.setWordWrap(True)
        self.reference_info.setStyleSheet("color: #a0a0a6;")
        self.show_outline_check = QCheckBox("Show measured particles")
        self.show_outline_check.setChecked(True)
        self.show_outline_check.setEnabled(False)
        self.show_outline_check.setToolTip("Outline (red) the particles the fit measured on the reference")
        self.show_outline_check.toggled.connect(self.reference_view.set_outline_visible)
        self.size_panel = SizePanel()
        self.size_panel.setMinimumHeight(170)
        left = QWidget()
        lv = QVBoxLayout(left)
        lv.setContentsMargins(6, 6, 6, 6)
        lv.addWidget(_label("Reference"))
        lv.addWidget(self.reference_view, 3)
        lv.addLayout(roi_row)
        lv.addWidget(self.reference_info)
        lv.addWidget(self.show_outline_check)
        lv.addWidget(_label("Particle sizes"))
        lv.addWidget(self.size_panel, 1)

        # --- middle: reference tile and render, linked; candidates and loss below
        self.tile_view = ImageView("The reference at the candidate's working scale appears here during a fit")
        self.render_view = ImageView("The render of the candidate appears here")
        link_views(self.tile_view, self.render_view)
        self.tile_title = _label("Reference (working scale)")
        self.render_title = _label("Render")
        for title in (self.tile_title, self.render_title):
            # long material ids must never widen the window
            title.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        pair = QHBoxLayout()
        for title, view in ((self.tile_title, self.tile_view), (self.render_title, self.render_view)):
            col = QVBoxLayout()
            col.addWidget(title)
            col.addWidget(view, 1)
            pair.addLayout(col, 1)
        self.candidate_strip = CandidateStrip()
        self.loss_plot = LossPlot()
        bottom = QHBoxLayout()
        bottom.addWidget(self.candidate_strip, 0)
        bottom.addWidget(self.loss_plot, 1)
        middle = QWidget()
        mv = QVBoxLayout(middle)
        mv.setContentsMargins(6, 6, 6, 6)
        mv.addLayout(pair, 5)
        mv.addWidget(_label("Candidates (distance to the reference) and refinement loss"))
        mv.addLayout(bottom, 2)

        # --- right: parameters
        self.parameter_panel = ParameterPanel(m)
        right = QWidget()
        rv = QVBoxLayout(right)
        rv.setContentsMargins(0, 0, 0, 0)
        rv.addWidget(_label("  Parameters"))
        rv.addWidget(self.parameter_panel, 1)

        splitter = QSplitter(Qt.Orientation.Horizontal)
        for w in (left, middle, right):
            splitter.addWidget(w)
        splitter.setSizes([320, 660, 420])
        splitter.setStretchFactor(1, 1)
        self.banner = Banner()
        central = QWidget()
        cv = QVBoxLayout(central)
        cv.setContentsMargins(0, 0, 0, 0)
        cv.setSpacing(0)
        cv.addWidget(self.banner)
        cv.addWidget(splitter, 1)
        self.setCentralWidget(central)

        # --- status bar: stage, progress, ETA, engine
        self.stage_label = QLabel("Open a micrograph to begin.")
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setFixedWidth(260)
        self.progress_bar.setTextVisible(True)
        self.progress_bar.setFormat("%p%")
        self.eta_label = QLabel("")
        self.eta_label.setMinimumWidth(80)
        self.engine_label = QLabel("engine: not started")
        self.engine_label.setStyleSheet("color: #909096;")
        sb = self.statusBar()
        sb.addWidget(self.stage_label, 1)
        sb.addPermanentWidget(self.progress_bar)
        sb.addPermanentWidget(self.eta_label)
        sb.addPermanentWidget(self.engine_label)

    def _connect(self) -> None:
        m = self.model
        m.referenceChanged.connect(self._show_reference)
        m.roiChanged.connect(self._show_roi)
        m.progressChanged.connect(self._show_progress)
        m.fitStateChanged.connect(self._fit_state_changed)
        m.candidatesChanged.connect(self._show_candidates)
        m.lossAppended.connect(self._loss_appended)
        m.candidatesReset.connect(self._reset_loss_plot)
        m.previewChanged.connect(self._show_comparison)
        m.referenceTileChanged.connect(self._show_comparison)
        m.fieldsChanged.connect(self._show_comparison)
        m.measurementChanged.connect(self._show_measurement)
        m.sizesChanged.connect(self._show_sizes)
        m.documentChanged.connect(self._document_changed)
        m.parameterEdited.connect(lambda _i: (self._show_comparison(), self._schedule_render()))
        m.logMessage.connect(self.stage_label.setText)
        self.reference_view.roiDrawn.connect(m.set_roi)
        self.candidate_strip.candidateClicked.connect(self._candidate_clicked)
        self._loader.loaded.connect(self._reference_loaded)
        self._loader.failed.connect(self._reference_failed)
        self.engine.ready.connect(self._engine_ready)
        self.engine.died.connect(self._engine_died)
        self.engine.busyChanged.connect(self._engine_busy)

    # ================================================================== settings
    def _load_user_settings(self) -> dict:
        s = state.settings()
        values = {k: s.value(f"fit/{k}", DEFAULT_FIT_OPTIONS.get(k)) for k in SETTINGS_KEYS}
        values["budget_s"] = float(values["budget_s"] or DEFAULT_FIT_OPTIONS["budget_s"])
        values["iterations"] = int(values["iterations"] or DEFAULT_FIT_OPTIONS["iterations"])
        values["size"] = int(values["size"] or DEFAULT_FIT_OPTIONS["size"])
        values["backbone"] = str(values["backbone"] or "vgg16-hed")
        values["device"] = str(s.value("engine/device", "auto"))
        imaging = str(s.value("fit/imaging", "auto") or "auto").lower()
        values["imaging"] = imaging if imaging in IMAGING_CHOICES else "auto"
        return values

    def _save_imaging(self) -> None:
        key = self.imaging_combo.currentData()
        s = state.settings()
        s.setValue("fit/imaging", key)
        s.sync()
        self.user_settings["imaging"] = key

    def set_fit_options(self, **options) -> None:
        """Override FitOptions fields for the next fits (tests, `matfit-gui --fit`); not saved.
        ``imaging`` and ``pixel_size_nm`` also set their controls."""
        imaging = options.pop("imaging", None)
        pixel = options.pop("pixel_size_nm", ...)
        self.model.fit_options.update(options)
        if imaging is not None:
            self.model.set_imaging(imaging)   # validates
            self.imaging_combo.setCurrentIndex(self.imaging_combo.findData(self.model.fit_options["imaging"]))
        if pixel is not ...:
            self.pixel_size_edit.setText("" if pixel is None else f"{float(pixel):g}")
            self.model.fit_options["pixel_size_nm"] = None if pixel is None else float(pixel)

    def fit_request_options(self) -> dict:
        """The options the next fit sends to the engine (FitOptions fields)."""
        return dict(self.model.fit_options)

    def show_settings(self) -> None:
        dialog = SettingsDialog({**self.user_settings, **self.model.fit_options},
                                self.engine.capabilities.get("backbones", {}), self)
        if dialog.exec() != SettingsDialog.DialogCode.Accepted:
            return
        self.apply_settings(dialog.values())

    def apply_settings(self, values: dict) -> None:
        s = state.settings()
        for k in SETTINGS_KEYS:
            s.setValue(f"fit/{k}", values[k])
            self.model.fit_options[k] = values[k]
        s.setValue("engine/device", values["device"])
        s.sync()
        device_changed = values["device"] != self.engine.device
        self.user_settings.update(values)
        if device_changed:
            self.engine.device = values["device"]
            if self.engine.busy:
                self._restart_engine_when_idle = True
                self.stage_label.setText("The engine switches device when the current job ends.")
            else:
                self.engine.restart()
                self._set_engine_label("engine: restarting…")

    # ================================================================== reference
    def load_reference_file(self, path: str | Path) -> None:
        """Load a micrograph (in the background); errors become a dialog."""
        path = str(path)
        self.stage_label.setText(f"loading {Path(path).name}…")
        self._loader.load(path)

    def _reference_loaded(self, ticket: int, ref) -> None:
        if ticket != self._loader.ticket:
            return   # a newer file was opened meanwhile
        state.add_recent_file(ref.path)
        self.model.set_reference(ref)
        self.stage_label.setText(f"{ref.name} loaded. Press Fit.")

    def _reference_failed(self, ticket: int, exc: Exception) -> None:
        if ticket != self._loader.ticket:
            return
        self.stage_label.setText("The image could not be opened.")
        self.show_exception("Cannot open the image", exc)
        self.referenceLoadFailed.emit(str(exc))

    def _show_reference(self) -> None:
        ref = self.model.reference
        self.reference_view.set_image(ref.pixels)
        w, h = ref.original_size
        for spin, top in zip(self.roi_spins, (w, h, w, h)):
            spin.blockSignals(True)
            spin.setRange(0, top)
            spin.blockSignals(False)
        info = [f"{ref.name} — {w} × {h} px, {ref.bit_depth}-bit {ref.mode}"]
        if ref.pixel_size_nm:
            info.append(f"pixel size {ref.pixel_size_nm:.3g} nm")
        # The file's pixel size (if it has one) in the field, where the user can correct it.
        self.pixel_size_edit.setText(f"{ref.pixel_size_nm:g}" if ref.pixel_size_nm else "")
        info.extend(ref.notes)
        self.reference_info.setText("\n".join(info))
        self.setWindowTitle(f"matfit — {ref.name}")
        self._update_actions()

    def _show_roi(self) -> None:
        ref, roi = self.model.reference, self.model.roi
        if ref is None or roi is None:
            return
        self.reference_view.set_regions(ref.crop_box, ref.bar_detected, roi)
        for spin, v in zip(self.roi_spins, roi):
            spin.blockSignals(True)
            spin.setValue(v)
            spin.blockSignals(False)
        self._update_actions()

    def _roi_spin_changed(self) -> None:
        self.model.set_roi(tuple(s.value() for s in self.roi_spins))
        self._show_roi()   # a rejected box snaps the spin boxes back

    # ================================================================== fit
    def start_fit(self) -> None:
        m = self.model
        if m.reference is None:
            self.show_error("Nothing to fit", "Open a micrograph first.", "Drop an image on the window.")
            return
        if m.fitting:
            return
        self._render_timer.stop()
        m.begin_fit()
        self.loss_plot.clear()
        payload = {"path": m.reference.path, "crop": m.crop_for_engine(), "options": self.fit_request_options(),
                   "autosave": str(state.autosave_path())}
        self._fit_request = self.engine.submit("fit", payload, on_event=m.apply_event,
                                               on_result=self._fit_finished, on_error=self._fit_failed,
                                               on_cancelled=self._fit_cancelled)

    def cancel_fit(self) -> None:
        """Stop the fit now: the window is usable at once; the engine stops within ~1 s."""
        if self._fit_request is None:
            return
        rid, self._fit_request = self._fit_request, None
        self.engine.cancel(rid)
        if self.model.fitting:
            self.model.end_fit("cancelled", "Fit cancelled.")

    def _fit_finished(self, result: dict) -> None:
        self._fit_request = None
        m = self.model
        m.apply_fit_result(result)
        self._shown_key = self._document_key()   # the result's preview is of the best's x_final
        self.loss_plot.set_series([c.losses for c in m.candidates], [c.material_id for c in m.candidates])
        summary = result.get("summary") or {}
        metrics = summary.get("metrics", {})
        text = f"Fit finished: {summary.get('best', '?')}"
        if metrics.get("distance_final") is not None:
            text += f", distance {metrics['distance_initial']:.3f} → {metrics['distance_final']:.3f}"
        if metrics.get("refinement_gained") is False:
            text += f"; {NOTHING_GAINED}"
        if result.get("autosaved"):
            text += f". Recipe autosaved to {result['autosaved']}"
        if result.get("autosave_error"):
            text += f". Autosave failed: {result['autosave_error']}"
        self.stage_label.setText(text)

    def _fit_failed(self, err: EngineError) -> None:
        self._fit_request = None
        self.model.end_fit("failed", err.message)
        self.show_engine_error("The fit failed", err)

    def _fit_cancelled(self) -> None:
        self.stage_label.setText("Fit cancelled.")

    def _fit_state_changed(self, fit_state: str) -> None:
        if fit_state == "running":
            self._eta_timer.start()
        else:
            self._eta_timer.stop()
        if fit_state in ("cancelled", "failed"):   # the previous result is back on screen
            m = self.model
            self.loss_plot.set_series([c.losses for c in m.candidates], [c.material_id for c in m.candidates])
        self._show_candidates()
        self._update_actions()

    def _show_progress(self) -> None:
        p = self.model.progress
        self.progress_bar.setValue(int(round(1000 * p.progress)))
        stage = {"start": "Starting", "load": "Loading", "measure": "Measuring", "describe": "Describing",
                 "rank": "Ranking",
                 "screen": "Screening", "refine": "Refining", "export": "Finishing"}.get(p.stage, p.stage.capitalize())
        if p.state == "running":
            self.stage_label.setText(f"{stage}: {p.message}" if p.message else stage)
        elif p.message and p.state in ("cancelled", "failed"):
            self.stage_label.setText(p.message)
        self.eta_label.setText(format_eta(self.model.eta_s()))

    def _show_candidates(self) -> None:
        m = self.model
        active = m.progress.refining if m.fitting else m.selected
        self.candidate_strip.show_candidates(m.candidates, active, selectable=not m.fitting)
        self.loss_plot.highlight = active
        self.loss_plot.update()
        self._show_titles()

    def _show_titles(self) -> None:
        m = self.model
        active = m.progress.refining if m.fitting else m.selected
        if m.fitting:
            scale = m.candidates[active].scale if active is not None and active < len(m.candidates) else None
        else:
            scale = m.working_scale if m.has_document else None
        if m.fields_shown:
            h, w = m.reference_field.shape[:2]
            self.tile_title.setText(f"Reference — {w} × {h} px field")
            self.render_title.setText(f"Render, same scale — {m.material.id}")
            tip = (f"The reference at the fit's working scale (longer side {scale} px; its central window when "
                   f"larger) beside a render of the same field, pixel size and scale: particles measure the same "
                   f"in pixels on both.")
            self.tile_title.setToolTip(tip)
            self.render_title.setToolTip(tip)
            return
        for title in (self.tile_title, self.render_title):
            title.setToolTip("")
        if m.fitting and active is not None and active < len(m.candidates):
            self.render_title.setText(f"Render — refining {m.candidates[active].material_id}")
        elif m.has_document:
            self.render_title.setText(f"Render — {m.material.id}" + (" (edited)" if m.edited else ""))
        self.tile_title.setText(f"Reference (working scale {scale} px)" if scale else "Reference (working scale)")

    def _show_comparison(self) -> None:
        """The side-by-side: the result's same-scale whole fields, else the tile and the preview."""
        left, right = self.model.comparison()
        if left is not self._shown_pair[0]:
            self.tile_view.set_image(left)
        if right is not self._shown_pair[1]:
            self.render_view.set_image(right)
        self._shown_pair = (left, right)
        self._show_titles()

    def _show_measurement(self) -> None:
        m = self.model
        o = m.outline
        if o is None:
            self.reference_view.set_outline(None)
        else:
            self.reference_view.set_outline(o.image, o.step, o.offset)
        self.show_outline_check.setEnabled(o is not None)
        text = imaging_decision_text(m.imaging_choice, m.imaging)
        # at most two lines: elide to twice the width
        self.imaging_label.setText(self.imaging_label.fontMetrics().elidedText(
            imaging_decision_text(m.imaging_choice, m.imaging, short=True), Qt.TextElideMode.ElideRight,
            2 * (DECISION_WIDTH - 8) - 40))
        self.imaging_label.setToolTip(text + (f"\n(decided by: {m.imaging.get('cue')}; candidate kinds: "
                                              f"{', '.join(m.imaging.get('kinds') or [])})" if m.imaging else ""))

    def _show_sizes(self) -> None:
        m = self.model
        self.size_panel.show_sizes(m.measured_sizes, m.fitted_sizes)
        if m.refinement_gained is False and m.fitted_sizes is not None:
            self.size_panel.fitted_label.setText(self.size_panel.fitted_label.text() + f" ({NOTHING_GAINED})")

    def _reset_loss_plot(self) -> None:
        m = self.model
        self.loss_plot.set_series([c.losses for c in m.candidates], [c.material_id for c in m.candidates])

    def _loss_appended(self, index: int, value: float) -> None:
        self.loss_plot.append(index, value, self.model.candidates[index].material_id)

    def _candidate_clicked(self, index: int) -> None:
        if not self.model.fitting:
            self.model.select_candidate(index)

    # ================================================================== document + previews
    def _document_key(self) -> tuple | None:
        m = self.model
        return (m.material.id, m.x.tobytes()) if m.has_document else None

    def preview_is_current(self) -> bool:
        """True when the render on screen shows the parameters in the panel."""
        return self._shown_key is not None and self._shown_key == self._document_key()

    def _document_changed(self) -> None:
        self._show_comparison()   # a reset brings the result's fields back
        self._show_candidates()
        self._update_actions()
        if self._document_key() != self._shown_key:
            self._schedule_render()

    def _schedule_render(self) -> None:
        self._render_timer.start()   # restarts: renders once the slider rests (debounce)

    def _render_preview(self) -> None:
        m = self.model
        if not m.has_document:
            return
        if self._render_request is not None and self.engine.is_pending(self._render_request):
            self._render_again = True   # one render at a time; the latest values follow
            return
        key = self._document_key()
        if key == self._shown_key:
            return
        payload = {**m.recipe_request(), "render": m.render_settings, "seed": m.render_seed}
        if m.document_source in ("fit", str(state.autosave_path())):
            # Edits of the last fit are the user's work too: keep the autosave in step.
            payload["autosave"] = str(state.autosave_path())
        self.parameter_panel.status.setText("rendering preview…")
        self._render_request = self.engine.submit(
            "render", payload, on_result=lambda r, key=key: self._preview_rendered(key, r),
            on_error=self._preview_failed)

    def _preview_rendered(self, key: tuple, result: dict) -> None:
        self._render_request = None
        if key == self._document_key():
            self._shown_key = key
            self.model.set_preview(result["image"])
            self.parameter_panel.status.setText(f"preview rendered in {result['seconds']:.2f} s")
        if self._render_again or key != self._document_key():
            self._render_again = False
            self._render_preview()

    def _preview_failed(self, err: EngineError) -> None:
        self._render_request = None
        self._render_again = False
        self.parameter_panel.status.setText("preview failed")
        self.show_engine_error("The preview could not be rendered", err)

    # ================================================================== recipes + exports
    def open_recipe(self, path: str | Path) -> None:
        path = str(path)
        self.stage_label.setText(f"opening recipe {Path(path).name}…")

        def opened(result: dict) -> None:
            self.model.open_recipe_result(result)
            self._shown_key = self._document_key()
            self.loss_plot.clear()
            notes = "; ".join(result.get("notes") or [])
            self.stage_label.setText(f"Recipe {Path(path).name}: {result['material']['id']}"
                                     + (f" ({notes})" if notes else ""))
            state.add_recent_file(path)
            if Path(path) == state.autosave_path():
                self.banner.hide()   # the offer is taken, whichever way

        ref = self.model.reference
        reference = None if ref is None else {"path": ref.path, "crop": self.model.crop_for_engine()}
        self.engine.submit("open_recipe", {"path": path, "reference": reference}, on_result=opened,
                           on_error=lambda e: self.show_engine_error("Cannot open the recipe", e))

    def export_recipe(self, path: str | Path, on_done=None) -> None:
        m = self.model
        if not m.has_document:
            return

        def saved(result: dict) -> None:
            self.stage_label.setText(f"Recipe saved to {result['path']}")
            state.add_recent_file(result["path"])
            if on_done is not None:
                on_done(result["path"])

        self.engine.submit("save_recipe", {**m.recipe_request(), "path": str(path)},
                           on_result=saved, on_error=lambda e: self.show_engine_error("Cannot save the recipe", e))

    def export_scene(self, folder: str | Path) -> None:
        m = self.model
        if not m.has_document:
            return
        self.engine.submit("export_scene", {**m.recipe_request(), "folder": str(folder)},
                           on_result=lambda r: self.stage_label.setText(f"Mitsuba scene written to {r['path']}"),
                           on_error=lambda e: self.show_engine_error("Cannot export the scene", e))

    def open_image_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open micrograph", "", IMAGE_FILTER)
        if path:
            self.load_reference_file(path)

    def open_recipe_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open recipe", "", RECIPE_FILTER)
        if path:
            self.open_recipe(path)

    def export_recipe_dialog(self) -> None:
        name = f"{self.model.material.id}_recipe.json" if self.model.has_document else "recipe.json"
        path, _ = QFileDialog.getSaveFileName(self, "Export recipe", name, RECIPE_FILTER)
        if path:
            self.export_recipe(path)

    def export_scene_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export Mitsuba scene to folder")
        if folder:
            self.export_scene(folder)

    def _fill_recent_menu(self) -> None:
        self.recent_menu.clear()
        files = state.recent_files()
        for path in files:
            a = self.recent_menu.addAction(Path(path).name)
            a.setToolTip(path)
            a.triggered.connect(lambda _=False, p=path: self.open_path(p))
        if not files:
            self.recent_menu.addAction("(none)").setEnabled(False)

    def open_path(self, path: str | Path) -> None:
        """A recipe (.json) is opened as a recipe, anything else as a micrograph."""
        if Path(path).suffix.lower() == ".json":
            self.open_recipe(path)
        else:
            self.load_reference_file(path)

    def _offer_autosave(self) -> None:
        path = state.autosave_path()
        what = state.describe_autosave(path)
        if what:
            self.banner.show_message(f"The recipe of your last fit was kept ({what}).",
                                     {"Open last fit": lambda: self.open_recipe(path)})

    # ================================================================== bulk preview
    def show_bulk_preview(self) -> None:
        if not self.model.has_document:
            return
        if self._bulk_dialog is None:
            self._bulk_dialog = BulkPreviewDialog(self.request_bulk_preview, self._cancel_bulk, self)
        self._bulk_dialog.show()
        self._bulk_dialog.raise_()

    def request_bulk_preview(self, seeds: list[int]) -> None:
        m, dialog = self.model, self._bulk_dialog

        def on_event(ev) -> None:
            d = ev.data
            dialog.add_render(d["index"], d["seed"], d["image"], d["mask"])

        def done(message: str) -> None:
            self._bulk_request = None
            dialog.finished_all(message)

        def failed(err: EngineError) -> None:
            done("failed")
            self.show_engine_error("The bulk preview failed", err)

        self._bulk_request = self.engine.submit(
            "bulk_preview", {"material": m.material.id, "x": m.x.copy(), "render": m.render_settings,
                             "seeds": seeds},
            on_event=on_event, on_result=lambda r: done(f"{r['count']} layouts rendered"), on_error=failed,
            on_cancelled=lambda: done("stopped"))

    def _cancel_bulk(self) -> None:
        if self._bulk_request is not None:
            self.engine.cancel(self._bulk_request)

    # ================================================================== validate
    def show_validate(self) -> None:
        m = self.model
        if not m.has_document or m.reference is None:
            return
        if self._validate_dialog is None:
            self._validate_dialog = ValidateDialog(self.request_validate, self._cancel_validate,
                                                   self.default_validation_folder(), self)
        self._validate_dialog.show()
        self._validate_dialog.raise_()

    def default_validation_folder(self) -> str:
        """A folder per reference and material in matfit's state folder."""
        m = self.model
        stem = Path(m.reference.path).stem if m.reference is not None else "reference"
        return str(state.state_dir() / "validation" / f"{stem}-{m.material.id}")

    def request_validate(self, settings: dict) -> None:
        m, dialog = self.model, self._validate_dialog

        def on_event(ev) -> None:
            if ev.kind in ("stage", "iteration", "log"):
                dialog.progress(ev.progress, ev.message, ev.eta_s)

        def done(result: dict) -> None:
            self._validate_request = None
            dialog.finished_with(result["report"], result["detections"], result["histogram"])
            self._update_actions()

        def failed(err: EngineError) -> None:
            self._validate_request = None
            dialog.stopped(f"failed: {err.message}" + (f" ({err.hint})" if err.hint else ""))
            self._update_actions()

        def cancelled() -> None:
            self._validate_request = None
            dialog.stopped("cancelled; run it again with the same folder to resume")
            self._update_actions()

        payload = {**m.recipe_request(), "reference": {"path": m.reference.path, "crop": m.crop_for_engine()},
                   **settings}
        self._validate_request = self.engine.submit("validate", payload, on_event=on_event, on_result=done,
                                                    on_error=failed, on_cancelled=cancelled)
        self._update_actions()

    def _cancel_validate(self) -> None:
        if self._validate_request is not None:
            self.engine.cancel(self._validate_request)

    # ================================================================== engine state
    def _engine_ready(self, info: dict) -> None:
        text = f"engine: {info.get('variant', '?')}, {info.get('threads')} render thread(s)"
        self._set_engine_label(text)
        problems = info.get("problems") or []
        if problems:
            self.engine_label.setText(text + " — problems")
            self.engine_label.setToolTip("\n".join(
                p["message"] + (f"\n  → {p['hint']}" if p.get("hint") else "") for p in problems))
        self._update_actions()

    def _engine_died(self, message: str) -> None:
        self._set_engine_label("engine: stopped (restarts with the next action)")
        if self.model.fitting:
            self._fit_request = None
            self.model.end_fit("failed", message)
        self._render_request = None
        self.show_error("The engine stopped", message,
                        "It is restarted with your next action. If this repeats, run `matfit doctor`.")

    def _engine_busy(self, busy: bool) -> None:
        if not busy and self._restart_engine_when_idle:
            self._restart_engine_when_idle = False
            self.engine.restart()
            self._set_engine_label("engine: restarting…")

    def _set_engine_label(self, text: str) -> None:
        self.engine_label.setText(text)
        self.engine_label.setToolTip("")

    def _update_actions(self) -> None:
        m = self.model
        fitting = m.fitting
        has_doc = m.has_document
        self.fit_action.setEnabled(m.reference is not None and not fitting)
        self.cancel_action.setEnabled(fitting)
        self.export_recipe_action.setEnabled(has_doc and not fitting)
        self.bulk_action.setEnabled(has_doc and not fitting)
        self.validate_action.setEnabled(has_doc and m.reference is not None and not fitting)
        self.parameter_panel.setEnabled(has_doc and not fitting)
        available = self.scene_export_available
        self.export_scene_action.setEnabled(available and has_doc and not fitting)
        self.export_scene_action.setToolTip("Write the recipe as a Mitsuba scene folder" if available
                                            else NO_EXPORT_TIP)
        for w in self.roi_spins:
            w.setEnabled(m.reference is not None and not fitting)
        self.imaging_combo.setEnabled(not fitting)
        self.pixel_size_edit.setEnabled(not fitting)
        self.roi_reset.setEnabled(m.reference is not None and not fitting and m.crop_for_engine() is not None)

    def _fit_all_views(self) -> None:
        for v in (self.reference_view, self.tile_view, self.render_view):
            v.fit_to_view()

    # ================================================================== errors
    def show_error(self, title: str, message: str, hint: str | None = None) -> None:
        text = message if not hint else f"{message}\n\n{hint}"
        QMessageBox.critical(self, title, text)

    def show_engine_error(self, title: str, err: EngineError) -> None:
        if err.kind == "EngineDied":
            return   # the `died` signal already shows one dialog for all of the requests
        if err.traceback:
            print(err.traceback, file=sys.stderr)
        self.show_error(title, err.message, err.hint)

    def show_exception(self, title: str, exc: BaseException) -> None:
        from fitting.core.errors import MatfitError
        if isinstance(exc, MatfitError):
            self.show_error(title, exc.message, exc.hint)
        else:
            self.show_error(title, f"{type(exc).__name__}: {exc}", "This is a bug in matfit; please report it.")

    # ================================================================== drag and drop, closing
    def dragEnterEvent(self, event) -> None:  # noqa: N802
        if any(u.isLocalFile() for u in event.mimeData().urls()):
            event.acceptProposedAction()

    def dragMoveEvent(self, event) -> None:  # noqa: N802
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:  # noqa: N802
        files = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if files:
            event.acceptProposedAction()
            self.open_path(files[0])

    def closeEvent(self, event) -> None:  # noqa: N802
        if self._bulk_dialog is not None:
            self._bulk_dialog.close()
        if self._validate_dialog is not None:
            self._validate_dialog.close()
        if self._owns_engine:
            self.engine.shutdown()
        super().closeEvent(event)

