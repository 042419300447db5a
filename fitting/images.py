"""Load and validate reference micrographs; find the instrument data bar and round apertures.

Why this module is careful: reference images come straight from users and microscopes. They are
8/16/32-bit, gray or colour or palette, sometimes with alpha, sometimes huge, sometimes broken,
and SEM/TEM images often carry a burned-in data bar (text, scale bar) along the bottom that must
not be mistaken for material texture. Everything here turns that into one thing: a float32 gray
image in [0, 1], the region to fit (``crop_box``), an optional validity mask, and metadata that
says what was done (``notes``). Every failure is an :class:`~fitting.errors.ImageLoadError` that
names the file, the problem and what to do; no raw PIL traceback reaches the user.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ImageLoadError

# --- limits -----------------------------------------------------------------------------------

DEFAULT_MAX_PIXELS = 100_000_000   # 100 megapixels; MATFIT_MAX_PIXELS overrides
MAX_PIXELS_ENV = "MATFIT_MAX_PIXELS"
MIN_SIDE = 16                      # smaller images (or crops) carry no usable texture

SUPPORTED_HINT = "use the original micrograph as PNG, TIFF, JPEG, BMP or WEBP"

# Luminance weights (ITU-R BT.601, the same as PIL's "L" conversion), applied in float so that
# colour images are not quantised twice.
_LUMA = (0.299, 0.587, 0.114)

# PIL modes we decode, by bit depth of one sample.
_MODES_8BIT = {"L", "P", "PA", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
               "HSV", "LAB"}
_MODES_16BIT = {"I;16", "I;16L", "I;16B", "I;16N"}

# PIL's global decompression-bomb limit can only be changed process-wide: the lock is held for
# as long as we have lifted it, and _PIL_SAVED keeps PIL's own value meanwhile.
_PIL_LIMIT_LOCK = threading.Lock()
_PIL_SAVED: list[int | None] = []


# --- result -----------------------------------------------------------------------------------

@dataclass(eq=False, repr=False)
class ReferenceImage:
    """A loaded reference micrograph: full gray pixels plus the region and metadata for fitting."""

    path: str
    name: str
    pixels: np.ndarray                      # float32 (H, W) gray in [0, 1], the FULL image
    crop_box: tuple[int, int, int, int]     # x0, y0, x1, y1 (exclusive) of the region to fit
    bar_detected: bool
    original_size: tuple[int, int]          # (width, height)
    bit_depth: int
    mode: str
    sha256: str
    pixel_size_nm: float | None
    valid_mask: np.ndarray | None           # bool (H, W) over the full image, or None
    notes: list[str] = field(default_factory=list)

    @property
    def cropped(self) -> np.ndarray:
        """The pixels inside ``crop_box`` (a view, not a copy)."""
        x0, y0, x1, y1 = self.crop_box
        return self.pixels[y0:y1, x0:x1]

    @property
    def cropped_mask(self) -> np.ndarray | None:
        """``valid_mask`` inside ``crop_box`` (a view), or None when there is no mask."""
        if self.valid_mask is None:
            return None
        x0, y0, x1, y1 = self.crop_box
        return self.valid_mask[y0:y1, x0:x1]

    def working(self, max_side: int = 512) -> np.ndarray:
        """The cropped image, area-averaged down so that its longer side is <= ``max_side``.

        Never upsamples: a crop already small enough is returned as a float32 copy.
        """
        return _area_downsample(self.cropped, max_side)

    def working_mask(self, max_side: int = 512) -> np.ndarray | None:
        """``valid_mask`` at the resolution of :meth:`working`; a working pixel is valid only if
        every full-resolution pixel under it is valid (so black surround never leaks in)."""
        m = self.cropped_mask
        if m is None:
            return None
        frac = _area_downsample(m.astype(np.float32), max_side)
        return frac >= 0.999

    def to_dict(self) -> dict:
        """JSON-able metadata (no pixels), e.g. for recipes."""
        return {
            "path": self.path,
            "name": self.name,
            "original_size": [int(v) for v in self.original_size],
            "bit_depth": int(self.bit_depth),
            "mode": self.mode,
            "sha256": self.sha256,
            "pixel_size_nm": None if self.pixel_size_nm is None else float(self.pixel_size_nm),
            "crop_box": [int(v) for v in self.crop_box],
            "bar_detected": bool(self.bar_detected),
            "has_valid_mask": self.valid_mask is not None,
            "notes": [str(n) for n in self.notes],
        }

    def __repr__(self) -> str:  # the default repr would print megapixels of array data
        return (f"ReferenceImage(name={self.name!r}, size={self.original_size}, mode={self.mode!r}, "
                f"bit_depth={self.bit_depth}, crop_box={self.crop_box}, "
                f"bar_detected={self.bar_detected}, valid_mask={self.valid_mask is not None})")


# --- public API ---------------------------------------------------------------------------------

def max_pixels() -> int:
    """The decompression-bomb limit in pixels: ``MATFIT_MAX_PIXELS`` or 100 megapixels."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw)) if ("e" in raw.lower() or "." in raw) else int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ImageLoadError(f"{MAX_PIXELS_ENV}={raw!r} is not a positive number of pixels",
                             hint=f"set {MAX_PIXELS_ENV} to e.g. 200000000, or unset it for the "
                                  f"default of {DEFAULT_MAX_PIXELS:,}")
    return value


