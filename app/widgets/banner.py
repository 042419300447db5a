"""A non-modal message bar across the top of the window (instead of a blocking dialog)."""
from __future__ import annotations

from typing import Callable

from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QPushButton


class Banner(QFrame):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("banner")
        self.setStyleSheet("#banner { background: #2c3a4a; border-bottom: 1px solid #3f5670; }")
        self.label = QLabel()
        self.label.setWordWrap(True)
        self._layout = QHBoxLayout(self)
        self._layout.setContentsMargins(10, 6, 10, 6)
        self._layout.addWidget(self.label, 1)
        self.buttons: dict[str, QPushButton] = {}
        self.hide()

    def show_message(self, text: str, actions: dict[str, Callable[[], None]]) -> None:
        """Show ``text`` with one button per action; every button also closes the banner."""
        for b in self.buttons.values():
            b.deleteLater()
        self.buttons = {}
        self.label.setText(text)
        for name, fn in {**actions, "Dismiss": lambda: None}.items():
            b = QPushButton(name)
            b.clicked.connect(lambda _=False, fn=fn: (self.hide(), fn()))
            self._layout.addWidget(b)
            self.buttons[name] = b
        self.show()
