"""A second population of spheres in any layout: satellites beside powder spheres, droplets
between flat islands, faint small particles among bright large ones.

The second population is placed after the material's own particles, on the substrate they
leave free (a distance transform of their top view), so it never interpenetrates them whatever
their shape. Its particles carry ``population == 1``; bulk labels give them their own category
and the imaging models their own contrast (``second_contrast``).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from fitting.render.geometry.layout import GeometryParam, InstanceGroup, ParticleLayout
from fitting.render.geometry.meshes import _add_spheres, _budget_levels, _MeshBuilder, _sphere_level, _triangle_budget
from fitting.render.geometry.sampling import _lognormal

MIXTURE_PARAMS: dict[str, GeometryParam] = {
    "second_size": GeometryParam(2.0, 150.0, 8.0, "px", "geometric mean diameter of the second population (spheres)"),
    "second_gsd": GeometryParam(1.0, 2.0, 1.2, "", "geometric std of the second population's diameters"),
    "second_coverage": GeometryParam(0.0, 0.4, 0.0, "", "projected area fraction of the second population (0 = none)"),
}

#: Resolution cap of the top view whose free space the second population fills.
_FREE_MAP_MAX = 1024
_ROUNDS = 60


def free_distance(layout: ParticleLayout, resolution: int) -> tuple[np.ndarray, float]:
    """Distance (world units) from each pixel centre of a top view to the nearest particle.

    Returns ``(distance, pixel)``: (R,R) float32 (row 0 = y = size), and the pixel size."""
    res = int(resolution)
    _, pid, _ = layout.top_view(res)
    pixel = float(layout.size) / res
    if not (pid > 0).any():
        return np.full((res, res), np.float32(4 * layout.size)), pixel
    dist = ndimage.distance_transform_edt(pid == 0) * pixel
    return dist.astype(np.float32), pixel


def place_in_free_space(radii: np.ndarray, free: np.ndarray, pixel: float, size: float,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random sequential addition of discs into the free space of a top view, largest first.

    Parameters
    ----------
    radii : (n,) disc radii in world units.
    free : (R,R) distance to the nearest obstacle (from :func:`free_distance`).
    pixel, size : the top view's pixel size and the field side.

    Returns ``(xy, placed)``: (n,2) positions and the (n,) mask of discs that found a place;
    placed discs overlap neither an obstacle nor each other.
    """
    n = len(radii)
    xy = np.zeros((n, 2))
    placed = np.zeros(n, bool)
    if n == 0:
        return xy, placed
    res = free.shape[0]
    order = np.argsort(-radii, kind="stable")
    rmax = float(radii.max())
    tree_pts = np.zeros((0, 2))
    tree_r = np.zeros(0)
    tree = None
    todo = order
    for _ in range(_ROUNDS):
        if todo.size == 0:
            break
        cand = rng.random((todo.size, 2)) * size
        col = np.clip((cand[:, 0] / pixel).astype(int), 0, res - 1)
        row = np.clip(((size - cand[:, 1]) / pixel).astype(int), 0, res - 1)
        ok = free[row, col] >= radii[todo] + 0.5 * pixel
        if tree is not None and ok.any():
            idx = np.flatnonzero(ok)
            hits = tree.query_ball_point(cand[idx], radii[todo[idx]] + rmax)
            for k, h in zip(idx, hits):
                if h and np.any(np.hypot(*(tree_pts[h] - cand[k]).T) < tree_r[h] + radii[todo[k]]):
                    ok[k] = False
        # conflicts inside the round: the later (smaller) disc yields
        idx = np.flatnonzero(ok)
        if idx.size > 1:
            pairs = cKDTree(cand[idx]).query_pairs(2 * rmax, output_type="ndarray")
            if len(pairs):
                a, b = idx[pairs[:, 0]], idx[pairs[:, 1]]
                close = np.hypot(*(cand[a] - cand[b]).T) < radii[todo[a]] + radii[todo[b]]
                for i, j in zip(a[close], b[close]):
                    if ok[i] and ok[j]:
                        ok[max(i, j)] = False
        got = todo[ok]
        xy[got] = cand[ok]
        placed[got] = True
        tree_pts = np.r_[tree_pts, cand[ok]]
        tree_r = np.r_[tree_r, radii[got]]
        tree = cKDTree(tree_pts) if len(tree_pts) else None
        todo = todo[~ok]
    return xy, placed


