"""Family adapters: where a causal LM keeps its decoder layers and per-layer config.

A family is identified by `config.model_type`. Everything downstream (gates, export,
methods) goes through `get_adapter(model)` and never hard-codes attribute paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn


@dataclass(frozen=True)
class FamilyAdapter:
    """How to reach the decoder stack of one model family.

    layers_path:  dotted path from the *CausalLM* module to the nn.ModuleList of layers.
    norm_path / embed_path / head_path: final norm, token embedding and LM head.
    per_layer_config: config attributes that are lists with one entry per layer and are
      subset on export (any other list of length num_hidden_layers is subset too).
    window_threshold_config: int attributes meaning "layers with index >= this value use
      a sliding window" (Qwen2/Qwen3 `max_window_layers`); remapped on export.
    """

    model_type: str
    layers_path: str = "model.layers"
    norm_path: str = "model.norm"
    embed_path: str = "model.embed_tokens"
    head_path: str = "lm_head"
    per_layer_config: tuple[str, ...] = ()
    window_threshold_config: tuple[str, ...] = ()
    notes: str = ""
    extra: dict = field(default_factory=dict)


_ADAPTERS: dict[str, FamilyAdapter] = {
    "llama": FamilyAdapter("llama", notes="Llama 2/3, SmolLM, TinyLlama"),
    "mistral": FamilyAdapter("mistral", per_layer_config=("layer_types",), notes="Mistral 7B"),
    "qwen2": FamilyAdapter("qwen2", per_layer_config=("layer_types",),
                           window_threshold_config=("max_window_layers",), notes="Qwen2, Qwen2.5"),
    "qwen3": FamilyAdapter("qwen3", per_layer_config=("layer_types",),
                           window_threshold_config=("max_window_layers",), notes="Qwen3 dense"),
}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_ADAPTERS)


class UnsupportedArchitectureError(ValueError):
    pass


def _resolve(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def adapter_for_config(config) -> FamilyAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        archs = getattr(config, "architectures", None)
        raise UnsupportedArchitectureError(
            f"unsupported architecture: model_type={model_type!r} (architectures={archs}). "
            f"Supported families: {', '.join(SUPPORTED_FAMILIES)} "
            "(transformers LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
            "Qwen3ForCausalLM).")
    return _ADAPTERS[model_type]


def get_adapter(model: nn.Module) -> FamilyAdapter:
    return adapter_for_config(model.config)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The nn.ModuleList of decoder layers of a supported causal LM."""
    layers = _resolve(model, get_adapter(model).layers_path)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: expected an nn.ModuleList of decoder layers, "
            f"found {type(layers).__name__}")
    return layers


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def final_norm(model: nn.Module) -> nn.Module:
    return _resolve(model, get_adapter(model).norm_path)


def lm_head(model: nn.Module) -> nn.Linear:
    return _resolve(model, get_adapter(model).head_path)


def embed_tokens(model: nn.Module) -> nn.Embedding:
    return _resolve(model, get_adapter(model).embed_path)
