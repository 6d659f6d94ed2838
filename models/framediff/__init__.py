"""FrameDiff (Yim et al. 2023) score network: native, batched, loads official checkpoints."""
from .config import EmbedConfig, FrameDiffConfig, IpaConfig
from .network import FrameDiffScoreNetwork

__all__ = ["EmbedConfig", "FrameDiffConfig", "IpaConfig", "FrameDiffScoreNetwork"]
from .adapter import FrameDiffAdapter, FrameDiffOutput

__all__ += ["FrameDiffAdapter", "FrameDiffOutput"]