def load_reference(path: str | os.PathLike, crop: tuple[int, int, int, int] | None = None,
                   detect_bar: bool = True) -> ReferenceImage:
    """Load a reference micrograph as float32 gray in [0, 1] with its fitting region and metadata.

    ``crop`` (x0, y0, x1, y1; end exclusive) overrides the automatic data-bar crop; with
    ``detect_bar=False`` and no ``crop`` the whole image is used.
    """
    p = _check_path(path)
    notes: list[str] = []
    with _open_image(p) as im:
        w, h = im.size
        if w < MIN_SIDE or h < MIN_SIDE:
            raise ImageLoadError(
                f"image '{p}' is too small ({w} x {h} pixels; at least "
                f"{MIN_SIDE} x {MIN_SIDE} needed)",
                hint="use the full-resolution micrograph, not a thumbnail or icon")
        # validate a caller's crop from the header, before paying for decoding
        crop_box = _validate_crop(crop, w, h, p) if crop is not None else (0, 0, w, h)
        mode = im.mode
        pixel_size_nm = _pixel_size_nm(im, notes)
        if getattr(im, "is_animated", False):
            notes.append("file has several pages/frames; the first one is used")
        _note_orientation(im, notes)
        sha = _sha256(p)
        gray, bit_depth = _decode_gray(im, p, notes)

    if not np.isfinite(gray).all() or float(gray.max()) <= float(gray.min()):
        raise ImageLoadError(f"image '{p}' has a single gray value everywhere; "
                             "there is no texture to fit",
                             hint="check that the right file was exported (not a blank frame)")

    bar_detected = False
    if crop is not None:
        notes.append(f"crop {crop_box} given by the caller")
    elif detect_bar:
        bar_row = detect_data_bar(gray)
        if bar_row is not None:
            crop_box = (0, 0, w, bar_row)
            bar_detected = True
            notes.append(f"data bar detected at rows {bar_row}..{h - 1}; excluded from fitting")

    valid_mask = None
    x0, y0, x1, y1 = crop_box
    inner = detect_aperture(gray[y0:y1, x0:x1])
    if inner is not None:
        valid_mask = np.zeros((h, w), dtype=bool)   # outside the crop is not valid either
        valid_mask[y0:y1, x0:x1] = inner
        notes.append(f"round aperture detected: {100.0 * (1.0 - inner.mean()):.1f}% of the "
                     "fitting region is black surround, marked invalid in valid_mask")

    return ReferenceImage(path=str(p), name=p.name, pixels=gray, crop_box=crop_box,
                          bar_detected=bar_detected, original_size=(w, h), bit_depth=bit_depth,
                          mode=mode, sha256=sha, pixel_size_nm=pixel_size_nm,
                          valid_mask=valid_mask, notes=notes)


