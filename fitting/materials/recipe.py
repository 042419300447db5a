"""The recipe: a versioned JSON record of a material with its parameter values.

Written by `matfit sample` and by fits, read by `matfit render`, `bulk` and the window.
Everything needed to reproduce and audit a render or a fit is in it. Files are written
atomically (temporary file in the same folder, then rename), so a crash or Ctrl-C never
leaves half a recipe.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fitting.core.errors import RecipeError
from fitting.core.files import _UMASK, atomic_write_text
from fitting.materials.library import Material, get_material

SCHEMA_VERSION = 1
os.umask(_UMASK)


def matfit_version() -> str:
    try:
        from importlib.metadata import version
        return version("matfit")
    except Exception:
        return "0.1.0"


@dataclass
class Recipe:
    material_id: str
    content_hash: str
    values: dict[str, float]                       # physical values
    render: dict[str, Any] = field(default_factory=lambda: {"size": 256, "spp": 4, "layout_seed": 0})
    seeds: dict[str, int] = field(default_factory=lambda: {"layout": 0, "render": 0})
    refined: list[str] = field(default_factory=list)
    initial: dict[str, float] | None = None        # predictor's (or default) guess before refinement
    descriptor: dict[str, Any] | None = None
    reference: dict[str, Any] | None = None
    fit: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    matfit_version: str = field(default_factory=matfit_version)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_vector(cls, material: Material, x, **kw) -> "Recipe":
        return cls(material_id=material.id, content_hash=material.content_hash,
                   values=material.physical(x), **kw)

    def vector(self, material: Material) -> np.ndarray:
        return np.array([s.to_normalized(self.values[s.name]) for s in material.specs], dtype=np.float32)

    def material(self) -> Material:
        return get_material(self.material_id)

    # ------------------------------------------------------------------ JSON
    def to_dict(self, material: Material | None = None) -> dict:
        material = material or self.material()
        params = {}
        for s in material.specs:
            params[s.name] = {"value": self.values[s.name], "normalized": round(s.to_normalized(self.values[s.name]), 6),
                              "min": s.min, "max": s.max, "unit": s.unit, "group": s.group, "scale": s.scale,
                              "refined": s.name in self.refined}
            if self.initial is not None and s.name in self.initial:
                params[s.name]["initial"] = self.initial[s.name]
        from fitting.core.runtime import runtime_info
        info = runtime_info()
        render = dict(self.render)
        render.setdefault("variant", info.variant if info else None)
        return {"schema_version": SCHEMA_VERSION, "matfit_version": self.matfit_version,
                "material": {"id": material.id, "title": material.title, "imaging": material.imaging,
                             "geometry": material.geometry_kind, "content_hash": self.content_hash},
                "parameters": params, "seeds": self.seeds, "render": render,
                "descriptor": self.descriptor, "reference": self.reference, "fit": self.fit, "notes": self.notes}

    def save(self, path: str | os.PathLike, material: Material | None = None) -> Path:
        text = json.dumps(self.to_dict(material), indent=2, sort_keys=False, default=_json_default)
        atomic_write_text(path, text + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, check_hash: bool = False) -> "Recipe":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError(f"{path}: no such recipe file") from None
        except IsADirectoryError:
            raise RecipeError(f"{path}: is a folder, not a recipe file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"{path}: cannot be read ({exc})", hint="give the .json written by matfit") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})",
                              hint="give the .json written by `matfit fit` or `matfit sample`") from None
        return cls.from_dict(d, source=str(path), check_hash=check_hash)

    @classmethod
    def from_dict(cls, d: Any, source: str = "<recipe>", check_hash: bool = False) -> "Recipe":
        if not isinstance(d, dict):
            raise RecipeError(f"{source}: a recipe is a JSON object")
        ver = d.get("schema_version")
        if ver != SCHEMA_VERSION:
            raise RecipeError(f"{source}: schema_version {ver!r} is not supported (this matfit reads {SCHEMA_VERSION})",
                              hint="re-export the recipe with this matfit version")
        try:
            mat = d["material"]
            mid = mat["id"]
            params = d["parameters"]
        except (KeyError, TypeError) as exc:
            raise RecipeError(f"{source}: missing field {exc}") from None
        from fitting.core.errors import LibraryError
        try:
            material = get_material(mid)
        except LibraryError as exc:
            raise RecipeError(f"{source}: {exc.message}", hint=exc.hint) from None
        values: dict[str, float] = {}
        initial: dict[str, float] = {}
        for s in material.specs:
            if s.name not in params:
                raise RecipeError(f"{source}: parameter '{s.name}' of material '{mid}' is missing")
            entry = params[s.name]
            v = entry.get("value") if isinstance(entry, dict) else entry
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v):
                raise RecipeError(f"{source}: parameter '{s.name}' has no numeric value")
            tol = 1e-6 * (s.max - s.min)
            if v < s.min - tol or v > s.max + tol:
                raise RecipeError(f"{source}: parameter '{s.name}' = {v} is outside its range [{s.min}, {s.max}]")
            values[s.name] = float(min(max(v, s.min), s.max))
            if isinstance(entry, dict) and "initial" in entry:
                initial[s.name] = float(entry["initial"])
        unknown = set(params) - set(values)
        if unknown:
            raise RecipeError(f"{source}: unknown parameter(s) for '{mid}': {', '.join(sorted(unknown))}")
        notes = list(d.get("notes") or [])
        h = mat.get("content_hash", "")
        if h and h != material.content_hash:
            msg = (f"material '{mid}' changed since this recipe was written "
                   f"(content hash {h} -> {material.content_hash}); renders may differ")
            if check_hash:
                raise RecipeError(f"{source}: {msg}")
            notes.append(msg)
        render = d.get("render") or {}
        return cls(material_id=mid, content_hash=h or material.content_hash, values=values,
                   render={k: render[k] for k in ("size", "spp", "layout_seed") if k in render} or
                   {"size": 256, "spp": 4, "layout_seed": 0},
                   seeds=dict(d.get("seeds") or {"layout": 0, "render": 0}),
                   refined=[k for k, e in params.items() if isinstance(e, dict) and e.get("refined")],
                   initial=initial or None, descriptor=d.get("descriptor"), reference=d.get("reference"),
                   fit=d.get("fit"), notes=notes, matfit_version=d.get("matfit_version", "?"))


def _json_default(o):
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
