"""Shared pytest configuration."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def official_fixtures_dir() -> Path:
    """Directory of official golden fixtures (env ``SUPERDIFF_OFFICIAL_FIXTURES``)."""
    return Path(os.environ.get("SUPERDIFF_OFFICIAL_FIXTURES", REPO.parent / "shared" / "fixtures" / "official"))


def pdownb_archive() -> Path:
    return Path(os.environ.get("SUPERDIFF_PDOWNB", REPO.parent / "shared" / "data" / "pdownb"))


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
