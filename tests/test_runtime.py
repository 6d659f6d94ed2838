"""The CLI allocator hook (superdiff_protein.cli.runtime.tune_malloc): applies on glibc, can be disabled."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = "from superdiff_protein.cli.runtime import tune_malloc; print(tune_malloc(), tune_malloc())"


def _run(**env_over: str) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SUPERDIFF_NO_MALLOPT", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    env.update(env_over)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt tuning applies to glibc Linux only")
def test_tune_malloc_applies_on_glibc():
    assert _run() == "True True"


def test_tune_malloc_disabled_by_env_or_user_knobs():
    assert _run(SUPERDIFF_NO_MALLOPT="1") == "False False"
    assert _run(MALLOC_MMAP_THRESHOLD_="65536") == "False False"
    assert _run(GLIBC_TUNABLES="glibc.malloc.trim_threshold=65536") == "False False"
