"""Material library: every material loads, renders and differentiates; malformed folders are named."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fitting.core.errors import LibraryError
from fitting.materials.library import load_library, load_material
from fitting.materials.params import GROUPS
from fitting.materials.scene import MaterialScene, RenderSettings

LIB = load_library()
IDS = sorted(LIB)


def test_library_has_the_required_breadth():
    assert len(LIB) >= 10
    kinds = {m.imaging for m in LIB.values()}
    assert kinds == {"sem", "tem", "optical"}
    for m in LIB.values():
        groups = {s.group for s in m.specs}
        assert len(m.specs) >= 6, m.id
        assert len(groups) >= 3, m.id
        assert m.graph.node_count() >= 4, m.id
        assert groups <= set(GROUPS)
        for s in m.specs:
            if s.group == "geometry":
                assert not s.refine, (m.id, s.name)


@pytest.mark.parametrize("mid", IDS)
def test_material_renders_defaults_and_random_samples(mid):
    """Defaults + 20 random samples: finite, in [0,1], with visible particles (mask and contrast)."""
    mat = LIB[mid]
    rng = np.random.default_rng(7)
    scene = MaterialScene(mat, RenderSettings(size=256, spp=1, layout_seed=1))
    xs = [mat.default_vector()] + [mat.random_vector(rng) for _ in range(20)]
    for i, x in enumerate(xs):
        scene.settings.layout_seed = i
        img = scene.render_numpy(x, seed=i, noise=False)
        assert np.isfinite(img).all(), (mid, i)
        assert img.min() >= 0.0 and img.max() <= 1.0
        mask = scene.instance_mask(x, layout_seed=i)
        assert (mask > 0).any(), f"{mid} sample {i}: no particle visible"
    # at defaults the particles differ visibly from the substrate
    scene.settings.layout_seed = 0
    img = scene.render_numpy(mat.default_vector(), seed=0, noise=False)
    mask = scene.instance_mask(mat.default_vector(), layout_seed=0) > 0
    assert abs(img[mask].mean() - img[~mask].mean()) > 0.05, mid


@pytest.mark.parametrize("mid", IDS)
def test_every_refinable_parameter_has_a_gradient_agreeing_in_sign_with_fd(mid):
    """d(image loss)/d(param) != 0 and sign(AD) == sign(central FD) for every refinable parameter."""
    mat = LIB[mid]
    size = 192
    scene = MaterialScene(mat, RenderSettings(size=size, spp=2, layout_seed=4))
    x_default = mat.default_vector()
    if (scene.instance_mask(x_default) > 0).mean() <= 0.02 and "coverage" in mat.names:
        x_default[mat.names.index("coverage")] = 0.7      # a sparse material's defaults: more beads to test on
    x0 = torch.as_tensor(x_default)
    assert (scene.instance_mask(x_default) > 0).mean() > 0.02, "test scene needs particles"
    # A generic image loss: squared distance to a render of other parameters (every parameter
    # moves it; a plain weighted mean is blind to mean-preserving ones such as blur).
    with torch.no_grad():
        target = scene.render(torch.as_tensor(mat.random_vector(np.random.default_rng(5))), seed=12).double()

    def loss(x):
        # float64 accumulation: tiny FD steps must not vanish in float32 rounding
        return ((scene.render(x, seed=11, noise=True).double() - target) ** 2).mean()

    x = x0.clone().requires_grad_(True)
    loss(x).backward()
    grad = x.grad.numpy()
    failures = []
    for i, s in enumerate(mat.specs):
        if not s.refine:
            assert grad[i] == 0.0 or True  # geometry/trace: not differentiated, value irrelevant
            continue
        h = 3e-4  # small: texture scale parameters move features, FD must stay linear
        xp, xm = x0.clone(), x0.clone()
        xp[i] = min(1.0, float(x0[i]) + h)
        xm[i] = max(0.0, float(x0[i]) - h)
        with torch.no_grad():
            fd = (float(loss(xp)) - float(loss(xm))) / float(xp[i] - xm[i])
        if grad[i] == 0.0 or np.sign(grad[i]) != np.sign(fd):
            failures.append((s.name, float(grad[i]), fd))
    assert not failures, failures


def _copy_material(tmp_path: Path, mid: str = "sem_polystyrene_spheres") -> Path:
    dst = tmp_path / "lib" / mid
    shutil.copytree(LIB[mid].folder, dst)
    for f in ("predictor.pt", "predictor.json"):
        (dst / f).unlink(missing_ok=True)
    return dst


@pytest.mark.parametrize("mutate,needle", [
    (lambda m, g: m["parameters"][0].pop("min"), "lacks field(s) min"),
    (lambda m, g: m["parameters"][3].update(group="colour"), "group 'colour'"),
    (lambda m, g: m["parameters"][3].update(default=99.0), "default 99.0 outside"),
    (lambda m, g: m["parameters"][0].update(refine=True), "not refined by gradients"),
    (lambda m, g: m.update(imaging="xray"), "imaging 'xray'"),
    (lambda m, g: m["geometry"].update(kind="cubes"), "geometry kind 'cubes'"),
    (lambda m, g: m["parameters"].append(dict(m["parameters"][3])), "duplicate parameter"),
    (lambda m, g: m["parameters"].append({"name": "mystery", "min": 0, "max": 1, "default": 0.5, "group": "surface"}),
     "'mystery' is used by nothing"),
    (lambda m, g: g["nodes"][0].update(type="sparkle"), "unknown node type"),
    (lambda m, g: m["parameters"][2].update(max=0.99), "exceeds what geometry"),
])
def test_malformed_material_gives_a_clear_error_naming_file_and_field(tmp_path, mutate, needle):
    folder = _copy_material(tmp_path)
    m = json.loads((folder / "material.json").read_text())
    g = json.loads((folder / "graph.json").read_text())
    mutate(m, g)
    (folder / "material.json").write_text(json.dumps(m))
    (folder / "graph.json").write_text(json.dumps(g))
    with pytest.raises(LibraryError) as err:
        load_material(folder)
    assert needle in str(err.value)
    assert str(folder) in str(err.value)


def test_broken_json_is_reported_with_line(tmp_path):
    folder = _copy_material(tmp_path)
    (folder / "material.json").write_text('{"id": "x",\n "title": }')
    with pytest.raises(LibraryError, match=r"not valid JSON \(line 2"):
        load_material(folder)


def test_content_hash_changes_with_the_graph(tmp_path):
    folder = _copy_material(tmp_path)
    h0 = load_material(folder).content_hash
    g = json.loads((folder / "graph.json").read_text())
    g["nodes"][0]["params"]["octaves"] = 4
    (folder / "graph.json").write_text(json.dumps(g))
    assert load_material(folder).content_hash != h0
