"""Proteus model configuration: the ``model`` section of the official (Hydra/OmegaConf) config."""
from __future__ import annotations

import ast
import copy
from typing import Any, Mapping


class ProteusConfigError(ValueError):
    """The model configuration asks for a variant this implementation does not provide."""


def _to_plain(conf: Any) -> Any:
    try:  # OmegaConf objects -> plain containers (interpolations resolved)
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(conf, (DictConfig, ListConfig)):
            return OmegaConf.to_container(conf, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(conf, str):
        return ast.literal_eval(conf)
    return copy.deepcopy(dict(conf))


def model_config(conf: Any) -> dict:
    """Plain-dict ``model`` config from a full run config, a ``model`` section, or its ``str`` repr.

    Validates that the variant is the one Proteus ships (template self-conditioning, pytorch
    sequence transformer, no MSA / struct2seq modules); raises :class:`ProteusConfigError` otherwise.
    """
    c = _to_plain(conf)
    if "model" in c and "ipa" not in c:
        c = _to_plain(c["model"])
    for key in ("node_embed_size", "edge_embed_size", "embed", "ipa", "auxiliary_heads"):
        if key not in c:
            raise ProteusConfigError(f"Proteus model config lacks the key '{key}'")
    ipa = c["ipa"]
    ipa.setdefault("local_triangle_attention", {"enable": False})
    ipa.setdefault("axial_pair_attention", {"enable": False})
    ipa.setdefault("local_triangle_attention_new", {"enable": False})
    ipa.setdefault("coordinate_scaling", 0.1)
    sc = c["embed"].get("self_condition", {})
    problems = []
    if sc.get("version") not in ("template", None, False):
        problems.append(f"embed.self_condition.version={sc.get('version')!r} (only 'template' or null)")
    if sc.get("version") == "template" and sc.get("aatype") != "mask":
        problems.append("embed.self_condition.aatype must be 'mask'")
    if sc.get("version") == "template" and sc.get("all_atom_mask") != "backbone":
        problems.append("embed.self_condition.all_atom_mask must be 'backbone'")
    if sc.get("struct2seq", {}).get("enable"):
        problems.append("embed.self_condition.struct2seq.enable=True (ESM/ProteinMPNN embedder) is not supported")
    if c.get("msa_transformer", {}).get("enable"):
        problems.append("msa_transformer.enable=True is not supported")
    if ipa.get("seq_tfmr_attention", "pytorch") != "pytorch":
        problems.append(f"ipa.seq_tfmr_attention={ipa.get('seq_tfmr_attention')!r} (only 'pytorch')")
    if ipa["axial_pair_attention"].get("enable"):
        problems.append("ipa.axial_pair_attention.enable=True is not supported")
    if c["embed"]["feature"].get("aatype"):
        problems.append("embed.feature.aatype=True (sequence-conditioned) is not supported")
    if c["embed"]["feature"].get("index"):
        problems.append("embed.feature.index is not supported")
    if c.get("mode", "monomer") not in ("monomer", "multimer"):
        problems.append(f"mode={c.get('mode')!r}")
    if problems:
        raise ProteusConfigError("unsupported Proteus configuration: " + "; ".join(problems))
    return c


def merge(base: Mapping, override: Mapping) -> dict:
    """Recursive dict merge (``override`` wins), like ``OmegaConf.merge`` for plain dicts."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out
