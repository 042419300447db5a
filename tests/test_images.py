"""Tests for fitting.images: real references, every supported file kind, and every bad input."""
from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, TiffImagePlugin

from fitting.reference import loading as images
from fitting.core.errors import ImageLoadError
from fitting.reference.loading import ReferenceImage, load_image_rgb, load_reference
from fitting.reference.regions import detect_aperture, detect_data_bar

LICOVO4 = "ParticleAnalyzer__Cathode_LiCoVO4.jpg"
APERTURE = "ParticleMixtureAnalysis__image_000_00006.png"
NO_BAR = ["CarbonBlackSegmentation__20180529_A9_003.png",
          "CarbonBlackSegmentation__201805A_A6_004.png",
          APERTURE]
# First row of the white Tescan data bar: found by viewing rows 1150..1400 and by row statistics
# (row 1279 is image, mean ~157 and std ~50; rows 1280.. are white, >97 % of pixels >= 240).
LICOVO4_BAR_ROW = 1280

LUMA = np.array([0.299, 0.587, 0.114])
RNG = np.random.default_rng(1234)


# --- helpers ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def refs(reference_dir: Path) -> dict[str, ReferenceImage]:
    """All four real references, loaded once (they are the slow part)."""
    return {name: load_reference(reference_dir / name) for name in NO_BAR + [LICOVO4]}


def noise_u8(h: int, w: int, channels: int | None = None) -> np.ndarray:
    shape = (h, w) if channels is None else (h, w, channels)
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def expect_error(path, *fragments: str, **kw) -> ImageLoadError:
    """load_reference must raise ImageLoadError naming the file, the problem and a hint."""
    with pytest.raises(ImageLoadError) as info:
        load_reference(path, **kw)
    err = info.value
    text = str(err).lower()
    assert Path(path).name.lower() in text, f"error does not name the file: {err}"
    for frag in fragments:
        assert frag.lower() in text, f"{frag!r} not in {err}"
    assert err.hint, "every load error carries a hint saying what to do"
    return err


