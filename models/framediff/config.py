"""FrameDiff model configuration (the ``model`` section of the official Hydra config)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

__all__ = ["EmbedConfig", "IpaConfig", "FrameDiffConfig"]


@dataclass
class EmbedConfig:
    """``model.embed``: time / index embeddings and the self-conditioning distogram."""

    index_embed_size: int = 32
    aatype_embed_size: int = 64  # present in the official config, unused by the network
    embed_self_conditioning: bool = True
    num_bins: int = 22
    min_bin: float = 1e-5
    max_bin: float = 20.0


@dataclass
class IpaConfig:
    """``model.ipa``: IPA trunk sizes (``c_s``/``c_z`` default to the node/edge sizes)."""

    c_s: int = 256
    c_z: int = 128
    c_hidden: int = 256
    c_skip: int = 64
    no_heads: int = 8
    no_qk_points: int = 8
    no_v_points: int = 12
    seq_tfmr_num_heads: int = 4
    seq_tfmr_num_layers: int = 2
    num_blocks: int = 4
    coordinate_scaling: float = 0.1
    # ours, not official (0 = off): the predicted CA positions become x_t + c(t) (trunk - x_t) with
    # c(t) = min(1, sqrt(t / trans_skip_t)), so that nearly clean inputs are changed by less (no parameters;
    # docs/training.md, "Session 24")
    trans_skip_t: float = 0.0


@dataclass
class FrameDiffConfig:
    """FrameDiff ``ScoreNetwork`` configuration; defaults are the paper (``config/base.yaml``)."""

    node_embed_size: int = 256
    edge_embed_size: int = 128
    dropout: float = 0.0
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    ipa: IpaConfig = field(default_factory=IpaConfig)

    @classmethod
    def from_dict(cls, model_conf: Mapping[str, Any]) -> "FrameDiffConfig":
        """Build from the (resolved) ``conf['model']`` mapping of a checkpoint.

        String interpolations that were not resolved (``'${model.node_embed_size}'``,
        ``'${diffuser.r3.coordinate_scaling}'``) fall back to the values they point to in the
        official config (node/edge sizes; coordinate scaling 0.1).  Unknown keys are ignored.
        """
        mc = dict(model_conf)
        node = int(mc.get("node_embed_size", 256))
        edge = int(mc.get("edge_embed_size", 128))
        emb_in = dict(mc.get("embed", {}) or {})
        ipa_in = dict(mc.get("ipa", {}) or {})
        defaults_ipa = {"c_s": node, "c_z": edge, "coordinate_scaling": 0.1}

        def val(d: dict, k: str, default: Any, typ: type) -> Any:
            v = d.get(k, default)
            if isinstance(v, str) and v.startswith("${"):
                v = defaults_ipa.get(k, default)
            return typ(v)

        e0, i0 = EmbedConfig(), IpaConfig()
        embed = EmbedConfig(
            **{k: val(emb_in, k, getattr(e0, k), type(getattr(e0, k))) for k in asdict(e0)}
        )
        ipa = IpaConfig(
            **{k: val(ipa_in, k, defaults_ipa.get(k, getattr(i0, k)), type(getattr(i0, k))) for k in asdict(i0)}
        )
        return cls(node, edge, float(mc.get("dropout", 0.0)), embed, ipa)

    def to_dict(self) -> dict:
        """Plain nested dict (the official key layout)."""
        return asdict(self)