def load_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Load any image (e.g. a texture, not a reference) as float32 (H, W, 3) RGB in [0, 1].

    Same checks and error messages as :func:`load_reference`; alpha is composited over black,
    gray images are replicated into three channels, 16/32-bit images are stretched min..max.
    """
    p = _check_path(path)
    with _open_image(p) as im:
        return _decode_rgb(im, p)


# --- data bar -----------------------------------------------------------------------------------

_BAR_SEARCH_FRACTION = 0.35  # data bars live in the bottom third; never look higher
_BAR_TOL = 5                 # gray levels (of 255) that count as "the same" flat value
_BAR_START_FLAT = 0.85       # the first bar row is (almost) all one value ...
_BAR_ABOVE_MAX = 0.5         # ... and that value is rare in the image rows just above it
_BAR_ROW_FLAT = 0.5          # a bar row (even one through text) is mostly background
_BAR_ROWS_FLAT = 0.8         # ... for most of the rows of the bar
_BAR_MEAN_FLAT = 0.7
_BAR_BG_SHARE = 0.6          # one background value dominates the whole bar


def detect_data_bar(gray: np.ndarray) -> int | None:
    """First row of an instrument data bar / scale-bar strip along the bottom, or None.

    A bar is a full-width block reaching the bottom edge whose rows are dominated by one flat
    (synthetic, noise-free) value, with text or lines on it, that starts abruptly: its first row
    is almost all one value and that value is rare in the image rows right above. Natural image
    content changes gradually from row to row, so smooth TEM backgrounds or the black rim
    under a round aperture are not taken for a bar. Only the bottom 35 % is searched.
    """
    g = np.asarray(gray)
    if g.ndim != 2:
        raise ValueError(f"detect_data_bar expects a 2-D gray image, got shape {g.shape}")
    h, w = g.shape
    min_bar = max(6, math.ceil(0.015 * h))
    top = max(4, int(h * (1.0 - _BAR_SEARCH_FRACTION)), MIN_SIDE)
    if w < 8 or h - top < min_bar:
        return None
    ctx = 4
    q = np.rint(np.clip(np.nan_to_num(g[top - ctx:], nan=0.0), 0.0, 1.0) * 255.0).astype(np.int64)
    n = q.shape[0]
    counts = np.bincount((np.arange(n)[:, None] * 256 + q).ravel(), minlength=n * 256)
    counts = counts.reshape(n, 256)
    win = _window_sum(counts, _BAR_TOL)          # win[r, v]: pixels of row r within tol of v
    flat = win.max(axis=1) / w                   # share of the row's most common (flat) value
    start_val = win.argmax(axis=1)

    # Suffix sums make every candidate's block statistics O(1) (or O(256)).
    is_flat = (flat >= _BAR_ROW_FLAT).astype(np.int64)
    suf_flat_rows = np.cumsum(is_flat[::-1])[::-1]
    suf_flat_sum = np.cumsum(flat[::-1])[::-1]
    suf_counts = np.cumsum(counts[::-1], axis=0)[::-1]

    for s in range(top, h - min_bar + 1):        # top-down: the first hit is the bar's first row
        i = s - top + ctx
        if flat[i] < _BAR_START_FLAT:
            continue
        v = start_val[i]
        # Abrupt start: rows s-4..s-2 (s-1 may be a blurred/JPEG transition row) lack value v.
        if (win[i - 4:i - 1, v] / w).max() > _BAR_ABOVE_MAX:
            continue
        rows = n - i
        if suf_flat_rows[i] < _BAR_ROWS_FLAT * rows or suf_flat_sum[i] < _BAR_MEAN_FLAT * rows:
            continue
        bg_share = _window_sum(suf_counts[i][None, :], _BAR_TOL).max() / (rows * w)
        if bg_share < _BAR_BG_SHARE:
            continue
        return int(s)
    return None


def _window_sum(counts: np.ndarray, tol: int) -> np.ndarray:
    """Sum of histogram counts over values v-tol..v+tol for every v (last axis)."""
    padded = np.pad(counts, ((0, 0), (tol + 1, tol)))
    cs = np.cumsum(padded, axis=1)
    return cs[:, 2 * tol + 1:] - cs[:, :-2 * tol - 1]


# --- round aperture --------------------------------------------------------------------------------

def detect_aperture(gray: np.ndarray) -> np.ndarray | None:
    """Valid-pixel mask for an image seen through a round aperture with flat black surround.

    Returns a bool (H, W) mask that is False outside the aperture circle (shrunk by a small
    margin that drops the blurred rim), or None unless an aperture is clearly present: all four
    corners flat and dark at the same level, and the edge of that dark surround fits a circle.
    """
    from scipy import ndimage  # scipy is slow to import and only needed here

    g = np.asarray(gray, dtype=np.float32)
    if g.ndim != 2:
        raise ValueError(f"detect_aperture expects a 2-D gray image, got shape {g.shape}")
    h, w = g.shape
    if min(h, w) < 64:
        return None
    # Work at <= 1024 px: a circle fit does not need more, and huge images stay cheap.
    step = max(1, int(math.ceil(max(h, w) / 1024)))
    small = g[::step, ::step]
    sh, sw = small.shape

    # 1) all four corners flat and dark, at one level
    pc = max(3, int(0.02 * min(sh, sw)))
    corners = [small[:pc, :pc], small[:pc, -pc:], small[-pc:, :pc], small[-pc:, -pc:]]
    meds = np.array([float(np.median(c)) for c in corners])
    stds = np.array([float(c.std()) for c in corners])
    if meds.max() > 0.15 or stds.max() > 0.02 or meds.max() - meds.min() > 0.03:
        return None
    level = float(np.median(meds))
    tol = max(3.0 / 255.0, 4.0 * float(stds.max()))

    # 2) the surround: pixels at that level connected to a corner
    dark = np.abs(small - level) <= tol
    labels, _ = ndimage.label(dark)
    corner_labels = {labels[0, 0], labels[0, -1], labels[-1, 0], labels[-1, -1]} - {0}
    outside = np.isin(labels, list(corner_labels))
    out_frac = float(outside.mean())
    if not 0.02 <= out_frac <= 0.7:
        return None

    # 3) fit a circle to the surround's inner edge (not to the image border)
    inside = ~outside
    edge = outside & ndimage.binary_dilation(inside)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = False
    ys, xs = np.nonzero(edge)
    if xs.size < 50:
        return None
    xs = xs.astype(np.float64)
    ys = ys.astype(np.float64)
    keep = np.ones(xs.size, dtype=bool)
    for _ in range(3):  # trim outliers (dark specks touching the rim) and refit
        fit = _fit_circle(xs[keep], ys[keep])
        if fit is None:
            return None
        cx, cy, r = fit
        res = np.abs(np.hypot(xs - cx, ys - cy) - r)
        keep = res <= max(2.0, 3.0 * float(np.median(res[keep])) + 1.0)
    res_kept = res[keep]
    if (keep.mean() < 0.8 or float(np.median(res_kept)) > max(1.5, 0.01 * r)
            or r < 0.25 * min(sh, sw)):
        return None
    ang = np.arctan2(ys[keep] - cy, xs[keep] - cx)
    octants = np.unique(((ang + np.pi) / (np.pi / 4)).astype(int) % 8)
    if octants.size < 4:  # an arc in one corner could be anything; a circle shows all round
        return None

    # 4) the surround really is outside the circle, the inside is mostly image
    yy, xx = np.mgrid[0:sh, 0:sw]
    dist = np.hypot(xx - cx, yy - cy)
    outer = dist > r + 3
    if outer.any() and float(outside[outer].mean()) < 0.95:
        return None
    if float(dark[dist < r - 3].mean()) > 0.3:
        return None

    # mask at full resolution, circle shrunk by a margin that drops the blurred rim
    scale = float(step)
    cx_f, cy_f, r_f = (cx + 0.5) * scale - 0.5, (cy + 0.5) * scale - 0.5, r * scale
    margin = max(2.0, 0.01 * r_f)
    yy, xx = np.ogrid[0:h, 0:w]
    return ((xx - cx_f) ** 2 + (yy - cy_f) ** 2) <= (r_f - margin) ** 2


def _fit_circle(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float, float] | None:
    """Algebraic (Kasa) least-squares circle; works on partial arcs such as four corners."""
    if xs.size < 10:
        return None
    a = np.column_stack([xs, ys, np.ones_like(xs)])
    b = xs * xs + ys * ys
    try:
        sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    except np.linalg.LinAlgError:
        return None
    cx, cy = sol[0] / 2.0, sol[1] / 2.0
    r2 = sol[2] + cx * cx + cy * cy
    if not np.isfinite(r2) or r2 <= 0:
        return None
    return float(cx), float(cy), float(math.sqrt(r2))


# --- opening and decoding -----------------------------------------------------------------------

def _check_path(path: str | os.PathLike) -> Path:
    try:
        p = Path(os.fspath(path)).expanduser()
    except TypeError as e:
        raise ImageLoadError(f"{path!r} is not a file path", hint="pass the image file's path") from e
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except OSError as e:   # e.g. a parent folder without permission
        raise ImageLoadError(f"cannot access image '{p}': {e.strerror or e}",
                             hint="check the path and the folder permissions") from e
    if not exists:
        raise ImageLoadError(f"image '{p}' does not exist",
                             hint="check the path and spelling, or pick the file in the file dialog")
    if is_dir:
        raise ImageLoadError(f"image '{p}' is a folder, not an image file",
                             hint="choose one image file inside the folder")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ImageLoadError(f"cannot read image '{p}': {e.strerror or e}",
                             hint="check that the file is readable") from e
    if size == 0:
        raise ImageLoadError(f"image '{p}' is empty (0 bytes)",
                             hint="the file was not written completely; export or copy it again")
    return p


class _OpenedImage:
    """Context manager: open lazily (header only), check the size, close the file afterwards."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.im: Image.Image | None = None

    def __enter__(self) -> Image.Image:
        limit = max_pixels()
        with _pil_limit(limit):
            try:
                im = Image.open(self.path)   # lazy: reads the header, not the pixels
            except Image.DecompressionBombError as e:
                # PIL's own, stricter check fired inside open(); it only tells the pixel count
                m = re.search(r"\((\d+) pixels\)", str(e))
                raise _too_large(self.path, None, limit, int(m.group(1)) if m else None) from e
            except Exception as e:           # PIL raises many types on bad files
                raise _wrap_pil_error(self.path, e, "open") from e
        self.im = im
        w, h = im.size
        if w * h > limit:
            im.close()
            raise _too_large(self.path, (w, h), limit)
        return im

    def __exit__(self, *exc: object) -> None:
        if self.im is not None:
            self.im.close()


