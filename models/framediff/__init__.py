"""FrameDiff (Yim et al. 2023) score network: native, batched, loads official checkpoints.

Its training code sits next to it and is not imported here (so inference needs no Lightning):
``losses`` (FrameDiff's loss), ``training`` (the LightningModule), ``datamodule`` (the LightningDataModule),
``fit`` (the Trainer, resume, time budget), ``checkpointing`` (official ``model.pth``, safe ``last.ckpt`` reading),
``metrics`` (``metrics.csv``, ``loss_curve.png``). Command line: ``train_frame_model`` (docs/training.md).
"""
from .config import EmbedConfig, FrameDiffConfig, IpaConfig
from .network import FrameDiffScoreNetwork

__all__ = ["EmbedConfig", "FrameDiffConfig", "IpaConfig", "FrameDiffScoreNetwork"]
from .adapter import FrameDiffAdapter, FrameDiffOutput

__all__ += ["FrameDiffAdapter", "FrameDiffOutput"]
