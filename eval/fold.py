"""ESMFold refolding through transformers' ``EsmForProteinFolding``.

Weights are looked up offline: ``esmfold`` may be a local directory (``config.json`` + weights, as written by
``save_pretrained``), or a Hugging Face model id (default ``facebook/esmfold_v1``) found in the local HF cache
(``$HF_HOME/hub``, default ``~/.cache/huggingface/hub``). Nothing is downloaded.
"""
from __future__ import annotations

import os
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import ModelUnavailableError

DEFAULT_ESMFOLD = "facebook/esmfold_v1"
#: openfold / AlphaFold residue order of ESMFold's inputs (indices 0..19, 20 = X)
RESTYPES = "ARNDCQEGHILKMFPSTWYV"
_RESTYPE_INDEX = {a: i for i, a in enumerate(RESTYPES)}
#: ``fold.precision`` values. The ESM-2 language model runs in fp16 on GPU whatever the choice; this is the
#: arithmetic of the folding trunk:
#: ``fp32`` strict fp32 (TF32 off for the call); ``tf32`` TF32 matmuls/cuDNN for the call (no effect on CPU);
#: ``bf16`` bf16 autocast around the trunk's folding blocks (the 48 triangular blocks, most of the time), the
#: structure module and heads stay fp32; on CPU it is CPU autocast (slow, for tests). The default is ``fp32``,
#: what the published designability numbers used; the H200 measurements are in docs/evaluation_speed.md. Global
#: TF32 flags and autocast state are restored after every call.
PRECISIONS = ("fp32", "tf32", "bf16")


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
                 chunk_size: int | None = 64, fp16_esm: bool | None = None, precision: str = "fp32",
                 compile: bool = False) -> torch.nn.Module:
    """Load ``EsmForProteinFolding`` offline; raise :class:`ModelUnavailableError` with download instructions
    when the weights are absent. ``chunk_size`` bounds trunk memory (axial attention chunking; None = none);
    ``precision`` is the trunk arithmetic (:data:`PRECISIONS`); ``compile`` compiles the folding blocks
    (:func:`compile_folding_blocks`)."""
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
    return prepare_esmfold(model, device=device, chunk_size=chunk_size, fp16_esm=fp16_esm, precision=precision,
                           compile=compile)


def resolve_precision(precision: str | None) -> str:
    """``fold.precision`` -> ``fp32``, ``tf32`` or ``bf16`` (case-insensitive; None means ``fp32``). Raises
    ``ValueError`` for an unknown value."""
    p = "fp32" if precision is None else str(precision).lower()
    if p not in PRECISIONS:
        raise ValueError(f"fold.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return p


def precision_note(precision: str, device: str | torch.device) -> str | None:
    """The one log line that a precision choice deserves on ``device`` (None when it needs none)."""
    if torch.device(device).type == "cuda":
        return None
    if precision == "tf32":
        return "fold.precision=tf32 has no effect on CPU (TF32 is a CUDA matmul mode): folding in fp32"
    if precision == "bf16":
        return "fold.precision=bf16 on CPU: bf16 CPU autocast of the trunk blocks (slow; meant for GPUs)"
    return None


def prepare_esmfold(model: torch.nn.Module, device: str | torch.device = "cpu", chunk_size: int | None = 64,
                    fp16_esm: bool | None = None, precision: str = "fp32", compile: bool = False) -> torch.nn.Module:
    """Move to ``device``, set eval mode and trunk chunking (``chunk_size`` rows per attention call; None = no
    chunking, whatever the checkpoint's config says); the ESM language model runs in fp16 only on GPU.
    ``precision`` (:data:`PRECISIONS`) is resolved for ``device`` and kept as ``model.fold_precision``, the
    default of :func:`fold_sequences`. ``compile``: :func:`compile_folding_blocks`."""
    device = torch.device(device)
    resolved = resolve_precision(precision)
    note = precision_note(resolved, device)
    if note:
        print(f"[eval.fold] {note}", file=sys.stderr, flush=True)
    model = model.to(device).eval()
    if fp16_esm is None:
        fp16_esm = device.type == "cuda"
    model.esm = model.esm.half() if fp16_esm else model.esm.float()
    if hasattr(model, "trunk"):
        model.trunk.set_chunk_size(int(chunk_size) if chunk_size else None)
    model.fold_precision = resolved  # type: ignore[attr-defined]
    if compile:
        compile_folding_blocks(model)
    return model


def compile_folding_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Put each of the trunk's folding blocks through ``torch.compile`` (in place; the originals are kept in
    ``model.eager_blocks`` for :func:`uncompile_folding_blocks`). The 48 blocks share one compiled graph per
    input shape: the first call at a new shape compiles (about 35-45 s for esmfold_v1 on an H200), a second shape
    makes Dynamo recompile with dynamic sizes, and later shapes reuse that. Inductor's on-disk cache makes later
    processes faster to warm up (``superdiff_protein.runs.compile_cache``). Weights, outputs and the
    fold cache are unchanged (docs/evaluation_speed.md)."""
    from superdiff_protein.runs.compile_cache import configure_compile_cache

    blocks = getattr(getattr(model, "trunk", None), "blocks", None)
    if blocks is None:
        raise ValueError("fold.compile needs an ESMFold model with trunk.blocks")
    configure_compile_cache()  # the sampler's cache folder, one per CPU capability
    if getattr(model, "eager_blocks", None) is None:
        model.eager_blocks = list(blocks)  # type: ignore[attr-defined]
        for i, blk in enumerate(model.eager_blocks):
            blocks[i] = torch.compile(blk)
    return model


def uncompile_folding_blocks(model: torch.nn.Module) -> bool:
    """Undo :func:`compile_folding_blocks`; True when there was something to undo."""
    eager = getattr(model, "eager_blocks", None)
    if eager is None:
        return False
    for i, blk in enumerate(eager):
        model.trunk.blocks[i] = blk
    model.eager_blocks = None  # type: ignore[attr-defined]
    return True


@contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """Set TF32 for CUDA matmuls and cuDNN inside the block and restore the previous global flags after it
    (also on an exception). Uses the legacy ``allow_tf32`` flags, as the rest of the project, unless the process
    already switched to torch's ``fp32_precision`` API (reading the legacy flags then raises)."""
    mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    try:
        saved: tuple = ("legacy", mm.allow_tf32, cudnn.allow_tf32)
    except RuntimeError:
        saved = ("new", mm.fp32_precision, cudnn.conv.fp32_precision)
    try:
        if saved[0] == "legacy":
            mm.allow_tf32 = cudnn.allow_tf32 = bool(enabled)
        else:
            mm.fp32_precision = cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"
        yield
    finally:
        if saved[0] == "legacy":
            mm.allow_tf32, cudnn.allow_tf32 = saved[1], saved[2]
        else:
            mm.fp32_precision, cudnn.conv.fp32_precision = saved[1], saved[2]


