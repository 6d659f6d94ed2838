"""ESMFold trunk options of evaluate_backbones: ``fold.chunk_size: null`` really means no chunking, and
``fold.compile`` (compiled folding blocks) gives the eager folds, falls back to eager with one warning when
compiling fails, and is a checked boolean option. Tiny random ESMFold on CPU; no timing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.config import validate_config
from eval.errors import BadInputError
from eval.fold import compile_folding_blocks, fold_sequences, prepare_esmfold, uncompile_folding_blocks
from test_eval_common import tiny_esmfold

SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLEDPAAKKWV"]
#: Chunking splits the attention's batch dimensions and compiling reorders fp32 sums: both change each op's
#: rounding (a few ulp of O(1) activations). Through a randomly initialised network with recycling this
#: grows; tests/test_eval_fold_batching.py measured batch-composition changes of the same kind at <= 1e-8 A on
#: this tiny model, so 1e-4 A (coordinates are O(10) A: 1e-5 relative, ~100x fp32's eps) flags any real change.
ATOL_A = 1e-4


def _max_diff(a, b) -> float:
    return max(float(np.abs(x.backbone - y.backbone).max()) for x, y in zip(a, b))


def test_chunk_size_null_turns_off_the_checkpoints_chunking():
    m = tiny_esmfold()
    m.trunk.set_chunk_size(3)  # as a checkpoint's config would (esmfold_v1 ships chunk_size 128)
    assert prepare_esmfold(m, "cpu", chunk_size=None).trunk.chunk_size is None
    assert prepare_esmfold(m, "cpu", chunk_size=4).trunk.chunk_size == 4
    chunked = fold_sequences(m, SEQS, batch_size=2)
    plain = fold_sequences(prepare_esmfold(m, "cpu", chunk_size=None), SEQS, batch_size=2)
    assert _max_diff(chunked, plain) < ATOL_A


def test_compiled_blocks_fold_like_eager():
    m = prepare_esmfold(tiny_esmfold(), "cpu", chunk_size=None)
    ref = fold_sequences(m, SEQS, batch_size=2)
    compile_folding_blocks(m)
    assert m.eager_blocks is not None and all(hasattr(b, "_orig_mod") for b in m.trunk.blocks)
    got = fold_sequences(m, SEQS, batch_size=2)
    assert _max_diff(got, ref) < ATOL_A
    assert abs(got[0].plddt - ref[0].plddt) < 1e-3
    assert uncompile_folding_blocks(m) and not uncompile_folding_blocks(m)
    assert not any(hasattr(b, "_orig_mod") for b in m.trunk.blocks)


class _Broken(torch.nn.Module):
    """Stands in for a compiled block whose compiler fails on the first call."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("backend compiler failed: no C++ compiler (simulated)")


def test_compile_failure_warns_once_and_folds_eagerly(capsys):
    m = prepare_esmfold(tiny_esmfold(), "cpu", chunk_size=None)
    ref = fold_sequences(m, SEQS, batch_size=1)
    m.eager_blocks = list(m.trunk.blocks)       # what compile_folding_blocks keeps
    m.trunk.blocks[0] = _Broken()
    got = fold_sequences(m, SEQS, batch_size=1)  # two calls: the second must not warn again
    assert _max_diff(got, ref) == 0.0
    err = capsys.readouterr().err
    assert err.count("fold.compile failed") == 1 and "simulated" in err
    assert m.eager_blocks is None and not isinstance(m.trunk.blocks[0], _Broken)


def test_failure_without_compile_is_not_swallowed():
    m = prepare_esmfold(tiny_esmfold(), "cpu", chunk_size=None)
    m.trunk.blocks[0] = _Broken()
    with pytest.raises(RuntimeError, match="simulated"):
        fold_sequences(m, SEQS[:1], batch_size=1)


def test_compile_option_is_a_checked_boolean():
    validate_config({"fold": {"compile": True}})
    validate_config({"fold": {"compile": False}})
    for bad in ("yes", 1, None):
        with pytest.raises(BadInputError, match="fold.compile must be true or false"):
            validate_config({"fold": {"compile": bad}})


def test_evaluate_with_fold_compile_loads_compiles_and_scores_like_eager(tmp_path, monkeypatch):
    """``evaluate_backbones fold.compile=true fold.chunk_size=null``: the ESMFold loaded from disk gets compiled
    blocks and the designability scores equal the eager run's within the rounding bound above."""
    import csv

    import eval.fold as fold_mod
    from eval.pipeline import evaluate
    from superdiff_protein.cli.evaluate import load_config
    from test_eval_common import pdownb_chains, tiny_mpnn_checkpoint, write_sample_dir

    chains = pdownb_chains(2)
    ckpt = tiny_mpnn_checkpoint(tmp_path / "tiny_mpnn.pt")
    esm_dir = tmp_path / "esmfold"
    tiny_esmfold().save_pretrained(str(esm_dir))
    compiled = []
    real = fold_mod.compile_folding_blocks
    monkeypatch.setattr(fold_mod, "compile_folding_blocks", lambda m: compiled.append(m) or real(m))
    scores = {}
    for flag in ("false", "true"):
        sdir = write_sample_dir(tmp_path / f"samples_{flag}", chains)
        cfg = load_config([f"samples_dir={sdir}", "mpnn.num_seqs=2", "workers=1", "progress=false",
                           "fold.batch_size=2", "reference=null", f"esmfold={esm_dir}", f"mpnn.weights={ckpt}",
                           f"fold.compile={flag}", "fold.chunk_size=null", "diversity.enabled=false"])
        evaluate(cfg)
        with open(sdir / "eval" / "metrics.csv", newline="") as fh:
            scores[flag] = {r["path"].split("samples_")[-1].split("/", 1)[-1]: float(r["sc_rmsd"])
                            for r in csv.DictReader(fh)}
    assert len(compiled) == 1 and compiled[0].trunk.chunk_size is None
    assert all(hasattr(b, "_orig_mod") for b in compiled[0].trunk.blocks)
    assert scores["true"].keys() == scores["false"].keys() and len(scores["true"]) == 2
    for k, v in scores["false"].items():
        assert abs(scores["true"][k] - v) < ATOL_A, k


class _Mute(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise RuntimeError()


def test_compile_failure_without_a_message_still_falls_back(capsys):
    m = prepare_esmfold(tiny_esmfold(), "cpu", chunk_size=None)
    ref = fold_sequences(m, SEQS[:1], batch_size=1)
    m.eager_blocks = list(m.trunk.blocks)
    m.trunk.blocks[0] = _Mute()
    assert _max_diff(fold_sequences(m, SEQS[:1], batch_size=1), ref) == 0.0
    assert "fold.compile failed (RuntimeError: )" in capsys.readouterr().err
