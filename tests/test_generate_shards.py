"""Sharded generation (Hydra multirun jobs / torchrun ranks) gives exactly the single-process samples."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from superdiff_protein.frames.generate_config import GenerateError
from superdiff_protein.frames.generation import generate

COMMON = dict(models=["exact-helix", "exact-strand"], lengths=[20, 24], samples_per_length=3, batch_size=2, num_steps=6, seed=3, device="cpu",
              plots=False, progress=False)


def _pdbs(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("sample_*.pdb"))}


def test_shards_union_equals_single_run(tmp_path):
    single = tmp_path / "single"
    generate(out_dir=str(single), **COMMON)
    sharded = tmp_path / "sharded"
    for i in range(3):   # as three Hydra multirun jobs would, one after the other (or at once)
        generate(out_dir=str(sharded), shard=f"{i}/3", **COMMON)
    assert _pdbs(single) == _pdbs(sharded) and len(_pdbs(single)) == 6
    a = (single / "samples.csv").read_text().splitlines()
    b = (sharded / "samples.csv").read_text().splitlines()
    assert len(a) == len(b) == 7 and a[0] == b[0]
    assert not list(sharded.glob("samples.shard-*.csv"))
    # a rerun of any shard (or of the whole job) finds everything done
    assert generate(out_dir=str(sharded), shard="1/3", **COMMON).generated == 0
    assert generate(out_dir=str(sharded), **COMMON).generated == 0


def test_interrupted_shard_rows_are_folded_in(tmp_path):
    d = tmp_path / "d"
    generate(out_dir=str(d), shard="0/2", **COMMON)
    # simulate a shard that was killed before merging: its rows sit in a shard file
    rows = (d / "samples.csv").read_text()
    (d / "samples.csv").unlink()
    (d / "samples.shard-0-of-2.csv").write_text(rows)
    n_done = len(rows.splitlines()) - 1
    s = generate(out_dir=str(d), **COMMON)
    assert 0 < n_done < 6 and s.generated == 6 - n_done and len(s.rows) == 6
    assert not list(d.glob("samples.shard-*.csv"))


@pytest.mark.parametrize("bad", ["2/2", "x", "1/0", "-1/3"])
def test_bad_shard_spec(tmp_path, bad):
    with pytest.raises(GenerateError, match="shard"):
        generate(out_dir=str(tmp_path / "x"), shard=bad, **COMMON)
    assert not (tmp_path / "x").exists()


def test_torchrun_two_ranks_cpu(tmp_path):
    """Two gloo ranks on CPU through torchrun: same PDBs as one process."""
    pytest.importorskip("torch.distributed.run")
    single = tmp_path / "single"
    generate(out_dir=str(single), **COMMON)
    out = tmp_path / "ddp"
    args = [f"out_dir={out}", "models=[exact-helix,exact-strand]", "lengths=[20,24]", "samples_per_length=3", "batch_size=2", "num_steps=6", "seed=3",
            "device=cpu", "plots=false", "progress=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "superdiff_protein.cli.generate", *args], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _pdbs(single) == _pdbs(out)
    assert len((out / "samples.csv").read_text().splitlines()) == 7
