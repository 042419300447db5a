"""A small loss-curve plot drawn with QPainter (one line per candidate; no plotting library)."""
from __future__ import annotations

from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QColor, QPainter, QPainterPath, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

SERIES_COLOURS = (QColor(255, 190, 60), QColor(90, 180, 255), QColor(120, 220, 130), QColor(230, 120, 200))


class LossPlot(QWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._series: list[list[float]] = []
        self._labels: list[str] = []
        self.highlight: int | None = None
        self.setMinimumSize(180, 120)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setToolTip("Refinement loss per iteration (descriptor distance + gray-level term)")

    # ------------------------------------------------------------------ data
    def clear(self) -> None:
        self._series, self._labels = [], []
        self.update()

    def set_series(self, series: list[list[float]], labels: list[str]) -> None:
        self._series = [list(s) for s in series]
        self._labels = list(labels)
        self.update()

    def append(self, index: int, value: float, label: str = "") -> None:
        while len(self._series) <= index:
            self._series.append([])
            self._labels.append("")
        self._series[index].append(float(value))
        if label:
            self._labels[index] = label
        self.update()

    def series(self) -> list[list[float]]:
        return [list(s) for s in self._series]

    # ------------------------------------------------------------------ painting
    def paintEvent(self, event) -> None:  # noqa: N802
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        p.fillRect(self.rect(), QColor(30, 30, 33))
        fm = p.fontMetrics()
        left = fm.horizontalAdvance("0.0000") + 10
        top = fm.height() + 8   # one legend line above the plot: never over the curves
        plot = QRectF(left, top, self.width() - left - 10, self.height() - top - 8 - fm.height())
        p.setPen(QPen(QColor(80, 80, 86), 1))
        p.drawRect(plot)
        values = [v for s in self._series for v in s]
        if not values:
            p.setPen(QColor(140, 140, 145))
            p.drawText(plot, Qt.AlignmentFlag.AlignCenter, "loss curve: starts with the refinement")
            return
        lo, hi = min(values), max(values)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        pad = 0.06 * (hi - lo)
        lo, hi = lo - pad, hi + pad
        n = max(len(s) for s in self._series)
        span = max(1, n - 1)

        def at(i: int, v: float) -> QPointF:
            return QPointF(plot.left() + plot.width() * i / span, plot.bottom() - plot.height() * (v - lo) / (hi - lo))

        p.setPen(QColor(150, 150, 155))
        p.drawText(QRectF(0, plot.top() - 2, left - 6, fm.height()), Qt.AlignmentFlag.AlignRight, f"{hi:.4f}")
        p.drawText(QRectF(0, plot.bottom() - fm.height() + 2, left - 6, fm.height()), Qt.AlignmentFlag.AlignRight,
                   f"{lo:.4f}")
        p.drawText(QRectF(plot.left(), plot.bottom() + 2, plot.width(), fm.height()), Qt.AlignmentFlag.AlignRight,
                   f"iteration {n}")
        for k, s in enumerate(self._series):
            if not s:
                continue
            colour = SERIES_COLOURS[k % len(SERIES_COLOURS)]
            width = 2.4 if self.highlight in (None, k) else 1.2
            p.setPen(QPen(colour, width))
            if len(s) == 1:
                p.setBrush(colour)
                p.drawEllipse(at(0, s[0]), 2.5, 2.5)
                p.setBrush(Qt.BrushStyle.NoBrush)
            else:
                path = QPainterPath(at(0, s[0]))
                for i, v in enumerate(s[1:], 1):
                    path.lineTo(at(i, v))
                p.drawPath(path)
        # legend: one line above the plot, as many entries as fit (the candidate cards beside
        # the plot carry the same colours)
        x = plot.left()
        for k, label in enumerate(self._labels):
            if not label or not self._series[k]:
                continue
            if x + 16 + fm.horizontalAdvance(label) > self.width() - 4:
                break
            colour = SERIES_COLOURS[k % len(SERIES_COLOURS)]
            p.fillRect(QRectF(x, 4 + fm.height() / 2 - 2, 12, 4), colour)
            p.setPen(QColor(210, 210, 215))
            p.drawText(QPointF(x + 16, 4 + fm.ascent()), label)
            x += 16 + fm.horizontalAdvance(label) + 14
