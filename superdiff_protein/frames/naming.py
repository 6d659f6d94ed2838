"""Unique display names (chains in a dataset file, models in a run)."""
from __future__ import annotations

from typing import Iterable

__all__ = ["unique_names"]


def unique_names(names: Iterable[str]) -> list[str]:
    """``names`` with repeats numbered in order: ``a, a, b, a`` -> ``a, a#2, b, a#3``."""
    out, seen = [], {}
    for nm in names:
        if nm in seen:
            seen[nm] += 1
            nm = f"{nm}#{seen[nm]}"
        else:
            seen[nm] = 1
        out.append(nm)
    return out
