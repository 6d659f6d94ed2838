"""Building blocks of the Proteus network (parameter names match the official state_dict).

Every module reproduces the official forward numerics (openfold / Proteus) in float32 but is
written for padded batches: masks are applied so that a padded batch gives the same result as
unpadded per-sample runs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _rigid
from models.framediff.network import EdgeTransition as _FrameDiffEdgeTransition


def _fused_linear(x: Tensor, lins: tuple[nn.Linear, ...]) -> tuple[Tensor, ...]:
    """Linears of the same input as one product with the concatenated weights, split back. Each output is the same
    dot product as the separate layer's, so only the GEMM's blocking (rounding) can differ. The layers must all have
    a bias or all have none."""
    b = None if lins[0].bias is None else torch.cat([lin.bias for lin in lins])
    return F.linear(x, torch.cat([lin.weight for lin in lins]), b).split([lin.out_features for lin in lins], dim=-1)


class Attention(nn.Module):
    """AlphaFold-style multi-head attention (keys ``linear_q/k/v/o[/g]``) with additive biases."""

    def __init__(self, c_q: int, c_k: int, c_v: int, c_hidden: int, no_heads: int, gating: bool = True):
        super().__init__()
        self.c_hidden = c_hidden
        self.no_heads = no_heads
        self.linear_q = nn.Linear(c_q, c_hidden * no_heads, bias=False)
        self.linear_k = nn.Linear(c_k, c_hidden * no_heads, bias=False)
        self.linear_v = nn.Linear(c_v, c_hidden * no_heads, bias=False)
        self.linear_o = nn.Linear(c_hidden * no_heads, c_q)
        self.linear_g = nn.Linear(c_q, c_hidden * no_heads) if gating else None

    _fused = staticmethod(_fused_linear)

    def forward(self, q_x: Tensor, kv_x: Tensor, biases: list[Tensor] | None = None) -> Tensor:
        """q_x (*, Q, C_q), kv_x (*, K, C_k), biases broadcast to (*, H, Q, K) -> (*, Q, C_q)."""
        if kv_x.shape[-2] == 1:
            v = self.linear_v(kv_x).unflatten(-1, (self.no_heads, -1))
            # One key (Proteus's template attentions: one self-conditioning template). A softmax over one finite
            # logit is exactly 1 and 1 * v is exact, so the output is v for every query, bit for bit, without the
            # query/key projections, the logits and a (B*N*N*H)-batched GEMV (8.6 ms of 70 at 128 x 100, bf16).
            # contiguous, as the general path's output is: in bf16 the input layout changes linear_o's rounding
            o = v.expand(*v.shape[:-3], q_x.shape[-2], *v.shape[-2:]).contiguous()
        else:
            if q_x is kv_x:  # self-attention (the local triangle attentions): q and k in one product with v
                q, k, v = self._fused(q_x, (self.linear_q, self.linear_k, self.linear_v))
                q, k = q.unflatten(-1, (self.no_heads, -1)), k.unflatten(-1, (self.no_heads, -1))
                v = v.unflatten(-1, (self.no_heads, -1))
            else:
                q = self.linear_q(q_x).unflatten(-1, (self.no_heads, -1))
                k = self.linear_k(kv_x).unflatten(-1, (self.no_heads, -1))
                v = self.linear_v(kv_x).unflatten(-1, (self.no_heads, -1))
            q = q / math.sqrt(self.c_hidden)
            a = torch.matmul(q.movedim(-2, -3), k.movedim(-3, -1))  # (*, H, Q, K)
            for b in biases or []:
                a = a + b
            a = torch.softmax(a, dim=-1)
            o = torch.matmul(a, v.movedim(-2, -3)).transpose(-2, -3)  # (*, Q, H, C)
        if self.linear_g is not None:
            g = torch.sigmoid(self.linear_g(q_x)).unflatten(-1, (self.no_heads, -1))
            o = o * g
        return self.linear_o(o.flatten(-2))


class TriangleMultiplication(nn.Module):
    """Triangle multiplicative update (outgoing or incoming), AlphaFold Alg. 11/12."""

    def __init__(self, c_z: int, c_hidden: int, outgoing: bool):
        super().__init__()
        self.outgoing = outgoing
        self.linear_a_p = nn.Linear(c_z, c_hidden)
        self.linear_a_g = nn.Linear(c_z, c_hidden)
        self.linear_b_p = nn.Linear(c_z, c_hidden)
        self.linear_b_g = nn.Linear(c_z, c_hidden)
        self.linear_g = nn.Linear(c_z, c_z)
        self.linear_z = nn.Linear(c_hidden, c_z)
        self.layer_norm_in = nn.LayerNorm(c_z)
        self.layer_norm_out = nn.LayerNorm(c_hidden)

    def forward(self, z: Tensor, mask: Tensor) -> Tensor:
        """z (*, N, N, C), mask (*, N, N) -> update (*, N, N, C)."""
        m = mask.unsqueeze(-1).to(z.dtype)
        z = self.layer_norm_in(z)
        a_p, a_g, b_p, b_g, g = self._projections(z)
        a = a_p * torch.sigmoid(a_g) * m
        b = b_p * torch.sigmoid(b_g) * m
        # (*, C, N, N), contiguous: a product needs one of its two last dims unit-stride, so a permuted view is
        # copied inside the matmul anyway; made here, a compiler writes it from the kernel that computes a and b
        a = a.movedim(-1, -3).contiguous()
        b = b.movedim(-1, -3).contiguous()
        if self.outgoing:  # x_ij = sum_k a_ik b_jk
            p = torch.matmul(a, b.transpose(-1, -2))
        else:  # x_ij = sum_k a_ki b_kj
            p = torch.matmul(a.transpose(-1, -2), b)
        x = self.layer_norm_out(p.movedim(-3, -1))
        x = self.linear_z(x)
        return x * torch.sigmoid(g)

    def _projections(self, z: Tensor) -> tuple[Tensor, ...]:
        """The five linears that read the normalised z (a/b projections and gates, output gate) as one product.

        Each output is the same dot product as in the separate layers; only the GEMM's blocking may differ, so the
        result agrees to rounding, not bit for bit. One pass over the (*, N, N, C) input instead of five, and one
        wide GEMM instead of five narrow ones (the pair linears were the largest item left in the compiled bf16
        profile). The weights stay separate modules, so the official state_dict keys are unchanged."""
        return _fused_linear(z, (self.linear_a_p, self.linear_a_g, self.linear_b_p, self.linear_b_g, self.linear_g))


class PairTransition(nn.Module):
    """LayerNorm -> Linear -> ReLU -> Linear, masked."""

    def __init__(self, c_z: int, n: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(c_z)
        self.linear_1 = nn.Linear(c_z, n * c_z)
        self.linear_2 = nn.Linear(n * c_z, c_z)

    def forward(self, z: Tensor, mask: Tensor) -> Tensor:
        z = self.layer_norm(z)
        return self.linear_2(torch.relu(self.linear_1(z))) * mask.unsqueeze(-1).to(z.dtype)


class StructureModuleTransition(nn.Module):
    """Residual 3-layer MLP followed by LayerNorm (key ``node_transition_b``)."""

    def __init__(self, c: int):
        super().__init__()
        self.linear_1 = nn.Linear(c, c)
        self.linear_2 = nn.Linear(c, c)
        self.linear_3 = nn.Linear(c, c)
        self.ln = nn.LayerNorm(c)

    def forward(self, s: Tensor) -> Tensor:
        x = self.linear_3(torch.relu(self.linear_2(torch.relu(self.linear_1(s)))))
        return self.ln(x + s)


class BackboneUpdate(nn.Module):
    """Linear map to the 6-vector (quaternion b, c, d; translation update in nm)."""

    def __init__(self, c_s: int):
        super().__init__()
        self.linear = nn.Linear(c_s, 6)

    def forward(self, s: Tensor) -> Tensor:
        return self.linear(s)


class TorsionAngles(nn.Module):
    """Torsion head. Present in checkpoints; NOT used by Proteus's forward pass."""

    def __init__(self, c: int, num_torsions: int = 7, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.linear_1 = nn.Linear(c, c)
        self.linear_2 = nn.Linear(c, c)
        self.linear_3 = nn.Linear(c, c)  # dead weights kept for checkpoint compatibility
        self.linear_final = nn.Linear(c, num_torsions * 2)

    def forward(self, s: Tensor) -> tuple[Tensor, Tensor]:
        x = self.linear_2(torch.relu(self.linear_1(s))) + s
        x = self.linear_final(x).unflatten(-1, (-1, 2))
        norm = torch.sqrt(torch.clamp((x**2).sum(-1, keepdim=True), min=self.eps))
        return x, x / norm


class SeqTransformerLayer(nn.Module):
    """Post-norm transformer encoder layer with the parameter names of ``nn.TransformerEncoderLayer``
    (ReLU, dim_feedforward = d_model, no dropout) and a *boolean* key mask (padded keys ignored)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.nhead = nhead
        self.self_attn = nn.Module()
        self.self_attn.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.self_attn.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        self.self_attn.out_proj = nn.Linear(d_model, d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        nn.init.xavier_uniform_(self.self_attn.in_proj_weight)
        nn.init.zeros_(self.self_attn.in_proj_bias)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, N, D), mask (B, N) bool (True = real residue)."""
        q, k, v = F.linear(x, self.self_attn.in_proj_weight, self.self_attn.in_proj_bias).chunk(3, -1)
        q, k, v = (y.unflatten(-1, (self.nhead, -1)).transpose(1, 2) for y in (q, k, v))  # (B, H, N, c)
        attn_mask = mask[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        a = self.self_attn.out_proj(a.transpose(1, 2).flatten(-2))
        x = self.norm1(x + a)
        return self.norm2(x + self.linear2(torch.relu(self.linear1(x))))


class SeqTransformer(nn.Module):
    """Stack of :class:`SeqTransformerLayer` (key ``seq_tfmr_b.layers.i``)."""

    def __init__(self, d_model: int, nhead: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(SeqTransformerLayer(d_model, nhead, d_model) for _ in range(num_layers))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class InvariantPointAttention(nn.Module):
    """IPA of the FrameDiff/Proteus fork (down-projected pair values ``down_z``; dead ``linear_rbf``)."""

    def __init__(self, c_s: int, c_z: int, c_hidden: int, no_heads: int, no_qk_points: int, no_v_points: int,
                 inf: float = 1e5, eps: float = 1e-8):
        super().__init__()
        self.c_hidden, self.no_heads = c_hidden, no_heads
        self.no_qk_points, self.no_v_points = no_qk_points, no_v_points
        self.inf, self.eps = inf, eps
        hc = c_hidden * no_heads
        self.linear_q = nn.Linear(c_s, hc)
        self.linear_kv = nn.Linear(c_s, 2 * hc)
        self.linear_q_points = nn.Linear(c_s, no_heads * no_qk_points * 3)
        self.linear_kv_points = nn.Linear(c_s, no_heads * (no_qk_points + no_v_points) * 3)
        self.linear_b = nn.Linear(c_z, no_heads)
        self.down_z = nn.Linear(c_z, c_z // 4)
        self.head_weights = nn.Parameter(torch.full((no_heads,), 0.541324854612918))
        concat_out_dim = c_z // 4 + c_hidden + no_v_points * 4
        self.linear_out = nn.Linear(no_heads * concat_out_dim, c_s)
        self.linear_rbf = nn.Linear(20, 1)  # unused by the official forward, kept for the checkpoint

    def _points(self, lin: nn.Linear, s: Tensor, rot: Tensor, trans: Tensor) -> Tensor:
        p = lin(s)
        p = torch.stack(torch.split(p, p.shape[-1] // 3, dim=-1), dim=-1)  # (B, N, HP, 3)
        p = _rigid.apply(rot[..., None, :, :], trans[..., None, :], p)
        return p.view(p.shape[:-2] + (self.no_heads, -1, 3))

    def forward(self, s: Tensor, z: Tensor, rot: Tensor, trans: Tensor, mask: Tensor) -> Tensor:
        """s (B, N, C_s), z (B, N, N, C_z), frames rot (B, N, 3, 3)/trans (B, N, 3) (nm), mask (B, N)."""
        H = self.no_heads
        q = self.linear_q(s).view(s.shape[:-1] + (H, -1))
        k, v = torch.split(self.linear_kv(s).view(s.shape[:-1] + (H, -1)), self.c_hidden, dim=-1)
        q_pts = self._points(self.linear_q_points, s, rot, trans)
        k_pts, v_pts = torch.split(self._points(self.linear_kv_points, s, rot, trans),
                                   [self.no_qk_points, self.no_v_points], dim=-2)
        b = self.linear_b(z)
        a = torch.matmul(q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1))
        a = a * math.sqrt(1.0 / (3 * self.c_hidden))
        a = a + math.sqrt(1.0 / 3) * b.permute(0, 3, 1, 2)
        d = q_pts.unsqueeze(-4) - k_pts.unsqueeze(-5)  # (B, N, N, H, P, 3)
        pt_att = sum(torch.unbind(d**2, dim=-1))
        hw = F.softplus(self.head_weights).view(1, 1, 1, -1, 1) * math.sqrt(1.0 / (3 * (self.no_qk_points * 9.0 / 2)))
        pt_att = torch.sum(pt_att * hw, dim=-1) * (-0.5)  # (B, N, N, H)
        m = mask.to(s.dtype)
        square_mask = self.inf * (m.unsqueeze(-1) * m.unsqueeze(-2) - 1)
        a = a + pt_att.permute(0, 3, 1, 2) + square_mask.unsqueeze(-3)
        a = torch.softmax(a, dim=-1)  # (B, H, N, N)
        o = torch.matmul(a, v.transpose(-2, -3)).transpose(-2, -3).flatten(-2)
        o_pt = torch.sum(a[..., None, :, :, None] * v_pts.permute(0, 2, 4, 1, 3)[..., None, :, :], dim=-2)
        o_pt = o_pt.permute(0, 3, 1, 4, 2)  # (B, N, H, P_v, 3)
        o_pt = _rigid.invert_apply(rot[..., None, None, :, :], trans[..., None, None, :], o_pt)
        o_pt_norm = torch.sqrt(torch.sum(o_pt**2, dim=-1) + self.eps).flatten(-2)
        o_pt = o_pt.reshape(o_pt.shape[:-3] + (-1, 3))
        o_pair = torch.matmul(a.transpose(-2, -3), self.down_z(z)).flatten(-2)
        feats = [o, *torch.unbind(o_pt, dim=-1), o_pt_norm, o_pair]
        return self.linear_out(torch.cat(feats, dim=-1))


class EdgeTransition(_FrameDiffEdgeTransition):
    """FrameDiff's edge MLP, used when ``local_triangle_attention_new`` is disabled; Proteus keeps the
    default initialisation and passes (unused) geometry arguments."""

    def __init__(self, node_embed_size: int, edge_embed_in: int, edge_embed_out: int, num_layers: int = 2,
                 node_dilation: int = 2):
        super().__init__(node_embed_size, edge_embed_in, edge_embed_out, num_layers, node_dilation, zero_init=False)

    def forward(self, node_embed: Tensor, edge_embed: Tensor, trans_ang: Tensor, edge_mask: Tensor) -> Tensor:
        return super().forward(node_embed, edge_embed)


class LocalTriangleAttention(nn.Module):
    """Proteus's graph triangle update (``LocalTriangleAttentionNew``).

    Triangle multiplications (outgoing, incoming) followed by attention restricted to the k nearest
    neighbours (by CA distance) of each residue, along rows (starting node) and columns (ending
    node); pair bias from an RBF of distances gated by the single representation.
    Correct batching: padded residues are never chosen as neighbours before real ones (the official
    code adds ``-inf`` to their distances and so picks them first).
    """

    def __init__(self, c_s: int, c_z: int, c_rbf: int, c_gate_s: int, c_hidden: int, c_hidden_mul: int,
                 no_heads: int, transition_n: int, k_neighbour: int, k_linear: int = 0, inf: float = 1e9, **_):
        super().__init__()
        self.no_heads, self.c_rbf = no_heads, c_rbf
        self.k_neighbour, self.k_linear, self.inf = k_neighbour, k_linear, inf
        self.proj_left = nn.Linear(c_s, c_gate_s)
        self.proj_right = nn.Linear(c_s, c_gate_s)
        self.to_gate = nn.Linear(c_gate_s * c_gate_s, c_z)
        self.emb_rbf = nn.Linear(c_rbf, c_z)
        self.to_bias = nn.Linear(c_z, no_heads, bias=False)
        self.tri_mul_out = TriangleMultiplication(c_z, c_hidden_mul, outgoing=True)
        self.tri_mul_in = TriangleMultiplication(c_z, c_hidden_mul, outgoing=False)
        self.mha_start = Attention(c_z, c_z, c_z, c_hidden, no_heads)
        self.mha_end = Attention(c_z, c_z, c_z, c_hidden, no_heads)
        self.pair_transition = PairTransition(c_z, transition_n)  # constructed but unused officially
        self.layer_norm = nn.LayerNorm(c_z)

    def knn_indices(self, coords: Tensor, res_mask: Tensor) -> Tensor:
        """Indices (B, N, K) of the K nearest real residues of every residue (self excluded unless
        fewer than K+1 residues exist; then self and, after it, padded residues fill the list)."""
        B, N = coords.shape[:2]
        d = torch.norm(coords.unsqueeze(2) - coords.unsqueeze(1), dim=-1)
        eye = torch.eye(N, dtype=torch.bool, device=coords.device)
        d = d.masked_fill(eye, self.inf)
        for i in range(1, self.k_linear // 2 + 1):  # sequence neighbours count as distance 0
            band = torch.diag(torch.ones(N - i, dtype=torch.bool, device=coords.device), i) if i < N else None
            if band is not None:
                d = d.masked_fill(band | band.T, 0.0)
        pad = ~(res_mask[:, :, None] & res_mask[:, None, :])
        d = d.masked_fill(pad, 2 * self.inf)  # padded keys rank after every real key (and after self)
        k = min(self.k_neighbour + self.k_linear, N)
        return torch.topk(d, k, dim=-1, largest=False).indices

    def _local_mha(self, mha: Attention, z: Tensor, idx: Tensor, bias: Tensor, key_mask: Tensor
                   ) -> tuple[Tensor, Tensor]:
        """Row-wise attention of z[b, i, idx[b, i, :]] with per-key bias bias[b, i, idx, h]: the update (B, N, K, D)
        at the K chosen keys of every row, and z at those keys (what the update is added to)."""
        B, N, _, D = z.shape
        K = idx.shape[-1]
        zk = torch.gather(z, 2, idx[..., None].expand(B, N, K, D))
        x = self.layer_norm(zk)
        km = torch.gather(key_mask.to(z.dtype), 2, idx)  # (B, N, K)
        mask_bias = (self.inf * (km - 1))[:, :, None, None, :]
        tb = torch.gather(bias, 2, idx[..., None].expand(B, N, K, bias.shape[-1]))  # (B, N, K, H)
        tb = tb.permute(0, 1, 3, 2)[:, :, :, None, :]  # (B, N, H, 1, K): depends on the key only
        return mha(x, x, [mask_bias, tb]), zk

    def _gate(self, node_embed: Tensor) -> Tensor:
        """``to_gate`` of the outer product ``left_l (x) right_m`` (official: a (B, N, N, c_gate_s^2) tensor fed to a
        linear layer), computed as the bilinear form it is: sum_ij left_li W_cij right_mj + b_c. The same value
        without the c_gate_s^2-wide pair tensor ((B, N, N, 256) at the paper's size) and with 1/16 of the FLOPs."""
        B, N, _ = node_embed.shape
        left, right = self.proj_left(node_embed), self.proj_right(node_embed)
        cz, cg = self.to_gate.out_features, left.shape[-1]
        p = torch.einsum("bli,cij->blcj", left, self.to_gate.weight.view(cz, cg, cg))     # (B, N, c_z, c_g)
        g = torch.matmul(p.reshape(B, N * cz, cg), right.transpose(1, 2)).view(B, N, cz, N)
        return g.transpose(2, 3) + self.to_gate.bias.to(g.dtype)     # (B, N, N, c_z); bf16 stays bf16 under autocast

    def forward(self, node_embed: Tensor, edge_embed: Tensor, trans_ang: Tensor, edge_mask: Tensor,
                res_mask: Tensor) -> Tensor:
        B, N, _ = node_embed.shape
        dist = torch.norm(trans_ang.unsqueeze(2) - trans_ang.unsqueeze(1), dim=-1)
        mu = torch.linspace(0.0, (self.c_rbf - 1) * 0.5, self.c_rbf, device=dist.device)
        rbf = self.emb_rbf(torch.exp(-(((dist[..., None] - mu) / 0.5) ** 2)))
        bias = self.to_bias(rbf * torch.sigmoid(self._gate(node_embed)))  # (B, N, N, H)
        z = edge_embed
        z = z + self.tri_mul_out(z, edge_mask)
        z = z + self.tri_mul_in(z, edge_mask)
        idx = self.knn_indices(trans_ang, res_mask)
        # Official: z + (a zero pair tensor with the update scattered in at the K keys). The same values are
        # written here at the K keys only (z + update there, z elsewhere): an index_put without accumulation,
        # one pass less in eager mode (no GPU gain measured). The keys of a row are distinct (top-k), so no
        # position is written twice.
        rows = torch.arange(B, device=idx.device)[:, None, None], torch.arange(N, device=idx.device)[None, :, None]
        upd, zk = self._local_mha(self.mha_start, z, idx, bias, edge_mask)
        z = self._put(z, (rows[0], rows[1], idx), zk + upd)
        upd, zk = self._local_mha(self.mha_end, z.transpose(1, 2), idx, bias.transpose(1, 2), edge_mask.transpose(1, 2))
        return self._put(z, (rows[0], idx, rows[1]), zk + upd)

    @staticmethod
    def _put(z: Tensor, index: tuple[Tensor, ...], values: Tensor) -> Tensor:
        """z with ``values`` at ``index``, in the dtype ``z + update`` would have had (autocast mixes bf16/fp32)."""
        return torch.index_put(z.to(values.dtype), index, values)


class DistogramHead(nn.Module):
    """Auxiliary 6D-distogram head (optionally symmetrised)."""

    def __init__(self, c_z: int, no_bins: int, asymmetry: bool = False, **_):
        super().__init__()
        self.asymmetry = asymmetry
        self.linear = nn.Linear(c_z, no_bins)

    def forward(self, z: Tensor) -> Tensor:
        logits = self.linear(z)
        return logits if self.asymmetry else (logits + logits.transpose(-2, -3)) / 2


class AuxiliaryHeads(nn.Module):
    """dist/omega (symmetric) and theta/phi (asymmetric) logits from the final pair representation."""

    def __init__(self, conf: dict):
        super().__init__()
        d = conf["distogram_6d"]
        self.dist_head = DistogramHead(**d["dist"])
        self.omega_head = DistogramHead(**d["omega"])
        self.theta_head = DistogramHead(**d["theta"], asymmetry=True)
        self.phi_head = DistogramHead(**d["phi"], asymmetry=True)

    def forward(self, z: Tensor) -> dict[str, Tensor]:
        return {"dist6d_logits": self.dist_head(z), "omega6d_logits": self.omega_head(z),
                "theta6d_logits": self.theta_head(z), "phi6d_logits": self.phi_head(z)}
