"""The material library: one folder per material, authored as data.

A material folder holds
- ``material.json``: id, title, imaging kind (sem/tem/optical), geometry kind, fixed values,
  and the parameter specs (see :mod:`fitting.materials.params`);
- ``graph.json``: the surface node graph (see :mod:`fitting.materials.graph`);
- ``predictor.pt`` + ``predictor.json`` once trained (see :mod:`fitting.fit.predictor`).

Who consumes a parameter is inferred from its name and checked: a geometry-kind parameter,
a trace/shade/post parameter of the imaging model, or a ``$name`` the graph refers to.
A name used by none of them, or by two, is an error naming the file and the field.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fitting.core.errors import LibraryError
from fitting.materials.params import GROUPS, ParamSpec

LIBRARY_VERSION = "1"
REPO_ROOT = Path(__file__).resolve().parents[2]
# Bumped when the engine changes what a material's parameters mean (invalidates predictors).
ENGINE_MODEL_VERSION = "render-1"


def library_dir() -> Path:
    return Path(os.environ.get("MATFIT_LIBRARY", REPO_ROOT / "material_library"))


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LibraryError(f"{path}: file is missing") from None
    except OSError as exc:
        raise LibraryError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LibraryError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise LibraryError(f"{path}: must hold a JSON object")
    return data


@dataclass
class Material:
    id: str
    title: str
    imaging: str
    description: str
    geometry_kind: str
    geometry_fixed: dict[str, float]
    imaging_fixed: dict[str, float]
    specs: list[ParamSpec]
    graph: object
    folder: Path
    content_hash: str
    tags: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ parameters
    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def spec(self, name: str) -> ParamSpec:
        for s in self.specs:
            if s.name == name:
                return s
        raise LibraryError(f"material '{self.id}' has no parameter '{name}'")

    def default_vector(self) -> np.ndarray:
        return np.array([s.default_normalized for s in self.specs], dtype=np.float32)

    def random_vector(self, rng: np.random.Generator, spread: float = 0.3) -> np.ndarray:
        """A random normalised vector: each parameter from a normal around its default
        (sd ``spread`` in normalised units) truncated to [0, 1] by redrawing.

        Uniform draws over every range at once mostly give implausible images (e.g. maximal
        contrast, offset and brightness together saturate to white); centring on the
        author's defaults keeps samples micrograph-like while still covering each range.
        """
        mean = self.default_vector().astype(np.float64)
        out = rng.normal(mean, spread)
        for _ in range(20):
            bad = (out < 0) | (out > 1)
            if not bad.any():
                break
            out[bad] = rng.normal(mean[bad], spread)
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def refine_mask(self) -> np.ndarray:
        return np.array([s.refine for s in self.specs], dtype=bool)

    def physical(self, x) -> dict[str, float]:
        return {s.name: s.to_physical(float(u)) for s, u in zip(self.specs, np.asarray(x, dtype=np.float64))}

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {g: [] for g in GROUPS}
        for s in self.specs:
            out[s.group].append(s.name)
        return out

    @property
    def predictor_path(self) -> Path:
        return self.folder / "predictor.pt"

    def summary(self) -> dict:
        """JSON-ready description (the predictor's status is added by the caller: predictors
        belong to the fitting stage, which depends on the library, not the other way)."""
        return {"id": self.id, "title": self.title, "imaging": self.imaging,
                "geometry": self.geometry_kind, "description": self.description,
                "content_hash": self.content_hash, "parameters": [s.to_dict() for s in self.specs]}


def _infer_targets(mat_id: str, source: str, specs: list[ParamSpec], geometry_kind: str, imaging: str,
                   graph_params: set[str]) -> None:
    from fitting.render.geometry.kinds import GEOMETRY_KINDS
    from fitting.render.imaging import IMAGING_MODELS
    model = IMAGING_MODELS[imaging]
    geo = GEOMETRY_KINDS[geometry_kind]
    geo_names = set(geometry_param_names(geo))
    for s in specs:
        users = []
        if s.name in geo_names:
            users.append("geometry")
        if s.name in model.TRACE_PARAMS:
            users.append("trace")
        if s.name in model.SHADE_PARAMS:
            users.append("shade")
        if s.name in model.POST_PARAMS:
            users.append("post")
        if s.name in graph_params:
            users.append("graph")
        if not users:
            raise LibraryError(f"{source}: parameter '{s.name}' is used by nothing: not a '{geometry_kind}' "
                               f"geometry parameter, not a {imaging} imaging parameter, and the graph "
                               f"never refers to '${s.name}'")
        if len(users) > 1:
            raise LibraryError(f"{source}: parameter '{s.name}' is ambiguous: used by {', '.join(users)}")
        s.target = users[0]
        if s.target == "geometry":
            g = geo.params[s.name]
            if s.min < g.min or s.max > g.max:
                raise LibraryError(f"{source}: parameter '{s.name}' range [{s.min:g}, {s.max:g}] exceeds what "
                                   f"geometry '{geometry_kind}' accepts: [{g.min:g}, {g.max:g}]")
        if s.target in ("geometry", "trace") and s.refine:
            raise LibraryError(f"{source}: parameter '{s.name}' changes rays ({s.target}) and cannot be "
                               "refined by gradients: set \"refine\": false")
    missing = graph_params - {s.name for s in specs}
    if missing:
        raise LibraryError(f"{source}: the graph refers to undefined parameter(s) {', '.join(sorted(missing))}")


def geometry_param_names(kind) -> list[str]:
    params = getattr(kind, "params", None) or getattr(kind, "parameters", None) or {}
    if isinstance(params, dict):
        return list(params)
    return [getattr(p, "name", p[0] if isinstance(p, (tuple, list)) else p) for p in params]


def load_material(folder: str | os.PathLike) -> Material:
    from fitting.materials.graph import MaterialGraph
    from fitting.render.geometry.kinds import GEOMETRY_KINDS
    from fitting.render.imaging import IMAGING_MODELS

    folder = Path(folder)
    mpath = folder / "material.json"
    data = _read_json(mpath)
    src = str(mpath)
    for key in ("id", "title", "imaging", "geometry", "parameters"):
        if key not in data:
            raise LibraryError(f"{src}: missing field '{key}'")
    mat_id = data["id"]
    if mat_id != folder.name:
        raise LibraryError(f"{src}: id '{mat_id}' must equal the folder name '{folder.name}'")
    imaging = data["imaging"]
    if imaging not in IMAGING_MODELS:
        raise LibraryError(f"{src}: imaging '{imaging}' is not one of {', '.join(IMAGING_MODELS)}")
    geometry = data["geometry"]
    if not isinstance(geometry, dict) or "kind" not in geometry:
        raise LibraryError(f"{src}: 'geometry' must be an object with a 'kind'")
    if geometry["kind"] not in GEOMETRY_KINDS:
        raise LibraryError(f"{src}: geometry kind '{geometry['kind']}' is not one of {', '.join(GEOMETRY_KINDS)}")
    if not isinstance(data["parameters"], list) or not data["parameters"]:
        raise LibraryError(f"{src}: 'parameters' must be a non-empty list")
    specs = [ParamSpec.from_dict(p, src) for p in data["parameters"]]
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise LibraryError(f"{src}: duplicate parameter(s) {', '.join(sorted(dup))}")
    gpath = folder / data.get("graph", "graph.json")
    gdata = _read_json(gpath)
    graph = MaterialGraph.from_dict(gdata, source=str(gpath))
    graph_params = set(graph.referenced_params())
    _infer_targets(mat_id, src, specs, geometry["kind"], imaging, graph_params)
    imaging_fixed = {k: float(v) for k, v in data.get("imaging_fixed", {}).items()}
    model = IMAGING_MODELS[imaging]
    for k in imaging_fixed:
        if k not in model.all_params():
            raise LibraryError(f"{src}: imaging_fixed '{k}' is not a {imaging} imaging parameter")
    h = hashlib.sha256()
    h.update(ENGINE_MODEL_VERSION.encode())
    h.update(json.dumps(data, sort_keys=True).encode())
    h.update(json.dumps(gdata, sort_keys=True).encode())
    return Material(id=mat_id, title=data["title"], imaging=imaging, description=data.get("description", ""),
                    geometry_kind=geometry["kind"],
                    geometry_fixed={k: float(v) for k, v in geometry.get("fixed", {}).items()},
                    imaging_fixed=imaging_fixed, specs=specs, graph=graph, folder=folder,
                    content_hash=h.hexdigest()[:16], tags=list(data.get("tags", [])))


_CACHE: dict[str, dict[str, Material]] = {}


def load_library(path: str | os.PathLike | None = None, reload: bool = False) -> dict[str, Material]:
    """All materials in the library folder, by id (sorted)."""
    root = Path(path) if path else library_dir()
    key = str(root.resolve())
    if key in _CACHE and not reload:
        return _CACHE[key]
    if not root.is_dir():
        raise LibraryError(f"material library folder {root} does not exist",
                           hint="set MATFIT_LIBRARY or run matfit from its checkout")
    mats = {}
    for sub in sorted(root.iterdir()):
        if sub.is_dir() and (sub / "material.json").exists():
            m = load_material(sub)
            mats[m.id] = m
    if not mats:
        raise LibraryError(f"material library {root} holds no material folders")
    _CACHE[key] = mats
    return mats


def get_material(material_id: str, path: str | os.PathLike | None = None) -> Material:
    lib = load_library(path)
    if material_id not in lib:
        raise LibraryError(f"unknown material '{material_id}'",
                           hint="`matfit library list` shows the ids: " + ", ".join(lib))
    return lib[material_id]
