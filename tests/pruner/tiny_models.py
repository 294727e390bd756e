"""Tiny random models of every supported family (fast CPU tests)."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def tiny_config(family: str, *, num_layers: int = 6, tie: bool = False, vocab: int = 211):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=48, intermediate_size=96,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=tie, head_dim=12,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(sliding_window=16, **common)
    if family == "qwen2":
        return Qwen2Config(use_sliding_window=True, sliding_window=16,
                           max_window_layers=num_layers // 2, **common)
    if family == "qwen3":
        return Qwen3Config(use_sliding_window=True, sliding_window=16,
                           max_window_layers=num_layers // 2, **common)
    raise ValueError(family)


def tiny_model(family: str, *, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw), dtype=torch.float32)
    # random init has tiny weights: scale up so that layers really change the residual stream
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(8.0)
    return model.eval()
