"""Rotation / translation scores from predicted frames, computed exactly the official way.

Merged into the shared diffuser :mod:`superdiff_protein.frames.se3` (the same object the superposition core
uses); this module re-exports it for backwards compatibility. ``OfficialDiffuserConfig`` is
:class:`superdiff_protein.frames.se3.SE3DiffuserConfig`.
"""
from __future__ import annotations

from superdiff_protein.frames.se3 import SE3DiffuserConfig as OfficialDiffuserConfig
from superdiff_protein.frames.se3 import (
    discrete_sigma,
    igso3_dlog_domega,
    igso3_expansion,
    official_rot_score,
    official_trans_score,
    tabulated_sigma,
)

__all__ = [
    "OfficialDiffuserConfig",
    "discrete_sigma",
    "tabulated_sigma",
    "igso3_expansion",
    "igso3_dlog_domega",
    "official_rot_score",
    "official_trans_score",
]
