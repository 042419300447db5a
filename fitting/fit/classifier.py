"""Which library material made an image: a classifier on the predictors' descriptor features.

The route of inverse procedural texture modelling (Hu et al. 2019): first classify the
procedural model, then regress its parameters (the per-material predictors). It is trained on
the predictors' cached training renders (random parameters of every material, the same
features the predictors read), so it knows each material's whole parameter range, where the
ranking only sees each material at the one parameter vector its predictor proposed.

The fit refines the materials it finds most probable beside the ranking's best
(:func:`fitting.fit.candidates.classified_candidates`).
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from fitting.core.errors import MatfitError
from fitting.fit.predictor import part_slices_of, reduce_descriptor

CLASSIFIER_FORMAT = 1
WEIGHTS_FILE = "classifier.pt"
META_FILE = "classifier.json"


class ClassifierNet(nn.Module):
    """One hidden layer on the standardised features; logits per material."""

    def __init__(self, n_in: int, n_classes: int, hidden: int = 128, dropout: float = 0.25) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class MaterialClassifier:
    """A trained material classifier.

    Attributes
    ----------
    materials : list of str
        Material ids, in the order of the network's outputs.
    net : ClassifierNet
    mean, std : torch.Tensor
        Feature standardisation (training statistics).
    meta : dict
        Training record: content hash of every material, samples, held-out accuracy.
    """

    materials: list[str]
    net: ClassifierNet
    mean: torch.Tensor
    std: torch.Tensor
    meta: dict = field(default_factory=dict)

    def probabilities(self, desc: torch.Tensor, part_slices: dict[str, slice] | None = None) -> dict[str, float]:
        """Probability of each material given one image's texture descriptor."""
        if part_slices is None:
            part_slices = part_slices_of(self.meta)
        f = reduce_descriptor(desc.reshape(1, -1), part_slices)
        return self.probabilities_of_features(f)[0]

    def probabilities_of_features(self, features) -> list[dict[str, float]]:
        """Probabilities for each row of reduced features (N, F)."""
        x = torch.as_tensor(np.asarray(features, np.float32))
        with torch.no_grad():
            self.net.eval()
            p = torch.softmax(self.net((x - self.mean) / self.std), dim=1).numpy()
        return [{m: float(v) for m, v in zip(self.materials, row)} for row in p]

    def save(self, folder: str | Path) -> None:
        """Weights and meta, each written atomically, into the library folder."""
        from fitting.core.files import atomic_write_bytes, atomic_write_text
        folder = Path(folder)
        buf = io.BytesIO()
        torch.save({"format": CLASSIFIER_FORMAT, "materials": self.materials, "net": self.net.state_dict(),
                    "mean": self.mean, "std": self.std, "n_in": int(self.mean.numel()),
                    "hidden": int(self.net.net[0].out_features)}, buf)
        atomic_write_bytes(folder / WEIGHTS_FILE, buf.getvalue())
        atomic_write_text(folder / META_FILE, json.dumps(self.meta, indent=2) + "\n")


def _status_and_meta(lib: dict, folder: Path) -> tuple[str, dict | None]:
    """:func:`classifier_status` and the classifier's meta (None when missing or unreadable)."""
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / META_FILE).is_file():
        return "missing", None
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return "stale", None
    current = {mid: mat.content_hash for mid, mat in lib.items()}
    return ("current" if meta.get("content_hashes", {}) == current else "stale"), meta


def classifier_status(lib: dict, folder: str | Path) -> str:
    """'missing', 'current', or 'stale' (a material was added, removed or changed since training)."""
    return _status_and_meta(lib, Path(folder))[0]


def load_classifier(lib: dict, folder: str | Path, backbone: str | None = None,
                    on_warning: Callable[[str], None] | None = None) -> MaterialClassifier | None:
    """The library's classifier, or None when there is none or it no longer fits the library.

    A classifier trained on another set of materials (one added, removed or changed) is not
    used: its probabilities would be over the wrong classes. The warning says how to retrain."""
    folder = Path(folder)
    status, meta = _status_and_meta(lib, folder)
    if status == "missing":
        return None
    warn = on_warning or (lambda m: None)
    if status == "stale":
        warn("the material classifier was trained on another library (a material was added, removed or "
             "changed): not used (run `matfit train --classifier`)")
        return None
    if backbone is not None and meta.get("backbone") != backbone:
        warn(f"the material classifier was trained with backbone '{meta.get('backbone')}', not '{backbone}': "
             f"not used (run `matfit train --classifier --backbone {backbone}`)")
        return None
    state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    if state.get("format") != CLASSIFIER_FORMAT:
        warn("the material classifier has an unknown format: not used (run `matfit train --classifier`)")
        return None
    net = ClassifierNet(int(state["n_in"]), len(state["materials"]), int(state["hidden"]))
    net.load_state_dict(state["net"])
    net.eval()
    return MaterialClassifier(list(state["materials"]), net, state["mean"], state["std"], meta)


