import math

import pytest
import torch
import torch.nn.functional as F

from e3pruner.eval.perplexity import _windows, perplexity
from tests.pruner.tiny_models import tiny_model


@pytest.mark.parametrize("n,ctx,stride", [(100, 16, None), (97, 16, None), (100, 16, 5),
                                          (33, 8, 8), (50, 50, 10), (2, 4, None)])
def test_windows_score_each_token_once(n, ctx, stride):
    scored = []
    for b, e, s in _windows(n, ctx, stride):
        assert e - b <= ctx and b < s <= e
        scored += list(range(s, e))
    assert scored == list(range(1, n))


@torch.no_grad()
def test_perplexity_matches_direct_computation():
    model = tiny_model("llama")
    stream = torch.randint(3, 211, (150,), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, stream, ctx_len=50, batch_size=2, progress=False)
    nll, count = 0.0, 0
    for b in range(0, 149, 49):
        chunk = stream[b:b + 50][None]
        logits = model(chunk).logits
        nll += F.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    assert res["tokens"] == count
    assert math.isclose(res["ppl"], math.exp(nll / count), rel_tol=1e-5)


@torch.no_grad()
def test_strided_perplexity_uses_more_context():
    model = tiny_model("qwen3")
    stream = torch.randint(3, 211, (200,), generator=torch.Generator().manual_seed(1))
    a = perplexity(model, stream, ctx_len=40, progress=False)
    b = perplexity(model, stream, ctx_len=40, stride=10, progress=False)
    assert a["tokens"] == b["tokens"] == 199
    assert a["ppl"] != b["ppl"]


def test_perplexity_bad_args():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="ctx_len"):
        perplexity(model, torch.arange(10), ctx_len=1)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, torch.arange(10), ctx_len=4, stride=9)
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(model, "heldout")
