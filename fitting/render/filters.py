"""Separable image filters shared by the node graphs and the imaging models.
"""
from __future__ import annotations

import torch
from torch import Tensor


def shifted_sum(x: Tensor, k: Tensor, n: int, dim: int) -> Tensor:
    """``sum_i k[i] * x.narrow(dim, i, n)``: a 1-D correlation along ``dim`` of ``x`` padded by
    ``len(k) - 1`` there. One pass of a separable blur, as weighted sums of shifted views
    (differentiable in ``x`` and ``k``; torch's CPU convolution has no fast one-channel path)."""
    if torch.is_grad_enabled() and (x.requires_grad or k.requires_grad):
        acc = k[0] * x.narrow(dim, 0, n)
        for i in range(1, len(k)):
            acc = acc + k[i] * x.narrow(dim, i, n)
        return acc
    # Nothing to differentiate (bulk rendering, previews): accumulate in place, one fused
    # multiply-add pass per tap instead of a product and a sum; equal to the above up to float
    # rounding (docs/decisions.md, "Blur as weighted sums of shifted views").
    w = k.tolist()
    acc = x.narrow(dim, 0, n) * w[0]
    for i in range(1, len(w)):
        acc.add_(x.narrow(dim, i, n), alpha=w[i])
    return acc
