"""The top candidates of a fit: thumbnail, material and distance; click one to show it."""
from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from ..model import Candidate
from .loss_plot import SERIES_COLOURS
from .qimage import to_pixmap

THUMB = 84
CARD_WIDTH = THUMB + 56


class CandidateCard(QFrame):
    clicked = Signal(int)

    def __init__(self, index: int, parent=None) -> None:
        super().__init__(parent)
        self.index = index
        self.setObjectName("candidateCard")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.image = QLabel()
        self.image.setFixedSize(THUMB, THUMB)
        self.image.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.title = QLabel()
        self.distance = QLabel()
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)].name()
        self.title.setStyleSheet(f"font-weight: 600; color: {colour};")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.setSpacing(2)
        layout.addWidget(self.image, 0, Qt.AlignmentFlag.AlignHCenter)
        layout.addWidget(self.title)
        layout.addWidget(self.distance)
        self.setFixedWidth(CARD_WIDTH)
        self.set_state(False, False)

    def show_candidate(self, c: Candidate) -> None:
        if c.thumbnail is not None:
            self.image.setPixmap(to_pixmap(c.thumbnail).scaled(
                THUMB, THUMB, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation))
        self.title.setText(self.title.fontMetrics().elidedText(c.material_id, Qt.TextElideMode.ElideMiddle,
                                                               CARD_WIDTH - 14))
        self.title.setToolTip(f"{c.material_id}: {c.title}")
        if c.distance_final is not None and c.distance is not None:
            self.distance.setText(f"{c.distance:.3f} → {c.distance_final:.3f}")
        elif c.distance is not None:
            self.distance.setText(f"{c.distance:.3f}")
        scale = f" at the {c.scale} px working scale" if c.scale else ""
        self.setToolTip(f"{c.material_id}: {c.title}\ndescriptor distance to the reference{scale}"
                        + ("\n(before → after refinement, on the fit's evaluation seeds)"
                           if c.distance_final is not None else "\n(ranking)"))

    def set_state(self, active: bool, selectable: bool) -> None:
        border = "#e0b040" if active else "#3a3a40"
        self.setStyleSheet(f"#candidateCard {{ border: 2px solid {border}; border-radius: 6px; }}")
        self.setCursor(Qt.CursorShape.PointingHandCursor if selectable else Qt.CursorShape.ArrowCursor)
        self._selectable = selectable

    def mouseReleaseEvent(self, event) -> None:  # noqa: N802
        if self._selectable and event.button() == Qt.MouseButton.LeftButton:
            self.clicked.emit(self.index)
        super().mouseReleaseEvent(event)


class CandidateStrip(QWidget):
    """Cards for the fit's top candidates; the refined one (during) or chosen one (after) is lit."""

    candidateClicked = Signal(int)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._layout = QHBoxLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self._placeholder = QLabel("The top-3 library materials appear here once the fit has ranked them.")
        self._placeholder.setWordWrap(True)
        self._placeholder.setStyleSheet("color: #909096;")
        self._layout.addWidget(self._placeholder)
        self._layout.addStretch(1)
        self.cards: list[CandidateCard] = []

    def show_candidates(self, candidates: list[Candidate], active: int | None, selectable: bool) -> None:
        if len(self.cards) != len(candidates):
            for card in self.cards:
                card.deleteLater()
            self.cards = []
            for i in range(len(candidates)):
                card = CandidateCard(i, self)
                card.clicked.connect(self.candidateClicked)
                self._layout.insertWidget(i, card)
                self.cards.append(card)
        self._placeholder.setVisible(not candidates)
        for card, c in zip(self.cards, candidates):
            card.show_candidate(c)
            card.set_state(card.index == active, selectable and c.material is not None)
