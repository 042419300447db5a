"""The engine process: serves fit / render / bulk-preview / recipe requests for the window.

Why a separate process: Dr.Jit holds the GIL while it compiles and launches kernels, so the
engine running in a thread of the GUI process would freeze the Qt event loop for seconds.
This module is what the child process runs; it never imports Qt (a spawned child imports the
target's module, and Qt would only cost start-up time there).

Wire protocol, all plain picklable data (numbers, strings, dicts, numpy arrays, FitEvents):

- request: ``{"id": int, "op": str, **payload}``, or ``None`` to stop the process;
- reply: ``(kind, request_id, payload)`` where kind is
  ``"ready"``      (id 0) once at start: runtime and capabilities (see ``EngineBackend.startup``),
  ``"started"``    the child began working on the request (the client may now cancel it),
  ``"event"``      a :class:`fitting.core.events.FitEvent` (progress of a long job),
  ``"result"``     the op's result dict; the request is done,
  ``"error"``      ``{"message", "hint", "kind", "traceback"}``; the request is done,
  ``"cancelled"``  ``{"message"}``; the request is done.
"""
from __future__ import annotations

import os
import pickle
import queue
import time
import traceback
from collections import OrderedDict
from dataclasses import replace
from typing import Any, Callable

import numpy as np

DEFAULT_BACKEND = "app.engine_worker:EngineBackend"
# The same render seed the fit uses for its final preview (fitting.fit.refine.EVAL_SEEDS[0]), so a
# slider preview at the fitted values looks like the fit's own result.
PREVIEW_SEED = 1001
SCENE_CACHE_SIZE = 6

Reply = Callable[[str, int, Any], None]


