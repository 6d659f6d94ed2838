"""ESMFold refolding through transformers' ``EsmForProteinFolding``.

Weights are looked up offline: ``esmfold`` may be a local directory (``config.json`` + weights, as written by
``save_pretrained``), or a Hugging Face model id (default ``facebook/esmfold_v1``) found in the local HF cache
(``$HF_HOME/hub``, default ``~/.cache/huggingface/hub``). Nothing is downloaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ModelUnavailableError

DEFAULT_ESMFOLD = "facebook/esmfold_v1"
#: openfold / AlphaFold residue order of ESMFold's inputs (indices 0..19, 20 = X)
RESTYPES = "ARNDCQEGHILKMFPSTWYV"
_RESTYPE_INDEX = {a: i for i, a in enumerate(RESTYPES)}


def esmfold_help(spec: str | None) -> str:
    """The exact instructions printed when ESMFold weights are absent."""
    hub = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    return (
        f"ESMFold weights not found for esmfold={spec!r}; folding metrics (sc_rmsd, sc_tm, plddt, designable) are "
        "skipped, everything else is computed. To enable them, download the transformers checkpoint "
        f"'{DEFAULT_ESMFOLD}' (about 8.5 GB), either into the Hugging Face cache ({hub}) with\n"
        f"    hf download {DEFAULT_ESMFOLD}\n"
        "or into a directory of your choice with\n"
        f"    hf download {DEFAULT_ESMFOLD} --local-dir /path/to/esmfold_v1\n"
        "and pass esmfold=/path/to/esmfold_v1 (the directory holding config.json and model.safetensors / "
        "pytorch_model.bin). `hf` is the command line of huggingface_hub >= 0.34 (pip install -U huggingface_hub). "
        "Pass esmfold=null to silence this message."
    )


def resolve_esmfold(spec: str | None) -> Path | None:
    """Directory holding an ESMFold checkpoint for ``spec`` (local dir or HF id in the local cache), else None."""
    if not spec:
        return None
    p = Path(str(spec)).expanduser()
    if p.is_dir():
        return p if (p / "config.json").is_file() else None
    if p.exists() or str(spec).startswith(("/", ".", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        d = snapshot_download(repo_id=str(spec), local_files_only=True)
        d = Path(d)
        return d if (d / "config.json").is_file() else None
    except Exception:
        return None


def load_esmfold(spec: str | None = DEFAULT_ESMFOLD, device: str | torch.device = "cpu",
                 chunk_size: int | None = 64, fp16_esm: bool | None = None) -> torch.nn.Module:
    """Load ``EsmForProteinFolding`` offline; raise :class:`ModelUnavailableError` with download instructions
    when the weights are absent. ``chunk_size`` bounds trunk memory (axial attention chunking)."""
    path = resolve_esmfold(spec)
    if path is None:
        raise ModelUnavailableError(esmfold_help(spec))
    from transformers import EsmForProteinFolding

    from superdiff_protein.runs.safe_load import CheckpointError, pretrained_load_kwargs

    try:
        vetted = pretrained_load_kwargs(path)
    except CheckpointError as exc:
        raise ModelUnavailableError(f"ESMFold weights: {exc}") from exc
    try:
        model = EsmForProteinFolding.from_pretrained(str(path), local_files_only=True, **vetted)
    except Exception as exc:
        raise ModelUnavailableError(f"cannot load ESMFold from {path}: {exc}\n" + esmfold_help(spec)) from exc
    return prepare_esmfold(model, device=device, chunk_size=chunk_size, fp16_esm=fp16_esm)


def prepare_esmfold(model: torch.nn.Module, device: str | torch.device = "cpu", chunk_size: int | None = 64,
                    fp16_esm: bool | None = None) -> torch.nn.Module:
    """Move to ``device``, set eval mode and trunk chunking; the ESM language model runs in fp16 only on GPU."""
    device = torch.device(device)
    model = model.to(device).eval()
    if fp16_esm is None:
        fp16_esm = device.type == "cuda"
    model.esm = model.esm.half() if fp16_esm else model.esm.float()
    if chunk_size and hasattr(model, "trunk"):
        model.trunk.set_chunk_size(chunk_size)
    return model


def sequence_to_aatype(seq: str) -> np.ndarray:
    """One-letter sequence -> openfold residue indices (0..19, 20 for unknown)."""
    return np.array([_RESTYPE_INDEX.get(a, 20) for a in seq.upper()], dtype=np.int64)


@dataclass
class Fold:
    backbone: np.ndarray  # (L, 4, 3) float64 N, CA, C, O
    plddt: float  # mean CA pLDDT, 0..100
    ptm: float


@torch.no_grad()
def fold_sequences(model: torch.nn.Module, seqs: list[str], batch_size: int = 4,
                   num_recycles: int | None = None) -> list[Fold]:
    """Fold sequences with ESMFold in batches (padded to the batch's longest sequence)."""
    device = next(model.parameters()).device
    out: list[Fold] = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        L = max(len(q) for q in chunk)
        aa = torch.zeros(len(chunk), L, dtype=torch.long)
        mask = torch.zeros(len(chunk), L, dtype=torch.long)
        for k, q in enumerate(chunk):
            aa[k, :len(q)] = torch.from_numpy(sequence_to_aatype(q))
            mask[k, :len(q)] = 1
        pos = torch.arange(L)[None].expand(len(chunk), L)
        res = model(aa.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                    num_recycles=num_recycles)
        xyz = res["positions"][-1].float().cpu().numpy()  # (B, L, 14, 3) atom14: N, CA, C, O first
        plddt = res["plddt"].float().cpu().numpy()  # (B, L, 37) in 0..1
        ptm = res["ptm"].float().cpu().numpy().reshape(-1)
        if ptm.size != len(chunk):  # transformers reduces pTM over the batch; only a single-sequence call is per-sequence
            ptm = np.full(len(chunk), np.nan)
        for k, q in enumerate(chunk):
            n = len(q)
            out.append(Fold(backbone=xyz[k, :n, :4].astype(np.float64),
                            plddt=float(100.0 * plddt[k, :n, 1].mean()), ptm=float(ptm[k])))
    return out