def _open_image(path: Path) -> _OpenedImage:
    return _OpenedImage(path)


class _pil_limit:
    """PIL has its own, global decompression-bomb check (a warning above ~89 MP, an error above
    ~179 MP) during open and load. Our limit was checked first from the header; silence PIL's
    warning, and only if the user raised our limit above PIL's error threshold lift PIL's limit
    while we open/decode (under a lock, restored afterwards)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lifted = False

    def __enter__(self) -> None:
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # decide from PIL's own value, not from one another thread lifted for the moment
        pil_max = _PIL_SAVED[0] if _PIL_SAVED else Image.MAX_IMAGE_PIXELS
        if pil_max is not None and self.limit > 2 * pil_max:
            _PIL_LIMIT_LOCK.acquire()
            _PIL_SAVED.append(Image.MAX_IMAGE_PIXELS)
            Image.MAX_IMAGE_PIXELS = self.limit
            self.lifted = True

    def __exit__(self, *exc: object) -> None:
        if self.lifted:
            Image.MAX_IMAGE_PIXELS = _PIL_SAVED.pop()
            _PIL_LIMIT_LOCK.release()
        self._warn.__exit__(*exc)


def _too_large(path: Path, size: tuple[int, int] | None, limit: int,
               n_pixels: int | None = None) -> ImageLoadError:
    if size is not None:
        what = f"{size[0]} x {size[1]} = {size[0] * size[1] / 1e6:.1f} megapixels"
    elif n_pixels is not None:
        what = f"{n_pixels / 1e6:.1f} megapixels"
    else:
        what = "larger than the decompression-bomb limit"
    return ImageLoadError(
        f"image '{path}' is too large ({what}; the limit is {limit / 1e6:g} megapixels)",
        hint=f"downscale or crop it first, or raise the limit with the environment variable "
             f"{MAX_PIXELS_ENV} (e.g. {MAX_PIXELS_ENV}={max(limit * 2, 200_000_000)})")


def _wrap_pil_error(path: Path, e: BaseException, stage: str) -> ImageLoadError:
    """Turn whatever PIL raised into a message the user can act on."""
    msg = str(e) or type(e).__name__
    if isinstance(e, MemoryError):
        return ImageLoadError(f"not enough memory to decode image '{path}'",
                              hint="downscale the image or close other programs")
    if isinstance(e, PermissionError):
        return ImageLoadError(f"cannot read image '{path}': permission denied",
                              hint="check the file's permissions")
    if isinstance(e, Image.UnidentifiedImageError) or (stage == "open" and "identify" in msg):
        ext = path.suffix.lower()
        looks = _sniff(path)
        detail = f" (it looks like {looks})" if looks else ""
        return ImageLoadError(
            f"'{path}' is not a readable image file{detail}"
            + (f"; the '{ext}' extension does not match its content" if ext and looks else ""),
            hint=SUPPORTED_HINT)
    if "truncated" in msg.lower() or isinstance(e, (EOFError, SyntaxError)) or "broken" in msg:
        return ImageLoadError(f"image '{path}' is truncated or corrupt ({msg})",
                              hint="the file is incomplete or damaged; copy or export it again")
    return ImageLoadError(f"cannot {'open' if stage == 'open' else 'decode'} reference image "
                          f"'{path}': {msg}",
                          hint=f"the file may be damaged or in an unusual variant; {SUPPORTED_HINT}")


def _sniff(path: Path) -> str | None:
    """A rough guess of what a non-image file is, for the error message."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head[:4] == b"PK\x03\x04":
        return "a ZIP archive"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return None


