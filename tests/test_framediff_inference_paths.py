"""FrameDiff network: the no-grad fast paths equal the autograd (reference) paths.

Under ``torch.no_grad()`` the network skips the (B,N,N,*) feature concatenations of the edge
embedder and the edge transitions, looks up relative-index and distogram rows, updates in place and
skips all-ones masks. Under grad it runs the plain official formulation. Both must agree to float64
rounding, with random (non-zero) weights so that every layer matters. The float64 bound is the same
computation's float32 rounding scaled by eps64/eps32 (docs/testing.md, ``tolerances.float64_tol``).
"""
from __future__ import annotations

import copy

import pytest
import torch

from models.framediff import FrameDiffConfig, FrameDiffScoreNetwork
from models.framediff.fast_paths import distogram_linear as _distogram_linear
from models.framediff.fast_paths import rel_index_linear as _rel_index_linear
from models.framediff.network import EdgeTransition, calc_distogram, index_embedding
from superdiff_protein.frames.geometry import rotmat_to_quat, so3_exp
from tolerances import close, float64_tol

SMALL = {
    "node_embed_size": 32, "edge_embed_size": 16,
    "embed": {"index_embed_size": 8, "num_bins": 22},
    "ipa": {"c_hidden": 16, "c_skip": 8, "no_heads": 2, "no_qk_points": 4, "no_v_points": 4,
            "seq_tfmr_num_heads": 2, "seq_tfmr_num_layers": 2, "num_blocks": 3},
}


def _random_net(seed: int = 0) -> FrameDiffScoreNetwork:
    g = torch.Generator().manual_seed(seed)
    net = FrameDiffScoreNetwork(FrameDiffConfig.from_dict(SMALL)).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return net


def _inputs(b: int, n: int, seed: int, padded: bool, seq_kind: str):
    g = torch.Generator().manual_seed(seed)
    quats = rotmat_to_quat(so3_exp(torch.randn(b, n, 3, generator=g, dtype=torch.float64)))
    trans = torch.randn(b, n, 3, generator=g, dtype=torch.float64) * 8
    t = torch.rand(b, generator=g, dtype=torch.float64)
    mask = torch.ones(b, n, dtype=torch.float64)
    if padded:
        for i in range(b):
            mask[i, n - 1 - 2 * i:] = 0
    if seq_kind == "arange":
        seq = None
    elif seq_kind == "gaps":                     # chain breaks: integer offsets with jumps
        seq = torch.cumsum(torch.randint(1, 4, (b, n), generator=g), -1)
    elif seq_kind == "far":                      # offsets too spread for the lookup table
        seq = torch.cumsum(torch.randint(1, 50, (b, n), generator=g), -1)
    else:                                        # float indices: no lookup
        seq = torch.arange(1, n + 1, dtype=torch.float64)[None].expand(b, n) * 1.5
    fixed = (torch.rand(b, n, generator=g) < 0.2).double()
    sc = torch.randn(b, n, 3, generator=g, dtype=torch.float64) * 6
    sc[0] = 0.0                                  # first-pass zeros: distance 0 is in no bin
    return dict(quats=quats, trans=trans, t=t, res_mask=mask, seq_idx=seq, fixed_mask=fixed, sc_ca=sc)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("seq_kind", ["arange", "gaps", "far", "float"])
@pytest.mark.parametrize("chunk", [None, 17, 40])
def test_no_grad_forward_equals_autograd_forward(monkeypatch, padded, seq_kind, chunk):
    """Also with pair blocks of one row (17 pairs) and of rows that do not divide the 17 rows (40 pairs: 2 rows),
    so the blocked edge embedding and edge transitions see every block shape."""
    import models.framediff.fast_paths as fp

    if chunk is not None:
        monkeypatch.setattr(fp, "CPU_PAIR_CHUNK", chunk)
    net = _random_net()
    inp = _inputs(3, 17, seed=1, padded=padded, seq_kind=seq_kind)
    with torch.no_grad():
        fast = net(**inp)
    with torch.enable_grad():
        ref = net(**inp)
    assert ref["trans"].abs().max() > 1e-3  # the network does something
    net32 = copy.deepcopy(net).float()
    with torch.no_grad():
        o32 = net32(**{k: (v.float() if torch.is_tensor(v) and v.is_floating_point() and k != "t" else v)
                       for k, v in inp.items()})
    for k in ("quats", "trans", "psi", "node_embed"):
        close(fast[k], ref[k].detach(), float64_tol(o32[k], fast[k]), k)


