"""Small numeric helpers shared by the particle kinds: log-normal draws, rotations, periodic wrap.
"""
from __future__ import annotations

import math

import numpy as np


def _lognormal(rng: np.random.Generator, gmean: float, gsd: float, n: int, clip: float = 3.0) -> np.ndarray:
    """Log-normal draws (geometric mean, geometric std), truncated at +-clip sigma by resampling."""
    s = math.log(max(gsd, 1.0))
    z = rng.standard_normal(n)
    if s > 0:
        bad = np.abs(z) > clip
        while bad.any():
            z[bad] = rng.standard_normal(int(bad.sum()))
            bad = np.abs(z) > clip
    return gmean * np.exp(s * z)


def _lognormal_max(gmean: float, gsd: float, clip: float = 3.0) -> float:
    return gmean * math.exp(clip * math.log(max(gsd, 1.0)))


def _random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n,3,3) uniformly distributed rotation matrices (random unit quaternions)."""
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], 1)


def _rot_z(theta: np.ndarray) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    o, z = np.ones_like(c), np.zeros_like(c)
    return np.stack([np.stack([c, -s, z], -1), np.stack([s, c, z], -1), np.stack([z, z, o], -1)], 1)


def _rot_align(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,3,3) rotations taking unit vectors a (n,3) onto the unit vector b (3,)."""
    a = np.atleast_2d(a) / np.linalg.norm(np.atleast_2d(a), axis=1, keepdims=True)
    v = np.cross(a, b[None, :])
    c = a @ b
    vx = np.zeros((len(a), 3, 3))
    vx[:, 0, 1], vx[:, 0, 2], vx[:, 1, 2] = -v[:, 2], v[:, 1], -v[:, 0]
    vx[:, 1, 0], vx[:, 2, 0], vx[:, 2, 1] = v[:, 2], -v[:, 1], v[:, 0]
    anti = c < -1 + 1e-9
    k = 1.0 / np.where(anti, 1.0, 1.0 + c)
    R = np.eye(3)[None] + vx + (vx @ vx) * k[:, None, None]
    if anti.any():   # 180 degrees about any axis perpendicular to a
        for i in np.flatnonzero(anti):
            p = np.cross(a[i], [1.0, 0, 0])
            if np.linalg.norm(p) < 1e-6:
                p = np.cross(a[i], [0, 1.0, 0])
            p /= np.linalg.norm(p)
            R[i] = 2 * np.outer(p, p) - np.eye(3)
    return R


def _wrap(d: np.ndarray, box) -> np.ndarray:
    return d - box * np.round(d / box)


def _wrap_pos(p: np.ndarray, box: float) -> np.ndarray:
    p = np.mod(p, box)
    p[p >= box] = 0.0
    return p


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-300)




def _field_box(size: float, bmax: float) -> tuple[float, float]:
    """(box, offset): periodic packing domain and the field's offset inside it."""
    margin = bmax + 1.0
    box = max(size + 2 * margin, 4.2 * bmax)
    return box, 0.5 * (box - size)