def _sha256(path: Path) -> str:
    """SHA-256 of the file bytes, streamed so that big files do not sit in memory twice."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise ImageLoadError(f"cannot read image '{path}': {e.strerror or e}",
                             hint="check that the file is readable") from e
    return h.hexdigest()


def _load_pixels(im: Image.Image, path: Path) -> None:
    """Decode the pixels (the expensive step), wrapping every PIL failure."""
    with _pil_limit(max_pixels()):
        try:
            im.load()
        except Image.DecompressionBombError as e:
            raise _too_large(path, im.size, max_pixels()) from e
        except Exception as e:
            raise _wrap_pil_error(path, e, "decode") from e


def _bit_depth(mode: str) -> int:
    if mode == "1":
        return 1
    if mode in _MODES_16BIT:
        return 16
    if mode in ("I", "F"):
        return 32
    return 8


def _stretch(a: np.ndarray, path: Path, bits: int, notes: list[str]) -> np.ndarray:
    """Map a 16/32-bit image's actual min..max to 0..1 so that nothing is clipped."""
    # float32 is exact for 16-bit samples; 32-bit int/float data keep float64 for the subtraction
    a = a.astype(np.float32 if bits == 16 else np.float64, copy=False)
    finite = np.isfinite(a)
    if not finite.all():
        if not finite.any():
            raise ImageLoadError(f"image '{path}' contains no finite values",
                                 hint="re-export the image; every pixel is NaN or infinite")
        notes.append(f"{int((~finite).sum())} NaN/infinite pixels set to the image minimum")
        a = np.where(finite, a, a[finite].min())
    lo, hi = float(a.min()), float(a.max())
    fmt = "g" if bits == 32 else "d"
    lo_s = format(lo if fmt == "g" else int(lo), fmt)
    hi_s = format(hi if fmt == "g" else int(hi), fmt)
    notes.append(f"{bits}-bit range {lo_s}..{hi_s} stretched to 0..1")
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)


