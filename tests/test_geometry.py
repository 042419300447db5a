"""Particle geometry generators: mesh validity, packing, statistics, determinism, speed."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy.spatial import cKDTree

from fitting.core.errors import LibraryError
from fitting.render.geometry.kinds import GEOMETRY_KINDS, generate_layout, validate_geometry_params
from fitting.render.geometry.layout import GeometryParam, ParticleLayout
from fitting.render.geometry.raster import _raster_fragments
from fitting.render.geometry.agglomerates import fractal_dimension_estimate, grow_aggregate

KINDS = list(GEOMETRY_KINDS)
SINGLE_KINDS = [k for k in KINDS if k != "agglomerates"]


def _params(kind: str, which: str) -> dict[str, float]:
    spec = GEOMETRY_KINDS[kind].params
    if which == "default":
        return {}
    return {k: (p.min if which == "min" else p.max) for k, p in spec.items()}


_CACHE: dict = {}


def layout(kind: str, params: dict | None = None, size: int = 256, seed: int = 0) -> ParticleLayout:
    key = (kind, tuple(sorted((params or {}).items())), size, seed)
    if key not in _CACHE:
        _CACHE[key] = generate_layout(kind, params or {}, size, seed)
    return _CACHE[key]


def dense(kind: str) -> dict[str, float]:
    return {"coverage": GEOMETRY_KINDS[kind].params["coverage"].max}


# ----------------------------------------------------------------------------- registry / API


def test_registry_lists_ranges():
    assert set(KINDS) == {"spheres", "agglomerates", "polyhedra", "crystals", "ellipsoids", "rods"}
    for kind, spec in GEOMETRY_KINDS.items():
        assert spec.name == kind and spec.description
        assert "coverage" in spec.params
        for name, p in spec.params.items():
            assert isinstance(p, GeometryParam)
            lo, hi, default, unit, desc = p            # tuple-like (min, max, default, unit, description)
            assert lo <= default <= hi, (kind, name)
            assert isinstance(unit, str) and desc
    sp = GEOMETRY_KINDS["spheres"].params
    assert (sp["size_mean"].min, sp["size_mean"].max) == (3.0, 150.0)
    assert (sp["coverage"].min, sp["coverage"].max) == (0.002, 0.75)   # sparse bright-field colloids
    ag = GEOMETRY_KINDS["agglomerates"].params
    assert (ag["fractal_dim"].min, ag["fractal_dim"].max) == (1.5, 2.8)
    assert (ag["primary_count"].min, ag["primary_count"].max) == (3.0, 200.0)
    assert (ag["overlap"].min, ag["overlap"].max) == (0.0, 0.5)


def test_validation_errors():
    with pytest.raises(LibraryError, match="unknown geometry kind"):
        generate_layout("cubes", {}, 64, 0)
    with pytest.raises(LibraryError, match="no parameter 'radius'"):
        generate_layout("spheres", {"radius": 3}, 64, 0)
    with pytest.raises(LibraryError, match="outside"):
        generate_layout("spheres", {"coverage": 0.9}, 64, 0)
    with pytest.raises(LibraryError, match="outside"):
        validate_geometry_params("agglomerates", {"fractal_dim": 1.2})
    with pytest.raises(LibraryError, match="outside"):
        validate_geometry_params("rods", {"diameter": float("nan")})
    with pytest.raises(LibraryError, match="number"):
        validate_geometry_params("rods", {"diameter": "12"})
    with pytest.raises(LibraryError, match="size"):
        generate_layout("spheres", {}, 4, 0)
    with pytest.raises(LibraryError, match="seed"):
        generate_layout("spheres", {}, 64, 1.5)
    p = validate_geometry_params("spheres", {"size_mean": 150, "coverage": np.float32(0.02)})
    assert p["size_mean"] == 150.0 and p["squash"] == 1.0 and abs(p["coverage"] - 0.02) < 1e-7


# ----------------------------------------------------------------------------- mesh validity


@pytest.mark.parametrize("which", ["min", "default", "max"])
@pytest.mark.parametrize("kind", KINDS)
def test_layout_is_valid_mesh(kind, which):
    lay = layout(kind, _params(kind, which), size=192, seed=3)
    N = lay.n_particles
    assert N > 0 and lay.kind == kind and lay.size == 192.0
    V, F = len(lay.vertices), len(lay.faces)
    assert lay.vertices.dtype == np.float32 and lay.vertices.shape == (V, 3)
    assert lay.normals.dtype == np.float32 and lay.normals.shape == (V, 3)
    assert lay.faces.dtype == np.int32 and lay.faces.shape == (F, 3)
    assert lay.face_particle.dtype == np.int32 and lay.face_particle.shape == (F,)
    assert lay.centers.dtype == np.float32 and lay.centers.shape == (N, 3)
    for name in ("radii", "attributes"):
        a = getattr(lay, name)
        assert a.dtype == np.float32 and a.shape == (N,)
    assert lay.cluster.dtype == np.int32 and lay.cluster.shape == (N,)
    for a in (lay.vertices, lay.normals, lay.centers, lay.radii, lay.attributes):
        assert np.isfinite(a).all()
    assert lay.faces.min() >= 0 and lay.faces.max() < V
    assert np.all(np.abs(np.linalg.norm(lay.normals, axis=1) - 1) < 1e-4)
    assert lay.face_particle.min() >= 1 and lay.face_particle.max() <= N
    assert np.all(np.bincount(lay.face_particle, minlength=N + 1)[1:] > 0), "a particle without faces"
    assert (lay.radii > 0).all()
    assert (lay.attributes >= 0).all() and (lay.attributes < 1).all()
    if kind == "agglomerates":
        assert lay.cluster.min() == 1 and set(np.unique(lay.cluster)) == set(range(1, lay.cluster.max() + 1))
    else:
        assert np.array_equal(lay.cluster, np.arange(1, N + 1))
    # on the substrate: nothing below z = 0, every particle / agglomerate touches it
    vz = lay.vertices[:, 2]
    assert vz.min() >= -1e-3
    vert_pid = np.zeros(V, np.int64)
    vert_pid[lay.faces.reshape(-1)] = np.repeat(lay.face_particle, 3)
    minz = np.full(N + 1, np.inf)
    np.minimum.at(minz, vert_pid, vz)
    clus_min = np.full(lay.cluster.max() + 1, np.inf)
    np.minimum.at(clus_min, lay.cluster, minz[1:])
    scale = np.maximum(lay.radii.max(), 1.0)
    # (the upper layers of a pile rest on the beads below: tests/test_library_reach.py)
    bottom = clus_min[1:] < 0.5 * lay.radii if lay.info.get("layers", 1) > 1 else slice(None)
    assert np.all(np.abs(clus_min[1:][bottom]) < 1e-4 * scale + 1e-3), "an agglomerate/particle floats or sinks"
    # outward, counter-clockwise faces: geometric normals agree with the shading normals and
    # point away from the particle centre (all primitives are convex)
    tri = lay.vertices[lay.faces].astype(np.float64)
    cr = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area2 = np.linalg.norm(cr, axis=1)
    ok = area2 > 1e-9
    nsh = lay.normals[lay.faces].astype(np.float64).sum(1)
    agree = (cr[ok] * nsh[ok]).sum(1) > 0
    assert agree.mean() > 0.999
    out = (lay.normals * (lay.vertices - lay.centers[vert_pid - 1])).sum(1)
    per = np.bincount(vert_pid, out, N + 1)[1:]
    assert np.all(per > 0), "normals point inwards for some particle"
    face_out = ((tri.mean(1) - lay.centers[lay.face_particle - 1]) * cr).sum(1)
    assert (face_out[ok] > 0).mean() > 0.999
    # every particle / agglomerate reaches into the field (it may cross the border)
    vc = lay.cluster[vert_pid - 1]
    K = lay.cluster.max() + 1
    for ax in (0, 1):
        lo = np.full(K, np.inf)
        hi = np.full(K, -np.inf)
        np.minimum.at(lo, vc, lay.vertices[:, ax])
        np.maximum.at(hi, vc, lay.vertices[:, ax])
        assert np.all(lo[1:] < lay.size) and np.all(hi[1:] > 0)


def test_top_view_and_coverage_api():
    lay = layout("spheres", {"coverage": 0.3}, size=128, seed=1)
    h, pid, n = lay.top_view(64)
    assert h.shape == (64, 64) and pid.shape == (64, 64) and n.shape == (64, 64, 3)
    assert h.dtype == np.float32 and pid.dtype == np.int32
    assert set(np.unique(pid)) <= set(range(0, lay.n_particles + 1))
    assert ((pid > 0) == (h > 0)).mean() > 0.99
    assert abs((pid > 0).mean() - lay.projected_coverage(64)) < 1e-9
    assert np.all(n[pid > 0, 2] > -1e-3)
    empty = generate_layout("spheres", {"coverage": 0.02, "size_mean": 150}, 16, 0)
    assert 0 <= empty.projected_coverage(32) <= 1


# ----------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("kind", KINDS)
def test_coverage_sparse_and_dense(kind):
    sparse = {"coverage": 0.06}
    if kind == "agglomerates":
        sparse.update(primary_count=8, primary_size=6)
    for p in (sparse, dense(kind)):
        lay = layout(kind, p, size=512, seed=5)
        got = lay.projected_coverage(512)
        assert abs(got / p["coverage"] - 1) < 0.3, (kind, p, got)
        # the bookkeeping estimate agrees with the rasterised mesh
        assert abs(lay.info["coverage_estimate"] - got) < 0.15 * got + 0.01
    if kind == "spheres":
        assert got >= 0.6, got


# ----------------------------------------------------------------------------- no interpenetration


def test_spheres_do_not_interpenetrate():
    for p in ({"coverage": 0.75}, {"coverage": 0.75, "size_gsd": 2.0, "size_mean": 10}, {"coverage": 0.5, "squash": 0.6}):
        lay = layout("spheres", p, size=384, seed=7)
        c = lay.centers[:, :2].astype(np.float64)
        r = (lay.radii / (p.get("squash", 1.0) ** (1 / 3))).astype(np.float64)     # horizontal radius
        i, j = cKDTree(c).query_pairs(2 * r.max(), output_type="ndarray").T
        d = np.linalg.norm(c[i] - c[j], axis=1)
        assert np.all(d >= 0.98 * (r[i] + r[j])), p
        np.testing.assert_allclose(lay.centers[:, 2], r * p.get("squash", 1.0), rtol=1e-5)


def test_agglomerates_do_not_interpenetrate_each_other():
    for p in ({"coverage": 0.6}, {"coverage": 0.5, "fractal_dim": 2.8, "size_gsd": 1.6, "overlap": 0.5}):
        lay = layout("agglomerates", p, size=384, seed=7)
        c, r, cl = lay.centers.astype(np.float64), lay.radii.astype(np.float64), lay.cluster
        i, j = cKDTree(c).query_pairs(2 * r.max(), output_type="ndarray").T
        other = cl[i] != cl[j]
        d = np.linalg.norm(c[i] - c[j], axis=1)
        assert np.all(d[other] >= 0.98 * (r[i] + r[j])[other]), p
        # inside an agglomerate primaries are sintered: overlap allowed down to (1-overlap)(r1+r2)
        same = ~other
        ov = p.get("overlap", GEOMETRY_KINDS["agglomerates"].params["overlap"].default)
        assert np.all(d[same] >= (1 - ov) * (r[i] + r[j])[same] * 0.999)
        # and every primary touches some other primary of its agglomerate
        counts = np.bincount(cl)
        touching = np.zeros(len(r), bool)
        near = same & (d <= (1 - ov) * (r[i] + r[j]) * 1.001)
        touching[i[near]] = True
        touching[j[near]] = True
        assert np.all(touching | (counts[cl] == 1))


def _footprint_conflicts(lay: ParticleLayout, res: int) -> int:
    """Pixel centres covered (in top view) by two different particles."""
    pix, pid = [], []
    for flat, ti, *_ in _raster_fragments(lay.vertices, lay.faces, lay.size, res):
        pix.append(flat)
        pid.append(lay.face_particle[ti])
    key = np.unique(np.concatenate(pix).astype(np.int64) * (lay.n_particles + 1) + np.concatenate(pid))
    per_pixel = np.bincount(key // (lay.n_particles + 1))
    return int((per_pixel > 1).sum())


@pytest.mark.parametrize("extra", [{}, {"aspect": 4.0, "flatness": 0.3, "size_gsd": 1.6}, {"aspect": 1.0}])
def test_ellipses_do_not_overlap(extra):
    """Sampled boundary points of every footprint ellipse stay outside all other ellipses."""
    lay = layout("ellipsoids", {**dense("ellipsoids"), **extra}, size=384, seed=11)
    ax, th, c = lay.info["semi_axes"].astype(np.float64), lay.info["orientation"].astype(np.float64), \
        lay.centers[:, :2].astype(np.float64)
    np.testing.assert_allclose(lay.centers[:, 2], ax[:, 2], rtol=1e-5)
    e1 = np.stack([np.cos(th), np.sin(th)], 1)
    e2 = np.stack([-e1[:, 1], e1[:, 0]], 1)
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    pts = (c[:, None, :] + ax[:, 0, None, None] * np.cos(t)[None, :, None] * e1[:, None, :]
           + ax[:, 1, None, None] * np.sin(t)[None, :, None] * e2[:, None, :])
    owner = np.repeat(np.arange(len(c)), len(t))
    pts = pts.reshape(-1, 2)
    cand = cKDTree(c).query_ball_point(pts, ax[:, 0].max())
    for k, near in enumerate(cand):
        for o in near:
            if o == owner[k]:
                continue
            d = pts[k] - c[o]
            u, v = d @ e1[o] / ax[o, 0], d @ e2[o] / ax[o, 1]
            assert u * u + v * v >= 1 - 1e-3, (owner[k], o)


@pytest.mark.parametrize("kind,extra", [
    ("polyhedra", {}), ("polyhedra", {"elongation": 3.0, "roundness": 0.5, "facets": 6}),
    ("crystals", {}), ("crystals", {"hex_fraction": 1.0, "hex_aspect": 3.0, "roundness": 0.3, "elongation": 3.0}),
    ("rods", {}), ("rods", {"end_shape": 1.0, "length_mean": 120, "diameter": 8, "alignment": 0.6}),
    ("rods", {"end_shape": 0.5, "length_mean": 30, "diameter": 20, "size_gsd": 2.0}),
])
def test_footprints_do_not_overlap(kind, extra):
    lay = layout(kind, {**dense(kind), **extra}, size=384, seed=11)
    assert lay.projected_coverage(384) > 0.3
    assert _footprint_conflicts(lay, 768) == 0


# ----------------------------------------------------------------------------- size statistics


def _gstats(d: np.ndarray) -> tuple[float, float]:
    ld = np.log(d)
    return float(np.exp(ld.mean())), float(np.exp(ld.std()))


@pytest.mark.parametrize("kind,gm,gsd", [
    ("spheres", 10.0, 1.5), ("spheres", 6.0, 1.15), ("ellipsoids", 10.0, 1.4),
    ("polyhedra", 12.0, 1.3), ("crystals", 10.0, 1.6),
])
def test_lognormal_size_statistics(kind, gm, gsd):
    lay = layout(kind, {"size_mean": gm, "size_gsd": gsd, "coverage": 0.3}, size=640, seed=2)
    assert lay.n_particles > 500
    g, s = _gstats(2 * lay.radii)
    assert abs(g / gm - 1) < 0.1, (g, gm)
    assert abs(s / gsd - 1) < 0.1, (s, gsd)


def test_agglomerate_primary_and_rod_statistics():
    lay = layout("agglomerates", {"primary_size": 8.0, "size_gsd": 1.4, "coverage": 0.3}, size=384, seed=2)
    g, s = _gstats(2 * lay.radii)
    assert abs(g / 8.0 - 1) < 0.1 and abs(s / 1.4 - 1) < 0.1, (g, s)
    counts = np.bincount(lay.cluster)[1:]
    assert 0.5 * 30 < counts.mean() < 1.6 * 30
    rods = layout("rods", {"length_mean": 40.0, "diameter": 8.0, "size_gsd": 1.3, "coverage": 0.3}, size=640, seed=2)
    z = rods.centers[:, 2]          # rods lie flat: centre height = radius
    g, _ = _gstats(2 * z)
    assert abs(g / 8.0 - 1) < 0.1


# ----------------------------------------------------------------------------- fractal dimension


@pytest.mark.parametrize("df", [1.5, 1.8, 2.2, 2.8])
def test_fractal_dimension_of_grown_aggregates(df):
    for seed, (ov, gsd) in enumerate([(0.0, 1.0), (0.2, 1.2), (0.5, 1.6)]):
        c, r = grow_aggregate(100, df, primary_size=10, size_gsd=gsd, overlap=ov, seed=seed)
        assert c.shape == (100, 3) and r.shape == (100,)
        est = fractal_dimension_estimate(c, r)
        assert abs(est - df) <= 0.25, (df, ov, est)
        # sintered contacts only: no pair closer than (1 - overlap)(r1 + r2)
        d = np.linalg.norm(c[:, None] - c[None], axis=2) + np.eye(100) * 1e9
        assert np.all(d >= (1 - ov) * (r[:, None] + r[None]) * 0.999)
    # order-independent ensemble estimate (Rg vs N over aggregates of different sizes)
    cs, rs, ls = [], [], []
    for k, n in enumerate([12, 25, 50, 100, 200]):
        c, r = grow_aggregate(n, df, seed=100 + k)
        rng = np.random.default_rng(k)
        perm = rng.permutation(n)
        cs.append(c[perm]), rs.append(r[perm]), ls.append(np.full(n, k))
    est = fractal_dimension_estimate(np.concatenate(cs), np.concatenate(rs), np.concatenate(ls))
    assert abs(est - df) <= 0.25, (df, est)


def test_fractal_dimension_in_layouts():
    for df in (1.6, 2.4):
        lay = layout("agglomerates", {"fractal_dim": df, "primary_count": 100, "coverage": 0.2}, size=384, seed=4)
        ests = []
        for cid in np.unique(lay.cluster):
            m = lay.cluster == cid
            if m.sum() >= 60:
                ests.append(fractal_dimension_estimate(lay.centers[m], lay.radii[m]))
        assert len(ests) >= 2
        assert abs(np.median(ests) - df) <= 0.25, (df, ests)
        ens = fractal_dimension_estimate(lay.centers, lay.radii, lay.cluster)
        assert abs(ens - df) <= 0.3, (df, ens)


# ----------------------------------------------------------------------------- determinism, LOD, speed


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_per_seed(kind):
    a = generate_layout(kind, {}, 160, 42)
    b = generate_layout(kind, {}, 160, 42)
    c = generate_layout(kind, {}, 160, 43)
    for name in ("vertices", "normals", "faces", "face_particle", "centers", "radii", "attributes", "cluster"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert not (a.centers.shape == c.centers.shape and np.array_equal(a.centers, c.centers))


def test_level_of_detail_and_budget():
    small = layout("spheres", {"size_mean": 4, "size_gsd": 1.0, "coverage": 0.05}, size=128, seed=0)
    big = layout("spheres", {"size_mean": 120, "size_gsd": 1.0, "coverage": 0.3}, size=128, seed=0)
    tris_small = len(small.faces) / small.n_particles
    tris_big = len(big.faces) / big.n_particles
    assert tris_small <= 80 and tris_big >= 1280
    densest = layout("spheres", {"coverage": 0.75}, size=512, seed=0)
    assert densest.n_triangles < 400_000
    tiny = generate_layout("spheres", {"size_mean": 3, "coverage": 0.75}, 512, 0)
    assert tiny.n_triangles < 460_000 and tiny.projected_coverage(512) > 0.65


@pytest.mark.parametrize("kind", KINDS)
def test_densest_512_field_is_fast(kind):
    generate_layout(kind, dense(kind), 128, 0)          # warm caches / imports
    best = math.inf
    for seed in (1, 2):
        t0 = time.perf_counter()
        lay = generate_layout(kind, dense(kind), 512, seed)
        best = min(best, time.perf_counter() - t0)
    assert lay.n_particles > 0
    assert best < 2.0, f"{kind}: {best:.2f}s"


def test_affine_groups_are_recognised_and_rejected_correctly():
    from fitting.render.geometry.meshes import _affine_group, _sphere_template
    rng = np.random.default_rng(0)
    tp, tn, tf = _sphere_template(2)
    k = 5
    A = np.stack([np.diag(rng.uniform(0.5, 3.0, 3)) for _ in range(k)])
    t = rng.uniform(0, 200, (k, 3))
    v = np.einsum("kij,vj->kvi", A, tp) + t[:, None, :]
    n = np.einsum("kij,vj->kvi", np.linalg.inv(A), tn)      # diagonal: inverse transpose = inverse
    out = _affine_group(v, n)
    assert out is not None
    tv, tnn, M = out
    rebuilt = np.einsum("kij,vj->kvi", M[:, :, :3], tv) + M[:, None, :, 3]
    assert np.abs(rebuilt - v).max() < 1e-3
    # normals that are not the inverse-transpose image (e.g. left unscaled) are refused
    assert _affine_group(v, np.broadcast_to(tn, v.shape)) is None
    # a non-affine deformation (one cap stretched, as a capsule of another length) is refused
    w = v.copy()
    w[1, tp[:, 0] > 0, 0] += 5.0
    assert _affine_group(w, n) is None


@pytest.mark.parametrize("kind", ["spheres", "agglomerates"])
def test_sphere_groups_given_their_transforms_reproduce_the_merged_mesh(kind):
    """Sphere generators hand their exact affine maps to the mesh builder (no least-squares
    detection); every instance rebuilt from template + matrix must equal the merged soup, and
    the matrices must be what the detection finds."""
    from fitting.render.geometry.meshes import _affine_group
    lay = generate_layout(kind, dense(kind), 256, 3)
    assert lay.instances, "sphere layouts are instanced"
    for g in lay.instances:
        faces = lay.faces[g.face_start:g.face_start + g.face_count].reshape(len(g.pids), -1, 3)
        v = lay.vertices[faces[:, :, :].min(axis=(1, 2))[:, None] + np.arange(len(g.vertices))[None]]
        rebuilt = np.einsum("kij,vj->kvi", g.matrices[:, :, :3], g.vertices) + g.matrices[:, None, :, 3]
        scale = float(np.abs(v).max())
        assert np.abs(rebuilt - v).max() < 1e-5 * scale
        found = _affine_group(v, lay.normals[faces[:, :, :].min(axis=(1, 2))[:, None] + np.arange(len(g.vertices))[None]])
        assert found is not None
        assert np.abs(found[2] - g.matrices).max() < 1e-4 * scale
