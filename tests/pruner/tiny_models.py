"""Tiny random models of every tested family (fast CPU tests).

FAMILIES: the dense families the per-module tests run on; NEW_FAMILIES: the ones added with
the generic adapter (tests/pruner/models/test_families.py runs every family). Each config
makes its family's special parts matter at these sizes: Gemma 2 a final softcap (5) below the
logits' range, Gemma 3 and Mistral/Qwen2/3 sliding windows shorter than the test sequences,
Granite logits_scaling != 1, Qwen3-MoE decoder_sparse_step=2 plus mlp_only_layers, DeepSeek-V3
small MLA ranks with first_k_dense_replace=1; MoE: 4 experts, top-2.
"""

from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
NEW_FAMILIES = ("gemma2", "gemma3_text", "phi3", "olmo2", "granite", "qwen3_moe", "mixtral",
                "deepseek_v3")
ALL_FAMILIES = FAMILIES + NEW_FAMILIES


def dense_attention(common: dict) -> dict:
    """The shared settings without head_dim (MLA sets its own head dims)."""
    return {k: v for k, v in common.items() if k != "head_dim"}


def _new_family_config(family: str, common: dict, num_layers: int):
    import transformers as tf

    if family == "gemma2":
        return tf.Gemma2Config(sliding_window=8, final_logit_softcapping=5.0,
                               attn_logit_softcapping=50.0, query_pre_attn_scalar=12, **common)
    if family == "gemma3_text":
        kinds = ["sliding_attention", "sliding_attention", "full_attention"]
        return tf.Gemma3TextConfig(sliding_window=8, query_pre_attn_scalar=12,
                                   layer_types=[kinds[i % 3] for i in range(num_layers)], **common)
    if family == "phi3":
        return tf.Phi3Config(**common)
    if family == "olmo2":
        return tf.Olmo2Config(**common)
    if family == "granite":
        return tf.GraniteConfig(logits_scaling=4.0, embedding_multiplier=2.0,
                                residual_multiplier=0.5, attention_multiplier=1 / 12, **common)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 decoder_sparse_step=2, mlp_only_layers=[3], **common)
    if family == "mixtral":
        return tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                                **common)
    if family == "deepseek_v3":
        mla = dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
                   v_head_dim=12)
        return tf.DeepseekV3Config(moe_intermediate_size=32, n_routed_experts=4,
                                   num_experts_per_tok=2, n_shared_experts=1, n_group=1,
                                   topk_group=1, first_k_dense_replace=1, **mla,
                                   **{**dense_attention(common), "num_key_value_heads": 4})
    raise ValueError(f"unknown family {family!r}; known: {ALL_FAMILIES}")


def tiny_config(family: str, *, num_layers: int = 6, tie: bool = False, vocab: int = 211):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=48, intermediate_size=96,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=tie, head_dim=12,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family in NEW_FAMILIES:
        return _new_family_config(family, common, num_layers)
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
    # (matrices and MoE expert stacks; every family's hidden norms and logits stay moderate)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.mul_(8.0)
    return model.eval()


def word_tokenizer(vocab: int = 211):
    """Word-level fast tokenizer over the words w0..w{vocab-3} (+ <unk>, </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "</s>": 1}
    words.update({f"w{i}": i + 2 for i in range(vocab - 2)})
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>",
                                   pad_token="</s>")


def markov_text(n_docs: int = 300, words_per_doc: int = 120, vocab: int = 211, seed: int = 0) -> str:
    """Documents from a sparse random Markov chain (learnable structure, not noise)."""
    g = torch.Generator().manual_seed(seed)
    n = vocab - 2
    nxt = torch.randint(0, n, (n, 3), generator=g)
    docs = []
    for _ in range(n_docs):
        w = int(torch.randint(0, n, (1,), generator=g))
        out = []
        for _ in range(words_per_doc):
            out.append(f"w{w}")
            w = int(nxt[w, int(torch.randint(0, 3, (1,), generator=g))])
        docs.append(" ".join(out))
    return "\n\n".join(docs)


def tiny_model_dir(root, family: str = "llama", **kw):
    """A saved tiny model + tokenizer + train/held-out text files; returns (dir, train, heldout)."""
    from pathlib import Path

    root = Path(root)
    model = tiny_model(family, **kw)
    model.save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    (root / "train.txt").write_text(markov_text(300, seed=1))
    (root / "heldout.txt").write_text(markov_text(40, seed=2))
    return root / "model", root / "train.txt", root / "heldout.txt"


def dead_block_model(family: str = "llama", block=(2, 3)):
    """A 6-layer tiny model whose layers in `block` are identities (zero attention output
    and MLP down projections): the block any sound selection removes."""
    model = tiny_model(family, num_layers=6)
    with torch.no_grad():
        for i in block:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return model
