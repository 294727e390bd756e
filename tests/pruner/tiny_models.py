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
