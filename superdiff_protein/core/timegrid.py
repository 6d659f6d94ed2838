"""The reverse-time grid of the sampler (``SamplerConfig.time_grid``) and its step sizes."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["time_grid", "step_sizes"]


def time_grid(num_steps: int, min_t: float, kind: str = "uniform", dtype=torch.float64) -> Tensor:
    """Descending times from 1 to ``min_t``.

    ``uniform``: equal steps (FrameDiff, the paper). ``quadratic``: ``t = min_t + (1 - min_t) u^2`` for
    ``u`` uniform -- steps shrink towards ``min_t`` where the marginals are sharpest, which cuts the
    discretisation error of both the sampler and the density estimates (docs/superposition.md).
    ``cosine``: ``t = min_t + (1 - min_t) (1 - cos(pi u)) / 2``: fine steps at both ends, near ``min_t`` (local
    geometry) and near 1 (where the VP drift is largest), coarse in the middle.
    ``framediff``: the official FrameDiff/Proteus grid ``numpy.linspace(min_t, 1, num_t)[::-1]`` with
    ``num_t = num_steps + 1`` (bit for bit); the official step size is the constant ``1 / num_t``
    (not the grid spacing), see :func:`step_sizes`.
    """
    if kind == "framediff":
        n = num_steps + 1
        step = (1.0 - min_t) / (n - 1)
        y = torch.arange(n, dtype=torch.float64) * step + min_t
        y[-1] = 1.0
        return y.flip(0).to(dtype)
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=dtype)
    if kind == "uniform":
        return min_t + (1.0 - min_t) * u
    if kind == "quadratic":
        return min_t + (1.0 - min_t) * u * u
    if kind == "cosine":
        return min_t + (1.0 - min_t) * 0.5 * (1.0 - torch.cos(torch.pi * u))
    raise ValueError(f"unknown time grid {kind!r}; choose 'uniform', 'quadratic', 'cosine' or 'framediff'")


def step_sizes(ts: Tensor, kind: str = "uniform") -> list[float]:
    """Reverse-time step sizes ``dtau`` for a grid from :func:`time_grid`: the grid differences, except
    for ``framediff`` where every step is ``1 / num_t = 1 / len(ts)`` as in the official samplers."""
    n = ts.numel() - 1
    if kind == "framediff":
        return [1.0 / (n + 1)] * n
    return [float(ts[i] - ts[i + 1]) for i in range(n)]
