"""Image views: zoom with the wheel, pan by dragging, double-click to fit; views can be linked.

Scene coordinates are always the image's own pixels, also when a huge reference is shown
downsampled, so regions of interest and linked views never convert units.
"""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QBrush, QColor, QPainter, QPen, QTransform
from PySide6.QtWidgets import (QGraphicsPixmapItem, QGraphicsRectItem, QGraphicsScene, QGraphicsTextItem,
                               QGraphicsView)

from .qimage import to_pixmap

MAX_DISPLAY_SIDE = 4096   # larger references are shown downsampled (the fit uses every pixel)
ZOOM_STEP = 1.25
OUTLINE_RGBA = (255, 60, 60, 235)   # the measured particles' outlines on the reference


def outline_rgba(outline: np.ndarray, pool: int = 1) -> np.ndarray:
    """An outline picture (non-zero = outline) as red on transparent, max-pooled by ``pool``
    first so that one-pixel lines survive a zoomed-out view (a pooled pixel is drawn at least
    one screen pixel wide)."""
    o = np.asarray(outline) > 0
    if pool > 1:
        h, w = o.shape
        hp, wp = -(-h // pool) * pool, -(-w // pool) * pool
        padded = np.zeros((hp, wp), bool)
        padded[:h, :w] = o
        o = padded.reshape(hp // pool, pool, wp // pool, pool).any(axis=(1, 3))
    rgba = np.zeros(o.shape + (4,), np.uint8)
    rgba[o] = OUTLINE_RGBA
    return rgba


class ImageView(QGraphicsView):
    """One image, fitted to the view until the user zooms; a placeholder text when empty."""

    viewChanged = Signal()   # zoom or pan changed (linked views follow)

    def __init__(self, placeholder: str = "", parent=None) -> None:
        super().__init__(parent)
        self.placeholder = placeholder
        self.setScene(QGraphicsScene(self))
        self._pixmap_item = QGraphicsPixmapItem()
        self._pixmap_item.setTransformationMode(Qt.TransformationMode.SmoothTransformation)
        self.scene().addItem(self._pixmap_item)
        self._has_image = False
        self._image_size: tuple[int, int] = (0, 0)
        self._auto_fit = True
        self._syncing = False
        self.setDragMode(QGraphicsView.DragMode.ScrollHandDrag)
        self.setTransformationAnchor(QGraphicsView.ViewportAnchor.AnchorUnderMouse)
        self.setResizeAnchor(QGraphicsView.ViewportAnchor.AnchorViewCenter)
        self.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
        self.setBackgroundBrush(QColor(24, 24, 26))
        self.setFrameShape(QGraphicsView.Shape.NoFrame)
        self.setMinimumSize(160, 160)
        # Drops are the window's: a file dropped on a view must reach it.
        self.setAcceptDrops(False)
        self.viewport().setAcceptDrops(False)

    # ------------------------------------------------------------------ content
    @property
    def has_image(self) -> bool:
        return self._has_image

    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size

    def set_image(self, img: np.ndarray | None) -> None:
        """Show a gray (H, W) or RGB (H, W, 3) image; None clears the view."""
        if img is None:
            self._pixmap_item.setPixmap(to_pixmap(np.zeros((1, 1), np.uint8)))
            self._pixmap_item.setVisible(False)
            self._has_image = False
            self._image_size = (0, 0)
            self.viewport().update()
            return
        h, w = img.shape[:2]
        step = int(np.ceil(max(h, w) / MAX_DISPLAY_SIDE))
        shown = img[::step, ::step] if step > 1 else img
        same_size = self._has_image and self._image_size == (w, h)
        self._pixmap_item.setPixmap(to_pixmap(shown))
        self._pixmap_item.setScale(step)
        self._pixmap_item.setVisible(True)
        self._has_image = True
        self._image_size = (w, h)
        self.scene().setSceneRect(QRectF(0, 0, w, h))
        # Pixels stay crisp when zoomed in, smooth when zoomed out.
        self._update_pixel_mode()
        if self._auto_fit or not same_size:
            self.fit_to_view()

    # ------------------------------------------------------------------ zoom / pan
    def fit_to_view(self) -> None:
        if not self._has_image:
            return
        self.fitInView(self.sceneRect(), Qt.AspectRatioMode.KeepAspectRatio)
        self._auto_fit = True
        self._update_pixel_mode()
        self._changed()

    def zoom_by(self, factor: float) -> None:
        self.scale(factor, factor)
        self._auto_fit = False
        self._update_pixel_mode()
        self._changed()

    def zoom_factor(self) -> float:
        return self.transform().m11()

    def wheelEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        if not self._has_image:
            return
        steps = event.angleDelta().y() / 120.0
        if steps:
            self.zoom_by(ZOOM_STEP ** steps)

    def mouseDoubleClickEvent(self, event) -> None:  # noqa: N802
        self.fit_to_view()

    def resizeEvent(self, event) -> None:  # noqa: N802
        super().resizeEvent(event)
        if self._auto_fit:
            self.fit_to_view()

    def scrollContentsBy(self, dx: int, dy: int) -> None:  # noqa: N802
        super().scrollContentsBy(dx, dy)
        self._changed()

    def _update_pixel_mode(self) -> None:
        mode = (Qt.TransformationMode.FastTransformation if self.zoom_factor() * self._pixmap_item.scale() > 1.5
                else Qt.TransformationMode.SmoothTransformation)
        self._pixmap_item.setTransformationMode(mode)

    def _changed(self) -> None:
        if not self._syncing:
            self.viewChanged.emit()

    def follow(self, other: "ImageView") -> None:
        """Take ``other``'s zoom and the scene point at its centre (a linked view)."""
        self._syncing = True
        try:
            self.setTransform(QTransform(other.transform()))
            self.centerOn(other.mapToScene(other.viewport().rect().center()))
            self._auto_fit = other._auto_fit
            self._update_pixel_mode()
        finally:
            self._syncing = False

    def drawForeground(self, painter: QPainter, rect: QRectF) -> None:  # noqa: N802
        if self._has_image or not self.placeholder:
            return
        painter.save()
        painter.resetTransform()
        painter.setPen(QColor(150, 150, 155))
        painter.drawText(self.viewport().rect(), Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap,
                         self.placeholder)
        painter.restore()


def link_views(*views: ImageView) -> None:
    """Zooming or panning any of ``views`` zooms and pans the others the same way."""
    for v in views:
        others = [o for o in views if o is not v]
        v.viewChanged.connect(lambda v=v, others=others: [o.follow(v) for o in others if o.has_image])


class ReferenceView(ImageView):
    """The full reference with the data bar shaded, the detected region dashed and the region
    of interest drawn; Shift+drag draws a new region of interest."""

    roiDrawn = Signal(tuple)   # x0, y0, x1, y1 in image pixels

    def __init__(self, placeholder: str = "", parent=None) -> None:
        super().__init__(placeholder, parent)
        self._bar_item = QGraphicsRectItem()
        self._bar_item.setBrush(QBrush(QColor(220, 60, 60, 70)))
        self._bar_item.setPen(QPen(QColor(230, 80, 80), 0))
        # Rich text for a solid background: readable over the bar's own text, white or black.
        self._bar_label = QGraphicsTextItem()
        self._bar_label.setHtml("<span style='background-color:#2a2a2e; color:#ff7070; font-weight:600'>"
                                "&nbsp;data bar — not fitted&nbsp;</span>")
        self._bar_label.setFlag(QGraphicsTextItem.GraphicsItemFlag.ItemIgnoresTransformations)
        self._detected_item = QGraphicsRectItem()
        pen = QPen(QColor(90, 200, 120), 0, Qt.PenStyle.DashLine)
        pen.setCosmetic(True)
        self._detected_item.setPen(pen)
        self._roi_item = QGraphicsRectItem()
        pen = QPen(QColor(255, 200, 40), 2)
        pen.setCosmetic(True)
        self._roi_item.setPen(pen)
        self._rubber_item = QGraphicsRectItem()
        pen = QPen(QColor(255, 230, 120), 1, Qt.PenStyle.DashLine)
        pen.setCosmetic(True)
        self._rubber_item.setPen(pen)
        for item in (self._bar_item, self._bar_label, self._detected_item, self._roi_item, self._rubber_item):
            item.setVisible(False)
            item.setZValue(10)
            self.scene().addItem(item)
        # The measured particles' outlines: a picture of the fitting region, possibly at a coarser
        # step; rebuilt (max-pooled) when the zoom changes so that the lines stay visible.
        self._outline_item = QGraphicsPixmapItem()
        self._outline_item.setTransformationMode(Qt.TransformationMode.FastTransformation)
        self._outline_item.setZValue(5)
        self._outline_item.setVisible(False)
        self.scene().addItem(self._outline_item)
        self._outline: np.ndarray | None = None
        self._outline_step = 1
        self._outline_pool = 0          # pooling of the pixmap now in the item (0 = none built)
        self._outline_wanted = True
        self.viewChanged.connect(self._refresh_outline)
        self._drag_origin: QPointF | None = None
        self.setToolTip("Wheel: zoom · drag: pan · double-click: fit · Shift+drag: draw the region to fit")

    def set_regions(self, detected: tuple[int, int, int, int] | None, bar_detected: bool,
                    roi: tuple[int, int, int, int] | None) -> None:
        if not self.has_image:
            return
        w, h = self.image_size
        if detected is not None:
            x0, y0, x1, y1 = detected
            self._detected_item.setRect(QRectF(x0, y0, x1 - x0, y1 - y0))
            self._detected_item.setVisible(roi is not None and tuple(roi) != tuple(detected))
            self._bar_item.setVisible(bar_detected)
            self._bar_label.setVisible(bar_detected)
            if bar_detected:
                self._bar_item.setRect(QRectF(0, y1, w, h - y1))
                self._bar_label.setPos(0, y1)
        if roi is not None:
            x0, y0, x1, y1 = roi
            self._roi_item.setRect(QRectF(x0, y0, x1 - x0, y1 - y0))
            self._roi_item.setVisible(True)

    # Measured particles -----------------------------------------------------------------
    def set_outline(self, outline: np.ndarray | None, step: int = 1, offset: tuple[int, int] = (0, 0)) -> None:
        """Outline picture of the fitting region (non-zero = a measured particle's outline);
        outline pixel (r, c) is image pixel (offset_y + r * step, offset_x + c * step).
        None removes it."""
        self._outline = None if outline is None else np.asarray(outline)
        self._outline_step = max(1, int(step))
        self._outline_pool = 0
        self._outline_item.setPos(float(offset[0]), float(offset[1]))
        self._refresh_outline()

    def set_outline_visible(self, visible: bool) -> None:
        self._outline_wanted = bool(visible)
        self._refresh_outline()

    @property
    def has_outline(self) -> bool:
        return self._outline is not None

    @property
    def outline_shown(self) -> bool:
        return self._outline_item.isVisible()

    def outline_rect(self) -> QRectF | None:
        """The overlay's extent in image pixels (None without an outline)."""
        if self._outline is None:
            return None
        h, w = self._outline.shape[:2]
        p = self._outline_item.pos()
        return QRectF(p.x(), p.y(), w * self._outline_step, h * self._outline_step)

    def _refresh_outline(self) -> None:
        if self._outline is None or not self.has_image or not self._outline_wanted:
            self._outline_item.setVisible(False)
            return
        per_px = self.zoom_factor() * self._outline_step        # screen px per outline px
        pool = max(1, int(np.ceil(1.0 / per_px - 1e-6))) if per_px > 0 else 1
        if pool != self._outline_pool:
            self._outline_item.setPixmap(to_pixmap(outline_rgba(self._outline, pool)))
            self._outline_item.setScale(self._outline_step * pool)
            self._outline_pool = pool
        self._outline_item.setVisible(True)

    def roi_rect(self) -> QRectF:
        return self._roi_item.rect()

    def bar_rect(self) -> QRectF | None:
        return self._bar_item.rect() if self._bar_item.isVisible() else None

    # Shift+drag: rubber-band region of interest ---------------------------------------
    def mousePressEvent(self, event) -> None:  # noqa: N802
        if self.has_image and event.button() == Qt.MouseButton.LeftButton and \
                event.modifiers() & Qt.KeyboardModifier.ShiftModifier:
            self._drag_origin = self.mapToScene(event.position().toPoint())
            self._rubber_item.setRect(QRectF(self._drag_origin, self._drag_origin))
            self._rubber_item.setVisible(True)
            event.accept()
            return
        super().mousePressEvent(event)

    def mouseMoveEvent(self, event) -> None:  # noqa: N802
        if self._drag_origin is not None:
            p = self.mapToScene(event.position().toPoint())
            self._rubber_item.setRect(QRectF(self._drag_origin, p).normalized())
            event.accept()
            return
        super().mouseMoveEvent(event)

    def mouseReleaseEvent(self, event) -> None:  # noqa: N802
        if self._drag_origin is not None:
            r = self._rubber_item.rect()
            self._rubber_item.setVisible(False)
            self._drag_origin = None
            self.roiDrawn.emit((int(r.left()), int(r.top()), int(r.right()), int(r.bottom())))
            event.accept()
            return
        super().mouseReleaseEvent(event)
