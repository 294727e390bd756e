"""Model loading and family adapters."""

from e3pruner.models.families import (
    SUPPORTED_FAMILIES,
    FamilyAdapter,
    UnsupportedArchitectureError,
    adapter_for_config,
    decoder_layers,
    embed_tokens,
    final_norm,
    get_adapter,
    lm_head,
    num_layers,
)
from e3pruner.models.loading import (
    BUNDLED_ALIASES,
    bundled_gguf_path,
    check_device,
    clear_quantizer_state,
    load_model,
    parse_dtype,
    resolve_model_path,
    save_model,
)

__all__ = [
    "BUNDLED_ALIASES", "SUPPORTED_FAMILIES", "FamilyAdapter", "UnsupportedArchitectureError",
    "adapter_for_config", "bundled_gguf_path", "check_device", "clear_quantizer_state",
    "decoder_layers",
    "embed_tokens", "final_norm", "get_adapter", "lm_head", "load_model", "num_layers",
    "parse_dtype", "resolve_model_path", "save_model",
]
