import pytest
import torch

from e3pruner.data import TokenBlocks
from e3pruner.methods import Budget, PruneData, available_methods, get_method
from e3pruner.methods.base import check_n_prune, keep_lowest_removed
from e3pruner.methods.e3 import (
    E3Config,
    curriculum_pruned,
    init_logits,
    plackett_luce_log_prob,
    skip_one_kl,
)
from tests.pruner.tiny_models import markov_text, tiny_model, word_tokenizer

DEAD = (1, 4)  # layers made exact identities


def _model_with_dead_layers(family="llama"):
    model = tiny_model(family, num_layers=6)
    with torch.no_grad():
        for i in DEAD:
            layer = model.model.layers[i]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        # make the live layers matter
        for i in (2, 3):
            model.model.layers[i].mlp.down_proj.weight.mul_(3.0)
    return model


def _data(block_len=32):
    tok = word_tokenizer()
    from e3pruner.data import tokenize_stream

    stream = tokenize_stream(markov_text(60, seed=3).split("\n\n"), tok)
    blocks = TokenBlocks(stream, block_len, seed=0)
    return PruneData(calib=blocks.take(4, 0), blocks=blocks, train_start=4)


def test_registry():
    assert {"e3", "shortgpt"} <= set(available_methods())
    with pytest.raises(ValueError, match="available"):
        get_method("nope")


def test_skip_one_kl_is_zero_for_identity_layers():
    model = _model_with_dead_layers()
    kl = skip_one_kl(model, _data().calib, batch_size=2, progress=False)
    assert kl.shape == (6,)
    for i in DEAD:
        assert kl[i] < 1e-6
    assert all(kl[i] > 1e-3 for i in range(6) if i not in DEAD)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shortgpt_finds_identity_layers(family):
    model = _model_with_dead_layers(family)
    sel = get_method("shortgpt")(model, _data(), 2, Budget(progress=False))
    assert sel.removed == list(DEAD)
    assert sel.scores[1] < 1e-6 and sel.scores[4] < 1e-6


@pytest.mark.parametrize("estimator,batch", [("score", 4), ("st", 2)])
def test_e3_search_finds_identity_layers_from_uninformed_init(estimator, batch):
    """With init='zeros' (no prior), the search alone must discover the two removable layers."""
    model = _model_with_dead_layers()
    data = _data()
    cfg = E3Config(init="zeros", estimator=estimator, curriculum=0.3)
    sel = get_method("e3")(model, data, 2, Budget(search_tokens=batch * 32 * 40,
                                                  batch_size=batch, progress=False), config=cfg)
    assert sel.removed == list(DEAD), sel.scores
    assert all(p.requires_grad for p in model.parameters())  # restored after the search


def test_curriculum_and_init():
    assert [curriculum_pruned(s, 10, 4, 0.5) for s in range(10)] == [1, 1, 2, 2, 3, 4, 4, 4, 4, 4]
    assert curriculum_pruned(0, 10, 1, 0.5) == 1
    a = init_logits(torch.tensor([1e-3, 1.0, 10.0, 0.0]), 2.0)
    assert a.argmax() == 2 and a.argmin() == 3 and torch.isfinite(a).all()


def test_keep_lowest_removed_and_checks():
    assert keep_lowest_removed(torch.tensor([0.5, 0.1, 0.9, 0.1]), 2) == [0, 2]
    for bad in (0, 6, 2.5):
        with pytest.raises(ValueError, match="n_prune"):
            check_n_prune(bad, 6)


def test_plackett_luce_log_prob_sums_to_one():
    import itertools

    alpha = torch.tensor([0.3, -1.2, 2.0, 0.1, -0.4], requires_grad=True)
    orders = torch.tensor(list(itertools.permutations(range(5), 3)))
    p = plackett_luce_log_prob(alpha, orders).exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)
    first = torch.softmax(alpha.detach(), 0)
    direct = first[2] * first[0] / (1 - first[2]) * first[4] / (1 - first[2] - first[0])
    i = [tuple(o) for o in orders.tolist()].index((2, 0, 4))
    assert p[i].item() == pytest.approx(direct.item(), rel=1e-5)
    p.sum().backward()
    assert alpha.grad.abs().max() < 1e-4  # total probability does not depend on alpha
