"""vLLM loads our exports and decodes them token for token like transformers.

Two models: the bundled SmolLM2-135M (Llama) and a small random Gemma 3 text model whose
`layer_types` mix sliding and full attention, with a window shorter than prompt + output.
Needs the vLLM venv (its own torch/transformers): skipped with the command that builds it
when absent. Run:  tools/make_vllm_env.sh && python -m pytest -m vllm tests/pruner/eval/test_vllm.py
(~3-4 min on 2 cores)
"""

import pytest
import torch

from e3pruner.eval.vllm_runner import BUILD_HINT, default_venv, run_vllm

REMOVED = [4, 12, 13, 14, 15, 17, 18, 25]  # the E3 default run's 8 of 30 layers
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, a small robot",
           "Water boils at"]
NEW_TOKENS = 32

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(not (default_venv() / "bin" / "python").is_file(),
                       reason=f"no vLLM venv at {default_venv()}: build it with `{BUILD_HINT}`, "
                              "then `python -m pytest -m vllm`"),
]


def hf_greedy(model, tok, prompts, n):
    """Greedy continuations (new token ids) of each prompt: a text or a list of token ids."""
    outs = []
    for prompt in prompts:
        ids = (tok(prompt, return_tensors="pt").input_ids if isinstance(prompt, str)
               else torch.tensor([prompt]))
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=n, do_sample=False, num_beams=1,
                                 pad_token_id=tok.pad_token_id)
        outs.append(out[0, ids.shape[1]:].tolist())
    return outs


def test_vllm_matches_transformers_on_original_and_pruned(bundled, tmp_path):
    from e3pruner.models.export import export_pruned
    from e3pruner.models import load_model, resolve_model_path

    model, tok = bundled
    keep = [i for i in range(30) if i not in REMOVED]
    pruned_dir = export_pruned(model, keep, tmp_path / "pruned", tok)
    dirs = {"original": resolve_model_path("smollm2-135m"), "pruned": str(pruned_dir)}
    prompt_ids = [tok(p).input_ids for p in PROMPTS]

    answer = run_vllm({"models": dirs, "dtype": "float32", "max_model_len": 256,
                       "generate": {"prompts": prompt_ids, "max_tokens": NEW_TOKENS}})
    hf = {"original": hf_greedy(model, tok, PROMPTS, NEW_TOKENS),
          "pruned": hf_greedy(load_model(str(pruned_dir))[0], tok, PROMPTS, NEW_TOKENS)}
    for name in dirs:
        for text, want, got in zip(PROMPTS, hf[name], answer["generate"][name]):
            assert got == want, (f"{name}, prompt {text!r}:\n  transformers {tok.decode(want)!r}"
                                 f"\n  vLLM         {tok.decode(got)!r}")
    # the comparison can tell the two models apart (vLLM really loaded 22 layers)
    assert hf["original"] != hf["pruned"]
    assert sum(len(o) for o in hf["pruned"]) >= len(PROMPTS) * NEW_TOKENS // 2


# ------------------------------------------------------------------------------------------
# Sliding-window families: Gemma 3 text and Gemma 2 with mixed layer_types
# ------------------------------------------------------------------------------------------
SLIDING_WINDOW = 12
SLIDING_VOCAB = 211
S, F = "sliding_attention", "full_attention"
SLIDING_LAYERS = {"gemma3_text": [S, S, F, S, S, F, S, S], "gemma2": [S, F] * 4}
SLIDING_REMOVED = [1, 3]  # kept: s f s f s s (Gemma 3), s s s f s f (Gemma 2): no period


def sliding_model(family: str, window: int = SLIDING_WINDOW):
    """Random Gemma3ForCausalLM / Gemma2ForCausalLM: 8 layers (SLIDING_LAYERS), hidden 256,
    4 heads / 2 KV heads of head_dim 64 (sizes vLLM's CPU attention has kernels for), eos =
    the word tokenizer's </s>. Matrices are scaled x8 so that layers, and the window, change
    the greedy tokens. Gemma 3: untied head (tied, the output repeats the last input token).
    Gemma 2: tied head (vLLM's Gemma2ForCausalLM has no lm_head of its own), attention
    softcap 20, final softcap 30, final norm gain x4 so greedy margins stay >> fp32 noise."""
    import transformers as tf

    common = dict(vocab_size=SLIDING_VOCAB, hidden_size=256, intermediate_size=512,
                  num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, query_pre_attn_scalar=64, sliding_window=window,
                  layer_types=list(SLIDING_LAYERS[family]), max_position_embeddings=256,
                  tie_word_embeddings=family == "gemma2", bos_token_id=None, eos_token_id=1,
                  pad_token_id=1)
    if family == "gemma3_text":
        config = tf.Gemma3TextConfig(**common)
    else:
        config = tf.Gemma2Config(attn_logit_softcapping=20.0, final_logit_softcapping=30.0,
                                 **common)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.mul_(8.0)
        if family == "gemma2":
            model.model.norm.weight.add_(3.0)  # Gemma norms scale by (1 + weight)
    return model.eval()


@pytest.mark.parametrize("family", sorted(SLIDING_LAYERS))
def test_vllm_matches_transformers_on_sliding_window_family(family, tmp_path):
    """Prompts of 8-20 tokens, 24 new: prefill shorter and longer than the window of 12, and
    every decode step past it, on the original (through export_pruned too) and on a pruned
    export (6 of 8 layers, sliding and full ones kept)."""
    from e3pruner.models import load_model
    from e3pruner.models.export import export_pruned
    from tests.pruner.tiny_models import word_tokenizer

    new_tokens = 24
    model, tok = sliding_model(family), word_tokenizer(SLIDING_VOCAB)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, SLIDING_VOCAB, (n,), generator=gen).tolist() for n in (8, 13, 20)]
    keep = [i for i in range(8) if i not in SLIDING_REMOVED]
    original_dir = export_pruned(model, list(range(8)), tmp_path / "original", tok)
    pruned_dir = export_pruned(model, keep, tmp_path / "pruned", tok)
    pruned = load_model(str(pruned_dir))[0]
    assert pruned.config.layer_types == [SLIDING_LAYERS[family][i] for i in keep]
    assert pruned.config.sliding_window == SLIDING_WINDOW

    hf = {"original": hf_greedy(model, tok, prompts, new_tokens),
          "pruned": hf_greedy(pruned, tok, prompts, new_tokens)}
    # the inputs tell the window from none on every prompt, and the two models apart
    unwindowed = sliding_model(family, window=256)
    unwindowed.load_state_dict(model.state_dict())
    for want, full in zip(hf["original"], hf_greedy(unwindowed, tok, prompts, new_tokens)):
        assert want != full
    assert hf["original"] != hf["pruned"]
    for outs in hf.values():
        assert all(len(set(o)) > len(o) // 3 for o in outs), f"degenerate greedy output {outs}"

    dirs = {"original": str(original_dir), "pruned": str(pruned_dir)}
    answer = run_vllm({"models": dirs, "dtype": "float32", "max_model_len": 256,
                       "generate": {"prompts": prompts, "max_tokens": new_tokens}})
    for name in dirs:
        for prompt, want, got in zip(prompts, hf[name], answer["generate"][name]):
            assert got == want, (f"{family} {name}, prompt of {len(prompt)} tokens:\n  "
                                 f"transformers {want}\n  vLLM         {got}")
