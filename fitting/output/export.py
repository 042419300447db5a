"""Export a recipe as a plain Mitsuba 3 scene (XML + PLY mesh + texture PNGs).

The exported scene renders with stock Mitsuba (`mitsuba scene.xml` or `mi.load_file`), no
matfit needed. matfit's own imaging models are custom Dr.Jit shading programs, so the
export maps each to the closest standard plugins:

- SEM: particles and substrate are `diffuse` with the fitted albedo maps; a `constant`
  environment (ambient occlusion darkens gaps) plus a `directional` emitter from the
  detector direction (its shadows). The 1/cos edge brightening has no stock equivalent.
- TEM: particles are `null`-BSDF shapes filled with a `homogeneous` absorbing medium
  (Beer-Lambert along the beam, exactly like matfit's path-length model) above a back-lit
  `area` emitter; rendered with `volpath`.
- Optical: particles are `dielectric` with the fitted refractive index above a back-lit
  `area` emitter (refraction darkens rims); rendered with `path`.

Image-space effects (blur, noise, tone) are not part of a Mitsuba scene; their fitted values
go to ``postprocess.json`` beside the XML.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from fitting.materials.recipe import Recipe
from fitting.core.files import atomic_write_text


def _write_ply(path: Path, vertices: np.ndarray, normals: np.ndarray, faces: np.ndarray, size: float) -> None:
    """Binary PLY with normals and matfit's top-view texture coordinates
    (u = x / size, v = 1 - y / size: texture row 0 is the top of the image)."""
    header = (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(vertices)}\n"
              "property float x\nproperty float y\nproperty float z\n"
              "property float nx\nproperty float ny\nproperty float nz\n"
              "property float u\nproperty float v\n"
              f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n")
    uv = np.stack([vertices[:, 0] / size, 1.0 - vertices[:, 1] / size], axis=1)
    vert = np.concatenate([vertices, normals, uv], axis=1).astype("<f4")
    face = np.zeros(len(faces), dtype=[("n", "u1"), ("i", "<i4", (3,))])
    face["n"] = 3
    face["i"] = faces
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(vert.tobytes())
        f.write(face.tobytes())


def _write_pfm(path: Path, gray: np.ndarray) -> None:
    """Single-channel float PFM (rows stored bottom to top, little endian)."""
    g = np.ascontiguousarray(np.flipud(np.asarray(gray, dtype="<f4")))
    with open(path, "wb") as f:
        f.write(f"Pf\n{g.shape[1]} {g.shape[0]}\n-1.0\n".encode("ascii"))
        f.write(g.tobytes())


def export_mitsuba_scene(recipe: Recipe, folder: str | os.PathLike, spp: int = 64) -> Path:
    """Write scene.xml, particles.ply, textures and postprocess.json into ``folder``.

    Written into a temporary sibling folder first and renamed, so an interrupted export
    never leaves a half scene. Returns the path of scene.xml.
    """
    from fitting.materials.scene import MaterialScene, RenderSettings
    mat = recipe.material()
    size = int(recipe.render.get("size", 256))
    layout_seed = int(recipe.render.get("layout_seed", 0))
    scene = MaterialScene(mat, RenderSettings(size=size, spp=int(recipe.render.get("spp", 4)), layout_seed=layout_seed))
    x = torch.as_tensor(recipe.vector(mat))
    parts = scene.split(x)
    layout = scene.layout_for(parts["geometry"], layout_seed)
    with torch.no_grad():
        maps = mat.graph.evaluate(parts["graph"], size, int(recipe.seeds.get("render", 0)))
    values = dict(recipe.values)
    model = scene.model
    for table in (model.TRACE_PARAMS, model.SHADE_PARAMS, model.POST_PARAMS):
        for k, v in table.items():
            values.setdefault(k, v)
    values.update(mat.imaging_fixed)

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _write_ply(tmp / "particles.ply", layout.vertices, layout.normals, layout.faces, size)
        quad = np.array([[0, 0, 0], [size, 0, 0], [size, size, 0], [0, size, 0]], np.float32)
        _write_ply(tmp / "substrate.ply", quad, np.tile([[0, 0, 1]], (4, 1)).astype(np.float32),
                   np.array([[0, 1, 2], [0, 2, 3]], np.int32), size)
        # Float textures (PFM) with matfit's brightness scale baked in, so values above 1 survive.
        albedo = maps.get("albedo")
        alb = albedo.numpy() if albedo is not None else np.full((size, size), 0.8, np.float32)
        sub = maps.get("substrate")
        subm = sub.numpy() if sub is not None else np.full((size, size), 0.5, np.float32)
        if mat.imaging == "sem":
            alb = alb * 2.0 * values["particle_brightness"]
            subm = subm * 2.0 * values["substrate_brightness"]
        _write_pfm(tmp / "albedo.pfm", alb)
        _write_pfm(tmp / "substrate.pfm", subm)
        xml = _scene_xml(mat.imaging, values, size, spp, layout, scene.renderer(parts["geometry"], layout_seed).length_scale)
        atomic_write_text(tmp / "scene.xml", xml)
        post = {k: values[k] for k in model.POST_PARAMS}
        atomic_write_text(tmp / "postprocess.json", json.dumps(
            {"note": "image-space effects matfit applies after rendering (Gaussian blur sigma in px, "
                     "noise, tone: out = ((gain*I)^gamma - 0.5)*contrast + 0.5 + offset)",
             "imaging": mat.imaging, "values": post, "material": mat.id,
             "content_hash": mat.content_hash}, indent=2) + "\n")
        if folder.exists():
            backup = folder.with_name(folder.name + ".old")
            if backup.exists():
                shutil.rmtree(backup)
            folder.rename(backup)
            tmp.rename(folder)
            shutil.rmtree(backup)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder / "scene.xml"


def _scene_xml(imaging: str, v: dict, size: int, spp: int, layout, length_scale: float) -> str:
    half = size / 2.0
    z_top = float(layout.vertices[:, 2].max() + 10.0) if len(layout.vertices) else 10.0
    # Orthographic camera above the field centre looking down; the sensor's scale maps its
    # [-1,1]^2 screen onto the field. up = +y so image rows run from y = size down to 0.
    sensor = f"""
    <sensor type="orthographic">
        <transform name="to_world">
            <scale x="{half}" y="{half}"/>
            <lookat origin="{half}, {half}, {z_top}" target="{half}, {half}, 0" up="0, 1, 0"/>
        </transform>
        <sampler type="independent"><integer name="sample_count" value="{spp}"/></sampler>
        <film type="hdrfilm">
            <integer name="width" value="{size}"/><integer name="height" value="{size}"/>
            <string name="pixel_format" value="luminance"/>
            <rfilter type="box"/>
        </film>
    </sensor>"""
    substrate_shape = """
    <shape type="ply" id="substrate">
        <string name="filename" value="substrate.ply"/>
        {bsdf}
    </shape>"""
    if imaging == "sem":
        from fitting.render.tracing import direction_from_angles
        d = direction_from_angles(v.get("detector_azimuth", 45.0), v.get("detector_elevation", 35.0))
        mix = v.get("detector_mix", 0.35)
        body = f"""
    <integrator type="path"><integer name="max_depth" value="3"/></integrator>
    <emitter type="constant"><rgb name="radiance" value="{1.0 - mix:.5f}"/></emitter>
    <emitter type="directional">
        <vector name="direction" x="{-d[0]:.6f}" y="{-d[1]:.6f}" z="{-d[2]:.6f}"/>
        <rgb name="irradiance" value="{3.0 * mix:.5f}"/>
    </emitter>
    <shape type="ply" id="particles">
        <string name="filename" value="particles.ply"/>
        <bsdf type="diffuse"><texture type="bitmap" name="reflectance">
            <string name="filename" value="albedo.pfm"/><boolean name="raw" value="true"/></texture></bsdf>
    </shape>""" + substrate_shape.replace("{bsdf}", """<bsdf type="diffuse"><texture type="bitmap" name="reflectance">
            <string name="filename" value="substrate.pfm"/><boolean name="raw" value="true"/></texture></bsdf>""")
    elif imaging == "tem":
        sigma = v["optical_density"] / max(length_scale, 1e-6)
        film = v["film_level"]
        body = f"""
    <integrator type="volpath"><integer name="max_depth" value="64"/></integrator>
    <shape type="ply" id="particles">
        <string name="filename" value="particles.ply"/>
        <bsdf type="null"/>
        <medium type="homogeneous" name="interior">
            <rgb name="albedo" value="0"/><float name="sigma_t" value="{sigma:.6f}"/>
        </medium>
    </shape>
    <shape type="rectangle" id="illumination">
        <transform name="to_world"><scale x="{half * 4}" y="{half * 4}"/><translate x="{half}" y="{half}" z="-1"/></transform>
        <emitter type="area"><rgb name="radiance" value="{film:.5f}"/></emitter>
    </shape>"""
    else:
        bg = v["background"]
        body = f"""
    <integrator type="path"><integer name="max_depth" value="12"/></integrator>
    <shape type="ply" id="particles">
        <string name="filename" value="particles.ply"/>
        <bsdf type="dielectric"><float name="int_ior" value="{v.get('ior', 1.33):.4f}"/><float name="ext_ior" value="1.0"/></bsdf>
    </shape>
    <shape type="rectangle" id="illumination">
        <transform name="to_world"><scale x="{half * 4}" y="{half * 4}"/><translate x="{half}" y="{half}" z="-1"/></transform>
        <emitter type="area"><rgb name="radiance" value="{bg:.5f}"/></emitter>
    </shape>"""
    return f"""<?xml version="1.0" encoding="utf-8"?>
<!-- Exported by matfit: imaging model '{imaging}'. Render with stock Mitsuba 3, e.g.
     python -c "import mitsuba as mi; mi.set_variant('scalar_rgb'); mi.util.write_bitmap('out.png', mi.render(mi.load_file('scene.xml')))" -->
<scene version="3.0.0">{sensor}{body}
</scene>
"""