def png_with_header_size(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height but whose pixel data is tiny (a 'bomb')."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))


# --- real reference images ------------------------------------------------------------------------

def test_licovo4_true_boundary_is_where_we_think(reference_dir: Path) -> None:
    # Guards the constant the detector is checked against, independently of the detector.
    with Image.open(reference_dir / LICOVO4) as im:
        a = np.asarray(im, dtype=np.float64)
    assert a.shape == (1400, 1280)
    above, first = a[LICOVO4_BAR_ROW - 1], a[LICOVO4_BAR_ROW]
    assert above.mean() < 180 and above.std() > 30          # image content
    assert (first >= 240).mean() > 0.95                       # flat white bar background


def test_licovo4_data_bar_is_cropped(refs: dict[str, ReferenceImage]) -> None:
    r = refs[LICOVO4]
    assert r.bar_detected
    x0, y0, x1, y1 = r.crop_box
    assert (x0, y0, x1) == (0, 0, 1280)
    assert abs(y1 - LICOVO4_BAR_ROW) <= 8
    assert r.cropped.shape == (y1, 1280)
    assert r.pixels.shape == (1400, 1280)                   # full image is kept
    # the cropped region contains no flat white bar rows
    assert (r.cropped[-1] >= 240 / 255).mean() < 0.5
    assert any("data bar" in n for n in r.notes)
    assert r.valid_mask is None


@pytest.mark.parametrize("name", NO_BAR)
def test_references_without_bar_are_not_cropped(refs: dict[str, ReferenceImage], name: str) -> None:
    r = refs[name]
    w, h = r.original_size
    assert not r.bar_detected
    assert r.crop_box == (0, 0, w, h)
    assert r.cropped.shape == r.pixels.shape == (h, w)


def test_reference_metadata(refs: dict[str, ReferenceImage], reference_dir: Path) -> None:
    for name, r in refs.items():
        data = (reference_dir / name).read_bytes()
        assert r.sha256 == hashlib.sha256(data).hexdigest()
        assert r.name == name and Path(r.path) == reference_dir / name
        assert r.mode == "L" and r.bit_depth == 8
        assert r.pixels.dtype == np.float32 and r.pixels.ndim == 2
        assert 0.0 <= r.pixels.min() < r.pixels.max() <= 1.0
        with Image.open(reference_dir / name) as im:
            raw = np.asarray(im, dtype=np.float32) / 255
        np.testing.assert_allclose(r.pixels, raw, atol=1e-6)   # 8-bit is not stretched
        d = r.to_dict()
        json.dumps(d)                                            # JSON-able, no arrays
        assert d["sha256"] == r.sha256 and d["crop_box"] == list(r.crop_box)
        assert d["original_size"] == list(r.original_size) and "pixels" not in d
    assert refs[LICOVO4].original_size == (1280, 1400)


def test_round_aperture_mask(refs: dict[str, ReferenceImage]) -> None:
    r = refs[APERTURE]
    m = r.valid_mask
    assert m is not None and m.dtype == bool and m.shape == r.pixels.shape
    assert not m[0, 0] and not m[0, -1] and not m[-1, 0] and not m[-1, -1]
    h, w = m.shape
    assert m[h // 2, w // 2] and m[h // 2, w // 4] and m[h // 2, 3 * w // 4]
    invalid = ~m
    assert 0.05 < invalid.mean() < 0.3
    # what is masked out is the flat black surround (plus a thin rim), not image content
    assert (r.pixels[invalid] <= 0.1).mean() > 0.95
    assert (r.pixels[m] <= 6 / 255).mean() < 0.001
    assert r.crop_box == (0, 0, w, h)                            # apertures are masked, not cropped
    wm = r.working_mask(256)
    assert wm is not None and wm.shape == r.working(256).shape and not wm[0, 0]
    for name in NO_BAR[:2] + [LICOVO4]:
        assert refs[name].valid_mask is None and refs[name].working_mask() is None


def test_working_size(refs: dict[str, ReferenceImage]) -> None:
    r = refs[NO_BAR[0]]                                          # 2240 x 1952
    wk = r.working()
    assert wk.dtype == np.float32 and wk.shape == (446, 512)
    assert r.working(1000).shape == (871, 1000)
    bar = refs[LICOVO4]                                          # cropped to 1280 x ~1280
    assert max(bar.working(300).shape) == 300
    full = r.working(5000)                                       # never upsampled
    assert full.shape == r.pixels.shape and full is not r.pixels


# --- generated files: every supported kind -------------------------------------------------------

def test_16bit_tiff_is_stretched_min_max(tmp_path: Path) -> None:
    a = RNG.integers(1200, 40001, (40, 50)).astype(np.uint16)
    a[0, 0], a[0, 1] = 1200, 40000
    Image.fromarray(a).save(tmp_path / "g16.tif")
    r = load_reference(tmp_path / "g16.tif")
    assert r.bit_depth == 16 and r.mode.startswith("I;16")
    np.testing.assert_allclose(r.pixels, (a - 1200.0) / (40000 - 1200), atol=1e-6)
    assert "16-bit range 1200..40000 stretched to 0..1" in r.notes


def test_32bit_float_and_int_tiff(tmp_path: Path) -> None:
    f = (RNG.random((32, 40)) * 6 - 2).astype(np.float32)
    Image.fromarray(f).save(tmp_path / "f32.tif")
    r = load_reference(tmp_path / "f32.tif")
    assert r.mode == "F" and r.bit_depth == 32
    np.testing.assert_allclose(r.pixels, (f - f.min()) / (f.max() - f.min()), atol=1e-6)
    assert any(n.startswith("32-bit range") for n in r.notes)

    i = RNG.integers(-100000, 100000, (32, 40)).astype(np.int32)
    Image.fromarray(i).save(tmp_path / "i32.tif")
    r = load_reference(tmp_path / "i32.tif")
    assert r.mode == "I" and r.bit_depth == 32
    assert r.pixels.min() == 0.0 and r.pixels.max() == 1.0
    np.testing.assert_allclose(r.pixels, (i - i.min()) / float(i.max() - i.min()), atol=1e-6)


def test_palette_png_uses_palette_luminance(tmp_path: Path) -> None:
    pal = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [100, 150, 200]], dtype=np.uint8)
    idx = RNG.integers(0, 4, (24, 30)).astype(np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette(pal.ravel().tolist())
    im.save(tmp_path / "pal.png")
    r = load_reference(tmp_path / "pal.png")
    assert r.mode == "P" and r.bit_depth == 8
    np.testing.assert_allclose(r.pixels, (pal @ LUMA / 255)[idx], atol=1e-5)
    assert any("luminance" in n for n in r.notes)


def test_rgba_png_composited_over_black(tmp_path: Path) -> None:
    rgba = noise_u8(20, 24, 4)
    rgba[0, 0] = (200, 100, 50, 128)
    rgba[0, 1, 3] = 0                                            # fully transparent -> black
    rgba[0, 2, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    r = load_reference(tmp_path / "rgba.png")
    expected = (rgba[..., :3] @ LUMA) / 255 * (rgba[..., 3] / 255)
    np.testing.assert_allclose(r.pixels, expected, atol=1e-5)
    assert r.pixels[0, 0] == pytest.approx((0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255 * 128 / 255,
                                           abs=1e-5)
    assert r.pixels[0, 1] == 0.0
    assert any("composited over black" in n for n in r.notes)
    rgb = load_image_rgb(tmp_path / "rgba.png")
    assert rgb.shape == (20, 24, 3) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb, rgba[..., :3] / 255 * (rgba[..., 3:] / 255), atol=1e-5)


def test_la_png_composited_over_black(tmp_path: Path) -> None:
    la = noise_u8(20, 20, 2)
    la[5, 5] = (200, 51)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    r = load_reference(tmp_path / "la.png")
    np.testing.assert_allclose(r.pixels, la[..., 0] / 255 * la[..., 1] / 255, atol=1e-5)
    assert r.pixels[5, 5] == pytest.approx(200 / 255 * 51 / 255, abs=1e-6)
    assert any("composited over black" in n for n in r.notes)


def test_multipage_tiff_uses_first_page(tmp_path: Path) -> None:
    p1, p2 = noise_u8(20, 30), np.full((20, 30), 7, np.uint8)
    Image.fromarray(p1).save(tmp_path / "multi.tif", save_all=True,
                             append_images=[Image.fromarray(p2)])
    with Image.open(tmp_path / "multi.tif") as im:
        assert im.n_frames == 2
    r = load_reference(tmp_path / "multi.tif")
    np.testing.assert_allclose(r.pixels, p1 / 255, atol=1e-6)
    assert any("first" in n for n in r.notes)


@pytest.mark.parametrize("ext,kw", [("bmp", {}), ("webp", {"lossless": True}), ("png", {})])
def test_lossless_rgb_formats(tmp_path: Path, ext: str, kw: dict) -> None:
    rgb = noise_u8(24, 32, 3)
    Image.fromarray(rgb).save(tmp_path / f"c.{ext}", **kw)
    r = load_reference(tmp_path / f"c.{ext}")
    assert r.mode == "RGB" and r.pixels.shape == (24, 32)
    np.testing.assert_allclose(r.pixels, rgb @ LUMA / 255, atol=1e-5)


def test_gray_jpeg_and_bilevel(tmp_path: Path) -> None:
    g = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    Image.fromarray(g).save(tmp_path / "g.jpg", quality=95)
    r = load_reference(tmp_path / "g.jpg")
    assert r.mode == "L" and np.abs(r.pixels - g / 255).max() < 0.05

    b = noise_u8(20, 20) > 127
    Image.fromarray(b).save(tmp_path / "b.png")
    r = load_reference(tmp_path / "b.png")
    assert r.mode == "1" and r.bit_depth == 1
    np.testing.assert_array_equal(r.pixels, b.astype(np.float32))


def test_cmyk_jpeg(tmp_path: Path) -> None:
    im = Image.new("CMYK", (32, 32), (0, 0, 0, 0))               # white paper
    im.paste((0, 0, 0, 255), (0, 16, 32, 32))                    # bottom half full black ink
    im.save(tmp_path / "cmyk.jpg", quality=95)
    r = load_reference(tmp_path / "cmyk.jpg")
    assert r.mode == "CMYK"
    assert r.pixels[:12].mean() > 0.95 and r.pixels[20:].mean() < 0.05
    assert any("CMYK" in n for n in r.notes)


def test_content_wins_over_extension(tmp_path: Path) -> None:
    g = noise_u8(20, 20)
    Image.fromarray(g).save(tmp_path / "really_png.jpg", format="PNG")
    np.testing.assert_allclose(load_reference(tmp_path / "really_png.jpg").pixels, g / 255, atol=1e-6)


def test_pixel_size_from_tiff_tags(tmp_path: Path) -> None:
    im = Image.fromarray(noise_u8(20, 20))
    im.save(tmp_path / "cm.tif", resolution=1e5, resolution_unit="cm")   # 1e5 px/cm = 100 nm
    assert load_reference(tmp_path / "cm.tif").pixel_size_nm == pytest.approx(100.0)
    im.save(tmp_path / "dpi.tif", dpi=(72, 72))                  # a screen DPI is no calibration
    r = load_reference(tmp_path / "dpi.tif")
    assert r.pixel_size_nm is None and any("DPI" in n for n in r.notes)
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[34682] = "[Scan]\r\nPixelWidth=2.5e-09\r\n"               # FEI/Thermo SEM tag, metres
    ifd.tagtype[34682] = 2
    im.save(tmp_path / "fei.tif", tiffinfo=ifd, resolution=1e5, resolution_unit="cm")
    assert load_reference(tmp_path / "fei.tif").pixel_size_nm == pytest.approx(2.5)
    im.save(tmp_path / "none.png")
    assert load_reference(tmp_path / "none.png").pixel_size_nm is None


@pytest.mark.parametrize("dpi", [72, 96, 254, 300, 600, 2400])
def test_print_dpi_is_no_pixel_size(tmp_path: Path, dpi: int) -> None:
    """A JEOL SEM TIFF with XResolution 254 per inch was reported as 100000 nm per pixel."""
    Image.fromarray(noise_u8(20, 20)).save(tmp_path / "jeol.tif", dpi=(dpi, dpi))
    r = load_reference(tmp_path / "jeol.tif")
    assert r.pixel_size_nm is None and r.to_dict()["pixel_size_nm"] is None
    assert any("DPI" in n for n in r.notes)


def test_pixel_size_and_instrument_from_vendor_text(tmp_path: Path) -> None:
    im = Image.fromarray(noise_u8(20, 20))
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[270] = "JEOL JSM-7800F SEM, Secondary electrons, PixelSize = 12.5 nm"
    ifd.tagtype[270] = 2
    im.save(tmp_path / "jeol.tif", tiffinfo=ifd, dpi=(254, 254))
    r = load_reference(tmp_path / "jeol.tif")
    assert r.pixel_size_nm == pytest.approx(12.5)
    assert r.imaging_tag == "sem" and "270" in r.imaging_tag_cue
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[305] = "DigitalMicrograph 3.5 (Gatan)"
    ifd.tagtype[305] = 2
    im.save(tmp_path / "gatan.tif", tiffinfo=ifd)
    assert load_reference(tmp_path / "gatan.tif").imaging_tag == "tem"
    im.save(tmp_path / "plain.tif")
    assert load_reference(tmp_path / "plain.tif").imaging_tag is None


# --- bad input ---------------------------------------------------------------------------------------

def test_missing_directory_empty(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.png", "does not exist")
    (tmp_path / "folder.png").mkdir()
    expect_error(tmp_path / "folder.png", "folder")
    (tmp_path / "empty.png").write_bytes(b"")
    expect_error(tmp_path / "empty.png", "empty")


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("particle sizes: 12, 15, 20 nm\n")
    err = expect_error(tmp_path / "notes.png", "not a readable image", "text file")
    assert isinstance(err.__cause__, Image.UnidentifiedImageError)   # PIL's error chained, not shown
    with pytest.raises(ImageLoadError, match="not a readable image"):
        load_image_rgb(tmp_path / "notes.png")


def test_truncated_png(tmp_path: Path) -> None:
    Image.fromarray(noise_u8(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "cut.png", "truncated")


def test_too_small(tmp_path: Path) -> None:
    Image.new("L", (1, 1), 128).save(tmp_path / "dot.png")
    expect_error(tmp_path / "dot.png", "too small", "1 x 1")
    Image.fromarray(noise_u8(15, 40)).save(tmp_path / "strip.png")
    expect_error(tmp_path / "strip.png", "too small")


def test_unsupported_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every mode today's Pillow produces is handled; simulate a new one by withdrawing RGB.
    Image.fromarray(noise_u8(20, 20, 3)).save(tmp_path / "rgb.png")
    monkeypatch.setattr(images, "_MODES_8BIT", images._MODES_8BIT - {"RGB"})
    expect_error(tmp_path / "rgb.png", "unsupported pixel mode", "'RGB'")


def test_constant_image_rejected(tmp_path: Path) -> None:
    Image.new("L", (32, 32), 90).save(tmp_path / "flat.png")
    expect_error(tmp_path / "flat.png", "single gray value")


def test_pixel_limit_checked_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(noise_u8(100, 100)).save(tmp_path / "big.png")
    decoded: list[object] = []
    original_load = ImageFile.ImageFile.load

    def spy_load(self):
        decoded.append(self)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    monkeypatch.setenv("MATFIT_MAX_PIXELS", "5000")
    expect_error(tmp_path / "big.png", "too large", "100 x 100", "MATFIT_MAX_PIXELS")
    assert decoded == [], "pixels were decoded before the size check"
    monkeypatch.setenv("MATFIT_MAX_PIXELS", "20000")
    assert load_reference(tmp_path / "big.png").original_size == (100, 100)
    assert decoded, "the spy sees real decodes"
    monkeypatch.setenv("MATFIT_MAX_PIXELS", "lots")
    with pytest.raises(ImageLoadError, match="MATFIT_MAX_PIXELS"):
        load_reference(tmp_path / "big.png")


def test_header_bomb_with_default_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 20000 x 20000 = 400 MP claimed by the header, a few bytes of data: decoding would fail as
    # "truncated", so the "too large" message proves the header was checked first.
    monkeypatch.delenv("MATFIT_MAX_PIXELS", raising=False)
    png_with_header_size(tmp_path / "bomb.png", 20000, 20000)
    expect_error(tmp_path / "bomb.png", "too large", "400.0 megapixels", "limit is 100 megapixels")


def test_our_limit_overrides_pils_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # PIL refuses images above 2 * Image.MAX_IMAGE_PIXELS by itself; a user who raised
    # MATFIT_MAX_PIXELS must still get the image, and PIL's global must be left as it was.
    Image.fromarray(noise_u8(100, 100)).save(tmp_path / "img.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)      # 10000 px > 2 * 1000
    monkeypatch.setenv("MATFIT_MAX_PIXELS", "20000")
    assert load_reference(tmp_path / "img.png").original_size == (100, 100)
    assert load_image_rgb(tmp_path / "img.png").shape == (100, 100, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000
    monkeypatch.setenv("MATFIT_MAX_PIXELS", "5000")             # and ours still applies
    expect_error(tmp_path / "img.png", "too large", "limit is 0.005 megapixels")


# --- crop override -------------------------------------------------------------------------------------

def test_crop_override(reference_dir: Path) -> None:
    path = reference_dir / LICOVO4
    r = load_reference(path, crop=(100, 50, 612, 562))
    assert r.crop_box == (100, 50, 612, 562) and not r.bar_detected
    assert r.cropped.shape == (512, 512)
    np.testing.assert_array_equal(r.cropped, r.pixels[50:562, 100:612])
    assert any("caller" in n for n in r.notes)
    r = load_reference(path, detect_bar=False)
    assert r.crop_box == (0, 0, 1280, 1400) and not r.bar_detected
    for bad, frag in [((0, 0, 1281, 100), "outside"), ((-1, 0, 100, 100), "outside"),
                      ((100, 100, 50, 200), "outside"), ((0, 0, 15, 100), "too small"),
                      ((0, 0, 100), "four integers"), ((0, 0, 10.5, 100), "four integers")]:
        expect_error(path, frag, crop=bad)


# --- detectors on synthetic images ------------------------------------------------------------------

def _textured(h: int, w: int) -> np.ndarray:
    from scipy import ndimage
    return np.clip(0.5 + 2.5 * ndimage.gaussian_filter(RNG.standard_normal((h, w)), 3), 0, 1)


def test_detect_data_bar_synthetic() -> None:
    img = _textured(400, 300).astype(np.float32)
    assert detect_data_bar(img) is None
    bar = img.copy()
    bar[350:] = 0.0                                              # black bar with white "text"
    bar[360:372, 20:120] = 1.0
    bar[380:383, 150:280] = 1.0                                  # scale bar
    assert detect_data_bar(bar) == 350
    lined = bar.copy()
    lined[350:352] = 1.0                                         # white boundary line on top
    assert detect_data_bar(lined) == 350
    assert detect_data_bar(bar[::-1].copy()) is None             # a bar at the top is not ours
    high = img.copy()
    high[200:] = 0.0                                             # above the bottom 35 %: ignored
    assert detect_data_bar(high) is None
    with pytest.raises(ValueError):
        detect_data_bar(np.zeros((10, 10, 3)))


def test_detect_aperture_synthetic() -> None:
    yy, xx = np.mgrid[0:300, 0:360]
    inside = np.hypot(xx - 180, yy - 150) < 140
    img = np.where(inside, 0.2 + 0.6 * _textured(300, 360), 0.02).astype(np.float32)
    m = detect_aperture(img)
    assert m is not None
    assert not (m & ~inside).any()                               # never marks surround as valid
    assert m[inside].mean() > 0.95
    # a full circle with black below is neither a data bar nor cropped
    assert detect_data_bar(img) is None
    assert detect_aperture(_textured(300, 360).astype(np.float32)) is None