def _decode_gray(im: Image.Image, path: Path, notes: list[str]) -> tuple[np.ndarray, int]:
    """Decode to float32 gray [0, 1]; returns (gray, bit depth of the source samples)."""
    mode = im.mode
    bits = _bit_depth(mode)
    if mode not in _MODES_8BIT | _MODES_16BIT | {"1", "I", "F"}:
        raise ImageLoadError(f"image '{path}' has an unsupported pixel mode {mode!r}",
                             hint=f"convert it to 8- or 16-bit gray; {SUPPORTED_HINT}")
    _load_pixels(im, path)
    try:
        if mode == "1":
            return np.asarray(im, dtype=np.float32), 1
        if mode == "L":
            return np.asarray(im, dtype=np.float32) / np.float32(255.0), 8
        if mode in _MODES_16BIT or mode in ("I", "F"):
            return _stretch(np.asarray(im), path, bits, notes), bits
        rgb, alpha = _rgb_alpha(im, notes)
        if rgb.ndim == 2:  # LA: gray + alpha
            gray = rgb
        else:
            gray = _luma(rgb)
            notes.append(f"{'palette' if mode in ('P', 'PA') else 'colour'} image ({mode}) "
                         "converted to gray by luminance (0.299 R + 0.587 G + 0.114 B)")
        if alpha is not None:
            gray = gray * alpha
        return np.clip(gray, 0.0, 1.0).astype(np.float32, copy=False), bits
    except ImageLoadError:
        raise
    except Exception as e:
        raise _wrap_pil_error(path, e, "decode") from e


