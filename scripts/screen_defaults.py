#!/usr/bin/env python
"""Quick screen of candidate default-model pairs, meant for the GPU machine (no biotite or tmtools there).

For every pair ``NAME=HELIX_CKPT,STRAND_CKPT`` and every setting and seed it samples the model card's protocol
(``--n`` samples at each length, 40 cosine steps, min_t 0.002) with :func:`generate`, reads the written PDBs
back with a minimal ATOM parser and prints the geometry columns of the model card (CA-CA in range, clash-free,
CA clashes per sample, C-N in range) and, with ``--mpnn``, the ProteinMPNN log-likelihood of every sample (the
evaluation's settings: 8 designs at temperature 0.1, scored on the sampling device; the ``proteinmpnn`` package
must be importable there, e.g. a copy of its ``protein_mpnn_utils.py`` and ``v_48_020.pt`` on ``PYTHONPATH``). It also
writes ``OUT/screen.json`` with every sample's metrics and CA
trace, so that secondary structure (P-SEA, biotite) can be added on a machine that has biotite:

    python scripts/screen_defaults.py --out runs/screen ship=models/checkpoints/default_helix.pt,models/checkpoints/default_strand.pt
    python scripts/screen_defaults.py --ss runs/screen/screen.json     # later, with biotite: adds SS fractions

A screen, not the model card: GPU sampling differs from the CPU numbers in rounding, so only the final candidates
are evaluated with ``scripts/eval_defaults.py`` on the CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from eval.report import mean_se  # noqa: E402
from eval_defaults import SETTINGS  # noqa: E402  (the model card's six settings, defined once there)

ATOMS = ("N", "CA", "C", "O")


def read_pdb_backbone(path: Path) -> np.ndarray:
    """(L, 4, 3) N, CA, C, O of a single-chain backbone PDB written by ``generate`` (NaN where an atom is absent)."""
    res: dict[int, np.ndarray] = {}
    for line in path.read_text().splitlines():
        if not line.startswith("ATOM"):
            continue
        name = line[12:16].strip()
        if name not in ATOMS:
            continue
        r = int(line[22:26])
        row = res.setdefault(r, np.full((4, 3), np.nan))
        row[ATOMS.index(name)] = [float(line[30:38]), float(line[38:46]), float(line[46:54])]
    return np.stack([res[k] for k in sorted(res)]) if res else np.zeros((0, 4, 3))


_MPNN: dict = {}


def _mpnn_ll(x: np.ndarray, name: str, device: str) -> float:
    """Mean ProteinMPNN log-likelihood of the designs for backbone ``x`` (L, 4, 3), as ``evaluate_backbones``
    scores it (the ``mpnn`` settings and ``seed`` of configs/evaluate_backbones.yaml, read from there)."""
    import torch
    import yaml

    from eval.mpnn import design_sequences, load_proteinmpnn
    from superdiff_protein.runs.structures import Backbone

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dev not in _MPNN:
        cfg = yaml.safe_load((ROOT / "configs" / "evaluate_backbones.yaml").read_text())
        _MPNN[dev] = (load_proteinmpnn(cfg["mpnn"]["model_name"], device=dev), cfg["mpnn"], int(cfg.get("seed", 0)))
    model, mc, seed = _MPNN[dev]
    L = len(x)
    mask = np.isfinite(x).all(-1)
    bb = Backbone(atoms=np.nan_to_num(x).astype(np.float32), atom_mask=mask, sequence="X" * L,
                  res_ids=np.arange(1, L + 1), ins_codes=np.array([""] * L), chain_id="A", name=name)
    designs = design_sequences(model, bb, num_seqs=int(mc["num_seqs"]), temperature=float(mc["temperature"]),
                               seed=seed, batch_size=int(mc["batch_size"]), omit_aas=mc.get("omit_aas", "X"))
    return float(np.mean([d.log_likelihood for d in designs]))


def _job(pair: str, helix: str, strand: str, setting: str, seed: int, lengths: list[int], n: int,
         device: str, mpnn: bool = False) -> list[dict]:
    from eval.metrics import geometry_metrics
    from superdiff_protein.frames.generation import generate

    with tempfile.TemporaryDirectory() as tmp:
        generate(models=[helix, strand], lengths=lengths, samples_per_length=n, batch_size=n, num_steps=40,
                 time_grid="cosine", min_t=0.002, seed=seed, out_dir=tmp, progress=False, plots=False,
                 device=device, **SETTINGS[setting])
        rows = []
        for p in sorted(Path(tmp).glob("length_*/sample_*.pdb")):
            x = read_pdb_backbone(p)
            g = geometry_metrics(x)
            rows.append(dict(pair=pair, setting=setting, seed=seed, length=len(x), sample=p.stem,
                             ca_ca=g["ca_ca_valid_frac"], c_n=g["c_n_valid_frac"], clashes=int(g["n_ca_clashes"]),
                             rg=g["radius_of_gyration"], ca=np.round(x[:, 1], 3).tolist()))
            if mpnn:
                rows[-1]["mpnn"] = _mpnn_ll(x, f"{p.parent.name}/{p.stem}", device)
    return rows


def table(rows: list[dict]) -> str:
    """One markdown line per (pair, setting), seeds pooled."""
    from models.framediff.self_states import PDOWNB_RG_FIT

    a, b = PDOWNB_RG_FIT
    keys = sorted({(r["pair"], r["setting"]) for r in rows}, key=lambda k: (k[0], list(SETTINGS).index(k[1])))
    out = ["| pair | setting | n | CA-CA in range | clash-free | CA clashes / sample | C-N in range | helix | strand | Rg / PDownB fit | ProteinMPNN |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for pair, setting in keys:
        rs = [r for r in rows if r["pair"] == pair and r["setting"] == setting]
        ss = [r for r in rs if "helix" in r]
        h = f"{np.mean([r['helix'] for r in ss]):.2f}" if ss else "-"
        e = f"{np.mean([r['strand'] for r in ss]):.2f}" if ss else "-"
        rg = [r["rg"] / (a * r["length"] ** b) for r in rs if "rg" in r]
        ll = [r["mpnn"] for r in rs if "mpnn" in r]
        rg_s = f"{np.mean(rg):.2f}" if rg else "-"
        ll_m, ll_se, _ = mean_se(np.asarray(ll, dtype=np.float64))
        ll_s = f"{ll_m:.3f} ± {ll_se:.3f}" if len(ll) > 1 else "-"
        out.append(f"| {pair} | {setting} | {len(rs)} | {100 * np.mean([r['ca_ca'] for r in rs]):.1f} % | "
                   f"{100 * np.mean([r['clashes'] == 0 for r in rs]):.0f} % | {np.mean([r['clashes'] for r in rs]):.2f} | "
                   f"{100 * np.nanmean([r['c_n'] for r in rs]):.1f} % | {h} | {e} | {rg_s} | {ll_s} |")
    return "\n".join(out)


def add_ss(path: Path) -> None:
    """Add P-SEA helix/strand fractions (needs biotite) to a screen.json and print the table."""
    from eval.metrics import secondary_structure

    rows = json.loads(path.read_text())
    for r in rows:
        s = secondary_structure(np.asarray(r["ca"]))
        r["helix"], r["strand"] = s["helix_frac"], s["strand_frac"]
    print(table(rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs", nargs="*", help="NAME=HELIX_CKPT,STRAND_CKPT")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--settings", nargs="+", default=["helix", "strand", "or", "and"], choices=list(SETTINGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--lengths", nargs="+", type=int, default=[60, 100, 150])
    ap.add_argument("--n", type=int, default=8, help="samples per length")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--mpnn", action="store_true", help="also score every sample with ProteinMPNN")
    ap.add_argument("--ss", type=Path, help="add secondary structure to this screen.json and print the table")
    a = ap.parse_args(argv)
    if a.ss:
        add_ss(a.ss)
        return 0
    if not a.pairs or a.out is None:
        ap.error("give PAIRS and --out (or --ss FILE)")
    jobs = []
    for spec in a.pairs:
        name, _, ck = spec.partition("=")
        helix, _, strand = ck.partition(",")
        for f in (helix, strand):
            if not Path(f).is_file():
                print(f"error: {name}: no checkpoint {f}", file=sys.stderr)
                return 2
        jobs += [(name, helix, strand, s, seed, a.lengths, a.n, a.device, a.mpnn) for s in a.settings for seed in a.seeds]
    rows: list[dict] = []
    import multiprocessing as mp

    with ProcessPoolExecutor(a.workers, mp_context=mp.get_context("spawn")) as ex:
        for rs in ex.map(_job, *zip(*jobs)):
            rows += rs
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "screen.json").write_text(json.dumps(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
