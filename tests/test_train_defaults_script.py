"""scripts/train_defaults.sh: every run keeps its state where chunk/collect/pack look for it (issue 17).

Session 8 lost a GPU chunk to this: with SUBSETS=all the run wrote to runs/null (its data.subset value), while
chunk, collect and pack read runs/all, so the checkpoint never came back.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _recipes(subsets: str | None) -> dict[str, dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k != "SUBSETS"}
    if subsets is not None:
        env["SUBSETS"] = subsets
    out = subprocess.run(["bash", str(REPO / "scripts" / "train_defaults.sh"), "recipe", "5"], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    runs = {}
    for line in out.splitlines():
        name, _, args = line.partition(": ")
        runs[name] = dict(kv.split("=", 1) for kv in args.split())
    return runs


@pytest.mark.parametrize("subsets, expected", [(None, {"helix": "helix", "strand": "strand"}),
                                               ("all", {"all": "null"}),
                                               ("helix", {"helix": "helix"})])
def test_each_run_keeps_its_state_under_its_own_name(subsets, expected):
    runs = _recipes(subsets)
    assert set(runs) == set(expected)
    for name, data_subset in expected.items():
        assert runs[name]["data.subset"] == data_subset
        assert Path(runs[name]["out_dir"]).name == name      # chunk/collect/pack use .gpu_data/runs/<name>
        assert runs[name]["max_minutes"] == "5" and runs[name]["resume"] == "true"
