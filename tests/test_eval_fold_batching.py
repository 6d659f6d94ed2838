"""ESMFold speed options of evaluate_backbones: ``fold.precision`` (parsing, TF32 flags and autocast scoped to the
call), designs of many backbones folded together in length-sorted batches (same results as folding each backbone
on its own, resume, failures charged to their own sample). Tiny random models on CPU; no timing."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import eval.steps as steps
from eval.config import validate_config
from eval.designability import self_consistency
from eval.errors import BadInputError
from eval.fold import fold_precision, fold_sequences, prepare_esmfold, resolve_precision, tf32_matmuls
from eval.io import read_backbone
from eval.mpnn import Design, load_proteinmpnn
from eval.pipeline import evaluate
from eval.steps import length_batches
from test_eval_common import pdownb_chains, random_rotation, tiny_esmfold, tiny_mpnn_checkpoint, write_sample_dir

SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLEDPAAKK"]


@pytest.fixture(scope="module")
def esm():
    return prepare_esmfold(tiny_esmfold(), "cpu", chunk_size=4, precision="fp32")


@pytest.fixture
def tf32_flags():
    """Restore the process's TF32 flags after a test that sets them."""
    mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (mm.allow_tf32, cudnn.allow_tf32)
    yield
    mm.allow_tf32, cudnn.allow_tf32 = saved


def _flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


# ------------------------------------------------------------------------------------------------ precision
def test_resolve_precision_and_config_validation():
    assert resolve_precision(None) == "fp32"
    assert resolve_precision(None) == "fp32"
    for p in ("fp32", "tf32", "bf16"):
        assert resolve_precision(p) == p and resolve_precision(p.upper()) == p
    with pytest.raises(ValueError, match="fold.precision"):
        resolve_precision("fp16")
    for ok in ("fp32", "tf32", "bf16"):
        validate_config({"fold": {"precision": ok}})
    for bad in ("fp16", "half", 32, None, True):
        with pytest.raises(BadInputError, match="fold.precision must be one of fp32, tf32, bf16"):
            validate_config({"fold": {"precision": bad}})


def test_bad_precision_exits_2_before_any_work(tmp_path, capsys):
    from superdiff_protein.cli.evaluate import main

    sdir = write_sample_dir(tmp_path / "samples", pdownb_chains(1))
    assert main([f"samples_dir={sdir}", "fold.precision=fp16", "esmfold=null"]) == 2
    assert "fold.precision must be one of" in capsys.readouterr().err
    assert not (sdir / "eval").exists()


