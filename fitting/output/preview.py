"""Side-by-side pictures of a fit: the reference and the fitted render at the same pixel scale.

Both halves show the whole field the fit worked on (the reference's working image and a render
of the same size), so particle size and number can be compared by eye; measured particles can
be outlined on both.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

GAP_PX = 6


def _rgb(img: np.ndarray) -> np.ndarray:
    a = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return (a * 255.0 + 0.5).astype(np.uint8) if a.dtype != np.uint8 else a


def side_by_side(reference: np.ndarray, render: np.ndarray, *, labels: tuple[str, str] | None = None,
                 max_width: int = 2048) -> np.ndarray:
    """``reference | render`` as one uint8 RGB image.

    Parameters
    ----------
    reference, render : ndarray
        Gray float images in [0, 1] (or uint8 RGB, e.g. with outlines drawn), same height and
        pixel scale. A render of another height is padded or cropped at the bottom.
    labels : (str, str), optional
        Captions drawn in the top-left corner of each half.
    max_width : int
        The picture is area-downsampled (both halves alike) to at most this width.

    Returns
    -------
    ndarray of uint8, shape (H, W, 3)
    """
    a, b = _rgb(reference), _rgb(render)
    h = a.shape[0]
    if b.shape[0] != h:
        pad = np.zeros((h, b.shape[1], 3), np.uint8)
        pad[:min(h, b.shape[0])] = b[:h]
        b = pad
    gap = np.full((h, GAP_PX, 3), 255, np.uint8)
    out = np.concatenate([a, gap, b], axis=1)
    im = Image.fromarray(out)
    if im.width > max_width:
        k = max_width / im.width
        im = im.resize((max_width, max(1, round(im.height * k))), Image.BOX)
    if labels:
        draw = ImageDraw.Draw(im)
        half = (a.shape[1] + GAP_PX) * im.width / out.shape[1]
        for x, text in ((4, labels[0]), (half + 4, labels[1])):
            box = draw.textbbox((x, 4), text)
            draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
            draw.text((x, 4), text, fill=(255, 255, 0))
    return np.asarray(im)
