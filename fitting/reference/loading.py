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
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fitting.core.errors import ImageLoadError
from fitting.reference.metadata import _note_orientation, _pixel_size_nm, imaging_from_tags
from fitting.reference.regions import MIN_SIDE, detect_aperture, detect_data_bar

# --- limits -----------------------------------------------------------------------------------

DEFAULT_MAX_PIXELS = 100_000_000   # 100 megapixels; MATFIT_MAX_PIXELS overrides
MAX_PIXELS_ENV = "MATFIT_MAX_PIXELS"

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
    # Instrument kind named by the file's tags ("sem", "tem", "optical") and the tag that said it.
    imaging_tag: str | None = None
    imaging_tag_cue: str | None = None

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
            "imaging_tag": self.imaging_tag,
            "imaging_tag_cue": self.imaging_tag_cue,
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
        tag_kind = imaging_from_tags(im)
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
                          valid_mask=valid_mask, notes=notes,
                          imaging_tag=tag_kind[0] if tag_kind else None,
                          imaging_tag_cue=tag_kind[1] if tag_kind else None)


def load_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Load any image (e.g. a texture, not a reference) as float32 (H, W, 3) RGB in [0, 1].

    Same checks and error messages as :func:`load_reference`; alpha is composited over black,
    gray images are replicated into three channels, 16/32-bit images are stretched min..max.
    """
    p = _check_path(path)
    with _open_image(p) as im:
        return _decode_rgb(im, p)


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
