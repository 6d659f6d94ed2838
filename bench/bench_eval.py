"""Evaluation throughput: ESMFold (real esmfold_v1 architecture, random weights), ProteinMPNN, novelty.

    python bench/bench_eval.py esmfold --lengths 100 200 300 --batches 1 4 8 --reps 5 --out esm.json   # GPU
    python bench/bench_eval.py mpnn --out mpnn.json                                              # CPU or GPU
    python bench/bench_eval.py novelty --reference ref.npz --queries 4 --out nov.json             # CPU

``esmfold`` builds ``EsmForProteinFolding`` at the published esmfold_v1 sizes: the ESM-2 3B language
model (36 layers, width 2560) and a 48-block folding trunk with the transformers defaults. Weights are
random, which changes nothing about the time or memory of a forward pass. It then folds random
sequences with the project's own ``eval.fold.fold_sequences``, the path that ``evaluate_backbones``
uses.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ESM_VOCAB = ["<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q",
             "N", "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>"]


def meta() -> dict:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return dict(device=dev, torch=torch.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                command=" ".join(sys.argv))


def esmfold_real_size(device: str = "cuda", tiny: bool = False):
    """esmfold_v1 at its published sizes; ``tiny``: a few-layer copy for a CPU smoke run of this script."""
    from transformers import EsmConfig, EsmForProteinFolding
    if tiny:
        from transformers.models.esm.configuration_esm import EsmFoldConfig, TrunkConfig
        fold = EsmFoldConfig(fp16_esm=False, trunk=TrunkConfig(num_blocks=1, sequence_state_dim=64, pairwise_state_dim=32,
                                                              sequence_head_width=32, pairwise_head_width=32)).to_dict()
        cfg = EsmConfig(vocab_size=33, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=1026, position_embedding_type="rotary",
                        emb_layer_norm_before=False, token_dropout=True, mask_token_id=32, pad_token_id=1,
                        is_folding_model=True, vocab_list=ESM_VOCAB, esmfold_config=fold)
    else:
        cfg = EsmConfig(vocab_size=33, hidden_size=2560, num_hidden_layers=36, num_attention_heads=40,
                        intermediate_size=10240, max_position_embeddings=1026, position_embedding_type="rotary",
                        emb_layer_norm_before=False, token_dropout=True, mask_token_id=32, pad_token_id=1,
                        is_folding_model=True, vocab_list=ESM_VOCAB, esmfold_config={"fp16_esm": True})
    with torch.device(device):
        model = EsmForProteinFolding(cfg)
    return model


def _stat(xs: list[float], nd: int = 3) -> dict:
    return dict(median=round(float(np.median(xs)), nd), min=round(min(xs), nd), max=round(max(xs), nd),
                all=[round(x, nd) for x in xs])


def bench_esmfold(a) -> list[dict]:
    """Per cell: one warm-up batch, then ``reps`` batches, each timed on its own (median, min, max)."""
    from eval.fold import fold_sequences, prepare_esmfold
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    model = esmfold_real_size(dev, tiny=a.tiny)
    n_params = sum(p.numel() for p in model.parameters())
    out = []
    rng = np.random.default_rng(0)
    for chunk in a.chunk_sizes:
        model = prepare_esmfold(model, dev, chunk_size=chunk or None)
        for n in a.lengths:
            for b in a.batches:
                seqs = ["".join(rng.choice(list("ARNDCQEGHILKMFPSTWYV"), n)) for _ in range(b * (a.reps + 1))]
                try:
                    fold_sequences(model, seqs[:b], batch_size=b)  # warm-up
                    sync()
                    if dev == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    times = []
                    for r in range(1, a.reps + 1):
                        t0 = time.perf_counter()
                        fold_sequences(model, seqs[r * b:(r + 1) * b], batch_size=b)
                        sync()
                        times.append(time.perf_counter() - t0)
                    rec = dict(length=n, batch=b, chunk_size=chunk, params=n_params, repeats=a.reps,
                               seconds_per_batch=_stat(times), seqs_per_s=_stat([b / t for t in times]),
                               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    rec = dict(length=n, batch=b, chunk_size=chunk, error="out of memory")
                print(json.dumps(rec), flush=True)
                out.append(rec)
                Path(a.out).write_text(json.dumps(dict(meta=meta(), esmfold=out), indent=1))
    return out


def bench_mpnn(a) -> list[dict]:
    from eval.io import read_backbone
    from eval.mpnn import design_sequences, load_proteinmpnn
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_proteinmpnn(device=dev)
    pdbs = sorted(Path(a.pdb_dir).glob("*.pdb"))[: a.structures]
    if not pdbs:
        raise SystemExit(f"no PDB files in {a.pdb_dir}")
    bbs = [read_backbone(p) for p in pdbs]
    design_sequences(model, bbs[0], num_seqs=2)
    t0 = time.perf_counter()
    n_seq = n_res = 0
    for bb in bbs:
        r = design_sequences(model, bb, num_seqs=8, temperature=0.1)
        n_seq += len(r)
        n_res += len(r) * bb.length
    dt = time.perf_counter() - t0
    rec = dict(device=dev, structures=len(bbs), sequences=n_seq, seconds=round(dt, 2),
               seqs_per_s=round(n_seq / dt, 3), residues_per_s=round(n_res / dt, 1))
    print(json.dumps(rec))
    Path(a.out).write_text(json.dumps(dict(meta=meta(), mpnn=rec), indent=1))
    return [rec]


def bench_novelty(a) -> list[dict]:
    from eval.novelty import novelty
    from eval.reference import load_reference
    ref = load_reference(a.reference)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(ref.names), a.queries, replace=False)
    queries = []
    for i in idx:  # a perturbed copy of a reference chain: a realistic sample with one strong hit
        ca0 = np.asarray(ref.ca[ref.offsets[i]:ref.offsets[i + 1]], dtype=np.float64)
        queries.append((ca0 + rng.normal(0, 1.0, ca0.shape), str(ref.sequences[i])))
    out = []
    for w in a.workers:
        t0 = time.perf_counter()
        res = novelty(queries, ref, workers=w)
        dt = time.perf_counter() - t0
        rec = dict(workers=w, queries=len(queries), reference_chains=len(ref.names), seconds=round(dt, 2),
                   reference_chains_per_s=round(len(queries) * len(ref.names) / dt, 1),
                   alignments=int(sum(getattr(r, "n_aligned", 0) for r in res)))
        print(json.dumps(rec), flush=True)
        out.append(rec)
    Path(a.out).write_text(json.dumps(dict(meta=meta(), novelty=out), indent=1))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("esmfold")
    e.add_argument("--lengths", nargs="+", type=int, default=[100, 200, 300])
    e.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8])
    e.add_argument("--chunk-sizes", nargs="+", type=int, default=[0, 64], help="0 = no chunking")
    e.add_argument("--reps", type=int, default=5, help="timed batches per cell, each timed on its own")
    e.add_argument("--tiny", action="store_true", help="a tiny ESMFold on CPU (smoke test of this script)")
    e.add_argument("--out", default="bench_esmfold.json")
    m = sub.add_parser("mpnn")
    m.add_argument("--pdb-dir", required=True)
    m.add_argument("--structures", type=int, default=4)
    m.add_argument("--out", default="bench_mpnn.json")
    n = sub.add_parser("novelty")
    n.add_argument("--reference", required=True)
    n.add_argument("--queries", type=int, default=4)
    n.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    n.add_argument("--out", default="bench_novelty.json")
    a = p.parse_args()
    if a.what == "esmfold":
        if not torch.cuda.is_available() and not a.tiny:
            print("bench_eval esmfold: needs a CUDA device (or --tiny for a CPU smoke run)", file=sys.stderr)
            return 2
        bench_esmfold(a)
    elif a.what == "mpnn":
        bench_mpnn(a)
    else:
        bench_novelty(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