def _rgb_alpha(im: Image.Image, notes: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """8-bit modes to float colour in [0, 1] (H, W, 3) or gray (H, W) for LA, plus alpha.

    Alpha is returned separately so that the caller composites over black (premultiplies);
    micrographs have no meaningful background colour and black is what the microscope shows
    where there is no signal.
    """
    mode = im.mode
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        mode = im.mode
    elif mode == "La":
        im, mode = im.convert("LA"), "LA"
    elif mode == "RGBa":
        im, mode = im.convert("RGBA"), "RGBA"
    elif mode in ("CMYK", "YCbCr", "HSV", "LAB", "RGBX"):
        if mode == "CMYK":
            notes.append("CMYK image converted to RGB with PIL's simple formula (no colour profile)")
        im, mode = im.convert("RGB"), "RGB"
    a = np.asarray(im)
    alpha = None
    if mode in ("RGBA", "LA"):
        alpha_u8 = a[..., -1]
        a = a[..., 0] if mode == "LA" else a[..., :3]
        if (alpha_u8 < 255).any():
            share = 100.0 * float((alpha_u8 < 255).mean())
            notes.append(f"alpha channel composited over black ({share:.1f}% of pixels "
                         "partly or fully transparent)")
            alpha = alpha_u8.astype(np.float32) / np.float32(255.0)
        else:
            notes.append("alpha channel is fully opaque; ignored (would be composited over black)")
    return a.astype(np.float32) / np.float32(255.0), alpha


def _luma(rgb: np.ndarray) -> np.ndarray:
    # channel by channel to keep peak memory at two float32 planes for huge images
    out = rgb[..., 0] * np.float32(_LUMA[0])
    out += rgb[..., 1] * np.float32(_LUMA[1])
    out += rgb[..., 2] * np.float32(_LUMA[2])
    return out


def _decode_rgb(im: Image.Image, path: Path) -> np.ndarray:
    notes: list[str] = []
    mode = im.mode
    if mode in _MODES_16BIT or mode in ("1", "I", "F"):
        gray, _ = _decode_gray(im, path, notes)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode not in _MODES_8BIT:
        raise ImageLoadError(f"image '{path}' has an unsupported pixel mode {mode!r}",
                             hint=f"convert it to 8-bit RGB or gray; {SUPPORTED_HINT}")
    _load_pixels(im, path)
    try:
        if mode == "L":
            g = np.asarray(im, dtype=np.float32) / np.float32(255.0)
            return np.repeat(g[..., None], 3, axis=2)
        rgb, alpha = _rgb_alpha(im, notes)
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[..., None], 3, axis=2)
        if alpha is not None:
            rgb = rgb * alpha[..., None]
        return np.ascontiguousarray(rgb, dtype=np.float32)
    except ImageLoadError:
        raise
    except Exception as e:
        raise _wrap_pil_error(path, e, "decode") from e


# --- metadata ---------------------------------------------------------------------------------------

_UNIT_NM = {"pm": 1e-3, "nm": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3, "mm": 1e6, "m": 1e9}


def _tag_text(tags: dict, key: int) -> str | None:
    val = tags.get(key)
    if val is None:
        return None
    if isinstance(val, (tuple, list)):
        if val and all(isinstance(v, int) and 0 <= v < 256 for v in val):
            val = bytes(val)                       # BYTE/UNDEFINED tags come as int tuples
        elif len(val) == 1:
            val = val[0]
        else:
            return None
    if isinstance(val, bytes):
        return val.decode("latin-1", errors="replace")
    return str(val)


