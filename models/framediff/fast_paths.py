"""No-grad fast paths of FrameDiff's pair (N x N) work: the edge embedding and the edge transition.

Same maths as the modules' plain forward (which training and autograd use); only the float32 summation order
differs. Two ideas:

* **Split linear maps.** A linear layer applied to a concatenation ``[edge, x_i, x_j]`` or ``[t_i, t_j,
  rel_ij, dist_ij]`` is a sum of per-block products. Per-residue blocks become (B,N,C) products broadcast over
  pairs; integer-valued blocks (relative index, distogram bin) become lookups in small tables of weight rows.
* **Pair blocks on the CPU.** The edge transition's pairs go through its MLP :data:`CPU_PAIR_CHUNK` at a time
  (whole rows of one batch element), so the 128-wide activations stay in cache between layers. Every pair is computed by the same
  operations whatever the block size. GPUs and Inductor (which fuses the layers itself) take one pass.

Measurements: docs/benchmarks.md ("The main job on 2 CPU cores").
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .features import index_embedding

# Pairs per block of the CPU no-grad pair MLPs: 2048 pairs x 128 hidden channels in float32 is 1 MiB, an L2's
# worth, so the layers after the first read their input from cache (bench/bench_pair_chunk.py).
CPU_PAIR_CHUNK = 2048

is_compiling: Callable[[], bool] = getattr(getattr(torch, "compiler", None), "is_compiling",
                                           lambda: False)   # torch < 2.3: absent


def _row_blocks(device: torch.device, n: int) -> int:
    """Rows (of n pairs each) per block: :data:`CPU_PAIR_CHUNK` pairs on the CPU, all rows elsewhere."""
    if device.type == "cpu" and not is_compiling():
        return max(1, CPU_PAIR_CHUNK // max(n, 1))
    return n


def rel_index_linear(seq_idx: Tensor, w: Tensor, dim: int) -> Tensor:
    """``F.linear(index_embedding(seq_idx[:, :, None] - seq_idx[:, None, :], dim), w)`` (B,N,N,C_out).

    On CPU with integer indices the embedding and the product are taken once per distinct offset
    and gathered (the embedding of an offset is the same number whichever pair it comes from).
    """
    rel = seq_idx[:, :, None] - seq_idx[:, None, :]
    # the table needs the offsets' range on the host (a graph break under torch.compile, which fuses the
    # plain path anyway), so compiled graphs take the plain path
    if rel.device.type == "cpu" and not rel.is_floating_point() and rel.numel() > 0 and not is_compiling():
        lo, hi = int(rel.min()), int(rel.max())
        if hi - lo < 4 * rel.shape[-1] + 64:
            offs = torch.arange(lo, hi + 1, dtype=rel.dtype)
            table = F.linear(index_embedding(offs, dim).to(w.dtype), w)
            return table.index_select(0, (rel - lo).reshape(-1)).reshape(rel.shape + (w.shape[0],))
    return F.linear(index_embedding(rel, dim).to(w.dtype), w)


def distogram_linear(pos: Tensor, w: Tensor, min_bin: float, max_bin: float, num_bins: int) -> Tensor:
    """``F.linear(calc_distogram(pos, ...), w)`` (B,N,N,C_out) as a lookup of ``w``'s columns.

    A pair in bin k gets column k; a pair in no bin (distance exactly on a bin edge, 0, NaN) gets 0.
    """
    d = torch.linalg.norm(pos[:, :, None, :] - pos[:, None, :, :], dim=-1).contiguous()
    lower = torch.linspace(min_bin, max_bin, num_bins, device=pos.device)
    upper = torch.cat([lower[1:], torch.full((1,), 1e8, dtype=lower.dtype, device=lower.device)], dim=-1)
    k = torch.searchsorted(lower.to(d.dtype), d) - 1          # number of edges below d, minus 1
    kc = k.clamp(0, num_bins - 1)
    ok = (k >= 0) & (d < upper.to(d.dtype)[kc])
    table = torch.cat([w.t(), w.new_zeros(1, w.shape[0])], 0)  # row num_bins: "no bin"
    idx = torch.where(ok, kc, torch.full_like(kc, num_bins))
    return table.index_select(0, idx.reshape(-1)).reshape(d.shape + (w.shape[0],))


def edge_embed_no_grad(mlp: nn.Sequential, seq_idx: Tensor, t_emb: Tensor, sc_ca: Tensor | None,
                       index_dim: int, bins: tuple[float, float, int] | None) -> Tensor:
    """FrameDiff's edge embedding ``mlp([t_i, t_j, index_embedding(i - j), distogram(sc_ca)])`` (B,N,N,C).

    ``t_emb`` (B,N,K) is the per-residue time (+ fixed-mask) feature; ``bins = (min, max, num)`` when the
    self-conditioning distogram is an input. The first layer is split by input block: the two time blocks are
    per-residue products broadcast over pairs, the relative index and the distogram bin are lookups of weight
    rows. (Running this 32-wide MLP in pair blocks, as the edge transition does, measured no faster.)
    """
    lin = mlp[0]
    w = lin.weight
    k0 = t_emb.shape[-1]
    pair = rel_index_linear(seq_idx, w[:, 2 * k0:2 * k0 + index_dim].contiguous(), index_dim)
    pair += F.linear(t_emb, w[:, :k0].contiguous(), lin.bias)[:, :, None]
    pair += F.linear(t_emb, w[:, k0:2 * k0].contiguous())[:, None]
    if bins is not None:
        pair += distogram_linear(sc_ca, w[:, 2 * k0 + index_dim:], *bins)
    for layer in list(mlp)[1:]:
        pair = pair.relu_() if isinstance(layer, nn.ReLU) else layer(pair)
    return pair


def pair_mlp_no_grad(et: nn.Module, x: Tensor, edge: Tensor) -> Tensor:
    """:class:`~models.framediff.network.EdgeTransition` on ``x = initial_embed(node)`` (B,N,C_x) and ``edge``
    (B,N,N,C_e): ``LN(final(trunk(e) + e))`` with ``e = [edge, x_i, x_j]``, without building ``e``.

    Both linear maps that see ``e`` are split by input block: the first layer, and the residual's share of the
    final layer (``final(h + e) = final(h) + W_f e``). The per-residue parts are (B,N,C) products broadcast
    over pairs; the two edge parts are one (pairs, C_e) product into a buffer that already holds the broadcast
    per-residue sums (a GEMM that accumulates).
    """
    ce, cx = edge.shape[-1], x.shape[-1]
    first, fin = et.trunk[0], et.final_layer
    hid, co = first.out_features, fin.out_features
    w, wf = first.weight, fin.weight
    # contiguous weight blocks: the (B*N*N, C_e) product with a column slice of the weight
    # took twice as long (MKL, 2 CPU cores)
    w_edge = torch.cat([w[:, :ce], wf[:, :ce]], 0).t().contiguous()              # (C_e, H + C_o)
    a_i = torch.cat([F.linear(x, w[:, ce:ce + cx], first.bias), F.linear(x, wf[:, ce:ce + cx], fin.bias)], -1)
    a_j = torch.cat([F.linear(x, w[:, ce + cx:]), F.linear(x, wf[:, ce + cx:])], -1)
    trunk = list(et.trunk)[2:]

    def block(e: Tensor, ai: Tensor, aj: Tensor) -> Tensor:
        shape = torch.broadcast_shapes(ai.shape, aj.shape)
        buf = torch.add(ai, aj, out=ai.new_empty(shape)).view(-1, shape[-1])
        buf.addmm_(e.reshape(-1, ce).to(buf.dtype), w_edge.to(buf.dtype))   # in place: autocast does not cast
        h = buf[:, :hid].relu_()   # a column slice: the next product reads it with a leading dimension
        for layer in trunk:
            h = h.relu_() if isinstance(layer, nn.ReLU) else torch.addmm(layer.bias, h, layer.weight.t())
        return et.layer_norm(torch.addmm(buf[:, hid:], h, fin.weight.t())).view(shape[:-1] + (co,))

    b, n = edge.shape[:2]
    rows = _row_blocks(edge.device, n)
    if rows >= n:   # one block per batch row is the whole tensor: no copies
        return block(edge, a_i[:, :, None], a_j[:, None])
    out = edge.new_empty(b, n, n, co)
    for k in range(b):
        for s in range(0, n, rows):
            rs = slice(s, s + rows)
            out[k, rs] = block(edge[k, rs], a_i[k, rs, None], a_j[k, None])
    return out
