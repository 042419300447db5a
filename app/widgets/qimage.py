"""numpy images -> Qt images (copies: Qt must never point into a numpy buffer that goes away)."""
from __future__ import annotations

import numpy as np
from PySide6.QtGui import QImage, QPixmap


def gray_to_qimage(img: np.ndarray) -> QImage:
    """uint8 (H, W), or float in [0, 1], -> 8-bit grayscale QImage."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    a = np.ascontiguousarray(a)
    h, w = a.shape
    return QImage(a.data, w, h, w, QImage.Format.Format_Grayscale8).copy()


def rgb_to_qimage(img: np.ndarray) -> QImage:
    """uint8 (H, W, 3) -> RGB888 QImage."""
    a = np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
    h, w, _ = a.shape
    return QImage(a.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()


def rgba_to_qimage(img: np.ndarray) -> QImage:
    """uint8 (H, W, 4), straight alpha -> RGBA8888 QImage (overlays)."""
    a = np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
    h, w, _ = a.shape
    return QImage(a.data, w, h, 4 * w, QImage.Format.Format_RGBA8888).copy()


def to_pixmap(img: np.ndarray) -> QPixmap:
    a = np.asarray(img)
    if a.ndim == 3:
        return QPixmap.fromImage(rgba_to_qimage(a) if a.shape[2] == 4 else rgb_to_qimage(a))
    return QPixmap.fromImage(gray_to_qimage(a))