def train_classifier(features: dict[str, np.ndarray], part_slices: dict[str, slice], backbone: str,
                     content_hashes: dict[str, str], epochs: int = 200, hidden: int = 128, seed: int = 0,
                     holdout: float = 0.15, log: Callable[[str], None] | None = None
                     ) -> tuple[MaterialClassifier, dict]:
    """Train a :class:`MaterialClassifier` on each material's reduced descriptor features.

    Parameters
    ----------
    features : {material id: (N_m, F) array}
        The predictors' training features of each material (random parameters).
    part_slices, backbone
        The descriptor layout and backbone the features come from (stored for the fit).
    content_hashes : {material id: hash}
        Each material's content hash; a later change makes the classifier stale.
    epochs, hidden, seed
        Training length, hidden width, seed of the split and the weights.
    holdout : float
        Share of every material's samples kept out of training for the reported accuracy.

    Returns
    -------
    classifier : MaterialClassifier
    meta : dict
        Held-out top-1 and top-3 accuracy overall and per material, and the confusion (for
        each material, the class its misclassified samples went to most often).
    """
    materials = sorted(features)
    if len(materials) < 2:
        raise MatfitError("a material classifier needs at least two materials")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    xs, ys, test_mask = [], [], []
    for k, mid in enumerate(materials):
        f = np.asarray(features[mid], np.float32)
        if len(f) < 10:
            raise MatfitError(f"only {len(f)} training samples for '{mid}'", hint="use --samples 10 or more")
        t = np.zeros(len(f), bool)
        t[rng.permutation(len(f))[:max(2, int(round(holdout * len(f))))]] = True
        xs.append(f)
        ys.append(np.full(len(f), k))
        test_mask.append(t)
    X = torch.as_tensor(np.concatenate(xs))
    Y = torch.as_tensor(np.concatenate(ys))
    test = np.concatenate(test_mask)
    train_idx = np.flatnonzero(~test)
    mean = X[train_idx].mean(0)
    std = X[train_idx].std(0) + 1e-4
    Xn = (X - mean) / std
    net = ClassifierNet(X.shape[1], len(materials), hidden)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    # Materials with more cached samples must not dominate: each sample weighs 1 / its class size.
    counts = np.bincount(Y[train_idx].numpy(), minlength=len(materials)).astype(np.float32)
    loss_fn = nn.CrossEntropyLoss(weight=torch.as_tensor(counts.sum() / (len(materials) * np.maximum(counts, 1))))
    bs = min(256, len(train_idx))
    t0 = time.time()
    for ep in range(epochs):
        net.train()
        order = torch.as_tensor(rng.permutation(train_idx))
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            # feature noise: the same augmentation against render noise as the predictors'
            loss = loss_fn(net(Xn[idx] + 0.1 * torch.randn_like(Xn[idx])), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if log and (ep + 1) % max(1, epochs // 5) == 0:
            log(f"epoch {ep + 1}/{epochs}: training loss {loss.item():.4f}")
    net.eval()
    with torch.no_grad():
        p = torch.softmax(net(Xn[test]), dim=1).numpy()
    y_test = Y[test].numpy()
    order = np.argsort(-p, axis=1)
    top1 = order[:, 0] == y_test
    top3 = (order[:, :3] == y_test[:, None]).any(axis=1)
    per = {}
    for k, mid in enumerate(materials):
        sel = y_test == k
        wrong = order[sel & ~top1, 0]
        per[mid] = {"top1": float(top1[sel].mean()), "top3": float(top3[sel].mean()), "test_samples": int(sel.sum()),
                    "confused_with": materials[int(np.bincount(wrong).argmax())] if wrong.size else None}
    meta = {"format": CLASSIFIER_FORMAT, "backbone": backbone, "materials": materials,
            "content_hashes": {m: content_hashes[m] for m in materials},
            "samples": {m: int(len(features[m])) for m in materials}, "epochs": epochs, "hidden": hidden,
            "features": int(X.shape[1]), "part_slices": {k: [s.start, s.stop] for k, s in part_slices.items()},
            "heldout_top1": float(top1.mean()), "heldout_top3": float(top3.mean()), "per_material": per,
            "train_seconds": round(time.time() - t0, 1)}
    return MaterialClassifier(materials, net, mean, std, meta), meta


def classify_reference(classifier: MaterialClassifier, descriptors: list[torch.Tensor],
                       materials: list[str] | None = None) -> dict[str, float]:
    """Probability of each material for a reference described at one or more working scales.

    Parameters
    ----------
    classifier : MaterialClassifier
    descriptors : list of torch.Tensor
        The reference's texture descriptor at each working scale; the probabilities are averaged.
    materials : list of str, optional
        The candidate materials (an instrument choice may have excluded some): the probabilities
        are restricted to them and normalised again.

    Returns
    -------
    dict
        Material id to probability, most probable first.
    """
    if not descriptors:
        raise MatfitError("no descriptor to classify")
    per = [classifier.probabilities(d) for d in descriptors]
    keep = [m for m in classifier.materials if materials is None or m in materials]
    p = {m: float(np.mean([q[m] for q in per])) for m in keep}
    total = sum(p.values())
    if total > 0:
        p = {m: v / total for m, v in p.items()}
    return dict(sorted(p.items(), key=lambda kv: -kv[1]))
