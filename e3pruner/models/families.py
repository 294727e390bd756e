"""Family adapters: where a causal LM keeps its decoder layers, final norm, embedding and head,
and which transform its head applies to the logits.

Any transformers decoder-only causal LM whose decoder layers form one nn.ModuleList works
without a hand-written entry: `get_adapter(model)` finds the paths in the module tree (the
base model `model.get_decoder()`, the one nn.ModuleList of `num_hidden_layers` layers
directly under it, its final norm attribute, `get_input_embeddings()`,
`get_output_embeddings()`) and caches them per model class. `adapter_for_config(config)`
checks from the config alone that the model can be one (decoder-only, a model type
AutoModelForCausalLM knows). `_EXPLICIT` holds an entry only for a family that needs special
handling (none of the tested families does). Per-layer config fields are handled on export
by meaning, not by family (`models/export.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class FamilyAdapter:
    """Dotted paths from the *CausalLM* module to its parts.

    base_path: the decoder stack without the head (its output is the normed final hidden
    state); layers_path: the nn.ModuleList of decoder layers; norm_path / embed_path /
    head_path: final norm, token embedding and LM head.
    """

    model_type: str
    base_path: str = "model"
    layers_path: str = "model.layers"
    norm_path: str = "model.norm"
    embed_path: str = "model.embed_tokens"
    head_path: str = "lm_head"
    notes: str = ""


# Families that the fast suite runs through gates, the E3 search, recovery, export, reload
# equality and generate (tests/pruner/models/test_families.py): model_type -> what it covers.
TESTED_FAMILIES: dict[str, str] = {
    "llama": "Llama 2/3, SmolLM, TinyLlama",
    "mistral": "Mistral 7B (sliding window)",
    "qwen2": "Qwen2, Qwen2.5 (max_window_layers)",
    "qwen3": "Qwen3 dense",
    "gemma2": "Gemma 2 (sliding/full layer_types, final logit softcapping)",
    "gemma3_text": "Gemma 3 text (sliding/full layer_types, Gemma 3 270M/1B)",
    "phi3": "Phi-3, Phi-4 (fused qkv and gate_up projections)",
    "olmo2": "OLMo 2 (post-norm layers)",
    "granite": "Granite 3 (logits_scaling, residual/embedding multipliers)",
    "qwen3_moe": "Qwen3-MoE (decoder_sparse_step, mlp_only_layers)",
    "mixtral": "Mixtral (MoE)",
    "deepseek_v3": "DeepSeek-V3 (MLA + MoE, first_k_dense_replace)",
}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(TESTED_FAMILIES)

# model_type -> adapter, only where the discovery below cannot find the parts.
_EXPLICIT: dict[str, FamilyAdapter] = {}

_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm", "norm_f")
_DISCOVERED: dict[type, FamilyAdapter] = {}
_HEAD_TRANSFORM = "_e3_head_transform"
_HOW_TO_ADD = ("see 'Model families' in the README for how to add one (an explicit "
               "FamilyAdapter entry in e3pruner/models/families.py)")


class UnsupportedArchitectureError(ValueError):
    pass


def _resolve(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def adapter_for_config(config) -> FamilyAdapter:
    """The adapter of a config's family (paths are discovered on the model by `get_adapter`).

    Raises UnsupportedArchitectureError, naming the model type, for an encoder-decoder model
    or a model type that AutoModelForCausalLM has no class for.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    archs = getattr(config, "architectures", None)
    tested = ", ".join(SUPPORTED_FAMILIES)
    if model_type in _EXPLICIT:
        return _EXPLICIT[model_type]
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"unsupported architecture: model_type={model_type!r} (architectures={archs}) is an "
            "encoder-decoder model; e3pruner prunes the decoder layers of decoder-only causal "
            f"LMs (tested families: {tested}). Use a decoder-only checkpoint.")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture: model_type={model_type!r} (architectures={archs}) is "
            "not a transformers causal LM (AutoModelForCausalLM has no class for it). Any "
            f"decoder-only causal LM of transformers works; tested families: {tested}. For a "
            f"model outside transformers, {_HOW_TO_ADD}.")
    return FamilyAdapter(model_type, notes=TESTED_FAMILIES.get(model_type, ""))


