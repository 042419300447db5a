"""The particle size distribution: measured (the reference) vs fitted (the result's render),
a log-binned histogram drawn with QPainter (no plotting library) and one line of numbers each."""
from __future__ import annotations

import math

import numpy as np
from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QColor, QPainter, QPen
from PySide6.QtWidgets import QLabel, QSizePolicy, QVBoxLayout, QWidget

MEASURED_COLOUR = QColor(90, 180, 255)
FITTED_COLOUR = QColor(255, 170, 60)
MAX_BINS = 16


def log_bins(values: list[float], n: int | None = None) -> np.ndarray:
    """Log-spaced bin edges over ``values`` (positive), about sqrt(N) bins, 4..MAX_BINS."""
    v = np.asarray([x for x in values if x is not None and x > 0], dtype=np.float64)
    if v.size == 0:
        return np.array([1.0, 10.0])
    lo, hi = float(v.min()), float(v.max())
    if hi / lo < 1.05:
        lo, hi = lo / 1.2, hi * 1.2
    if n is None:
        n = int(np.clip(round(math.sqrt(v.size)), 4, MAX_BINS))
    return np.geomspace(lo, hi * (1 + 1e-9), n + 1)


def format_size(v: float) -> str:
    return f"{v:.3g}" if v < 1000 else f"{v:.0f}"


class SizeHistogram(QWidget):
    """Share of particles per log-spaced diameter bin: measured as bars, fitted as bars beside them."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.measured: list[float] = []
        self.fitted: list[float] = []
        self.unit = "px"
        self.setMinimumSize(180, 110)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setToolTip("Particle diameters (equivalent-circle), share of particles per log-spaced bin:\n"
                        "measured on the reference vs measured on the fitted render (same units)")

    def set_data(self, measured: list[float] | None, fitted: list[float] | None, scale: float = 1.0,
                 unit: str = "px") -> None:
        """Diameters in reference px; ``scale`` (e.g. nm per px) and ``unit`` set the axis."""
        self.measured = [float(d) * scale for d in (measured or []) if d and d > 0]
        self.fitted = [float(d) * scale for d in (fitted or []) if d and d > 0]
        self.unit = unit
        self.update()

    def shares(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bin edges, measured share per bin, fitted share per bin)."""
        edges = log_bins(self.measured + self.fitted)
        out = []
        for d in (self.measured, self.fitted):
            h, _ = np.histogram(np.asarray(d, dtype=np.float64), bins=edges)
            out.append(h / max(1, len(d)))
        return edges, out[0], out[1]

    def paintEvent(self, event) -> None:  # noqa: N802
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        p.fillRect(self.rect(), QColor(30, 30, 33))
        fm = p.fontMetrics()
        top = fm.height() + 8                      # legend line
        plot = QRectF(8, top, self.width() - 16, self.height() - top - 6 - fm.height())
        p.setPen(QPen(QColor(80, 80, 86), 1))
        p.drawLine(plot.bottomLeft(), plot.bottomRight())
        if not self.measured and not self.fitted:
            p.setPen(QColor(140, 140, 145))
            p.drawText(plot, Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap,
                       "particle sizes: measured when a fit starts")
            return
        edges, hm, hf = self.shares()
        n = len(edges) - 1
        peak = max(float(hm.max(initial=0)), float(hf.max(initial=0)), 1e-9)
        lo, hi = math.log(edges[0]), math.log(edges[-1])

        def x_at(v: float) -> float:
            return plot.left() + plot.width() * (math.log(v) - lo) / (hi - lo)

        both = bool(self.measured) and bool(self.fitted)
        for i in range(n):
            x0, x1 = x_at(edges[i]), x_at(edges[i + 1])
            w = (x1 - x0) * 0.84
            x0 += (x1 - x0) * 0.08
            for k, (share, colour) in enumerate(((hm[i], MEASURED_COLOUR), (hf[i], FITTED_COLOUR))):
                if share <= 0:
                    continue
                bw = w / 2 if both else w
                bx = x0 + (bw if both and k == 1 else 0.0)
                bh = plot.height() * float(share) / peak
                p.fillRect(QRectF(bx, plot.bottom() - bh, max(1.0, bw - 1), bh), colour)
        # x axis: the ends and a middle value, in the axis unit
        p.setPen(QColor(150, 150, 155))
        y = plot.bottom() + 2
        p.drawText(QRectF(plot.left(), y, plot.width(), fm.height()), Qt.AlignmentFlag.AlignLeft,
                   format_size(edges[0]))
        p.drawText(QRectF(plot.left(), y, plot.width(), fm.height()), Qt.AlignmentFlag.AlignRight,
                   f"{format_size(edges[-1])} {self.unit}")
        mid = math.exp((lo + hi) / 2)
        p.drawText(QRectF(x_at(mid) - 40, y, 80, fm.height()), Qt.AlignmentFlag.AlignHCenter, format_size(mid))
        # legend
        x = plot.left()
        for label, values, colour in (("measured", self.measured, MEASURED_COLOUR),
                                      ("fitted", self.fitted, FITTED_COLOUR)):
            if not values:
                continue
            text = label   # counts: in the lines below (the fitted one is for the whole region)
            p.fillRect(QRectF(x, 4 + fm.height() / 2 - 4, 10, 8), colour)
            p.setPen(QColor(210, 210, 215))
            p.drawText(QPointF(x + 14, 4 + fm.ascent()), text)
            x += 14 + fm.horizontalAdvance(text) + 14
        p.setPen(QColor(150, 150, 155))
        p.drawText(QRectF(x, 4, max(0.0, plot.right() - x), fm.height()), Qt.AlignmentFlag.AlignRight,
                   "share of particles")


def stats_line(label: str, stats) -> str:
    """'measured: 46 particles, geometric mean 68.0 px (= 136 nm), GSD 1.43, coverage 0.07'."""
    if stats is None:
        return ""
    if not stats.count or stats.gmean is None:
        return f"{label}: no particles found"
    text = f"{label}: {stats.count} particles, geometric mean {stats.gmean:.1f} px"
    if stats.gmean_nm is not None:
        text += f" (= {format_size(stats.gmean_nm)} nm)"
    if stats.gsd is not None:
        text += f", GSD {stats.gsd:.2f}"
    if stats.coverage is not None:
        text += f", coverage {stats.coverage:.2f}"
    return text


class SizePanel(QWidget):
    """Histogram plus one line of numbers for the measured and one for the fitted particles."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.histogram = SizeHistogram()
        self.measured_label = QLabel("")
        self.fitted_label = QLabel("")
        for label, colour in ((self.measured_label, MEASURED_COLOUR), (self.fitted_label, FITTED_COLOUR)):
            label.setWordWrap(True)
            label.setStyleSheet(f"color: {colour.name()};")
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addWidget(self.histogram, 1)
        layout.addWidget(self.measured_label)
        layout.addWidget(self.fitted_label)

    def show_sizes(self, measured, fitted) -> None:
        """``measured`` / ``fitted``: :class:`app.model.SizeStats` or None."""
        nm = next((s.pixel_size_nm for s in (measured, fitted) if s is not None and s.pixel_size_nm), None)
        self.histogram.set_data(measured.diameters if measured else None, fitted.diameters if fitted else None,
                                scale=nm or 1.0, unit="nm" if nm else "px")
        self.measured_label.setText(stats_line("measured", measured))
        self.fitted_label.setText(stats_line("fitted", fitted))
        self.measured_label.setVisible(measured is not None)
        self.fitted_label.setVisible(fitted is not None)
