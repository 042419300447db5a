"""Atomic file writes: a temporary file in the target folder, fsync, then ``os.replace``, so a
reader never sees a half-written result.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

_UMASK = os.umask(0)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def png_pixels(image: np.ndarray) -> np.ndarray:
    """The pixels a PNG stores for an image: uint8/uint16 as they are, floats in [0,1] as 8 bit."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 and arr.dtype != np.uint16:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return arr


def atomic_save_png(path, image: np.ndarray) -> None:
    """Save a float [0,1] gray image (or uint8/uint16 array) as PNG atomically.

    (Bulk sets encode with fitting.output.bulk.files.png_bytes, which is ~3x faster on noisy
    images.)"""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(png_pixels(image)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