@pytest.mark.parametrize("before", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_tf32_flags_set_for_the_call_and_restored(esm, tf32_flags, before, precision):
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    seen = []
    h = esm.register_forward_pre_hook(lambda m, a: seen.append(_flags()))
    try:
        folds = fold_sequences(esm, SEQS, batch_size=2, precision=precision)
    finally:
        h.remove()
    assert seen == [(precision == "tf32",) * 2]
    assert _flags() == before
    assert [f.backbone.dtype for f in folds] == [np.float64] * 2 and all(np.isfinite(f.plddt) for f in folds)


def test_flags_and_autocast_restored_after_a_failing_call(esm, tf32_flags):
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True

    def boom(module, args):
        raise RuntimeError("boom")

    h = esm.trunk.blocks[0].register_forward_pre_hook(boom)
    try:
        for p in ("tf32", "bf16"):
            with pytest.raises(RuntimeError, match="boom"):
                fold_sequences(esm, SEQS, batch_size=2, precision=p)
            assert _flags() == (False, True) and not torch.is_autocast_enabled("cpu")
            assert all("forward" not in b.__dict__ for b in esm.trunk.blocks)
    finally:
        h.remove()


def test_bf16_autocasts_only_the_trunk_blocks(esm):
    seen: dict[str, list[bool]] = {"block": [], "esm": [], "structure": []}
    inside_block = next(iter(esm.trunk.blocks[0].children()))  # hooks of the block itself run before its forward
    hooks = [inside_block.register_forward_pre_hook(
                 lambda m, a: seen["block"].append(torch.is_autocast_enabled("cpu"))),
             esm.esm.register_forward_pre_hook(lambda m, a: seen["esm"].append(torch.is_autocast_enabled("cpu"))),
             esm.trunk.structure_module.register_forward_pre_hook(
                 lambda m, a: seen["structure"].append(torch.is_autocast_enabled("cpu")))]
    try:
        ref = fold_sequences(esm, SEQS, batch_size=2, precision="fp32")
        assert seen == {"block": [False], "esm": [False], "structure": [False]}
        seen = {k: [] for k in seen}
        low = fold_sequences(esm, SEQS, batch_size=2, precision="bf16")
    finally:
        for h in hooks:
            h.remove()
    assert seen["block"] and all(seen["block"]) and seen["esm"] == [False] and not any(seen["structure"])
    assert low[0].backbone.dtype == np.float64
    diff = max(float(np.abs(a.backbone - b.backbone).max()) for a, b in zip(ref, low))
    assert 0 < diff < 1.0  # bf16 rounding moves atoms a little, never wholesale


def test_prepare_sets_default_precision(esm):
    m = prepare_esmfold(tiny_esmfold(), "cpu", chunk_size=4, precision="bf16")
    assert m.fold_precision == "bf16"
    a = fold_sequences(m, SEQS[:1], batch_size=1)
    b = fold_sequences(m, SEQS[:1], batch_size=1, precision="bf16")
    c = fold_sequences(m, SEQS[:1], batch_size=1, precision="fp32")
    assert np.array_equal(a[0].backbone, b[0].backbone) and not np.array_equal(a[0].backbone, c[0].backbone)
    assert prepare_esmfold(tiny_esmfold(), "cpu").fold_precision == "fp32"
    with fold_precision(m, "tf32"), tf32_matmuls(False):
        assert _flags() == (False, False)


# ------------------------------------------------------------------------------------------------ batching
def test_length_batches():
    lengths = [50, 30, 50, 40, 30, 30, 50, 40]
    batches = length_batches(lengths, 3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [len(b) for b in batches] == [3, 3, 2]
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)
    assert batches[0] == [1, 4, 5]  # stable: equal lengths keep their order
    assert length_batches([], 4) == []
    with pytest.raises(ValueError):
        length_batches([1], 0)


def _write_samples(root, equal_lengths: bool):
    chains = pdownb_chains(4)
    if equal_lengths:  # rotated copies of one chain: every batch holds one length, no padding
        rng = np.random.default_rng(1)
        chains = [chains[0]] + [replace(chains[0], atoms=(chains[0].atoms @ random_rotation(rng).T).astype(np.float32))
                                for _ in range(3)]
    return write_sample_dir(root, chains), chains


def _cfg(sdir, **fold):
    return {"samples_dir": str(sdir), "out_dir": None, "reference": None, "esmfold": None, "device": "cpu",
            "workers": 1, "seed": 0, "resume": True, "progress": False, "plots": False, "sc_results": "false",
            "mpnn": {"enabled": True, "num_seqs": 3, "temperature": 0.1, "model_name": "v_48_020", "ca_only": False,
                     "weights": None, "batch_size": 8, "omit_aas": "X"},
            "fold": {"batch_size": 4, "num_recycles": None, "chunk_size": 4, "precision": "fp32",
                     "designable_rmsd": 2.0, "save_refolds": True, **fold},
            "novelty": {"top_k": None, "refold": True},
            "diversity": {"enabled": False, "cluster_tm_threshold": 0.5, "cluster_method": "greedy",
                          "max_samples": 2000}}


def _fold_sections(sdir) -> dict[str, dict]:
    return {f.name: json.loads(f.read_text())["sections"]["fold"] for f in sorted((sdir / "eval" / "cache").glob("*"))}


@pytest.fixture(scope="module")
def tiny_mpnn(tmp_path_factory):
    ckpt = tiny_mpnn_checkpoint(tmp_path_factory.mktemp("mpnn") / "mpnn.pt")
    return load_proteinmpnn(weights=str(ckpt))


@pytest.mark.parametrize("equal_lengths, atol_rmsd, atol_plddt", [(True, 1e-4, 1e-3), (False, 2e-3, 2e-2)])
def test_grouped_folding_matches_per_sample_folding(tmp_path, esm, tiny_mpnn, equal_lengths, atol_rmsd,
                                                    atol_plddt):
    """Pooled, length-sorted batches of 4 (cutting across samples of 3 designs, and across lengths when they
    differ) give each sample the scRMSD / pLDDT of folding its own designs alone. Equal lengths: batch
    composition alone (float noise); mixed lengths: also padding, whose effect the existing tiny-model test bounds
    at 1e-3 A per atom."""
    sdir, _ = _write_samples(tmp_path / "s", equal_lengths)
    evaluate(_cfg(sdir), mpnn_model=tiny_mpnn, fold_model=esm)
    sections = _fold_sections(sdir)
    assert len(sections) == 4
    for name, fo in sections.items():
        assert "error" not in fo, fo
        pdb = sdir / name.replace("__", "/").removesuffix(".json")
        bb = read_backbone(pdb)
        designs = [Design(r["sequence"], r["mpnn_ll"]) for r in fo["per_sequence"]]
        assert len(designs) == 3 and all(len(d.sequence) == bb.length for d in designs)
        summ, per_seq, _ = self_consistency(bb, designs, esm, batch_size=4)
        np.testing.assert_allclose([r["sc_rmsd"] for r in fo["per_sequence"]], [r["sc_rmsd"] for r in per_seq],
                                   atol=atol_rmsd, rtol=0)
        np.testing.assert_allclose([r["plddt"] for r in fo["per_sequence"]], [r["plddt"] for r in per_seq],
                                   atol=atol_plddt, rtol=0)
        assert fo["sc_rmsd"] == pytest.approx(summ["sc_rmsd"], abs=atol_rmsd)
        assert fo["sc_best_index"] == summ["sc_best_index"]


class _Counting:
    """Wraps ``eval.steps.fold_sequences`` and records every call's sequences."""

    def __init__(self, real, fail_on: str | None = None, oom_batches: bool = False):
        self.real, self.fail_on, self.oom_batches, self.calls = real, fail_on, oom_batches, []

    def __call__(self, model, seqs, batch_size=4, **kw):
        self.calls.append(list(seqs))
        if self.oom_batches and len(seqs) > 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        if self.fail_on in seqs:
            raise ValueError("poisoned sequence")
        return self.real(model, seqs, batch_size=batch_size, **kw)


def test_resume_folds_only_new_or_changed_samples(tmp_path, esm, tiny_mpnn, monkeypatch):
    sdir, chains = _write_samples(tmp_path / "s", equal_lengths=False)
    spy = _Counting(steps.fold_sequences)
    monkeypatch.setattr(steps, "fold_sequences", spy)
    evaluate(_cfg(sdir), mpnn_model=tiny_mpnn, fold_model=esm)
    first = _fold_sections(sdir)
    assert sum(len(c) for c in spy.calls) == 4 * 3 and max(len(c) for c in spy.calls) == 4
    spy.calls.clear()
    evaluate(_cfg(sdir), mpnn_model=tiny_mpnn, fold_model=esm)
    assert spy.calls == [] and _fold_sections(sdir) == first
    evaluate(_cfg(sdir, precision="fp32"), mpnn_model=tiny_mpnn, fold_model=esm)  # the default is fp32: same
    assert spy.calls == []
    # a new sample: only its 3 designs are folded; the others keep their cached results
    extra = write_sample_dir(tmp_path / "extra", chains[:1], with_csv=False)
    (sdir / "new.pdb").write_text((extra / f"length_{chains[0].length}" / "sample_0.pdb").read_text())
    evaluate(_cfg(sdir), mpnn_model=tiny_mpnn, fold_model=esm)
    assert sum(len(c) for c in spy.calls) == 3
    after = _fold_sections(sdir)
    assert {k: v for k, v in after.items() if k != "new.pdb.json"} == first and "error" not in after["new.pdb.json"]
    spy.calls.clear()
    evaluate(_cfg(sdir, precision="bf16"), mpnn_model=tiny_mpnn, fold_model=esm)  # another arithmetic: refold all
    assert sum(len(c) for c in spy.calls) == 5 * 3


def test_failures_are_charged_to_their_own_sample(tmp_path, esm, tiny_mpnn, monkeypatch):
    sdir, _ = _write_samples(tmp_path / "s", equal_lengths=False)
    evaluate(_cfg(sdir, batch_size=6), mpnn_model=tiny_mpnn, fold_model=esm)
    ref = _fold_sections(sdir)
    victim = sorted(ref)[1]
    poisoned = ref[victim]["per_sequence"][2]["sequence"]
    spy = _Counting(steps.fold_sequences, fail_on=poisoned, oom_batches=True)
    monkeypatch.setattr(steps, "fold_sequences", spy)
    evaluate(_cfg(sdir, batch_size=6, num_recycles=0), mpnn_model=tiny_mpnn, fold_model=esm)  # new fingerprint
    got = _fold_sections(sdir)
    assert "poisoned sequence" in got[victim]["error"]
    assert all("error" not in v and len(v["per_sequence"]) == 3 for k, v in got.items() if k != victim)
    assert any(len(c) > 1 for c in spy.calls) and max(len(c) for c in spy.calls) == 6
    assert sum(1 for c in spy.calls if len(c) == 1) == 12  # every batch retried one sequence at a time