def add_second_population(layout: ParticleLayout, params: dict[str, float], size: int,
                          rng: np.random.Generator) -> ParticleLayout:
    """``layout`` with a second population of spheres in its free space (``second_*`` params).

    Returns the layout unchanged when ``second_coverage`` is 0."""
    cov = float(params.get("second_coverage", 0.0))
    if cov <= 0:
        return layout
    gm, gsd = float(params["second_size"]), float(params["second_gsd"])
    mean_area = math.pi / 4 * gm * gm * math.exp(2 * math.log(max(gsd, 1.0)) ** 2)
    n = int(cov * size * size / mean_area) + 1
    d = _lognormal(rng, gm, gsd, n)
    resolution = int(min(_FREE_MAP_MAX, max(64, size)))
    free, pixel = free_distance(layout, resolution)
    xy, placed = place_in_free_space(d / 2, free, pixel, float(size), rng)
    r = d[placed] / 2
    centers = np.c_[xy[placed], r]
    info = dict(layout.info)
    info["second_population"] = {"target_coverage": cov, "n_drawn": int(n), "n_placed": int(placed.sum()),
                                 "coverage_estimate": float(np.pi * (r * r).sum() / size ** 2)}
    if len(r) == 0:
        layout.info = info
        return layout
    mb = _MeshBuilder()
    levels = _budget_levels(_sphere_level(r), max(1, _triangle_budget(size) - layout.n_triangles))
    first = layout.n_particles
    _add_spheres(mb, centers, r, np.arange(first + 1, first + len(r) + 1), levels)
    return merge_layouts(layout, mb, centers, r, rng, info)


def merge_layouts(layout: ParticleLayout, mb: _MeshBuilder, centers: np.ndarray, radii: np.ndarray,
                  rng: np.random.Generator, info: dict) -> ParticleLayout:
    """``layout`` plus the second population built in ``mb`` (particle ids already after the
    layout's own), as one layout whose ``population`` marks the new particles 1."""
    nf0 = layout.n_triangles
    groups = [InstanceGroup(g.vertices, g.normals, g.faces, g.matrices, g.pids, g.face_start + nf0, g.face_count)
              for g in mb.groups]

    def soup():
        v0, n0, f0, p0 = layout.vertices, layout.normals, layout.faces, layout.face_particle
        v1, n1, f1, p1 = mb.build()
        return (np.concatenate([v0, v1]), np.concatenate([n0, n1]),
                np.concatenate([f0, f1 + len(v0)]).astype(np.int32), np.concatenate([p0, p1]).astype(np.int32))

    k = len(radii)
    loose0 = layout.loose_faces if layout.loose_faces is not None else np.zeros(0, np.int64)
    loose = np.concatenate([loose0, mb.loose_faces() + nf0]).astype(np.int64)
    top = int(layout.cluster.max(initial=0))
    cluster = np.concatenate([layout.cluster, top + 1 + np.arange(k)]).astype(np.int32)
    population = np.concatenate([layout.populations, np.ones(k, np.int8)])
    info = dict(info)
    info["n_particles"] = layout.n_particles + k
    info["n_triangles"] = nf0 + int(mb.nf)
    return ParticleLayout(soup, nf0 + int(mb.nf), max(layout.z_max, float(mb.z_max)),
                          np.r_[layout.centers, np.asarray(centers, np.float32)].astype(np.float32),
                          np.r_[layout.radii, np.asarray(radii, np.float32)].astype(np.float32),
                          np.r_[layout.attributes, rng.random(k).astype(np.float32)].astype(np.float32),
                          cluster, layout.size, layout.kind, info,
                          instances=list(layout.instances) + groups, loose_faces=loose, population=population)
