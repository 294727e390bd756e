"""vLLM loads our exports and decodes them token for token like transformers.

Needs the vLLM venv (its own torch/transformers): skipped with the command that builds it
when absent. Run:  tools/make_vllm_env.sh && python -m pytest -m vllm   (~2-3 min on 2 cores)
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
    outs = []
    for text in prompts:
        ids = tok(text, return_tensors="pt").input_ids
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
