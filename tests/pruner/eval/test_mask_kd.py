import pytest
import torch

from e3pruner.eval.mask_kd import MaskKDScorer
from e3pruner.losses import kd_from_hidden
from e3pruner.models.activations import final_hidden
from e3pruner.models.families import lm_head
from e3pruner.models.gates import gated, keep_mask
from tests.pruner.tiny_models import tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mask_loss_equals_the_gated_model_against_the_full_one(family):
    model = tiny_model(family, seed=5)
    ids = torch.randint(3, 200, (5, 24), generator=torch.Generator().manual_seed(1))
    scorer = MaskKDScorer(model, ids, batch_size=2)  # ragged chunks: 2 + 2 + 1
    with torch.no_grad():
        for keep in ([0, 2, 3, 5], [1, 2, 3, 4, 5], [0, 1, 2, 3, 4]):
            want = 0.0
            for chunk in ids.split(2):  # entropy weights are normalized within a chunk
                ht = final_hidden(model, chunk)
                with gated(model, keep_mask(6, keep)):
                    hs = final_hidden(model, chunk)
                want += float(kd_from_hidden(hs, lm_head(model).weight, ht,
                                             weighting="entropy", reduction="sum").loss)
            assert scorer.loss(keep) == pytest.approx(want / ids.numel(), rel=1e-5, abs=1e-7)
    assert scorer.loss(range(6)) == 0.0
    n = scorer.evaluations
    scorer.loss([5, 3, 2, 0])  # cached, in any order
    assert scorer.evaluations == n and scorer.tokens == ids.numel()


def test_mask_loss_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        MaskKDScorer(model, torch.randint(3, 200, (24,)))
    scorer = MaskKDScorer(model, torch.randint(3, 200, (1, 8)))
    for bad in ([], [0, 0, 1], [0, 6], [-1, 2]):
        with pytest.raises(ValueError, match="distinct layer indices"):
            scorer.loss(bad)
