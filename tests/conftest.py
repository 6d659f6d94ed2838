"""Shared pytest configuration."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


OFFICIAL_ENV = "SUPERDIFF_OFFICIAL_FIXTURES"
PDOWNB_ENV = "SUPERDIFF_PDOWNB"
TEST_DATA = REPO / "tests" / "data"  # small real structures shipped with the repository (tests/data/README.md)


def official_fixtures_dir() -> Path:
    """Official golden fixtures folder (env ``SUPERDIFF_OFFICIAL_FIXTURES``, default ../shared/fixtures/official)."""
    return Path(os.environ.get(OFFICIAL_ENV, REPO.parent / "shared" / "fixtures" / "official"))


def official_skip_reason(what: str = "official golden fixtures") -> str:
    """Skip reason for tests that need the external official fixtures (they run in CI, where ../shared exists)."""
    return (f"{what} not found in {official_fixtures_dir()}: set {OFFICIAL_ENV}=<folder of the official fixtures> "
            "to run (default ../shared/fixtures/official)")


def official_params(paths, what: str, ids=None) -> list:
    """``pytest.mark.parametrize`` values for fixture files found: the paths, or (none found) one skipped case whose
    reason names the environment variable (an empty list would skip with pytest's anonymous 'empty parameter set')."""
    paths = list(paths)
    if paths:
        return [pytest.param(p, id=(ids(p) if ids else None)) for p in paths]
    return [pytest.param(None, id="no-fixtures", marks=pytest.mark.skip(reason=official_skip_reason(what)))]


def pdownb_archive() -> Path:
    """Full PDownB archive or its folder (env ``SUPERDIFF_PDOWNB``, default ../shared/data/pdownb)."""
    return Path(os.environ.get(PDOWNB_ENV, REPO.parent / "shared" / "data" / "pdownb"))


def pdownb_archive_file() -> Path | None:
    """The archive file itself, or None when it is not there."""
    p = pdownb_archive()
    found = sorted(p.glob("*.tar*")) if p.is_dir() else ([p] if p.is_file() else [])
    return found[0] if found else None


def pdownb_skip_reason() -> str:
    return (f"full PDownB archive (pdownb_first_chain_pdb.tar.xz) not found under {pdownb_archive()}: "
            f"set {PDOWNB_ENV}=<archive or its folder> to run (default ../shared/data/pdownb)")


def real_chain_files(which: str) -> list[Path]:
    """Real PDB chains shipped in tests/data/pdownb: ``which`` = "spread" or "short" (see tests/data/README.md),
    in archive order."""
    import json

    d = TEST_DATA / "pdownb"
    index = json.loads((d / "index.json").read_text())
    return [d / m["file"] for m in index[which]["members"]]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _limit_threads():
    torch.set_num_threads(1)
    yield
