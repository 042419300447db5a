"""Settings: how long and how hard to fit, CPU or GPU, and the descriptor backbone."""
from __future__ import annotations

from PySide6.QtWidgets import (QComboBox, QDialog, QDialogButtonBox, QFormLayout, QLabel, QSpinBox,
                               QVBoxLayout)

# name -> (budget seconds, iterations per candidate)
QUALITY_PRESETS = {"Quick": (30, 20), "Standard": (120, 60), "Thorough": (600, 200)}
RENDER_SIZES = (128, 192, 256, 384, 512)
DEVICES = {"auto": "Automatic (GPU when available)", "cpu": "CPU", "gpu": "GPU (CUDA)"}


class SettingsDialog(QDialog):
    def __init__(self, values: dict, backbones: dict[str, str], parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Settings")
        self.preset = QComboBox()
        self.preset.addItems([*QUALITY_PRESETS, "Custom"])
        self.budget = QSpinBox()
        self.budget.setRange(10, 7200)
        self.budget.setSuffix(" s")
        self.iterations = QSpinBox()
        self.iterations.setRange(1, 2000)
        self.size = QComboBox()
        for s in RENDER_SIZES:
            self.size.addItem(f"{s} px", s)
        self.device = QComboBox()
        for key, label in DEVICES.items():
            self.device.addItem(label, key)
        self.backbone = QComboBox()
        for name, status in (backbones or {values.get("backbone", "vgg16-hed"): "ok"}).items():
            self.backbone.addItem(name, name)
            item = self.backbone.model().item(self.backbone.count() - 1)
            item.setToolTip(status)
            if not str(status).startswith("ok"):
                item.setEnabled(False)   # weights missing: the tooltip says how to get them

        self.budget.setValue(int(values.get("budget_s", 120)))
        self.iterations.setValue(int(values.get("iterations", 60)))
        self._select(self.size, int(values.get("size", 256)))
        self._select(self.device, values.get("device", "auto"))
        self._select(self.backbone, values.get("backbone", "vgg16-hed"))
        self._sync_preset()
        self.preset.activated.connect(self._apply_preset)
        self.budget.valueChanged.connect(self._sync_preset)
        self.iterations.valueChanged.connect(self._sync_preset)

        form = QFormLayout()
        form.addRow("Quality", self.preset)
        form.addRow("Time budget", self.budget)
        form.addRow("Iterations per candidate", self.iterations)
        form.addRow("Render size", self.size)
        form.addRow("Device", self.device)
        form.addRow("Descriptor backbone", self.backbone)
        note = QLabel("Changing the device restarts the engine process.")
        note.setStyleSheet("color: #909096;")
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(note)
        layout.addWidget(buttons)

    @staticmethod
    def _select(combo: QComboBox, data) -> None:
        i = combo.findData(data)
        if i >= 0:
            combo.setCurrentIndex(i)

    def _apply_preset(self) -> None:
        name = self.preset.currentText()
        if name in QUALITY_PRESETS:
            budget, iterations = QUALITY_PRESETS[name]
            self.budget.setValue(budget)
            self.iterations.setValue(iterations)

    def _sync_preset(self) -> None:
        current = (self.budget.value(), self.iterations.value())
        names = [n for n, v in QUALITY_PRESETS.items() if v == current]
        self.preset.setCurrentText(names[0] if names else "Custom")

    def values(self) -> dict:
        return {"budget_s": float(self.budget.value()), "iterations": int(self.iterations.value()),
                "size": int(self.size.currentData()), "device": self.device.currentData(),
                "backbone": self.backbone.currentData()}
