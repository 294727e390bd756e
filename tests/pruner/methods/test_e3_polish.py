import pytest
import torch

from e3pruner.methods.e3 import E3Config, polish_mask, swap_candidates


class _Additive:
    """A synthetic objective: the loss of a mask is the sum of the costs of its removed
    layers, so the optimum is known (remove the cheapest) and swaps can reach it."""

    def __init__(self, cost):
        self.cost = torch.as_tensor(cost, dtype=torch.float64)
        self.evaluations, self.tokens = 0, 0
        self.seen = set()

    def loss(self, keep):
        key = tuple(sorted(keep))
        if key not in self.seen:
            self.seen.add(key)
            self.evaluations += 1
        removed = [i for i in range(len(self.cost)) if i not in set(key)]
        return float(self.cost[removed].sum())


def test_swap_candidates_closest_scores_first():
    scores = torch.tensor([5.0, 1.0, 1.1, 4.0, 0.0])
    assert swap_candidates([0, 2, 3], scores, 2) == [(2, 1), (2, 4)]
    assert len(swap_candidates([0, 2, 3], scores, 100)) == 3 * 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_polish_reaches_the_optimum_of_an_additive_objective(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 10, 6
    cost = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    scores = cost + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)  # noisy search
    keep = sorted(torch.topk(scores, k).indices.tolist())
    scorer = _Additive(cost)
    best_keep = sorted(torch.topk(cost, k).indices.tolist())
    got, rec = polish_mask(scorer, keep, scores, evals=200, width=k * (n - k))
    assert got == best_keep
    assert rec["loss_after"] == pytest.approx(scorer.loss(best_keep))
    assert rec["loss_after"] <= rec["loss_before"]
    assert len(rec["moves"]) >= (0 if keep == best_keep else 1)


def test_polish_never_worse_and_spends_at_most_its_evaluations():
    g = torch.Generator().manual_seed(3)
    cost = torch.rand(12, generator=g, dtype=torch.float64)
    scores = -cost  # the worst possible ordering
    keep = sorted(torch.topk(scores, 8).indices.tolist())
    scorer = _Additive(cost)
    got, rec = polish_mask(scorer, keep, scores, evals=5, width=8)
    assert rec["evaluations"] <= 5 and scorer.evaluations <= 5 + 1  # (+ the start mask)
    assert scorer.loss(got) <= scorer.loss(keep) and len(got) == 8


def test_e3_polish_on_a_tiny_model_lowers_the_exact_loss():
    from e3pruner.methods import Budget, get_method
    from tests.pruner.test_pipeline import _tiny_model_and_data

    model, data = _tiny_model_and_data("llama", 2)
    budget = Budget(search_tokens=2 * 32 * 3, batch_size=2, progress=False)
    sel = get_method("e3")(model, data, 2, budget, E3Config(polish_evals=6, polish_width=8))
    rec = sel.info["polish"]
    assert len(sel.keep) == 4 and rec["loss_after"] <= rec["loss_before"]
    assert 1 <= rec["evaluations"] <= 6 and rec["tokens"] == 2 * 2 * 32
    # the polish's two batches come out of the search budget
    assert sel.tokens == 2 * 32 * 3 and sel.info["steps"] == 1
    off = get_method("e3")(model, data, 2, budget, E3Config(polish_evals=0))
    assert "polish" not in off.info and off.tokens == 2 * 32 * 3 and off.info["steps"] == 3


def test_polish_config_validated():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="polish_evals"):
            E3Config(polish_evals=bad).validate()