@contextmanager
def _autocast_blocks(model: torch.nn.Module, device_type: str, dtype: torch.dtype) -> Iterator[None]:
    """Run each folding block of ``model.trunk`` under autocast for the duration of the block (an instance
    ``forward`` wrapper, removed afterwards); the language model, structure module and heads are untouched."""
    blocks = list(getattr(getattr(model, "trunk", None), "blocks", []))
    if not blocks:
        raise ValueError("fold.precision=bf16 needs an ESMFold model with trunk.blocks")

    def wrap(fwd):
        def forward(*args, **kwargs):
            with torch.autocast(device_type, dtype=dtype):
                return fwd(*args, **kwargs)
        return forward

    try:
        for blk in blocks:
            blk.forward = wrap(blk.forward)
        yield
    finally:
        for blk in blocks:
            blk.__dict__.pop("forward", None)


@contextmanager
def fold_precision(model: torch.nn.Module, precision: str) -> Iterator[None]:
    """The arithmetic of one ESMFold call: ``fp32`` (TF32 off), ``tf32`` (TF32 on) or ``bf16`` (bf16 autocast of
    the trunk blocks, TF32 off elsewhere). Global flags are restored afterwards."""
    if precision not in PRECISIONS:
        raise ValueError(f"unresolved or unknown precision {precision!r} (resolve_precision first)")
    device_type = next(model.parameters()).device.type
    with ExitStack() as stack:
        stack.enter_context(tf32_matmuls(precision == "tf32"))
        if precision == "bf16":
            stack.enter_context(_autocast_blocks(model, device_type, torch.bfloat16))
        yield


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
                   num_recycles: int | None = None, precision: str | None = None) -> list[Fold]:
    """Fold sequences with ESMFold in batches of ``batch_size`` in the given order (each padded to its longest
    sequence). ``precision``: :data:`PRECISIONS`; None = ``model.fold_precision`` (set by
    :func:`prepare_esmfold`), else fp32. Coordinates and pLDDT come back as fp32-or-wider numpy."""
    device = next(model.parameters()).device
    precision = resolve_precision(precision or getattr(model, "fold_precision", "fp32"))
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
        args = (aa.to(device),)
        kwargs = dict(attention_mask=mask.to(device), position_ids=pos.to(device), num_recycles=num_recycles)
        try:
            with fold_precision(model, precision):
                res = model(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # a compiler failure: one warning, then eager for the rest of the process
            if getattr(model, "eager_blocks", None) is None:
                raise
            uncompile_folding_blocks(model)
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            print(f"[eval.fold] warning: fold.compile failed ({type(exc).__name__}: {first}); folding eagerly from "
                  "here on", file=sys.stderr, flush=True)
            with fold_precision(model, precision):
                res = model(*args, **kwargs)
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
