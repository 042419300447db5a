"""Preview of bulk rendering: the recipe rendered with new particle layouts (layout seeds), each
particle's outline drawn in its own colour from the instance mask, so the labels a training set
would get can be checked before committing to a large render."""
from __future__ import annotations

import colorsys
from typing import Callable

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QCheckBox, QDialog, QGridLayout, QHBoxLayout, QLabel, QPushButton, QSpinBox,
                               QVBoxLayout, QWidget)

from .qimage import to_pixmap

TILE = 220


def instance_colours(n: int = 64) -> np.ndarray:
    """Well separated hues (golden-ratio steps), uint8 (n, 3); colour k is for particle id k."""
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.85, 1.0)]
                     for k in range(n)], dtype=np.uint8)


_COLOURS = instance_colours()


def outline_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 gray render + instance mask (0 = substrate) -> RGB with each particle's outline
    (its pixels that touch another id) in that particle's colour."""
    gray = np.asarray(image, dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    m = np.asarray(mask)
    edge = np.zeros(m.shape, dtype=bool)
    edge[:, 1:] |= m[:, 1:] != m[:, :-1]
    edge[:, :-1] |= m[:, :-1] != m[:, 1:]
    edge[1:, :] |= m[1:, :] != m[:-1, :]
    edge[:-1, :] |= m[:-1, :] != m[1:, :]
    edge &= m > 0
    rgb[edge] = _COLOURS[m[edge] % len(_COLOURS)]
    return rgb


class BulkPreviewDialog(QDialog):
    """Non-modal: ``request(seeds)`` starts the renders; ``add_render`` shows each as it arrives."""

    def __init__(self, request: Callable[[list[int]], None], cancel: Callable[[], None], parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Preview bulk rendering")
        self._request = request
        self._cancel = cancel
        self.renders: dict[int, tuple[np.ndarray, np.ndarray]] = {}   # index -> (image, mask)
        self.count = QSpinBox()
        self.count.setRange(1, 16)
        self.count.setValue(6)
        self.first_seed = QSpinBox()
        self.first_seed.setRange(0, 1_000_000)
        self.first_seed.setValue(1)
        self.outlines = QCheckBox("Outline particles (instance masks)")
        self.outlines.setChecked(True)
        self.outlines.toggled.connect(self._redraw)
        self.render_button = QPushButton("Render previews")
        self.render_button.clicked.connect(self.start)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self._cancel)
        self.status = QLabel("New particle layouts of the current parameters.")
        controls = QHBoxLayout()
        for w in (QLabel("Images"), self.count, QLabel("first layout seed"), self.first_seed, self.outlines):
            controls.addWidget(w)
        controls.addStretch(1)
        controls.addWidget(self.render_button)
        controls.addWidget(self.stop_button)
        self._grid_host = QWidget()
        self._grid = QGridLayout(self._grid_host)
        self._tiles: list[QLabel] = []
        hint = QLabel("Happy with these? Export the recipe and render the training set with "
                      "<code>matfit bulk</code>.")
        hint.setStyleSheet("color: #909096;")
        layout = QVBoxLayout(self)
        layout.addLayout(controls)
        layout.addWidget(self._grid_host, 1)
        layout.addWidget(self.status)
        layout.addWidget(hint)
        self.resize(3 * (TILE + 16) + 40, 2 * (TILE + 40) + 120)

    def seeds(self) -> list[int]:
        return [self.first_seed.value() + k for k in range(self.count.value())]

    def start(self) -> None:
        seeds = self.seeds()
        self.renders = {}
        for t in self._tiles:
            t.deleteLater()
        self._tiles = []
        cols = min(4, max(1, int(np.ceil(np.sqrt(len(seeds))))))
        for k, seed in enumerate(seeds):
            tile = QLabel(f"layout seed {seed}\nrendering…")
            tile.setFixedSize(TILE, TILE)
            tile.setAlignment(Qt.AlignmentFlag.AlignCenter)
            tile.setStyleSheet("background: #1c1c1e; color: #909096;")
            self._grid.addWidget(tile, k // cols, k % cols)
            self._tiles.append(tile)
        self.set_running(True)
        self.status.setText(f"rendering {len(seeds)} layouts…")
        self._request(seeds)

    def set_running(self, running: bool) -> None:
        self.render_button.setEnabled(not running)
        self.stop_button.setEnabled(running)

    def add_render(self, index: int, seed: int, image: np.ndarray, mask: np.ndarray) -> None:
        self.renders[index] = (image, mask)
        self._show(index)
        n_particles = len(np.unique(mask)) - (1 if (mask == 0).any() else 0)
        self._tiles[index].setToolTip(f"layout seed {seed}: {n_particles} particles")
        self.status.setText(f"{len(self.renders)}/{len(self._tiles)} rendered")

    def finished_all(self, message: str) -> None:
        self.set_running(False)
        self.status.setText(message)

    def _show(self, index: int) -> None:
        image, mask = self.renders[index]
        shown = outline_overlay(image, mask) if self.outlines.isChecked() else image
        self._tiles[index].setPixmap(to_pixmap(shown).scaled(
            TILE, TILE, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation))

    def _redraw(self) -> None:
        for index in self.renders:
            self._show(index)

    def closeEvent(self, event) -> None:  # noqa: N802
        if self.stop_button.isEnabled():
            self._cancel()
        super().closeEvent(event)