def _note_orientation(im: Image.Image, notes: list[str]) -> None:
    """Micrographs are used as stored; say so if EXIF asks viewers to rotate the image."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # broken EXIF must not stop loading
        return
    if orientation not in (None, 1):
        notes.append(f"EXIF orientation {orientation} ignored; pixels are used as stored")


def _pixel_size_nm(im: Image.Image, notes: list[str]) -> float | None:
    """Pixel size from TIFF tags: SEM vendor tags first (FEI/Thermo, Zeiss, Tescan), then
    XResolution/ResolutionUnit. None when absent or when it is only a screen/print DPI."""
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return None
    try:
        # FEI / Thermo Fisher (34680, 34682): INI text, "[Scan] PixelWidth=<metres>"
        for key in (34682, 34680):
            text = _tag_text(tags, key)
            if text:
                m = re.search(r"^\s*PixelWidth\s*=\s*([0-9.eE+-]+)", text, re.M)
                if m and float(m.group(1)) > 0:
                    notes.append("pixel size from the FEI/Thermo TIFF tag")
                    return float(m.group(1)) * 1e9
        # Zeiss SmartSEM (34118): "Image Pixel Size = 2.345 nm"
        text = _tag_text(tags, 34118)
        if text:
            m = re.search(r"Image Pixel Size\s*=\s*([0-9.eE+-]+)\s*(pm|nm|um|µm|μm|mm)", text)
            if m and float(m.group(1)) > 0:
                notes.append("pixel size from the Zeiss SmartSEM TIFF tag")
                return float(m.group(1)) * _UNIT_NM[m.group(2)]
        # Tescan (50431): INI text, "PixelSizeX=<metres>"
        text = _tag_text(tags, 50431)
        if text:
            m = re.search(r"PixelSizeX\s*=\s*([0-9.eE+-]+)", text)
            if m and float(m.group(1)) > 0:
                notes.append("pixel size from the Tescan TIFF tag")
                return float(m.group(1)) * 1e9
        xres = tags.get(282)
        unit = tags.get(296, 2)
        if xres is None or unit not in (2, 3):
            return None
        xres = float(xres)
        if not xres > 0 or not math.isfinite(xres):
            return None
        nm = (2.54e7 if unit == 2 else 1e7) / xres
        # 72/96/300 dpi and the like describe a screen or printer, not a microscope: anything
        # coarser than 0.1 mm per pixel is not a calibration.
        if nm > 1e5:
            notes.append(f"TIFF resolution ({xres:g} per {'inch' if unit == 2 else 'cm'}) looks "
                         "like a display DPI, not a calibration; pixel size unknown")
            return None
        notes.append("pixel size from TIFF XResolution/ResolutionUnit")
        return nm
    except (ValueError, TypeError, ZeroDivisionError, KeyError):
        return None  # malformed metadata must not stop the image from loading


# --- crop and resampling ----------------------------------------------------------------------------

def _validate_crop(crop: object, w: int, h: int, path: Path) -> tuple[int, int, int, int]:
    try:
        vals = tuple(crop)  # type: ignore[arg-type]
        if len(vals) != 4 or any(float(v) != int(v) for v in vals):
            raise ValueError
        x0, y0, x1, y1 = (int(v) for v in vals)
    except (TypeError, ValueError) as e:
        raise ImageLoadError(f"crop {crop!r} for '{path}' is not four integers (x0, y0, x1, y1)",
                             hint="give the crop as x0, y0, x1, y1 in pixels, end exclusive") from e
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ImageLoadError(f"crop {vals} lies outside image '{path}' ({w} x {h})",
                             hint=f"use 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}")
    if x1 - x0 < MIN_SIDE or y1 - y0 < MIN_SIDE:
        raise ImageLoadError(f"crop {vals} of '{path}' is too small ({x1 - x0} x {y1 - y0})",
                             hint=f"choose a region of at least {MIN_SIDE} x {MIN_SIDE} pixels")
    return x0, y0, x1, y1


def _area_downsample(a: np.ndarray, max_side: int) -> np.ndarray:
    """Area-average (PIL BOX) a 2-D float image so that its longer side is <= max_side."""
    if int(max_side) < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    h, w = a.shape
    longer = max(h, w)
    if longer <= max_side:
        return a.copy()
    scale = max_side / longer
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    out = Image.fromarray(a).resize((nw, nh), Image.Resampling.BOX)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)

