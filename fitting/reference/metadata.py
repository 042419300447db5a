"""What a reference file's tags say: pixel size (vendor tags, calibrated TIFF resolution), the
instrument kind (SEM / TEM / optical) where a vendor tag or text names it, and orientation.
"""
from __future__ import annotations

import math
import re

from PIL import Image

_UNIT_NM = {"pm": 1e-3, "nm": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3, "micron": 1e3, "mm": 1e6, "m": 1e9}
#: Resolutions per inch below this are print or screen DPIs (a microscope calibration stored per
#: inch is at least ~25 000 per inch: 1 um pixels).
_MAX_PRINT_DPI = 10_000
_PIXEL_SIZE_TEXT = re.compile(
    r"pixel[ _-]?(?:size|width|spacing)[ _-]?x?\s*[=:]\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*"
    r"(pm|nm|um|µm|μm|micron|mm|m)?\b", re.I)

#: Words that name the instrument kind in vendor tags and free text, strongest first.
_KIND_WORDS = (
    ("tem", re.compile(r"\b(S?TEM|transmission electron|DigitalMicrograph|Gatan|bright[- ]field TEM|"
                       r"HAADF|selected area|EFTEM)\b", re.I)),
    ("sem", re.compile(r"\b(SEM|scanning electron|secondary electrons?|SE2|InLens|in-lens|BSE|"
                       r"backscatter\w*|ETD|Everhart|WD\s*=|Working ?Distance)\b", re.I)),
    ("optical", re.compile(r"\b(optical|light microscop\w*|brightfield|bright-field microscop\w*|"
                           r"objective|numerical aperture|DIC|phase contrast|endoscop\w*)\b", re.I)),
)


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
        # Free-text tags (ImageDescription 270, XMP 700; JEOL, Hitachi and others write
        # "PixelSize = 2.5 nm" or "pixel_size: 2.5e-9" there).
        for key in (270, 700):
            nm = _pixel_size_in_text(_tag_text(tags, key))
            if nm is not None:
                notes.append(f"pixel size from the TIFF {'ImageDescription' if key == 270 else 'XMP'} text")
                return nm
        xres = tags.get(282)
        unit = tags.get(296, 2)
        if xres is None or unit not in (2, 3):
            return None
        xres = float(xres)
        if not xres > 0 or not math.isfinite(xres):
            return None
        nm = (2.54e7 if unit == 2 else 1e7) / xres
        # A resolution per inch of a few hundred or thousand (72, 96, 254, 300, 600 dpi ...)
        # describes a screen or printer, not a microscope; so does anything coarser than 10 um
        # per pixel in any unit.
        if (unit == 2 and xres < _MAX_PRINT_DPI) or nm > 1e4:
            notes.append(f"TIFF resolution ({xres:g} per {'inch' if unit == 2 else 'cm'}) looks "
                         "like a display or print DPI, not a calibration; pixel size unknown")
            return None
        notes.append("pixel size from TIFF XResolution/ResolutionUnit")
        return nm
    except (ValueError, TypeError, ZeroDivisionError, KeyError):
        return None  # malformed metadata must not stop the image from loading


def _pixel_size_in_text(text: str | None) -> float | None:
    """Pixel size (nm) from a ``PixelSize = 2.5 nm``-style line; a bare number below 1e-3 is
    taken as metres (the SI habit of vendors that omit the unit), other bare numbers as nm."""
    if not text:
        return None
    m = _PIXEL_SIZE_TEXT.search(text)
    if not m:
        return None
    value = float(m.group(1))
    if not value > 0 or not math.isfinite(value):
        return None
    unit = m.group(2)
    nm = value * _UNIT_NM[unit.lower() if unit.lower() in _UNIT_NM else unit] if unit else (
        value * 1e9 if value < 1e-3 else value)
    return nm if 1e-3 <= nm <= 1e5 else None


def imaging_from_tags(im: Image.Image) -> tuple[str, str] | None:
    """The instrument kind named by the file's tags: ``(kind, cue)`` or None.

    SEM vendors' private TIFF tags (Zeiss SmartSEM 34118, Tescan 50431) mean SEM; FEI/Thermo's
    INI tag (34680/34682) and the free-text tags (ImageDescription, XMP, Software, Make, Model)
    are searched for words that name the technique (``TEM``, ``secondary electrons``, ``InLens``,
    ``objective`` ...).
    """
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return None
    try:
        if _tag_text(tags, 34118):
            return "sem", "Zeiss SmartSEM TIFF tag"
        if _tag_text(tags, 50431):
            return "sem", "Tescan TIFF tag"
        texts = [(key, _tag_text(tags, key)) for key in (34682, 34680, 270, 700, 305, 271, 272)]
        for kind, words in _KIND_WORDS:
            for key, text in texts:
                if text and (m := words.search(text)):
                    return kind, f"TIFF tag {key} says {m.group(0)!r}"
    except (ValueError, TypeError, KeyError):
        return None
    return None