class RequestCancelFlag:
    """The Event-like object a :class:`fitting.core.events.CancelToken` checks, for ONE request.

    The shared Event says "a cancel was asked", the shared id says for which request. Checking
    both means a cancel meant for one job can never leak into the next one, even when the
    window cancels a job that is still queued behind another.
    """

    def __init__(self, event, cancel_id, request_id: int) -> None:
        self._event = event
        self._cancel_id = cancel_id
        self._request_id = request_id

    def is_set(self) -> bool:
        return self._event.is_set() and self._cancel_id.value == self._request_id

    def set(self) -> None:
        self._cancel_id.value = self._request_id
        self._event.set()


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Float [0, 1] gray -> uint8: a quarter of the bytes to send, and what the window shows."""
    return (np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def material_info(material) -> dict:
    """What the window needs to build a parameter panel for a material (no torch objects)."""
    return {"id": material.id, "title": material.title, "imaging": material.imaging,
            "geometry": material.geometry_kind,
            "specs": [s.to_dict() for s in material.specs]}


def export_scene_function():
    """``export_mitsuba_scene(recipe, folder)`` if this engine has it, else None."""
    try:
        from fitting.output.export import export_mitsuba_scene
        return export_mitsuba_scene
    except ImportError:
        return None


def recipe_for(req: dict):
    """The recipe of what the window shows: its base recipe (the fit's, or an opened one) with
    the material and values now shown, keeping the fit's record (reference, options, seeds).

    Requests carry everything (``material``, ``x``, ``base`` recipe dict, ``candidate`` with
    its ``x_initial``/``x_final``/``scale``), so a restarted engine can serve them as well.
    """
    from fitting.materials.library import get_material
    from fitting.materials.recipe import Recipe
    mat = get_material(req["material"])
    x = np.asarray(req["x"], dtype=np.float32)
    if not req.get("base"):
        return Recipe.from_vector(mat, x, notes=["written by matfit-gui"])
    base = Recipe.from_dict(req["base"], source="the window's recipe")
    base.notes = list(dict.fromkeys(base.notes))   # a round trip may repeat a note
    cand = req.get("candidate")
    if base.material_id == mat.id:
        recipe = replace(base, values=mat.physical(x), notes=list(base.notes))
        start = cand["x_final"] if cand else base.vector(mat)
    else:
        # Another candidate of the same fit: its own starting point and working scale.
        refined = [s.name for s, m in zip(mat.specs, mat.refine_mask()) if m]
        reference = base.reference
        if cand and reference is not None:
            reference = {**reference, "working_scale": cand["scale"]}
        recipe = replace(base, material_id=mat.id, content_hash=mat.content_hash, values=mat.physical(x),
                         initial=mat.physical(cand["x_initial"]) if cand else None,
                         refined=refined, reference=reference, notes=list(base.notes))
        recipe.notes.append(f"candidate {mat.id} of the fit (the fit's best was {base.material_id})")
        start = cand["x_final"] if cand else x
    if not np.allclose(x, np.asarray(start, dtype=np.float32), atol=1e-6):
        recipe.notes.append("parameters edited in matfit-gui after the fit")
    return recipe


class EngineBackend:
    """The engine's state in the child: only caches (scenes); requests carry the rest."""

    def __init__(self) -> None:
        self._scenes: OrderedDict[tuple, Any] = OrderedDict()

    # ------------------------------------------------------------------ start-up
    def startup(self, device: str, threads: int) -> dict:
        """Warm the runtime up (imports, variant) and say what this engine can do."""
        info: dict[str, Any] = {"pid": os.getpid(), "threads": threads, "problems": []}
        from fitting.core.errors import MatfitError
        try:
            from fitting.core.runtime import init_mitsuba
            rt = init_mitsuba(device, threads)
            info.update(variant=rt.variant, backend=rt.backend, gpu=rt.gpu)
        except MatfitError as exc:
            info["problems"].append(_error_payload(exc))
        try:
            from fitting.describe.descriptor import available_backbones
            info["backbones"] = available_backbones()
        except Exception as exc:  # noqa: BLE001 - a missing module must not stop the engine
            info["backbones"] = {}
            info["problems"].append(_error_payload(exc))
        try:
            from fitting.materials.library import load_library
            info["materials"] = list(load_library())
        except Exception as exc:  # noqa: BLE001
            info["materials"] = []
            info["problems"].append(_error_payload(exc))
        info["export_scene"] = export_scene_function() is not None
        return info

    def _scene(self, material_id: str, size: int, spp: int, layout_seed: int):
        """A cached MaterialScene: building the Mitsuba scene costs more than a render."""
        from fitting.materials.library import get_material
        from fitting.materials.scene import MaterialScene, RenderSettings
        key = (material_id, int(size), int(spp), int(layout_seed))
        scene = self._scenes.get(key)
        if scene is None:
            scene = MaterialScene(get_material(material_id),
                                  RenderSettings(size=int(size), spp=int(spp), layout_seed=int(layout_seed)))
            self._scenes[key] = scene
            while len(self._scenes) > SCENE_CACHE_SIZE:
                self._scenes.popitem(last=False)
        self._scenes.move_to_end(key)
        return scene

    # ------------------------------------------------------------------ ops
    def op_fit(self, req: dict, emit, cancel) -> dict:
        from fitting.reference.loading import load_reference
        from fitting.materials.library import get_material
        from fitting.fit.options import FitOptions
        from fitting.fit.pipeline import fit_reference
        from fitting.fit.target import center_tile
        crop = req.get("crop")
        ref = load_reference(req["path"], crop=tuple(crop) if crop else None)
        opts = FitOptions(**req.get("options", {}))
        tiles: dict[str, np.ndarray] = {}

        def forward(ev) -> None:
            # The window compares each candidate's render with the reference at the scale that
            # candidate matched, pixel for pixel: add those reference tiles to the ranking event.
            if ev.kind == "candidates":
                try:
                    shown = ev.data.get("thumbnails", {})       # the screened pool, then the final top-k
                    for r in ev.data["ranking"]:
                        if r["material"] in shown and r["material"] not in tiles:
                            tiles[r["material"]] = to_uint8(center_tile(ref.working(max_side=r["scale"]), opts.size))
                    ev.data["reference_tiles"] = dict(tiles)
                except Exception:  # noqa: BLE001 - the event matters more than the tiles
                    pass
            emit(ev)

        result = fit_reference(ref, opts, on_event=forward, cancel=cancel)
        autosaved, autosave_error = None, None
        if req.get("autosave"):
            try:
                autosaved = str(result.recipe.save(req["autosave"]))
            except OSError as exc:
                autosave_error = f"{req['autosave']}: {exc}"
        candidates = []
        for c in result.candidates:
            tile = tiles.get(c.material_id)
            if tile is None:
                tile = to_uint8(center_tile(ref.working(max_side=c.scale), opts.size))
            candidates.append({"material": material_info(get_material(c.material_id)), "scale": c.scale,
                               "x_initial": np.asarray(c.x_initial, np.float32),
                               "x_final": np.asarray(c.x_final, np.float32),
                               "distance_initial": c.distance_initial, "distance_final": c.distance_final,
                               "history": list(c.history), "iterations": c.iterations, "stopped": c.stopped,
                               "reference_tile": tile})
        best = [c.material_id for c in result.candidates].index(result.best.material_id)
        # The honest side-by-side: the reference's working field and a render of the same pixel
        # size and scale (None from an engine that does not make them).
        fields = {k: (None if getattr(result, k, None) is None else to_uint8(getattr(result, k)))
                  for k in ("reference_field", "render_field")}
        return {"candidates": candidates, "best": best, "preview": to_uint8(result.preview),
                "recipe": result.recipe.to_dict(),
                "render": dict(result.recipe.render), "seed": PREVIEW_SEED,
                "summary": result.summary(), "autosaved": autosaved, "autosave_error": autosave_error,
                **fields}

    def op_render(self, req: dict, emit, cancel) -> dict:
        t0 = time.perf_counter()
        r = req["render"]
        scene = self._scene(req["material"], r["size"], r["spp"], r.get("layout_seed", 0))
        img = scene.render_numpy(np.asarray(req["x"], np.float32), seed=int(req.get("seed", PREVIEW_SEED)))
        out = {"image": to_uint8(img), "seconds": time.perf_counter() - t0}
        if req.get("autosave"):
            # Edits are the user's work too: keep the autosaved recipe in step with them.
            try:
                recipe_for(req).save(req["autosave"])
            except OSError as exc:
                out["autosave_error"] = f"{req['autosave']}: {exc}"
        return out

    def op_bulk_preview(self, req: dict, emit, cancel) -> dict:
        from fitting.core.events import FitEvent
        from fitting.materials.library import get_material
        from fitting.materials.scene import MaterialScene, RenderSettings
        r = req["render"]
        # A scene of its own: every seed rebuilds the layout, which must not evict the cached
        # scene the slider previews use.
        scene = MaterialScene(get_material(req["material"]),
                              RenderSettings(size=int(r["size"]), spp=int(r["spp"]), layout_seed=0))
        x = np.asarray(req["x"], np.float32)
        seeds = [int(s) for s in req["seeds"]]
        for i, seed in enumerate(seeds):
            cancel.check("the bulk preview")
            img = scene.render_numpy(x, seed=seed, layout_seed=seed)
            mask = scene.instance_mask(x, layout_seed=seed)
            emit(FitEvent(kind="preview", stage="bulk", progress=(i + 1) / len(seeds),
                          message=f"layout seed {seed}",
                          data={"index": i, "seed": seed, "image": to_uint8(img),
                                "mask": np.asarray(mask, dtype=np.int32)}))
        return {"count": len(seeds)}

    def op_validate(self, req: dict, emit, cancel) -> dict:
        """Render a training set from the shown recipe, train a detector, run it on the
        reference (``fitting.validate``). Renders inline: this process is already the engine."""
        from fitting.reference.loading import load_reference
        from fitting.validate.run import ValidationSettings, validate_recipe
        from fitting.validate.training import TrainingSettings
        crop = req["reference"].get("crop")
        ref = load_reference(req["reference"]["path"], crop=tuple(crop) if crop else None)
        settings = ValidationSettings(count=int(req["count"]), workers=1,
                                      training=TrainingSettings(steps=int(req["steps"])))
        report = validate_recipe(recipe_for(req), ref, req["out"], settings, annotations=req.get("annotations"),
                                 on_event=emit, cancel=cancel)
        return {"report": report.to_dict(), "detections": report.overlay, "histogram": report.histogram}

    def op_save_recipe(self, req: dict, emit, cancel) -> dict:
        return {"path": str(recipe_for(req).save(req["path"]))}

    def op_export_scene(self, req: dict, emit, cancel) -> dict:
        from fitting.core.errors import MatfitError
        export = export_scene_function()
        if export is None:
            raise MatfitError("this matfit cannot export Mitsuba scenes yet",
                              hint="update matfit; fitting.output.export.export_mitsuba_scene is missing")
        out = export(recipe_for(req), req["folder"])
        return {"path": str(out if out is not None else req["folder"])}

    def op_open_recipe(self, req: dict, emit, cancel) -> dict:
        from fitting.materials.recipe import Recipe
        recipe = Recipe.load(req["path"])
        mat = recipe.material()
        x = recipe.vector(mat)
        render = {"size": 256, "spp": 4, "layout_seed": 0, **recipe.render}
        seed = int(recipe.seeds.get("render", PREVIEW_SEED))
        img = self._scene(mat.id, render["size"], render["spp"], render["layout_seed"]).render_numpy(x, seed=seed)
        tile = None
        scale = (recipe.reference or {}).get("working_scale")
        if req.get("reference") and scale:
            # The micrograph now open, at the scale the recipe was fitted at: comparable pixel
            # for pixel with the render.
            from fitting.reference.loading import load_reference
            from fitting.fit.target import center_tile
            crop = req["reference"].get("crop")
            ref = load_reference(req["reference"]["path"], crop=tuple(crop) if crop else None)
            tile = to_uint8(center_tile(ref.working(max_side=int(scale)), int(render["size"])))
        return {"path": str(req["path"]), "material": material_info(mat), "x": x, "render": render,
                "seed": seed, "image": to_uint8(img), "notes": list(recipe.notes), "recipe": recipe.to_dict(mat),
                "reference_tile": tile, "working_scale": scale}


def _error_payload(exc: BaseException) -> dict:
    from fitting.core.errors import MatfitError
    if isinstance(exc, MatfitError):
        return {"message": exc.message, "hint": exc.hint, "kind": type(exc).__name__, "traceback": ""}
    return {"message": f"{type(exc).__name__}: {exc}",
            "hint": "this is a bug in matfit; please report it (the traceback is printed on the terminal)",
            "kind": type(exc).__name__, "traceback": traceback.format_exc()}


def _load_backend(spec: str):
    module, _, name = spec.partition(":")
    mod = __import__(module, fromlist=[name])
    return getattr(mod, name)()


def handle(backend, req: dict, reply: Reply, cancel_event, cancel_id, parent_alive: Callable[[], bool]) -> None:
    """Run one request and send exactly one terminal reply (result, error or cancelled)."""
    from fitting.core.errors import Cancelled
    from fitting.core.events import CancelToken
    rid = int(req["id"])
    token = CancelToken(RequestCancelFlag(cancel_event, cancel_id, rid))
    if token.cancelled:  # cancelled while it waited in the queue
        reply("cancelled", rid, {"message": f"{req['op']} was cancelled before it started"})
        return
    reply("started", rid, {})

    def emit(ev) -> None:
        if not parent_alive():  # the window is gone: stop the job at its next check
            token.cancel()
        reply("event", rid, ev)

    op = getattr(backend, f"op_{req['op']}", None)
    try:
        if op is None:
            raise ValueError(f"unknown engine request {req['op']!r}")
        result = op(req, emit, token)
        # The queue pickles in a feeder thread that drops what it cannot pickle: check here,
        # so that such a result becomes an error instead of a request the window waits on forever.
        pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        reply("result", rid, result)
    except Cancelled as exc:
        reply("cancelled", rid, {"message": exc.message})
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the window as a message
        reply("error", rid, _error_payload(exc))


def serve(requests, replies, cancel_event, cancel_id, config: dict) -> None:
    """The child's main loop (the target of the spawned process)."""
    # First, before any thread exists (Linux applies nice per thread, and new threads inherit
    # it): the window shares these cores, so its event loop must win the scheduler.
    try:
        os.nice(int(config.get("nice", 5)))
    except OSError:
        pass
    threads = int(config["threads"])
    # Read by fitting.core.runtime.init_mitsuba (Dr.Jit render threads) and by torch/OpenMP: leave
    # the window a core.
    os.environ["MATFIT_THREADS"] = str(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if config.get("device") and config["device"] != "auto":
        os.environ["MATFIT_DEVICE"] = config["device"]
    import multiprocessing

    import torch
    torch.set_num_threads(threads)
    parent = multiprocessing.parent_process()

    def parent_alive() -> bool:
        return parent is None or parent.is_alive()

    def reply(kind: str, rid: int, payload: Any) -> None:
        replies.put((kind, rid, payload))

    backend = _load_backend(config.get("backend") or DEFAULT_BACKEND)
    reply("ready", 0, backend.startup(config.get("device") or "auto", threads))
    while True:
        try:
            req = requests.get(timeout=1.0)
        except queue.Empty:
            if not parent_alive():
                break
            continue
        if req is None:
            break
        handle(backend, req, reply, cancel_event, cancel_id, parent_alive)
    replies.close()
    replies.join_thread()  # flush what is still in the feeder before the process exits
