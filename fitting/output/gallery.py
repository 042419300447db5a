"""Contact sheets: the library gallery and the reference-vs-library sheet."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fitting.core.files import atomic_write_bytes


def _font(size: int = 14):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _tile(img: np.ndarray, label: str, size: int, sub: str = "") -> Image.Image:
    pad = 40 if sub else 24
    tile = Image.new("L", (size, size + pad), 255)
    tile.paste(Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).resize((size, size)), (0, pad))
    d = ImageDraw.Draw(tile)
    d.text((4, 3), label, fill=0, font=_font(13))
    if sub:
        d.text((4, 20), sub, fill=80, font=_font(11))
    return tile


def _grid(tiles: list[Image.Image], cols: int) -> Image.Image:
    w, h = tiles[0].size
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("L", (cols * (w + 6) + 6, rows * (h + 6) + 6), 200)
    for i, t in enumerate(tiles):
        sheet.paste(t, (6 + (i % cols) * (w + 6), 6 + (i // cols) * (h + 6)))
    return sheet


def _save(sheet: Image.Image, path) -> Path:
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def library_gallery(output, size: int = 256, spp: int = 8, seed: int = 0, cols: int = 5) -> Path:
    """One labelled render per library material at its default parameters."""
    from fitting.materials.library import load_library
    from fitting.core.runtime import init_mitsuba
    from fitting.materials.scene import MaterialScene, RenderSettings
    init_mitsuba()
    tiles = []
    for mat in load_library().values():
        scene = MaterialScene(mat, RenderSettings(size=size, spp=spp, layout_seed=seed))
        img = scene.render_numpy(mat.default_vector(), seed=seed)
        tiles.append(_tile(img, mat.id, size, mat.title))
    return _save(_grid(tiles, cols), output)


def reference_sheet(references: list[str], output, size: int = 256, backbone: str = "vgg16-hed",
                    scale: int = 512) -> Path:
    """Each reference crop beside the library materials nearest to it (descriptor L1, defaults)."""
    from fitting.describe.descriptor import TextureDescriptor, descriptor_distance
    from fitting.reference.loading import load_reference
    from fitting.materials.library import load_library
    from fitting.fit.target import center_tile
    from fitting.core.runtime import init_mitsuba
    from fitting.materials.scene import MaterialScene, RenderSettings
    init_mitsuba()
    desc = TextureDescriptor(backbone, work_size=size)
    renders = {}
    for mat in load_library().values():
        scene = MaterialScene(mat, RenderSettings(size=size, spp=8, layout_seed=0))
        img = scene.render_numpy(mat.default_vector(), seed=0)
        with torch.no_grad():
            renders[mat.id] = (img, desc.describe(torch.as_tensor(img)[None, None]))
    tiles = []
    for path in references:
        ref = load_reference(path)
        work = ref.working(max_side=scale)
        d_ref = desc.describe_reference(work)
        ranked = sorted(renders.items(), key=lambda kv: float(descriptor_distance(kv[1][1], d_ref).mean()))
        tiles.append(_tile(center_tile(work, size), Path(path).name[:34], size, "reference"))
        for mid, (img, d) in ranked[:3]:
            tiles.append(_tile(img, mid, size, f"L1 {float(descriptor_distance(d, d_ref).mean()):.4f}"))
    return _save(_grid(tiles, 4), output)