def test_edge_transition_fast_path_matches_concatenation():
    g = torch.Generator().manual_seed(3)
    for layers in (1, 2, 3):
        et = EdgeTransition(24, 10, 12, num_layers=layers).double()
        with torch.no_grad():
            for p in et.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.4)
            node = torch.randn(2, 9, 24, generator=g, dtype=torch.float64)
            edge = torch.randn(2, 9, 9, 10, generator=g, dtype=torch.float64)
            fast = et(node, edge)
            x = et.initial_embed(node)
            e = torch.cat([edge, x[:, :, None].expand(2, 9, 9, -1), x[:, None].expand(2, 9, 9, -1)], -1)
            ref = et.layer_norm(et.final_layer(et.trunk(e) + e))
            fast32 = copy.deepcopy(et).float()(node.float(), edge.float())
        close(fast, ref, float64_tol(fast32, fast), f"edge transition {layers} layers")


@pytest.mark.parametrize("chunk", [1, 20, 27, 40])
def test_edge_transition_cpu_pair_blocks_match_one_pass(monkeypatch, chunk):
    """The CPU path runs pairs in blocks of rows (CPU_PAIR_CHUNK pairs): any block size, including blocks that
    do not divide the rows and a single pair's row, gives the one-pass result to rounding."""
    import models.framediff.fast_paths as net_mod

    g = torch.Generator().manual_seed(5)
    et = EdgeTransition(24, 10, 12, num_layers=2).double()
    with torch.no_grad():
        for p in et.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.4)
        node = torch.randn(3, 9, 24, generator=g, dtype=torch.float64)
        edge = torch.randn(3, 9, 9, 10, generator=g, dtype=torch.float64)
        monkeypatch.setattr(net_mod, "CPU_PAIR_CHUNK", 1 << 40)
        whole = et(node, edge)
        whole32 = copy.deepcopy(et).float()(node.float(), edge.float())
        monkeypatch.setattr(net_mod, "CPU_PAIR_CHUNK", chunk)
        blocked = et(node, edge)
    assert whole.abs().max() > 0.1
    close(blocked, whole, float64_tol(whole32, whole), f"pair blocks of {chunk}")


def test_lookups_equal_dense_features():
    g = torch.Generator().manual_seed(4)
    w_idx = torch.randn(5, 8, generator=g, dtype=torch.float64)
    seq = torch.cumsum(torch.randint(0, 3, (2, 12), generator=g), -1) - 4   # repeats, negatives
    dense = torch.nn.functional.linear(index_embedding(seq[:, :, None] - seq[:, None, :], 8).double(), w_idx)
    torch.testing.assert_close(_rel_index_linear(seq, w_idx, 8), dense, atol=1e-12, rtol=0)

    w_d = torch.randn(7, 22, generator=g, dtype=torch.float64)
    pos = torch.randn(2, 12, 3, generator=g, dtype=torch.float64) * 8
    lower = torch.linspace(1e-5, 20.0, 22)
    pos[0, 1] = pos[0, 0] + torch.tensor([float(lower[5]), 0.0, 0.0], dtype=torch.float64)  # exactly on an edge
    pos[1, 2] = pos[1, 3]                                                                   # distance 0
    dense = torch.nn.functional.linear(calc_distogram(pos, 1e-5, 20.0, 22), w_d)
    assert calc_distogram(pos, 1e-5, 20.0, 22)[0, 0, 1].sum() == 0  # the edge case is really in no bin
    torch.testing.assert_close(_distogram_linear(pos, w_d, 1e-5, 20.0, 22), dense, atol=1e-12, rtol=0)
