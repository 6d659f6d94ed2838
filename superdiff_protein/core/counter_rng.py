"""Counter-based normal noise: each sample's stream as a pure function of (its seed, the step, the stream id,
the element index), drawn for the whole batch in a few tensor operations.

The sampler's default streams are one ``torch.Generator`` per sample, drawn in a Python loop: batch-size
independent, but a loop of small host calls per step that a CUDA graph cannot capture. This module draws
the same kind of noise (independent standard normals per sample, batch-size independent) without a loop and
without host state: ``SamplerConfig(rng="counter")``. The values differ from the generator streams, so a
seed gives other samples under the two settings; each is deterministic on its own.

Construction: a 32-bit integer hash (xor-shift / multiply rounds with odd multipliers below 2^31, so every
product fits in int64 on every device) of the counter keyed by the seed's two 32-bit halves, the step and the
stream; two hashes per normal (Box–Muller on the uniforms ``(h + 0.5) / 2^32``). ``step`` may be a 0-d device
tensor, so a captured graph can be replayed with the step advanced on the device.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["counter_normal", "seeds_tensor"]

_M32 = 0xFFFFFFFF
_MULS = (0x2C1B3C6D, 0x297A2D39, 0x7FEB352D, 0x68E31DA5)   # odd, < 2^31


def _mix(h: Tensor) -> Tensor:
    """A 32-bit avalanche hash of int64 tensors holding values in [0, 2^32)."""
    for m in _MULS:
        h = h ^ (h >> 16)
        h = (h * m) & _M32
    return h ^ (h >> 15)


def seeds_tensor(seeds, device) -> Tensor:
    """(B,) int64 seeds on ``device`` (the per-sample keys)."""
    return torch.as_tensor([int(s) & ((1 << 63) - 1) for s in seeds], dtype=torch.int64, device=device)


def counter_normal(seeds: Tensor, step, stream: int, shape: tuple[int, ...], dtype=torch.float64) -> Tensor:
    """(B, *shape) standard normals; row b depends only on ``seeds[b]``, ``step``, ``stream`` and the
    element index (not on the batch it is drawn in)."""
    dev = seeds.device
    n = math.prod(shape)
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    st = torch.as_tensor(step, dtype=torch.int64, device=dev)
    key = _mix(hi[:, None] ^ _mix((st * 0x3504F333 + int(stream) * 0x1B873593) & _M32))
    key = _mix(lo[:, None] ^ key)                                                     # (B, 1)
    idx = torch.arange(n, dtype=torch.int64, device=dev)[None, :]
    h1 = _mix(key ^ ((2 * idx) & _M32))
    h2 = _mix(key ^ ((2 * idx + 1) & _M32))
    u1 = (h1.to(torch.float64) + 0.5) / 4294967296.0
    u2 = (h2.to(torch.float64) + 0.5) / 4294967296.0
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.reshape((seeds.shape[0],) + tuple(shape)).to(dtype)
