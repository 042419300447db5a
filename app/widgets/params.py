"""The parameter panel: the shown material's parameters grouped by surface, geometry, lighting and
imaging, one slider each (over the normalised [0, 1] range the fit works in)."""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QGridLayout, QGroupBox, QHBoxLayout, QLabel, QPushButton, QScrollArea, QSlider,
                               QVBoxLayout, QWidget)

from ..model import AppModel, ParamInfo

SLIDER_STEPS = 1000
NAME_WIDTH = 128
VALUE_WIDTH = 84


def format_value(spec: ParamInfo, value: float) -> str:
    if spec.integer:
        text = f"{int(value)}"
    elif abs(value) >= 100:
        text = f"{value:.1f}"
    elif abs(value) >= 1:
        text = f"{value:.3f}"
    else:
        text = f"{value:.4f}"
    return f"{text} {spec.unit}".strip()


class ParameterPanel(QWidget):
    """Edits :attr:`AppModel.x` through the model; rebuilt when the material changes."""

    def __init__(self, model: AppModel, parent=None) -> None:
        super().__init__(parent)
        self.model = model
        self.sliders: dict[str, QSlider] = {}
        self._value_labels: list[QLabel] = []
        self._slider_list: list[QSlider] = []
        self._material_id: str | None = None

        self.header = QLabel("No material yet: run a fit or open a recipe.")
        self.header.setWordWrap(True)
        self.header.setTextFormat(Qt.TextFormat.RichText)
        self.reset_button = QPushButton("Reset to fitted values")
        self.reset_button.setEnabled(False)
        self.reset_button.clicked.connect(model.reset_parameters)
        self.status = QLabel("")
        self.status.setStyleSheet("color: #909096;")

        self._groups_host = QWidget()
        self._groups_layout = QVBoxLayout(self._groups_host)
        self._groups_layout.setContentsMargins(0, 0, 0, 0)
        self._groups_layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)   # sliders shrink instead
        scroll.setWidget(self._groups_host)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)

        top = QHBoxLayout()
        top.addWidget(self.reset_button)
        top.addStretch(1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addWidget(self.header)
        layout.addLayout(top)
        layout.addWidget(scroll, 1)
        layout.addWidget(self.status)

        model.documentChanged.connect(self.refresh)
        model.parameterEdited.connect(self._show_value)

    # ------------------------------------------------------------------ building
    def refresh(self) -> None:
        m = self.model
        if not m.has_document:
            return
        if m.material.id != self._material_id:
            self._build()
        for i, slider in enumerate(self._slider_list):
            slider.blockSignals(True)
            slider.setValue(round(float(m.x[i]) * SLIDER_STEPS))
            slider.blockSignals(False)
            self._show_value(i)
        self._update_header()

    def _build(self) -> None:
        m = self.model
        while self._groups_layout.count() > 1:   # keep the trailing stretch
            item = self._groups_layout.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        n = len(m.material.specs)
        # Indexed like the parameter vector (specs order), though built group by group.
        self.sliders = {}
        self._slider_list: list[QSlider] = [None] * n   # type: ignore[list-item]
        self._value_labels: list[QLabel] = [None] * n   # type: ignore[list-item]
        for group, indices in m.material.groups().items():
            if not indices:
                continue
            box = QGroupBox(group.capitalize())
            grid = QGridLayout(box)
            grid.setColumnStretch(1, 1)
            for row, i in enumerate(indices):
                spec = m.material.specs[i]
                text = spec.name.replace("_", " ") + (" •" if spec.refine else "")
                name = QLabel()
                # Fixed name and value columns: the sliders line up across the groups.
                name.setFixedWidth(NAME_WIDTH)
                name.setText(name.fontMetrics().elidedText(text, Qt.TextElideMode.ElideRight, NAME_WIDTH))
                tip = f"{spec.description}\n" if spec.description else ""
                tip += f"range {spec.min:g} .. {spec.max:g} {spec.unit} ({spec.scale})"
                tip += "\n• refined by the fit" if spec.refine else "\nchosen by the fit's search, not refined"
                name.setToolTip(f"{spec.name}: {tip}")
                slider = QSlider(Qt.Orientation.Horizontal)
                slider.setRange(0, SLIDER_STEPS)
                slider.setObjectName(f"param_{spec.name}")
                slider.setToolTip(tip)
                slider.valueChanged.connect(lambda v, i=i: self.model.set_parameter(i, v / SLIDER_STEPS))
                slider.setMinimumWidth(60)
                value = QLabel()
                value.setFixedWidth(VALUE_WIDTH)
                value.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                grid.addWidget(name, row, 0)
                grid.addWidget(slider, row, 1)
                grid.addWidget(value, row, 2)
                self.sliders[spec.name] = slider
                self._slider_list[i] = slider
                self._value_labels[i] = value
            self._groups_layout.insertWidget(self._groups_layout.count() - 1, box)
        self._material_id = m.material.id
        self.reset_button.setEnabled(True)

    def _show_value(self, i: int) -> None:
        m = self.model
        if not m.has_document or i >= len(self._value_labels):
            return
        spec = m.material.specs[i]
        label = self._value_labels[i]
        label.setText(format_value(spec, spec.to_physical(float(m.x[i]))))
        fitted = m.x_fitted is not None and abs(float(m.x[i]) - float(m.x_fitted[i])) < 1e-6
        label.setStyleSheet("" if fitted else "color: #e0b040;")
        label.setToolTip("" if m.x_fitted is None else
                         f"fitted: {format_value(spec, spec.to_physical(float(m.x_fitted[i])))}")
        self._update_header()

    def _update_header(self) -> None:
        m = self.model
        source = "fit" if m.document_source == "fit" else "recipe"
        edited = " — <span style='color:#e0b040'>edited</span>" if m.edited else ""
        self.header.setText(f"<b>{m.material.title}</b><br><span style='color:#909096'>{m.material.id} · "
                            f"{m.material.imaging.upper()} · {m.material.geometry} · from {source}</span>{edited}")
