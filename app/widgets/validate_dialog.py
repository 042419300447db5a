"""Validate the recipe: train a particle detector on its renders and run it on the reference.

Thin over the engine's ``validate`` request: the dialog collects the settings, shows progress
(with ETA) and, at the end, the detected particles outlined on the reference, the diameter
histograms and the numbers. Non-modal; the work runs in the engine process."""
from __future__ import annotations

from typing import Callable

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QDialog, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QProgressBar,
                               QPushButton, QSpinBox, QVBoxLayout, QWidget)

from .qimage import to_pixmap
from .text import format_eta

PICTURE = 360


class ValidateDialog(QDialog):
    """``start(settings)`` runs a validation (settings: ``out``, ``count``, ``steps``,
    ``annotations``); ``progress``, ``finished_with`` and ``failed`` report back."""

    def __init__(self, start: Callable[[dict], None], cancel: Callable[[], None], default_out: str,
                 parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Validate the recipe with a detector")
        self._start, self._cancel = start, cancel
        self.report: dict | None = None
        self.out = QLineEdit(default_out)
        browse = QPushButton("…")
        browse.clicked.connect(self._browse_out)
        self.count = QSpinBox()
        self.count.setRange(4, 5000)
        self.count.setValue(200)
        self.count.setToolTip("Renders of the recipe to train on (10 % are held out to test the detector)")
        self.steps = QSpinBox()
        self.steps.setRange(10, 100_000)
        self.steps.setValue(1200)
        self.steps.setToolTip("Training steps of 8 crops each")
        self.annotations = QLineEdit()
        self.annotations.setPlaceholderText("optional: your labels of the reference (COCO JSON or 16-bit mask PNG)")
        browse_ann = QPushButton("…")
        browse_ann.clicked.connect(self._browse_annotations)
        form = QFormLayout()
        form.addRow("Output folder", _row(self.out, browse))
        form.addRow("Training renders", self.count)
        form.addRow("Training steps", self.steps)
        form.addRow("Annotations", _row(self.annotations, browse_ann))
        self.run_button = QPushButton("Validate")
        self.run_button.setObjectName("validateRun")
        self.run_button.clicked.connect(self.run)
        self.stop_button = QPushButton("Cancel")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self._cancel)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.status = QLabel("Renders the recipe, trains a detector on the renders (minutes on a CPU) and "
                             "runs it on the reference. A re-run with the same folder resumes.")
        self.status.setWordWrap(True)
        self.detections = QLabel()
        self.histogram = QLabel()
        for w in (self.detections, self.histogram):
            w.setFixedSize(PICTURE, PICTURE * 3 // 4)
            w.setAlignment(Qt.AlignmentFlag.AlignCenter)
            w.setStyleSheet("background: #1c1c1e; color: #909096;")
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.stop_button)
        pictures = QHBoxLayout()
        pictures.addWidget(self.detections)
        pictures.addWidget(self.histogram)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.bar)
        layout.addWidget(self.status)
        layout.addLayout(pictures)
        layout.addWidget(self.summary)

    def settings(self) -> dict:
        ann = self.annotations.text().strip()
        return {"out": self.out.text().strip(), "count": self.count.value(), "steps": self.steps.value(),
                "annotations": ann or None}

    def run(self) -> None:
        s = self.settings()
        if not s["out"]:
            self.status.setText("Choose an output folder first.")
            return
        self.report = None
        self.summary.setText("")
        self.detections.clear()
        self.histogram.clear()
        self.bar.setValue(0)
        self.set_running(True)
        self.status.setText("starting…")
        self._start(s)

    def set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.stop_button.setEnabled(running)

    def progress(self, fraction: float, message: str, eta_s: float | None = None) -> None:
        # events that carry no progress of their own (log lines) must not move the bar back
        self.bar.setValue(max(self.bar.value(), int(round(1000 * min(max(fraction, 0.0), 1.0)))))
        if message:
            eta = format_eta(eta_s)
            self.status.setText(f"{message} ({eta})" if eta else message)

    def finished_with(self, report: dict, detections: np.ndarray, histogram: np.ndarray) -> None:
        self.report = report
        self.set_running(False)
        self.bar.setValue(1000)
        self.detections.setPixmap(_fit(detections, self.detections))
        self.histogram.setPixmap(_fit(histogram, self.histogram))
        self.status.setText(f"done: written to {report['out_dir']}")
        self.summary.setText(summary_text(report))

    def stopped(self, message: str) -> None:
        self.set_running(False)
        self.status.setText(message)

    def _browse_out(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Output folder", self.out.text())
        if path:
            self.out.setText(path)

    def _browse_annotations(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Annotations of the reference", "",
                                              "Annotations (*.json *.png *.tif *.tiff)")
        if path:
            self.annotations.setText(path)

    def closeEvent(self, event) -> None:  # noqa: N802
        if self.stop_button.isEnabled():
            self._cancel()
        super().closeEvent(event)


def summary_text(r: dict) -> str:
    """The report's numbers in a few lines (rich text)."""
    def f(v, fmt=".1f"):
        return "?" if v is None else format(v, fmt)
    h, d = r["held_out"], r["detected"]
    rows = [f"<b>Held-out renders</b> ({h['images']}): precision {h['precision']:.2f}, recall {h['recall']:.2f} "
            f"at IoU 0.5",
            f"<b>Detected on the reference</b>: {d['count']} particles, median {f(d['median'])} px, "
            f"geometric mean {f(d['gmean'])} px, GSD {f(d['gsd'], '.2f')}"]
    for name, key in (("Classical measurement", "measured"), ("Fit", "fitted")):
        m = r.get(key)
        if m:
            rows.append(f"<b>{name}</b>: median {f(m.get('median'))} px, geometric mean {f(m.get('gmean'))} px, "
                        f"GSD {f(m.get('gsd'), '.2f')}")
    a = r.get("annotations")
    if a:
        err = a.get("gmean_error")
        rows.append(f"<b>Against your annotations</b> ({a['truth_count']}): precision {a['precision']:.2f}, "
                    f"recall {a['recall']:.2f}, geometric mean off by "
                    f"{f(None if err is None else 100 * err, '+.0f')} %")
    return "<br>".join(rows)


def _row(*widgets) -> QWidget:
    w = QWidget()
    lay = QHBoxLayout(w)
    lay.setContentsMargins(0, 0, 0, 0)
    for x in widgets:
        lay.addWidget(x, 1 if isinstance(x, QLineEdit) else 0)
    return w


def _fit(image: np.ndarray, label: QLabel):
    return to_pixmap(image).scaled(label.width(), label.height(), Qt.AspectRatioMode.KeepAspectRatio,
                                   Qt.TransformationMode.SmoothTransformation)
