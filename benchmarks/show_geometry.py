"""Top views of every geometry kind in one PNG, to eyeball the shapes (no Mitsuba needed).

    python benchmarks/show_geometry.py [--out /tmp/geometry.png] [--size 384] [--res 384] [--seed 0]

Each tile is a z-buffered top view of one layout, shaded SEM-like from the interpolated
normals (Lambert from the upper left plus edge brightening on steep flanks) and the height.
The caption under a tile gives the kind, the parameters that differ from the defaults, the
particle and triangle counts, the achieved projected coverage and the generation time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fitting.render.geometry.kinds import GEOMETRY_KINDS, generate_layout  # noqa: E402

CASES: list[tuple[str, dict]] = [
    ("spheres", {}),
    ("spheres", {"coverage": 0.75, "size_gsd": 1.05}),
    ("spheres", {"size_mean": 8, "size_gsd": 1.6, "coverage": 0.4}),
    ("agglomerates", {}),
    ("agglomerates", {"fractal_dim": 2.5, "primary_count": 60, "overlap": 0.3, "coverage": 0.45}),
    ("agglomerates", {"fractal_dim": 1.6, "primary_count": 120, "primary_size": 6, "coverage": 0.35}),
    ("polyhedra", {}),
    ("polyhedra", {"roundness": 0.35, "facets": 30, "size_mean": 40, "coverage": 0.5}),
    ("polyhedra", {"elongation": 2.5, "facets": 8, "roundness": 0.0, "size_mean": 30}),
    ("crystals", {"size_mean": 30}),
    ("crystals", {"habit": 0.5, "size_mean": 30, "roundness": 0.15}),
    ("crystals", {"habit": 1.0, "hex_fraction": 0.5, "hex_aspect": 0.25, "size_mean": 35}),
    ("ellipsoids", {}),
    ("ellipsoids", {"aspect": 3.5, "flatness": 0.5, "coverage": 0.55, "size_mean": 25}),
    ("rods", {}),
    ("rods", {"end_shape": 1.0, "length_mean": 80, "diameter": 16, "coverage": 0.45}),
]


def shade(layout, res: int) -> np.ndarray:
    height, pid, n = layout.top_view(res)
    light = np.array([-0.5, 0.5, 0.7])
    light /= np.linalg.norm(light)
    lam = np.clip((n * light).sum(-1), 0, 1)
    edge = (1 - np.clip(n[..., 2], 0, 1)) ** 2
    hmax = max(float(height.max()), 1e-6)
    img = 0.18 + 0.45 * lam + 0.35 * edge + 0.12 * height / hmax
    img[pid == 0] = 0.08
    return np.clip(img, 0, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/geometry.png")
    ap.add_argument("--size", type=int, default=384, help="field side in px (world units)")
    ap.add_argument("--res", type=int, default=384, help="tile resolution")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cols", type=int, default=4)
    args = ap.parse_args(argv)
    tiles = []
    for kind, params in CASES:
        assert kind in GEOMETRY_KINDS
        t0 = time.perf_counter()
        lay = generate_layout(kind, params, args.size, args.seed)
        dt = time.perf_counter() - t0
        img = (shade(lay, args.res) * 255).astype(np.uint8)
        tile = Image.new("L", (args.res, args.res + 30), 255)
        tile.paste(Image.fromarray(img), (0, 0))
        d = ImageDraw.Draw(tile)
        desc = ", ".join(f"{k}={v:g}" for k, v in params.items())
        d.text((3, args.res + 2), f"{kind} {desc}"[:70], fill=0)
        d.text((3, args.res + 15), f"N={lay.n_particles} tris={lay.n_triangles} cov={lay.projected_coverage(256):.2f} "
                                   f"t={dt:.2f}s", fill=0)
        tiles.append(tile)
        print(f"{kind:13s} {desc:60s} N={lay.n_particles:5d} tris={lay.n_triangles:7d} {dt:.2f}s")
    cols = args.cols
    rows = (len(tiles) + cols - 1) // cols
    w, h = tiles[0].size
    sheet = Image.new("L", (cols * (w + 4), rows * (h + 4)), 255)
    for k, t in enumerate(tiles):
        sheet.paste(t, ((k % cols) * (w + 4), (k // cols) * (h + 4)))
    sheet.save(args.out)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
