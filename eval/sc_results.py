"""FrameDiff-compatible self-consistency files: ``self_consistency/sc_results.csv`` next to each sample.

FrameDiff (jasonkyuyim/se3_diffusion @ 53359d7, ``experiments/inference_se3_diffusion.py``) writes, for every
sample folder ``length_L/sample_i/``::

    self_consistency/sample_1.pdb        a copy of the sample
    self_consistency/seqs/sample_1.fa    the ProteinMPNN sequences
    self_consistency/esmf/sample_k.pdb   the ESMFold refold of sequence k
    self_consistency/sc_results.csv      pandas ``DataFrame.to_csv``: an unnamed index column, then
                                         tm_score, sample_path, header, sequence, rmsd (one row per sequence)

``tm_score`` is the TM-score of the refold normalised by the sample's length, ``rmsd`` the CA RMSD after
superposition, ``sample_path`` the refold's PDB and ``header`` the sequence's FASTA header. The same quantities are
our per-sequence ``sc_tm`` / ``sc_rmsd``, so a run of ``generate_backbones layout=framediff`` evaluated by
``evaluate_backbones`` gets these files and tools written for FrameDiff's outputs read them. One difference:
FrameDiff folds the FASTA file's first record too, which is ProteinMPNN's echo of the input sequence (all
glycine/alanine for a backbone), so its CSV has one more row (index 0); ours lists the designed sequences only.
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

from .io import SELF_CONSISTENCY_DIR, atomic_write_bytes, atomic_write_text

#: the header of FrameDiff's sc_results.csv (``pd.DataFrame(mpnn_results).to_csv(csv_path)``: index column first)
SC_RESULTS_COLUMNS = ["", "tm_score", "sample_path", "header", "sequence", "rmsd"]
SC_RESULTS_MODES = ("auto", "true", "false")
_FRAMEDIFF_SAMPLE = re.compile(r"(?:.*/)?sample_\d+/sample_\d+\.pdb")


def is_framediff_run(samples_dir: Path) -> bool:
    """True when ``samples_dir`` was written by ``generate_backbones layout=framediff`` (its config.yaml says so)."""
    f = Path(samples_dir) / "config.yaml"
    if not f.is_file():
        return False
    try:
        import yaml

        cfg = yaml.safe_load(f.read_text())
    except Exception:
        return False
    return isinstance(cfg, dict) and str(cfg.get("layout", "")).lower() == "framediff"


def sc_dir_for(path: Path, rel: str, out_dir: Path, key: str) -> Path:
    """Where the self-consistency files of the sample at ``path`` go: FrameDiff's ``<sample folder>/self_consistency``
    for ``.../sample_i/sample_N.pdb``, else ``<out_dir>/self_consistency/<key>`` (never next to files of a
    directory that holds several samples)."""
    if _FRAMEDIFF_SAMPLE.fullmatch(rel):
        return path.parent / SELF_CONSISTENCY_DIR
    return Path(out_dir) / SELF_CONSISTENCY_DIR / re.sub(r"\.(pdb|cif|ent|mmcif|bcif)(\.gz)?$", "", key)


def _fasta_header(k: int, rec: dict, temperature: float) -> str:
    ll = rec.get("mpnn_ll")
    score = "" if ll is None else f", score={-float(ll):.4f}"       # ProteinMPNN's score = minus the mean log-lik
    return f"T={temperature:g}, sample={k + 1}{score}"


def write_sc_results(sample_path: Path, sc_dir: Path, per_sequence: list[dict], refolds: list[Path | None],
                     temperature: float) -> Path:
    """Write FrameDiff's self-consistency folder for one sample; returns the path of ``sc_results.csv``.

    ``per_sequence``: our per-sequence records (``index``, ``sequence``, ``sc_tm``, ``sc_rmsd``, ``mpnn_ll``);
    ``refolds``: the refold PDB of each record (copied to ``esmf/sample_k.pdb``) or None (then ``sample_path`` is
    empty). Every file is written atomically.
    """
    sc_dir = Path(sc_dir)
    recs = sorted(per_sequence, key=lambda r: int(r.get("index", 0)))
    atomic_write_bytes(sc_dir / sample_path.name, Path(sample_path).read_bytes())
    fasta = "".join(f">{_fasta_header(k, r, temperature)}\n{r['sequence']}\n" for k, r in enumerate(recs))
    atomic_write_text(sc_dir / "seqs" / f"{Path(sample_path).name.split('.')[0]}.fa", fasta)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SC_RESULTS_COLUMNS)
    for k, r in enumerate(recs):
        src = refolds[k] if k < len(refolds) else None
        dst = ""
        if src is not None and Path(src).is_file():
            dst_path = sc_dir / "esmf" / f"sample_{k}.pdb"
            atomic_write_bytes(dst_path, Path(src).read_bytes())
            dst = str(dst_path)
        w.writerow([k, _num(r.get("sc_tm")), dst, _fasta_header(k, r, temperature), r["sequence"],
                    _num(r.get("sc_rmsd"))])
    out = sc_dir / "sc_results.csv"
    atomic_write_text(out, buf.getvalue())
    return out


def sc_results_mode(v: Any) -> str:
    """``auto`` / ``true`` / ``false`` from the config value (Hydra gives booleans for true/false)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v).strip().lower()


def _num(v: Any) -> str:
    return "" if v is None else repr(float(v))
