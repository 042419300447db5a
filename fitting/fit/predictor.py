"""Per-material parameter predictors: fully connected layers on the texture descriptor.

Input reduction: the Gram descriptor has ~175k entries (upper triangles of four Gram
matrices). A fixed, seeded sparse random projection (count sketch: every entry is added
with a random sign into one of ``SKETCH_DIM`` buckets, separately per descriptor part so a
large layer cannot drown a small one) keeps distances approximately (Johnson-Lindenstrauss)
at a tiny fraction of the size, so a predictor file stays around 1 MB. Signed square roots
tame the heavy tails of Gram entries; features are standardised with training statistics.

Output: all of the material's normalised parameters (geometry included) through a sigmoid.

Data sets are cached on disk per material and content hash in chunks, so an interrupted
`matfit train` resumes where it stopped; renders run in parallel worker processes.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from fitting.core.errors import BackboneError, MatfitError

SKETCH_DIM_PER_PART = 192
SKETCH_SEED = 1234
CHUNK = 25
PREDICTOR_FORMAT = 1


def data_root() -> Path:
    from fitting.materials.library import REPO_ROOT
    return Path(os.environ.get("MATFIT_DATA", REPO_ROOT / "data"))


# ------------------------------------------------------------------------- features
_SKETCH_CACHE: dict[tuple, list] = {}


def sketch_plan(part_slices: dict[str, slice]) -> list[tuple[slice, torch.Tensor, torch.Tensor, int]]:
    key = tuple((k, s.start, s.stop) for k, s in part_slices.items())
    if key not in _SKETCH_CACHE:
        gen = torch.Generator().manual_seed(SKETCH_SEED)
        plan = []
        offset = 0
        for name, sl in part_slices.items():
            n = sl.stop - sl.start
            dim = min(SKETCH_DIM_PER_PART, n)
            if n <= dim:
                bucket = torch.arange(n)
                sign = torch.ones(n)
            else:
                bucket = torch.randint(0, dim, (n,), generator=gen)
                sign = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
            plan.append((sl, bucket + offset, sign, dim))
            offset += dim
        _SKETCH_CACHE[key] = plan
    return _SKETCH_CACHE[key]


def part_slices_of(meta: dict) -> dict[str, slice]:
    """The descriptor layout a trained model recorded (``meta["part_slices"]``) as slices."""
    return {k: slice(*v) for k, v in meta["part_slices"].items()}


def reduce_descriptor(desc: torch.Tensor, part_slices: dict[str, slice]) -> torch.Tensor:
    """(..., D) descriptor -> (..., F) predictor features (fixed count sketch per part)."""
    desc = desc.detach().to(torch.float32)
    lead = desc.shape[:-1]
    flat = desc.reshape(-1, desc.shape[-1])
    plan = sketch_plan(part_slices)
    total = sum(p[3] for p in plan)
    out = torch.zeros(flat.shape[0], total)
    for sl, bucket, sign, _ in plan:
        v = flat[:, sl]
        v = torch.sign(v) * torch.sqrt(v.abs() + 1e-12)
        out.index_add_(1, bucket, v * sign)
    return out.reshape(*lead, total)


# ------------------------------------------------------------------------- network
class PredictorNet(nn.Module):
    def __init__(self, n_in: int, n_out: int, hidden: int = 128, dropout: float = 0.25) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_out))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(f))


@dataclass
class Predictor:
    material_id: str
    net: PredictorNet
    mean: torch.Tensor
    std: torch.Tensor
    meta: dict
    # Per parameter: trust the network only where it beat the mean predictor on the held-out
    # split; elsewhere use the material default (the centre of the training distribution).
    trusted: np.ndarray | None = None
    fallback: np.ndarray | None = None

    @property
    def backbone(self) -> str:
        return self.meta["backbone"]

    def predict(self, desc: torch.Tensor, part_slices: dict[str, slice] | None = None) -> np.ndarray:
        if part_slices is None:
            part_slices = part_slices_of(self.meta)
        f = reduce_descriptor(desc.reshape(1, -1), part_slices)
        with torch.no_grad():
            self.net.eval()
            y = self.net((f - self.mean) / self.std)[0].numpy().astype(np.float32)
        if self.trusted is not None and self.fallback is not None:
            y = np.where(self.trusted, y, self.fallback).astype(np.float32)
        return y


def predictor_status(material) -> str:
    """'missing', 'current', or 'stale' (the material changed since training)."""
    meta_path = material.folder / "predictor.json"
    if not material.predictor_path.exists() or not meta_path.exists():
        return "missing"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return "stale"
    return "current" if meta.get("content_hash") == material.content_hash else "stale"


def load_predictor(material, backbone: str | None = None, on_warning: Callable[[str], None] | None = None) -> Predictor | None:
    status = predictor_status(material)
    if status == "missing":
        return None
    meta = json.loads((material.folder / "predictor.json").read_text())
    if backbone is not None and meta.get("backbone") != backbone:
        msg = (f"predictor of '{material.id}' was trained with backbone '{meta.get('backbone')}', "
               f"not '{backbone}': not used (run `matfit train {material.id} --backbone {backbone}`)")
        (on_warning or warnings.warn)(msg)
        return None
    if status == "stale":
        msg = (f"predictor of '{material.id}' is stale: the material changed since training "
               f"(run `matfit train {material.id}`)")
        (on_warning or warnings.warn)(msg)
    state = torch.load(material.predictor_path, map_location="cpu", weights_only=True)
    net = PredictorNet(int(state["n_in"]), int(state["n_out"]), int(state["hidden"]))
    net.load_state_dict(state["net"])
    if int(state["n_out"]) != len(material.specs):
        (on_warning or warnings.warn)(f"predictor of '{material.id}' predicts {state['n_out']} parameters, "
                                      f"the material has {len(material.specs)}: not used")
        return None
    per = meta.get("per_parameter", {})
    trusted = np.array([per.get(s.name, {}).get("mae", 1.0) < per.get(s.name, {}).get("mean_baseline", 0.0)
                        for s in material.specs])
    return Predictor(material.id, net, state["mean"], state["std"], meta, trusted=trusted,
                     fallback=material.default_vector())


# ------------------------------------------------------------------------- data sets
def dataset_dir(material, backbone: str, size: int) -> Path:
    return data_root() / "predictors" / material.id / f"{material.content_hash}-{backbone}-{size}"


def _render_chunk(args) -> tuple[int, np.ndarray, np.ndarray]:
    """Worker: render + describe one chunk of samples. Runs in its own process."""
    material_id, lib_path, chunk_id, n, size, spp, backbone, threads = args
    os.environ["MATFIT_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    from fitting.core.runtime import init_mitsuba
    from fitting.describe.descriptor import TextureDescriptor
    from fitting.materials.library import load_library
    from fitting.materials.scene import MaterialScene, RenderSettings
    init_mitsuba(threads=threads)
    mat = load_library(lib_path)[material_id]
    desc = TextureDescriptor(backbone, work_size=size)
    rng = np.random.default_rng(1_000_003 * chunk_id + 7)
    xs, feats = [], []
    for i in range(n):
        x = mat.random_vector(rng)
        seed = chunk_id * 1000 + i
        scene = MaterialScene(mat, RenderSettings(size=size, spp=spp, layout_seed=seed))
        img = scene.render(torch.as_tensor(x), seed=seed).detach()
        with torch.no_grad():
            d = desc.describe(img[None, None])[0]
        xs.append(x)
        feats.append(reduce_descriptor(d, desc.part_slices()).numpy())
    return chunk_id, np.stack(xs), np.stack(feats)


def generate_dataset(material, samples: int, backbone: str = "vgg16-hed", size: int = 256, spp: int = 4,
                     workers: int = 2, progress: Callable[[int, int, float], None] | None = None,
                     cancel=None, lib_path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render+describe ``samples`` random parameter vectors; cached and resumable (chunks)."""
    import io

    from fitting.core.files import atomic_write_bytes
    out = dataset_dir(material, backbone, size)
    out.mkdir(parents=True, exist_ok=True)
    n_chunks = math.ceil(samples / CHUNK)
    todo = [c for c in range(n_chunks) if not (out / f"chunk_{c:05d}.npz").exists()]
    done = n_chunks - len(todo)
    t0 = time.time()
    if progress:
        progress(done * CHUNK, n_chunks * CHUNK, 0.0)
    lib_path = lib_path or str(material.folder.parent)
    threads = max(1, (os.cpu_count() or 2) // max(1, workers))
    jobs = [(material.id, lib_path, c, CHUNK, size, spp, backbone, threads) for c in todo]

    def save(chunk_id, xs, feats):
        buf = io.BytesIO()
        np.savez(buf, x=xs.astype(np.float32), f=feats.astype(np.float32))
        atomic_write_bytes(out / f"chunk_{chunk_id:05d}.npz", buf.getvalue())

    finished = 0
    if workers <= 1 or len(jobs) <= 1:
        for j in jobs:
            if cancel is not None and cancel.cancelled:
                break
            save(*_render_chunk(j))
            finished += 1
            if progress:
                progress((done + finished) * CHUNK, n_chunks * CHUNK, time.time() - t0)
    else:
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers) as pool:
            for res in pool.imap_unordered(_render_chunk, jobs):
                save(*res)
                finished += 1
                if progress:
                    progress((done + finished) * CHUNK, n_chunks * CHUNK, time.time() - t0)
                if cancel is not None and cancel.cancelled:
                    pool.terminate()
                    break
    if cancel is not None:
        cancel.check("dataset generation")
    return load_dataset(material, backbone, size, limit=samples)


