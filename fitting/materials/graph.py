"""A material's surface graph, authored as data (JSON) and evaluated differentiably in torch.

The graph produces 2-D maps of the whole render field (``size`` x ``size`` pixels, world unit =
one pixel, row 0 at the top, y up). The maps are projected onto the particles from the top view,
so they have no seams and need not tile.

JSON format
-----------
::

    {
      "description": "optional free text",
      "nodes": [
        {"id": "grain", "type": "fbm", "params": {"scale": "$grain_size", "octaves": 4}},
        {"id": "cells", "type": "cellular", "params": {"cell_size": "$cell_size", "jitter": 0.9}},
        {"id": "mix",   "type": "blend", "inputs": {"a": "grain", "b": "cells.edge"},
                        "params": {"mode": "overlay", "opacity": "$roughness"}},
        {"id": "tone",  "type": "levels", "inputs": {"in": "mix"},
                        "params": {"in_low": 0.1, "gamma": {"param": "albedo_gamma", "scale": 2.0}}},
        {"id": "bump",  "type": "scale_offset", "inputs": {"in": "mix"}, "params": {"scale": "$bump"}},
        {"id": "sub",   "type": "constant", "params": {"value": "$substrate"}}
      ],
      "outputs": {"albedo": "tone", "height": "bump", "substrate": "sub"}
    }

* ``nodes``: a list; each node has a unique ``id`` (letters, digits, ``_`` and ``-``; no ``.``),
  a ``type`` from :data:`fitting.materials.nodes.NODE_TYPES`, optional ``inputs`` (input slot -> node
  reference) and optional ``params`` (parameter -> value; omitted parameters take their
  defaults), and optionally a free-text ``comment``. Node order in the file does not matter.
* A node reference is ``"id"`` (the node's default output port) or ``"id.port"`` (e.g.
  ``"cells.edge"``, ``"bump_slope.dy"``).
* A parameter value is a number, ``"$name"`` (the physical value of material parameter
  ``name``), ``{"param": "name", "scale": s, "offset": o}`` (= s * name + o), a string for
  choice parameters (``"mode": "overlay"``), true/false for flags, or a list of such numbers /
  references for stop lists (``ramp``, ``curve``). See :mod:`fitting.materials.nodes` for every node's
  inputs, parameters, defaults and ports.
* ``outputs``: map name -> node reference; names are ``albedo`` (surface brightness factor,
  ~[0, 1]), ``height`` (bump height in pixels), ``substrate`` (substrate brightness factor) and
  ``absorption`` (TEM / optical internal contrast factor). A graph declares the ones it provides.

Validation (:meth:`MaterialGraph.from_dict`) rejects unknown node types, unknown or missing
inputs, references to unknown nodes or ports, cycles, unknown parameters, malformed values and
unknown output names, with a :class:`fitting.core.errors.LibraryError` naming the file, the node and
the field, e.g. ``graph.json: node 'mix': input 'b' refers to unknown node 'cellz'``.

Evaluation receives PHYSICAL parameter values (name -> 0-dim tensor, may require grad, or float)
and is differentiable in every continuous node parameter. Randomness is deterministic from
``(seed, node id)``.
"""
from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from fitting.core.errors import LibraryError
from fitting.materials.nodes import NODE_TYPES, EvalContext, Node, slopes

__all__ = ["MaterialGraph", "OUTPUT_NAMES", "slopes", "NODE_TYPES"]

OUTPUT_NAMES: tuple[str, ...] = ("albedo", "height", "substrate", "absorption")
"""Map names a graph may provide."""

_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")
_TOP_KEYS = {"nodes", "outputs", "description", "comment"}
_NODE_KEYS = {"id", "type", "inputs", "params", "comment"}