def _path_of(model: nn.Module, module: nn.Module | None, what: str, model_type) -> str:
    if module is not None:
        for name, m in model.named_modules():
            if m is module and name:
                return name
    raise UnsupportedArchitectureError(
        f"{type(model).__name__} (model_type={model_type!r}): cannot find its {what} in the "
        f"module tree; {_HOW_TO_ADD}.")


def _discover(model: nn.Module, model_type: str) -> FamilyAdapter:
    """Paths of the base model, its one ModuleList of num_hidden_layers layers, final norm,
    embedding and head."""
    name = f"{type(model).__name__} (model_type={model_type!r})"
    get_decoder = getattr(model, "get_decoder", None)
    base = get_decoder() if callable(get_decoder) else getattr(model, "base_model", None)
    if base is None or base is model:
        raise UnsupportedArchitectureError(
            f"{name}: expected a causal LM with a head around a base model (e.g. "
            "AutoModelForCausalLM, not AutoModel)")
    base_path = _path_of(model, base, "base model", model_type)
    n = getattr(_text_config(model.config), "num_hidden_layers", None)
    lists = [(k, m) for k, m in base.named_children()
             if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(lists) > 1:
        named = [x for x in lists if x[0] in ("layers", "h", "blocks")]
        lists = named if len(named) == 1 else lists
    if len(lists) != 1:
        kids = ", ".join(f"{k}: {type(m).__name__}"
                         + (f"({len(m)})" if isinstance(m, (nn.ModuleList, nn.Sequential)) else "")
                         for k, m in base.named_children())
        found = "several" if lists else "no"
        raise UnsupportedArchitectureError(
            f"{name}: e3pruner needs the decoder layers in one nn.ModuleList of "
            f"num_hidden_layers={n} layers directly under {type(base).__name__}; found {found} "
            f"({kids}); {_HOW_TO_ADD}.")
    norm = next((getattr(base, k) for k in _NORM_NAMES
                 if isinstance(getattr(base, k, None), nn.Module)), None)
    head = model.get_output_embeddings()
    if not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
        raise UnsupportedArchitectureError(f"{name}: its output embedding is not a linear head "
                                           f"with a [vocab, hidden] weight; {_HOW_TO_ADD}.")
    return FamilyAdapter(
        model_type, base_path=base_path, layers_path=f"{base_path}.{lists[0][0]}",
        norm_path=_path_of(model, norm, "final norm (after the decoder layers)", model_type),
        embed_path=_path_of(model, model.get_input_embeddings(), "input embedding", model_type),
        head_path=_path_of(model, head, "LM head", model_type),
        notes=TESTED_FAMILIES.get(model_type, ""))


def get_adapter(model: nn.Module) -> FamilyAdapter:
    """The paths of `model`'s parts: an explicit entry, else discovered (cached per class)."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no .config: pass a transformers causal LM")
    adapter = adapter_for_config(config)
    if adapter.model_type in _EXPLICIT:
        return adapter
    cls = type(model)
    if cls not in _DISCOVERED:
        _DISCOVERED[cls] = _discover(model, adapter.model_type)
    return _DISCOVERED[cls]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The nn.ModuleList of decoder layers of a supported causal LM."""
    layers = _resolve(model, get_adapter(model).layers_path)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} (model_type={model.config.model_type!r}): expected an "
            f"nn.ModuleList of decoder layers, found {type(layers).__name__}")
    return layers


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack without the head (e.g. LlamaModel), whose output is normed."""
    return _resolve(model, get_adapter(model).base_path)


def final_norm(model: nn.Module) -> nn.Module:
    return _resolve(model, get_adapter(model).norm_path)


def lm_head(model: nn.Module) -> nn.Linear:
    return _resolve(model, get_adapter(model).head_path)


def embed_tokens(model: nn.Module) -> nn.Embedding:
    return _resolve(model, get_adapter(model).embed_path)


# ------------------------------------------------------------------------------------------
# The head's logit transform
# ------------------------------------------------------------------------------------------
def config_head_transform(config) -> tuple[float, float | None]:
    """(logit_scale s, softcap c) that the config's head applies to r = h W^T:
    z = c tanh(s r / c), or s r without a softcap. From `final_logit_softcapping` (Gemma 2/3),
    `logit_scale` (Cohere: multiplies) and `logits_scaling` (Granite: divides)."""
    cfg = _text_config(config)
    scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:
        scale /= float(cfg.logits_scaling)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return scale, (float(cap) if cap else None)


def apply_head_transform(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """z = c tanh(s r / c) (softcap c) or s r, elementwise on raw logits r = h W^T."""
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _probe_ids(model: nn.Module, vocab: int) -> torch.Tensor:
    device = embed_tokens(model).weight.device
    return torch.linspace(0, vocab - 1, 7).long().reshape(1, -1).to(device)


@torch.no_grad()
def _check_head_transform(model: nn.Module, scale: float, softcap: float | None) -> None:
    """Compare the model's logits on a few tokens with transform(final_hidden W^T + b)."""
    from e3pruner.models.gates import all_gates_on

    head = lm_head(model)
    model_type = getattr(model.config, "model_type", None)
    ids = _probe_ids(model, head.weight.shape[0])
    training = model.training
    model.eval()
    try:
        with all_gates_on(model), torch.autocast(ids.device.type, enabled=False):
            logits = model(input_ids=ids, use_cache=False).logits.float()
            hidden = base_model(model)(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        model.train(training)
    bias = None if getattr(head, "bias", None) is None else head.bias.float()
    want = apply_head_transform(F.linear(hidden.float(), head.weight.float(), bias), scale, softcap)
    low = head.weight.dtype not in (torch.float32, torch.float64)
    tol = 3e-2 if low else 1e-4
    err = float("inf") if want.shape != logits.shape else float(
        (want - logits).norm() / logits.norm().clamp_min(1e-12))
    if not err <= tol:
        raise UnsupportedArchitectureError(
            f"the head of {model_type} applies a transform the fused KD loss does not implement: "
            f"its logits {tuple(logits.shape)} differ from softcap(scale * h W^T) "
            f"{tuple(want.shape)} with scale={scale}, softcap={softcap} (from the config) by "
            f"{err:.2e} relative (> {tol}). Add the transform to "
            "e3pruner.models.families.config_head_transform if the kernel has it.")


def head_transform(model: nn.Module) -> tuple[float, float | None]:
    """(logit_scale, softcap) of `model`'s head (config_head_transform), checked once per
    model against its own logits on a few tokens: a head that does something else raises
    UnsupportedArchitectureError instead of letting a loss compute a different objective."""
    cached = model.__dict__.get(_HEAD_TRANSFORM)
    if cached is not None:
        return cached
    transform = config_head_transform(model.config)
    _check_head_transform(model, *transform)
    object.__setattr__(model, _HEAD_TRANSFORM, transform)
    return transform


def kd_head_kwargs(model: nn.Module) -> dict:
    """The keyword arguments of the e3kernels KD losses for `model`'s head transform: {} for
    a plain head (the kernels are called exactly as before), else logit_scale / softcap."""
    head = lm_head(model)
    if getattr(head, "bias", None) is not None:
        raise UnsupportedArchitectureError(
            f"the head of {model.config.model_type} has a bias, which the fused KD loss does "
            "not implement")
    scale, softcap = head_transform(model)
    out = {}
    if scale != 1.0:
        out["logit_scale"] = scale
    if softcap is not None:
        out["softcap"] = softcap
    return out
