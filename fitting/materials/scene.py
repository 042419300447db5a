"""A material made renderable: normalised parameters -> differentiable torch image.

:class:`MaterialScene` binds one library material to render settings. It splits a
normalised parameter vector by consumer (geometry, surface graph, imaging trace/shade/post),
caches the particle layout and the Mitsuba scene for the current geometry values (geometry
is never differentiated), evaluates the node graph in torch, and calls the renderer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fitting.materials.library import Material
from fitting.render.imaging import IMAGING_MODELS
from fitting.render.tracing import SceneRenderer, stack_maps


@dataclass
class RenderSettings:
    size: int = 256          # pixels; world unit = one pixel, so the field is size x size px
    spp: int = 4
    layout_seed: int = 0

    def to_dict(self) -> dict:
        return {"size": self.size, "spp": self.spp, "layout_seed": self.layout_seed}


class MaterialScene:
    def __init__(self, material: Material, settings: RenderSettings | None = None) -> None:
        self.material = material
        self.settings = settings or RenderSettings()
        self.model = IMAGING_MODELS[material.imaging]()
        self._renderer: SceneRenderer | None = None
        self._geo_key: tuple | None = None
        self._index = {s.name: i for i, s in enumerate(material.specs)}

    # ------------------------------------------------------------------ splitting
    def split(self, x: torch.Tensor) -> dict[str, dict[str, Any]]:
        """Physical values by consumer. Tensors for differentiable targets, floats otherwise."""
        out: dict[str, dict[str, Any]] = {"geometry": dict(self.material.geometry_fixed), "trace": {},
                                          "shade": {}, "post": {}, "graph": {}}
        for k, v in self.material.imaging_fixed.items():
            for tgt, table in (("trace", self.model.TRACE_PARAMS), ("shade", self.model.SHADE_PARAMS),
                               ("post", self.model.POST_PARAMS)):
                if k in table:
                    out[tgt][k] = v if tgt == "trace" else torch.tensor(float(v))
        for s in self.material.specs:
            u = x[self._index[s.name]]
            if s.target in ("geometry", "trace"):
                out[s.target][s.name] = s.to_physical(float(u.detach()))
            else:
                out[s.target][s.name] = s.to_physical(u)
        return out

    def layout_for(self, geometry: dict[str, float], layout_seed: int | None = None):
        from fitting.render.geometry.kinds import generate_layout
        seed = self.settings.layout_seed if layout_seed is None else layout_seed
        return generate_layout(self.material.geometry_kind, geometry, self.settings.size, seed)

    def renderer(self, geometry: dict[str, float], layout_seed: int | None = None) -> SceneRenderer:
        seed = self.settings.layout_seed if layout_seed is None else layout_seed
        key = (tuple(sorted((k, round(v, 6)) for k, v in geometry.items())), seed)
        if self._renderer is None or key != self._geo_key:
            layout = self.layout_for(geometry, seed)
            self._renderer = SceneRenderer(layout, self.model, self.settings.size, self.settings.spp)
            self._geo_key = key
        return self._renderer

    def maps(self, graph_values: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
        from fitting.materials.nodes import slopes
        size = self.settings.size
        out = self.material.graph.evaluate(graph_values, size, seed)
        maps = dict(out)
        if "height" in out:
            sx, sy = slopes(out["height"])
            maps["slope_x"], maps["slope_y"] = sx, sy
        return stack_maps(maps, size)

    # ------------------------------------------------------------------ rendering
    def render(self, x: torch.Tensor | np.ndarray, seed: int = 0, noise: bool = True,
               layout_seed: int | None = None, texture_seed: int | None = None) -> torch.Tensor:
        """Differentiable render of normalised parameters ``x`` -> (size, size) image in [0, 1].

        ``seed`` draws the samples and noise; the surface texture uses ``texture_seed``
        (default: ``seed``)."""
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        parts = self.split(x)
        r = self.renderer(parts["geometry"], layout_seed)
        maps = self.maps(parts["graph"], seed if texture_seed is None else texture_seed)
        img = r.render(maps, parts["shade"], seed, trace_params=parts["trace"])
        return self.model.post(img, parts["post"], seed, noise=noise)

    def render_numpy(self, x, seed: int = 0, noise: bool = True, layout_seed: int | None = None,
                     texture_seed: int | None = None) -> np.ndarray:
        with torch.no_grad():
            return self.render(torch.as_tensor(np.asarray(x, np.float32)), seed, noise, layout_seed,
                               texture_seed).numpy()

    def instance_mask(self, x, layout_seed: int | None = None) -> np.ndarray:
        parts = self.split(torch.as_tensor(np.asarray(x, np.float32)))
        return self.renderer(parts["geometry"], layout_seed).instance_mask()
