"""Evaluation throughput: ESMFold (real esmfold_v1 architecture, random weights), ProteinMPNN, novelty, and the
whole designability pipeline.

    python bench/bench_eval.py esmfold --lengths 100 --batches 8 16 32 --precisions fp32 tf32 bf16 --reps 3   # GPU
    python bench/bench_eval.py pipeline --n 32 --precisions bf16 --fold-batches 32                          # GPU
    python bench/bench_eval.py esmfold --tiny ... / pipeline --tiny ...      # CPU smoke runs (a tiny ESMFold)
    python bench/bench_eval.py mpnn --out mpnn.json                                              # CPU or GPU
    python bench/bench_eval.py novelty --reference ref.npz --queries 4 --out nov.json             # CPU

Default output files go to ``$OUT`` when it is set (the GPU runner's folder), else the current directory.

``esmfold`` builds ``EsmForProteinFolding`` at the published esmfold_v1 sizes: the ESM-2 3B language
model (36 layers, width 2560) and a 48-block folding trunk with the transformers defaults. Weights are
random, which changes nothing about the time or memory of a forward pass. It then folds random
sequences with the project's own ``eval.fold.fold_sequences``, the path that ``evaluate_backbones``
uses. With ``--precisions`` each (length, batch) cell is timed at every trunk precision, and the folds of its first
timed batch are compared with the fp32 folds of the same sequences (max / RMS CA difference in A, max |dpLDDT|).
``noise_floor`` is the same comparison between two fp32 folds that differ only in batch composition (the first
``--noise-seqs`` sequences folded inside the batch vs one at a time): fp32's own rounding scale.

``pipeline`` times ``eval.pipeline.evaluate`` end to end on N ideal-geometry backbones of one length (helix-loop
bundles built from internal coordinates, see :func:`ideal_backbone`): ProteinMPNN (packaged v_48_020 weights,
8 designs) -> ESMFold (random real-size weights, passed as ``fold_model``) -> scRMSD/TM-align; no novelty
reference, no diversity. Stage times come from ``EvalRun.timings``. Without tmtools, TM-align is skipped (sc_tm is
NaN) and said so; without biotite, the structure step keeps geometry only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ESM_VOCAB = ["<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q",
             "N", "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>"]


def _out_default(name: str) -> str:
    return str(Path(os.environ.get("OUT") or ".") / name)


def meta() -> dict:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    return dict(device=dev, torch=torch.__version__, transformers=tf_version, python=platform.python_version(),
                threads=torch.get_num_threads(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                command=" ".join(sys.argv))


def esmfold_real_size(device: str = "cuda", tiny: bool = False):
    """esmfold_v1 at its published sizes; ``tiny``: a few-layer copy for a CPU smoke run of this script."""
    from transformers import EsmConfig, EsmForProteinFolding
    if tiny:
        from transformers.models.esm.configuration_esm import EsmFoldConfig, TrunkConfig
        sm = dict(sequence_dim=32, pairwise_dim=16, ipa_dim=8, resnet_dim=16, num_heads_ipa=2, num_qk_points=2,
                  num_v_points=2, num_blocks=2)
        fold = EsmFoldConfig(fp16_esm=False, lddt_head_hid_dim=16,
                             trunk=TrunkConfig(num_blocks=1, sequence_state_dim=64, pairwise_state_dim=32,
                                               sequence_head_width=32, pairwise_head_width=32, max_recycles=1,
                                               structure_module=sm)).to_dict()
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


def fold_diff(a: list, b: list) -> dict:
    """Max / RMS CA-coordinate difference (A, no superposition: same weights, same frame) and max |dpLDDT|
    (points, mean CA pLDDT per sequence) between two lists of folds of the same sequences."""
    d = np.concatenate([np.linalg.norm(x.backbone[:, 1] - y.backbone[:, 1], axis=-1) for x, y in zip(a, b)])
    return dict(ca_max_A=round(float(d.max()), 4), ca_rms_A=round(float(np.sqrt((d ** 2).mean())), 4),
                plddt_max_abs=round(max(abs(x.plddt - y.plddt) for x, y in zip(a, b)), 4))


def bench_esmfold(a) -> list[dict]:
    """Per cell (chunk, length, batch, precision): one warm-up batch, then ``reps`` batches, each timed on its own
    (median, min, max); accuracy of the first timed batch against fp32 folds of the same sequences."""
    from eval.fold import compile_folding_blocks, fold_sequences, prepare_esmfold, uncompile_folding_blocks
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    model = esmfold_real_size(dev, tiny=a.tiny)
    n_params = sum(p.numel() for p in model.parameters())
    precisions = ["fp32"] + [p for p in a.precisions if p != "fp32"] if "fp32" in a.precisions else a.precisions

    def use_compiled(on: bool) -> None:
        """``+compile`` cells: the folding blocks through ``eval.fold.compile_folding_blocks`` (``fold.compile``)."""
        if on:
            compile_folding_blocks(model)
        else:
            uncompile_folding_blocks(model)
    out = []
    rng = np.random.default_rng(0)
    for chunk in a.chunk_sizes:
        model = prepare_esmfold(model, dev, chunk_size=chunk or None, precision="fp32")
        for n in a.lengths:
            pool = ["".join(rng.choice(list("ARNDCQEGHILKMFPSTWYV"), n)) for _ in range(max(a.batches) * a.reps)]
            k = min(a.noise_seqs, min(a.batches))
            singles = None  # fp32, one at a time: the noise-floor reference of pool[:k]
            for b in a.batches:
                ref = None
                for cell_prec in precisions:
                    prec, compiled = cell_prec.split("+")[0], cell_prec.endswith("+compile")
                    base = dict(length=n, batch=b, chunk_size=chunk, trunk_chunk_size=model.trunk.chunk_size,
                                precision=cell_prec, params=n_params, repeats=a.reps)
                    try:
                        if ref is None and compiled:     # the fp32 reference is the plain model's
                            use_compiled(False)
                            ref = fold_sequences(model, pool[:b], batch_size=b, precision="fp32")
                        use_compiled(compiled)
                        t_warm = time.perf_counter()
                        fold_sequences(model, pool[:b], batch_size=b, precision=prec)  # warm-up (and compile)
                        sync()
                        base["warmup_s"] = round(time.perf_counter() - t_warm, 1)
                        if compiled:                     # did the blocks compile, and in how many pieces
                            from torch._dynamo.utils import counters
                            base["dynamo"] = {k: sum(counters[k].values()) for k in ("stats", "graph_break")}
                            base["dynamo"]["unique_graphs"] = counters["stats"]["unique_graphs"]
                        sync()
                        if dev == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        times, first = [], None
                        for r in range(a.reps):
                            t0 = time.perf_counter()
                            got = fold_sequences(model, pool[r * b:(r + 1) * b], batch_size=b, precision=prec)
                            sync()
                            times.append(time.perf_counter() - t0)
                            first = got if r == 0 else first
                        rec = dict(base, seconds_per_batch=_stat(times), seqs_per_s=_stat([b / t for t in times]),
                                   peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda"
                                   else None)
                        if ref is None:
                            ref = first if cell_prec == "fp32" else fold_sequences(model, pool[:b], batch_size=b,
                                                                                   precision="fp32")
                        rec["vs_fp32"] = fold_diff(first, ref)
                        if cell_prec == "fp32" and k:
                            if singles is None:
                                singles = fold_sequences(model, pool[:k], batch_size=1, precision="fp32")
                            rec["noise_floor"] = dict(fold_diff(first[:k], singles), sequences=k,
                                                      what=f"fp32 batch {b} vs fp32 one at a time")
                    except torch.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        rec = dict(base, error="out of memory")
                    print(json.dumps(rec), flush=True)
                    out.append(rec)
                    Path(a.out).write_text(json.dumps(dict(meta=meta(), esmfold=out), indent=1))
    return out


# ------------------------------------------------------------------------------------------------ pipeline
_BOND = {"N_CA": 1.458, "CA_C": 1.525, "C_N": 1.329, "C_O": 1.231}
_ANGLE = {"N_CA_C": 111.2, "CA_C_N": 116.2, "C_N_CA": 121.7, "CA_C_O": 120.5}


def _place(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond: float, angle_deg: float, torsion_deg: float
           ) -> np.ndarray:
    """NeRF: the atom d with |cd| = bond, angle(b, c, d) = angle and dihedral(a, b, c, d) = torsion."""
    ang, tor = np.radians(angle_deg), np.radians(torsion_deg)
    bc = (c - b) / np.linalg.norm(c - b)
    nrm = np.cross(b - a, bc)
    nrm /= np.linalg.norm(nrm)
    d2 = np.array([-bond * np.cos(ang), bond * np.sin(ang) * np.cos(tor), bond * np.sin(ang) * np.sin(tor)])
    return c + d2[0] * bc + d2[1] * np.cross(nrm, bc) + d2[2] * nrm


def ideal_backbone(length: int, rng: np.random.Generator, tries: int = 200) -> np.ndarray:
    """An (L, 4, 3) N/CA/C/O backbone with ideal bond lengths and angles, trans peptides, built from phi/psi:
    three helices (phi -57, psi -47, +-4 deg jitter) joined by two loops of 4-6 residues with random loop-region
    torsions, redrawn until no two CAs 3+ residues apart are closer than 3.5 A. Valid geometry (CA-CA 3.8 A), a
    different shape per ``rng`` draw; not meant to be designable."""
    for _ in range(tries):
        x = _helix_loop_bundle(length, rng)
        ca = x[:, 1]
        d = np.linalg.norm(ca[:, None] - ca[None], axis=-1)
        if not (np.triu(d < 3.5, k=3)).any():
            return x
    raise RuntimeError(f"no clash-free backbone of length {length} in {tries} draws")


def _helix_loop_bundle(length: int, rng: np.random.Generator) -> np.ndarray:
    n_loop = rng.integers(4, 7, size=2)
    n_helix = length - int(n_loop.sum())
    cuts = np.sort(rng.choice(np.arange(12, n_helix - 12), size=2, replace=False))
    helices = np.diff(np.concatenate([[0], cuts, [n_helix]]))
    ss = "H" * helices[0] + "L" * n_loop[0] + "H" * helices[1] + "L" * n_loop[1] + "H" * helices[2]
    loop_set = np.array([[-90.0, 0.0], [-70.0, 140.0], [60.0, 40.0], [-120.0, 130.0]])
    phi, psi = np.empty(length), np.empty(length)
    for i, c in enumerate(ss):
        if c == "H":
            phi[i], psi[i] = -57.0 + rng.normal(0, 4), -47.0 + rng.normal(0, 4)
        else:
            phi[i], psi[i] = loop_set[rng.integers(len(loop_set))] + rng.normal(0, 10, size=2)
    x = np.zeros((length, 4, 3))
    x[0, 0] = [0.0, 0.0, 0.0]
    x[0, 1] = [_BOND["N_CA"], 0.0, 0.0]
    t = np.radians(180.0 - _ANGLE["N_CA_C"])
    x[0, 2] = x[0, 1] + _BOND["CA_C"] * np.array([np.cos(t), np.sin(t), 0.0])
    for i in range(1, length):
        n_, ca, c = x[i - 1, 0], x[i - 1, 1], x[i - 1, 2]
        x[i, 0] = _place(n_, ca, c, _BOND["C_N"], _ANGLE["CA_C_N"], psi[i - 1])
        x[i, 1] = _place(ca, c, x[i, 0], _BOND["N_CA"], _ANGLE["C_N_CA"], 180.0)
        x[i, 2] = _place(c, x[i, 0], x[i, 1], _BOND["CA_C"], _ANGLE["N_CA_C"], phi[i])
    for i in range(length):
        if i + 1 < length:
            x[i, 3] = _place(x[i + 1, 0], x[i, 1], x[i, 2], _BOND["C_O"], _ANGLE["CA_C_O"], 180.0)
        else:
            x[i, 3] = _place(x[i, 0], x[i, 1], x[i, 2], _BOND["C_O"], _ANGLE["CA_C_O"], psi[i] + 180.0)
    return x - x[:, 1].mean(0)


def _backbone(coords: np.ndarray, name: str):
    """A poly-Gly :class:`Backbone` of (L, 4, 3) coordinates, as the PDB reader would return it."""
    from superdiff_protein.runs.structures import Backbone
    n = len(coords)
    return Backbone(atoms=np.asarray(coords, dtype=np.float32), atom_mask=np.ones((n, 4), dtype=bool),
                    sequence="G" * n, res_ids=np.arange(1, n + 1), ins_codes=np.full(n, "", dtype="U1"),
                    chain_id="A", name=name, res_names=np.full(n, "GLY", dtype="U3"))


def _pipeline_fallbacks(backbones: dict[str, np.ndarray]) -> dict:
    """Keep ``evaluate`` running where tmtools / biotite are not installed (the GPU image): TM-align is replaced
    by a NaN result; without biotite the files this script wrote are read back from memory (``backbones``: path
    -> coordinates) and the structure step keeps geometry only. Returns what was replaced."""
    import importlib.util

    import eval.designability as designability
    import eval.steps as steps
    from eval.metrics import TMResult, geometry_metrics
    notes = {}
    if importlib.util.find_spec("tmtools") is None:
        designability.tm_align = lambda *args, **kw: TMResult(float("nan"), float("nan"), float("nan"), 0)
        notes["tm_align"] = "skipped: tmtools not installed (sc_tm is NaN; compare time is scRMSD + files only)"
    if importlib.util.find_spec("biotite") is None:
        steps.read_backbone = lambda path, name=None: _backbone(backbones[str(path)], name or Path(path).name)
        steps.structure_metrics = lambda bb: {"length": bb.length, "full_backbone": bb.has_full_backbone,
                                              **geometry_metrics(bb.coords)}
        notes["structure"] = ("biotite not installed: the bench's own PDB files are read back from memory and "
                              "the structure step keeps geometry only (no secondary structure)")
    return notes


def bench_pipeline(a) -> list[dict]:
    """``evaluate`` on ``n`` backbones per (precision, fold batch): backbones/h and the time of each stage."""
    from omegaconf import OmegaConf

    import eval.pipeline as pipeline
    from eval.fold import fold_sequences, prepare_esmfold
    from eval.io import write_backbone_pdb
    from eval.mpnn import design_sequences, load_proteinmpnn
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    samples = work / "samples"
    rng = np.random.default_rng(a.seed)
    backbones = {}
    for i in range(a.n):
        path = samples / f"backbone_{i:04d}.pdb"
        backbones[str(path)] = ideal_backbone(a.length, rng)
        write_backbone_pdb(path, backbones[str(path)], "G" * a.length)
    notes = _pipeline_fallbacks(backbones)
    model = prepare_esmfold(esmfold_real_size(dev, tiny=a.tiny), dev, chunk_size=a.chunk_size or None,
                            precision="fp32", compile=a.compile)
    warm_bb = _backbone(next(iter(backbones.values())), "warm-up")
    design_sequences(load_proteinmpnn(device=dev), warm_bb, num_seqs=2)  # CUDA context and kernels, not timed
    runs = []
    real_structure_step = pipeline.structure_step

    def capture(run):  # the EvalRun of this evaluate() call, for its per-stage timings
        runs.append(run)
        return real_structure_step(run)

    pipeline.structure_step = capture
    base = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "evaluate_backbones.yaml")
    out = []
    for prec in a.precisions:
        for fb in a.fold_batches:
            warm = ["".join(rng.choice(list("ARNDCQEGHILKMFPSTWYV"), a.length)) for _ in range(fb)]
            t_warm = time.perf_counter()
            fold_sequences(model, warm, batch_size=fb, precision=prec)  # warm-up (and compile) at this shape
            warm_s = time.perf_counter() - t_warm
            cfg = OmegaConf.merge(base, OmegaConf.create(dict(
                samples_dir=str(samples), out_dir=str(work / f"eval_{prec}_b{fb}"), reference=None, esmfold=None,
                device=dev, workers=1, resume=False, progress=False, plots=False, sc_results="false",
                mpnn=dict(num_seqs=a.num_seqs, batch_size=a.mpnn_batch),
                fold=dict(batch_size=fb, precision=prec, save_refolds=True, compile=a.compile,
                          chunk_size=a.chunk_size or None),
                diversity=dict(enabled=False))))
            t0 = time.perf_counter()
            summary = pipeline.evaluate(cfg, mpnn_model=None, fold_model=model)
            wall = time.perf_counter() - t0
            tm = runs[-1].timings
            stages = {k: round(tm.get(k, 0.0), 2) for k in ("mpnn", "fold", "compare")}
            rec = dict(n_backbones=a.n, length=a.length, num_seqs=a.num_seqs, precision=prec, fold_batch=fb,
                       compile=a.compile, warmup_s=round(warm_s, 1), chunk_size=a.chunk_size, seconds=round(wall, 2),
                       backbones_per_h=round(3600 * a.n / wall, 1),
                       stage_seconds=dict(stages, other=round(wall - sum(stages.values()), 2)),
                       fold_seqs_per_s=round(a.n * a.num_seqs / max(tm.get("fold", 0.0), 1e-9), 2),
                       mpnn_backbones_per_s=round(a.n / max(tm.get("mpnn", 0.0), 1e-9), 2),
                       n_failed=summary.get("n_failed"), n_designability=summary.get("n_designability_evaluated"),
                       tiny=a.tiny, backbones="ideal helix-loop bundles (bench_eval.ideal_backbone)", **notes)
            print(json.dumps(rec), flush=True)
            out.append(rec)
            Path(a.out).write_text(json.dumps(dict(meta=meta(), pipeline=out), indent=1))
    pipeline.structure_step = real_structure_step
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
    e.add_argument("--chunk-sizes", nargs="+", type=int, default=[0, 64],
                   help="0 = no chunking (before 2026-11-30 session 7, 0 kept the config's 128)")
    e.add_argument("--reps", type=int, default=5, help="timed batches per cell, each timed on its own")
    e.add_argument("--precisions", nargs="+", default=["fp32"],
                   choices=[p + c for p in ("fp32", "tf32", "bf16") for c in ("", "+compile")],
                   help="trunk precisions (eval.fold.PRECISIONS), each compared with fp32 on the same sequences; "
                        "'+compile': with fold.compile (the folding blocks through torch.compile)")
    e.add_argument("--noise-seqs", type=int, default=4,
                   help="sequences folded one at a time in fp32 for the noise floor (0 = none)")
    e.add_argument("--tiny", action="store_true", help="a tiny ESMFold on CPU (smoke test of this script)")
    e.add_argument("--out", default=_out_default("bench_esmfold.json"))
    q = sub.add_parser("pipeline", help="evaluate() end to end: ProteinMPNN -> ESMFold -> scRMSD/TM-align")
    q.add_argument("--n", type=int, default=32, help="backbones")
    q.add_argument("--length", type=int, default=100)
    q.add_argument("--num-seqs", type=int, default=8, help="ProteinMPNN designs per backbone")
    q.add_argument("--mpnn-batch", type=int, default=8, help="mpnn.batch_size")
    q.add_argument("--precisions", nargs="+", choices=["fp32", "tf32", "bf16"], default=["fp32"])
    q.add_argument("--fold-batches", nargs="+", type=int, default=[4], help="fold.batch_size values")
    q.add_argument("--chunk-size", type=int, default=0, help="trunk chunking of the ESMFold model; 0 = none")
    q.add_argument("--compile", action="store_true", help="fold.compile=true (warm-up, untimed, compiles)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--workdir", default=None, help="where backbones and eval outputs go (default: a temp dir)")
    q.add_argument("--tiny", action="store_true", help="a tiny ESMFold (CPU smoke test; MPNN is the real one)")
    q.add_argument("--out", default=_out_default("bench_pipeline.json"))
    m = sub.add_parser("mpnn")
    m.add_argument("--pdb-dir", required=True)
    m.add_argument("--structures", type=int, default=4)
    m.add_argument("--out", default=_out_default("bench_mpnn.json"))
    n = sub.add_parser("novelty")
    n.add_argument("--reference", required=True)
    n.add_argument("--queries", type=int, default=4)
    n.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    n.add_argument("--out", default=_out_default("bench_novelty.json"))
    a = p.parse_args()
    if a.what in ("esmfold", "pipeline") and not torch.cuda.is_available() and not a.tiny:
        print(f"bench_eval {a.what}: needs a CUDA device (or --tiny for a CPU smoke run)", file=sys.stderr)
        return 2
    if a.what == "esmfold":
        bench_esmfold(a)
    elif a.what == "pipeline":
        bench_pipeline(a)
    elif a.what == "mpnn":
        bench_mpnn(a)
    else:
        bench_novelty(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