class MaterialGraph:
    """A validated surface graph. Build it with :meth:`from_dict` (or :meth:`load`)."""

    def __init__(self, nodes: list[Node], outputs: dict[str, str], *, source: str = "<graph>",
                 description: str | None = None) -> None:
        self.source = source
        self.description = description
        self.nodes: dict[str, Node] = {n.id: n for n in nodes}
        self._file_order = [n.id for n in nodes]
        self.outputs: dict[str, str] = dict(outputs)
        self._out_refs: dict[str, tuple[str, str]] = {}
        for name, ref in self.outputs.items():
            nid, _, port = ref.partition(".")
            self._out_refs[name] = (nid, port or self.nodes[nid].PORTS[0])
        self._order = self._toposort()          # raises LibraryError on a cycle

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<graph>") -> "MaterialGraph":
        """Validate a graph dict (parsed JSON) and build the graph. Errors: LibraryError naming
        ``source`` and the offending node / field."""
        if not isinstance(d, Mapping):
            raise LibraryError(f"{source}: a surface graph must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - _TOP_KEYS
        if unknown:
            raise LibraryError(f"{source}: unknown top-level key(s) {sorted(unknown)}",
                               hint=f"allowed: {', '.join(sorted(_TOP_KEYS))}")
        raw_nodes = d.get("nodes")
        if not isinstance(raw_nodes, list) or not raw_nodes:
            raise LibraryError(f"{source}: 'nodes' must be a non-empty list of node objects")
        nodes: list[Node] = []
        seen: set[str] = set()
        for i, rn in enumerate(raw_nodes):
            if not isinstance(rn, Mapping):
                raise LibraryError(f"{source}: nodes[{i}]: expected an object, got {type(rn).__name__}")
            nid = rn.get("id")
            if not isinstance(nid, str) or not _ID_RE.match(nid):
                raise LibraryError(f"{source}: nodes[{i}]: 'id' must be a non-empty name of letters, "
                                   f"digits, '_' or '-' (no '.'), got {nid!r}")
            if nid in seen:
                raise LibraryError(f"{source}: node '{nid}': duplicate id")
            seen.add(nid)
            bad = set(rn) - _NODE_KEYS
            if bad:
                raise LibraryError(f"{source}: node '{nid}': unknown key(s) {sorted(bad)}",
                                   hint=f"allowed: {', '.join(sorted(_NODE_KEYS))}")
            ntype = rn.get("type")
            if ntype not in NODE_TYPES:
                raise LibraryError(f"{source}: node '{nid}': unknown node type {ntype!r}",
                                   hint=f"known types: {', '.join(sorted(NODE_TYPES))}")
            inputs = rn.get("inputs", {})
            params = rn.get("params", {})
            if not isinstance(inputs, Mapping):
                raise LibraryError(f"{source}: node '{nid}': 'inputs' must be an object")
            if not isinstance(params, Mapping):
                raise LibraryError(f"{source}: node '{nid}': 'params' must be an object")
            nodes.append(NODE_TYPES[ntype](nid, params, inputs, source=source))

        by_id = {n.id: n for n in nodes}
        for n in nodes:
            for slot, (ref, port) in n.connections.items():
                cls._check_ref(by_id, ref, port, f"{source}: node '{n.id}': input '{slot}'")

        outs = d.get("outputs")
        if not isinstance(outs, Mapping) or not outs:
            raise LibraryError(f"{source}: 'outputs' must be a non-empty object "
                               f"(output name -> node id)", hint=f"names: {', '.join(OUTPUT_NAMES)}")
        for name, ref in outs.items():
            if name not in OUTPUT_NAMES:
                raise LibraryError(f"{source}: outputs: {name!r} is not an output name",
                                   hint=f"expected one of {', '.join(OUTPUT_NAMES)}")
            if not isinstance(ref, str) or not ref:
                raise LibraryError(f"{source}: outputs: '{name}' must be a node id, got {ref!r}")
            nid, _, port = ref.partition(".")
            cls._check_ref(by_id, nid, port or None, f"{source}: outputs: '{name}'")

        desc = d.get("description")
        graph = cls(nodes, dict(outs), source=source, description=desc if isinstance(desc, str) else None)
        return graph

    @classmethod
    def load(cls, path: str | Path) -> "MaterialGraph":
        """Read a graph JSON file (errors name the file)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise LibraryError(f"{path}: cannot read the surface graph ({e.strerror or e})") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LibraryError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
        return cls.from_dict(data, source=str(path.name))

    @staticmethod
    def _check_ref(by_id: Mapping[str, Node], nid: str, port: str | None, where: str) -> None:
        if nid not in by_id:
            raise LibraryError(f"{where} refers to unknown node '{nid}'")
        ports = by_id[nid].PORTS
        if port is not None and port not in ports:
            raise LibraryError(f"{where} refers to unknown port '{port}' of node '{nid}' "
                               f"(type '{by_id[nid].type_name}' has: {', '.join(ports)})")

    def _toposort(self) -> list[str]:
        order: list[str] = []
        state: dict[str, int] = {}          # 1 = on the stack, 2 = done
        for root in self._file_order:
            if state.get(root) == 2:
                continue
            # iterative DFS keeping the path, so a cycle can be reported as a -> b -> a
            stack: list[tuple[str, list[tuple[str, str]]]] = []
            path: list[str] = []

            def push(nid: str) -> None:
                state[nid] = 1
                path.append(nid)
                deps = [(slot, ref) for slot, (ref, _) in self.nodes[nid].connections.items()]
                stack.append((nid, deps))

            push(root)
            while stack:
                nid, deps = stack[-1]
                if deps:
                    slot, dep = deps.pop(0)
                    if state.get(dep) == 1:
                        cyc = path[path.index(dep):] + [dep]
                        raise LibraryError(f"{self.source}: node '{nid}': input '{slot}' creates a cycle: "
                                           f"{' -> '.join(cyc)}")
                    if state.get(dep) != 2:
                        push(dep)
                    continue
                stack.pop()
                path.pop()
                state[nid] = 2
                order.append(nid)
        return order

    # -- queries ------------------------------------------------------------------------------
    def referenced_params(self) -> set[str]:
        """Material parameter names the graph refers to (in any node, used or not)."""
        out: set[str] = set()
        for n in self.nodes.values():
            out |= n.referenced_params()
        return out

    def node_count(self) -> int:
        return len(self.nodes)

    @property
    def provides(self) -> tuple[str, ...]:
        """The output names this graph declares, in :data:`OUTPUT_NAMES` order."""
        return tuple(n for n in OUTPUT_NAMES if n in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        """The graph as a JSON-ready dict (round-trips through :meth:`from_dict`)."""
        d: dict[str, Any] = {}
        if self.description is not None:
            d["description"] = self.description
        d["nodes"] = [self.nodes[n].to_dict() for n in self._file_order]
        d["outputs"] = copy.deepcopy(self.outputs)
        return d

    def __repr__(self) -> str:
        return f"<MaterialGraph {self.source}: {len(self.nodes)} nodes -> {', '.join(self.provides)}>"

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, values: Mapping[str, torch.Tensor | float], size: int, seed: int,
                 outputs: Iterable[str] | None = None, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", ports: bool = False) -> dict[str, torch.Tensor]:
        """Evaluate the graph over a ``size`` x ``size`` field.

        ``values``: physical material parameter values (0-dim tensors, possibly requiring grad,
        or floats). ``outputs``: which maps to compute (default: all declared); only the nodes
        they need are evaluated. Returns name -> (size, size) tensor of ``dtype``.
        With ``ports=True`` the result also holds every evaluated node port as ``"id.port"``
        (for inspection / debugging).
        """
        size = int(size)
        if size < 2:
            raise ValueError(f"size must be >= 2, got {size}")
        if isinstance(outputs, str):
            outputs = [outputs]
        want = list(self.outputs) if outputs is None else list(outputs)
        for name in want:
            if name not in self.outputs:
                raise LibraryError(f"{self.source}: the graph does not provide output '{name}'",
                                   hint=f"it provides: {', '.join(self.provides)}")
        needed = self._ancestors(self._out_refs[n][0] for n in want)
        ctx = EvalContext(size, seed, dtype, device)
        cache: dict[str, dict[str, torch.Tensor]] = {}
        for nid in self._order:
            if nid not in needed:
                continue
            node = self.nodes[nid]
            ins: dict[str, torch.Tensor | None] = {i.name: None for i in node.INPUTS}
            for slot, (ref, port) in node.connections.items():
                ins[slot] = cache[ref][port or self.nodes[ref].PORTS[0]]
            cache[nid] = node.forward(ctx, ins, node.resolve(ctx, values))
        result = {name: self._finish(ctx, cache[nid][port])
                  for name, (nid, port) in ((n, self._out_refs[n]) for n in want)}
        if ports:
            for nid, outs in cache.items():
                for port, t in outs.items():
                    result[f"{nid}.{port}"] = self._finish(ctx, t)
        return result

    @staticmethod
    def _finish(ctx: EvalContext, t: torch.Tensor) -> torch.Tensor:
        t = t.to(ctx.dtype)
        if t.shape != (ctx.size, ctx.size):
            t = t.expand(ctx.size, ctx.size).contiguous()
        return t

    def _ancestors(self, roots: Iterable[str]) -> set[str]:
        seen: set[str] = set()
        todo = list(roots)
        while todo:
            nid = todo.pop()
            if nid in seen:
                continue
            seen.add(nid)
            todo.extend(ref for ref, _ in self.nodes[nid].connections.values())
        return seen