def load_dataset(material, backbone: str, size: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    d = dataset_dir(material, backbone, size)
    files = sorted(d.glob("chunk_*.npz"))
    if not files:
        raise MatfitError(f"no training data for '{material.id}' in {d}", hint=f"run `matfit train {material.id}`")
    xs, fs = [], []
    for f in files:
        with np.load(f) as z:
            xs.append(z["x"])
            fs.append(z["f"])
    x, f = np.concatenate(xs), np.concatenate(fs)
    if limit is not None:
        x, f = x[:limit], f[:limit]
    return x, f


# ------------------------------------------------------------------------- training
def train_predictor(material, x: np.ndarray, f: np.ndarray, part_slices: dict[str, slice], backbone: str,
                    epochs: int = 300, hidden: int = 128, seed: int = 0, holdout: float = 0.15,
                    save: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Train, evaluate on a held-out split, save weights + metadata. Returns the metadata."""
    import io

    from fitting.core.files import atomic_write_bytes, atomic_write_text
    from fitting.materials.library import LIBRARY_VERSION
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = len(x)
    if n < 10:
        raise MatfitError(f"only {n} training samples for '{material.id}'", hint="use --samples 10 or more")
    perm = rng.permutation(n)
    n_test = max(2, int(round(holdout * n)))
    test, train = perm[:n_test], perm[n_test:]
    X = torch.as_tensor(f, dtype=torch.float32)
    Y = torch.as_tensor(x, dtype=torch.float32)
    # Early stopping on an inner validation split of the training part (the held-out test
    # split is only used for the final report).
    n_val = max(2, int(round(0.12 * len(train))))
    val, fit_idx = train[:n_val], train[n_val:]
    mean = X[fit_idx].mean(0)
    std = X[fit_idx].std(0) + 1e-4
    Xn = (X - mean) / std
    net = PredictorNet(X.shape[1], Y.shape[1], hidden, dropout=0.25)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    bs = min(128, len(fit_idx))
    t0 = time.time()
    best_val, best_state, best_epoch = float("inf"), None, 0
    for ep in range(epochs):
        net.train()
        order = torch.as_tensor(rng.permutation(fit_idx))
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            # feature noise = augmentation against render noise in the descriptor
            inp = Xn[idx] + 0.1 * torch.randn_like(Xn[idx])
            loss = (net(inp) - Y[idx]).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        net.eval()
        with torch.no_grad():
            v = float((net(Xn[val]) - Y[val]).abs().mean())
        if v < best_val:
            best_val, best_epoch = v, ep + 1
            best_state = {k: t.clone() for k, t in net.state_dict().items()}
        if log and (ep + 1) % max(1, epochs // 5) == 0:
            log(f"epoch {ep + 1}/{epochs}: train L1 {float(loss.detach()):.4f}, validation L1 {v:.4f}")
    net.load_state_dict(best_state)
    net.eval()
    with torch.no_grad():
        pred = net(Xn[test]).numpy()
    y_test = x[test]
    base = np.abs(y_test - x[fit_idx].mean(0)).mean(0)
    err = np.abs(pred - y_test).mean(0)
    per_param = {s.name: {"mae": float(e), "mean_baseline": float(b), "group": s.group}
                 for s, e, b in zip(material.specs, err, base)}
    per_group: dict[str, dict] = {}
    for g in ("surface", "geometry", "lighting", "imaging"):
        idx = [i for i, s in enumerate(material.specs) if s.group == g]
        if idx:
            per_group[g] = {"mae": float(err[idx].mean()), "mean_baseline": float(base[idx].mean())}
    meta = {"format": PREDICTOR_FORMAT, "material": material.id, "content_hash": material.content_hash,
            "library_version": LIBRARY_VERSION, "backbone": backbone, "samples": int(n),
            "train_samples": int(len(train)), "heldout_samples": int(n_test), "epochs": epochs,
            "hidden": hidden, "features": int(X.shape[1]), "best_epoch": best_epoch,
            "part_slices": {k: [s.start, s.stop] for k, s in part_slices.items()},
            "heldout_mae": float(err.mean()), "heldout_mean_baseline": float(base.mean()),
            "per_group": per_group, "per_parameter": per_param, "train_seconds": round(time.time() - t0, 1)}
    if save:
        buf = io.BytesIO()
        torch.save({"net": net.state_dict(), "mean": mean, "std": std, "n_in": X.shape[1], "n_out": Y.shape[1],
                    "hidden": hidden}, buf)
        atomic_write_bytes(material.predictor_path, buf.getvalue())
        atomic_write_text(material.folder / "predictor.json", json.dumps(meta, indent=2) + "\n")
    return meta


def check_backbone_matches(meta: dict, backbone: str) -> None:
    if meta.get("backbone") != backbone:
        raise BackboneError(f"predictor trained with '{meta.get('backbone')}' cannot read '{backbone}' descriptors",
                            hint="retrain with `matfit train --backbone ...` or choose the matching backbone")
