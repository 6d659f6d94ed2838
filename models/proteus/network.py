"""Native, batched re-implementation of Proteus's ``ScoreNetwork`` (Wangchentong/Proteus @ cda22f6).

Module and parameter names follow the official state_dict so that official checkpoints load
unmodified. See docs/proteus.md for the architecture and the numerical traps.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import _rigid
from models.framediff.network import timestep_embedding

from .config import model_config
from .layers import (AuxiliaryHeads, BackboneUpdate, EdgeTransition, InvariantPointAttention,
                     LocalTriangleAttention, SeqTransformer, StructureModuleTransition, TorsionAngles)
from .template import UNK, TemplateEmbedder, backbone_atoms


def _mlp(d_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.LayerNorm(d))


class Embedder(nn.Module):
    """Initial single/pair embeddings: time, fixed mask, (masked) residue type, relative position,
    the fine-tuning embedders (secondary structure, adjacency, hotspot) and the template."""

    def __init__(self, conf: dict):
        super().__init__()
        self.conf = conf
        emb = conf["embed"]
        self.t_dim = emb["feature"]["t"]
        self.rel_pos = emb["feature"]["rel_pos"]
        self.mode = conf.get("mode", "monomer")
        node_in = self.t_dim + 1 + 21
        edge_in = 2 * node_in
        if self.rel_pos:
            edge_in += 2 * self.rel_pos + 2 + 2
        self.use_template = emb["self_condition"].get("version") == "template"
        if self.use_template:
            self.template_embedder = TemplateEmbedder(emb["template"])
        n, e = conf["node_embed_size"], conf["edge_embed_size"]
        self.node_embedder = _mlp(node_in, n)
        self.edge_embedder = _mlp(edge_in, e)
        self.ss_embedder = nn.Linear(4, n)
        self.adjacency_embedder = nn.Linear(3, e)
        self.hotspot_embedder = nn.Linear(2, n)

    def relpos_features(self, chain_index: Tensor, residue_index: Tensor | None,
                        dtype: torch.dtype = torch.float32) -> Tensor:
        """One-hot relative position (2r+2 bins) + same-chain one-hot (2)."""
        B, N = chain_index.shape
        if self.mode == "monomer":
            # chains are concatenated: position = index + 64 * (chain segment number along the row)
            seg = torch.cumsum(torch.cat([torch.zeros_like(chain_index[:, :1]),
                                          (chain_index[:, 1:] != chain_index[:, :-1]).long()], 1), 1)
            pos = torch.arange(N, device=chain_index.device)[None] + seg * 64
            chain = asym = torch.zeros_like(chain_index)
        else:
            pos, chain = residue_index, chain_index
            asym = chain_index
        r = self.rel_pos
        off = torch.clamp(pos[:, :, None] - pos[:, None, :] + r, 0, 2 * r)
        same_asym = asym[:, :, None] == asym[:, None, :]
        off = torch.where(same_asym, off, torch.full_like(off, 2 * r + 1))
        rel = nn.functional.one_hot(off, 2 * r + 2).to(dtype)
        same_chain = (chain[:, :, None] == chain[:, None, :]).long()
        return torch.cat([rel, nn.functional.one_hot(same_chain, 2).to(dtype)], -1)

    def forward(self, t: Tensor, res_mask: Tensor, fixed_mask: Tensor, chain_index: Tensor,
                residue_index: Tensor | None, ss: Tensor, hotspot: Tensor, adjacency: Tensor,
                template_atoms: Tensor | None, template_atom_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        B, N = res_mask.shape
        t_emb = timestep_embedding(t, self.t_dim)[:, None, :].expand(B, N, -1)
        fdt = t.dtype  # float32 (float64 only for a float64 copy of the network, the tests' rounding reference)
        aat = nn.functional.one_hot(torch.full((B, N), UNK, device=res_mask.device), 21).to(fdt)
        node_f = torch.cat([t_emb.to(fdt), fixed_mask[..., None].to(fdt), aat], -1)
        pair_f = [node_f[:, :, None, :].expand(B, N, N, -1), node_f[:, None, :, :].expand(B, N, N, -1)]
        if self.rel_pos:
            pair_f.append(self.relpos_features(chain_index, residue_index, fdt))
        node = self.node_embedder(node_f)
        edge = self.edge_embedder(torch.cat(pair_f, -1))
        node = node + self.ss_embedder(ss)
        node = node + self.hotspot_embedder(hotspot)
        edge = edge + self.adjacency_embedder(adjacency)
        if self.use_template:
            ts, tz = self.template_embedder(node, edge, res_mask, template_atoms, template_atom_mask)
            node, edge = node + ts, edge + tz
        return node, edge


class IpaScore(nn.Module):
    """The IPA trunk (key prefix ``score_model``)."""

    def __init__(self, conf: dict):
        super().__init__()
        ipa = conf["ipa"]
        self.num_blocks = ipa["num_blocks"]
        self.scaling = ipa["coordinate_scaling"]
        self.trunk = nn.ModuleDict()
        tfmr_in = ipa["c_s"] + ipa["c_skip"]
        self.local_tri = bool(ipa["local_triangle_attention_new"].get("enable"))
        for b in range(self.num_blocks):
            self.trunk[f"ipa_{b}"] = InvariantPointAttention(ipa["c_s"], ipa["c_z"], ipa["c_hidden"], ipa["no_heads"],
                                                             ipa["no_qk_points"], ipa["no_v_points"])
            self.trunk[f"ipa_ln_{b}"] = nn.LayerNorm(ipa["c_s"])
            self.trunk[f"skip_embed_{b}"] = nn.Linear(conf["node_embed_size"], ipa["c_skip"])
            self.trunk[f"seq_tfmr_{b}"] = SeqTransformer(tfmr_in, ipa["seq_tfmr_num_heads"], ipa["seq_tfmr_num_layers"])
            self.trunk[f"post_tfmr_{b}"] = nn.Linear(tfmr_in, ipa["c_s"])
            self.trunk[f"node_transition_{b}"] = StructureModuleTransition(ipa["c_s"])
            self.trunk[f"bb_update_{b}"] = BackboneUpdate(ipa["c_s"])
            if b < self.num_blocks - 1:
                if self.local_tri:
                    self.trunk[f"edge_transition_{b}"] = LocalTriangleAttention(**ipa["local_triangle_attention_new"])
                else:
                    self.trunk[f"edge_transition_{b}"] = EdgeTransition(ipa["c_s"], conf["edge_embed_size"],
                                                                        conf["edge_embed_size"])
        self.torsion_pred = TorsionAngles(ipa["c_s"], 7)


class ProteusNetwork(nn.Module):
    """Proteus ``ScoreNetwork``: predicts clean frames from noisy frames.

    ``forward`` takes a padded batch; every output for a real residue equals what the official
    code gives for the same protein run alone (unpadded).
    """

    def __init__(self, conf) -> None:
        super().__init__()
        self.conf = model_config(conf)
        self.embedding_layer = Embedder(self.conf)
        self.score_model = IpaScore(self.conf)
        self.auxiliary_heads = AuxiliaryHeads(self.conf["auxiliary_heads"])

    def forward(
        self,
        quats: Tensor,
        trans: Tensor,
        t: Tensor,
        res_mask: Tensor,
        *,
        template_atoms: Tensor | None = None,
        template_atom_mask: Tensor | None = None,
        fixed_mask: Tensor | None = None,
        chain_index: Tensor | None = None,
        residue_index: Tensor | None = None,
        ss: Tensor | None = None,
        hotspot: Tensor | None = None,
        adjacency: Tensor | None = None,
        aux_heads: bool = False,
    ) -> dict[str, Tensor]:
        """Run the network.

        Args:
            quats: (B, N, 4) noisy frame rotations as quaternions, w-first (unit).
            trans: (B, N, 3) noisy frame translations in Angstrom.
            t: (B,) diffusion time.
            res_mask: (B, N) True/1 for real residues.
            template_atoms: (B, N, 4, 3) backbone atoms N, CA, C, O (Angstrom) of the previous
                prediction (template self-conditioning) or None on the first step.
            template_atom_mask: (B, N, 4) atom mask; default = res_mask for all four atoms.
            fixed_mask: (B, N) motif mask (1 = fixed, not updated); default zeros.
            chain_index, residue_index: (B, N) ints; defaults single chain, 0..N-1.
            ss, hotspot, adjacency: fine-tuning conditions; defaults are the "mask" classes the
                official unconditional sampler uses (ss class 3 of 4, hotspot [1, 0], adjacency class
                2 of 3).
            aux_heads: also return the auxiliary 6D distogram logits.

        Returns dict with ``pred_quats`` (B, N, 4), ``pred_rotmats`` (B, N, 3, 3), ``pred_trans``
        (B, N, 3) Angstrom, ``backbone_atoms`` (B, N, 4, 3) [N, CA, C, O] (the next template),
        ``node_embed``, ``edge_embed`` and optionally ``aux``.
        """
        B, N = res_mask.shape
        dev = trans.device
        mask_b = res_mask.bool()
        # float32 as official; a float64 copy of the network (tests: the rounding reference) computes in float64
        fdt = torch.float64 if self.embedding_layer.ss_embedder.weight.dtype == torch.float64 else torch.float32
        node_mask = res_mask.to(fdt)
        fixed = torch.zeros(B, N, device=dev, dtype=fdt) if fixed_mask is None else fixed_mask.to(fdt)
        chain = torch.zeros(B, N, dtype=torch.long, device=dev) if chain_index is None else chain_index.long()
        if ss is None:
            ss = nn.functional.one_hot(torch.full((B, N), 3, device=dev), 4).to(fdt)
        if hotspot is None:
            hotspot = nn.functional.one_hot(torch.zeros(B, N, dtype=torch.long, device=dev), 2).to(fdt)
        if adjacency is None:
            adjacency = nn.functional.one_hot(torch.full((B, N, N), 2, device=dev), 3).to(fdt)
        if template_atoms is not None and template_atom_mask is None:
            template_atom_mask = node_mask[..., None].expand(B, N, 4)
        if template_atoms is not None:
            template_atom_mask = template_atom_mask.to(fdt) * node_mask[..., None]
            template_atoms = template_atoms.to(fdt) * template_atom_mask[..., None]
        edge_mask = node_mask[:, :, None] * node_mask[:, None, :]

        init_node, init_edge = self.embedding_layer(t.to(fdt), mask_b, fixed, chain, residue_index, ss, hotspot,
                                                    adjacency, template_atoms, template_atom_mask)
        edge = init_edge * edge_mask[..., None]
        node = init_node * node_mask[..., None]
        init_node = init_node * node_mask[..., None]
        diffuse_mask = ((1 - fixed) * node_mask)[..., None]

        sm = self.score_model
        tr = sm.trunk
        q = quats.to(fdt)
        x = trans.to(fdt) * sm.scaling
        aux = None
        for b in range(sm.num_blocks):
            rot = _rigid.quat_to_rotmat(q)
            ipa = tr[f"ipa_{b}"](node, edge, rot, x, node_mask) * node_mask[..., None]
            node = tr[f"ipa_ln_{b}"](node + ipa)
            seq_in = torch.cat([node, tr[f"skip_embed_{b}"](init_node)], dim=-1)
            seq_out = tr[f"seq_tfmr_{b}"](seq_in, mask_b)
            node = node + tr[f"post_tfmr_{b}"](seq_out)
            node = tr[f"node_transition_{b}"](node) * node_mask[..., None]
            upd = tr[f"bb_update_{b}"](node * diffuse_mask)
            q, x = _rigid.compose_q_update(q, x, upd, diffuse_mask)
            if b < sm.num_blocks - 1:
                x_ang = x / sm.scaling
                et = tr[f"edge_transition_{b}"]
                if sm.local_tri:
                    edge = et(node, edge, x_ang, edge_mask, mask_b)
                else:
                    edge = et(node, edge, x_ang, edge_mask)
                edge = edge * edge_mask[..., None]
            elif aux_heads:
                aux = self.auxiliary_heads(edge)
        pred_trans = x / sm.scaling
        pred_rot = _rigid.quat_to_rotmat(q)
        out = {
            "pred_quats": q,
            "pred_rotmats": pred_rot,
            "pred_trans": pred_trans,
            "backbone_atoms": backbone_atoms(pred_rot, pred_trans),
            "node_embed": node,
            "edge_embed": edge,
        }
        if aux is not None:
            out["aux"] = aux
        return out
