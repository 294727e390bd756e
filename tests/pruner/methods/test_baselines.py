"""Baselines angular, ppl, taylor, sleb on tiny random models (and the shared contract
every method keeps: exactly n removed, weights, gates, requires_grad and .grad untouched)."""

import pytest
import torch

from e3pruner.models.gates import gated, get_mask, set_mask
from e3pruner.models.activations import final_hidden
from e3pruner.methods import Budget, PruneData, get_method, method_recovery
from e3pruner.angular_distance import angular_distances
from e3pruner.losses import lm_nll
from e3pruner.methods.ppl import drop_one_nll
from e3pruner.methods.sleb import candidate_nll
from tests.pruner.test_methods import DEAD, _data, _model_with_dead_layers
from tests.pruner.tiny_models import dead_block_model, tiny_model

BASELINES = ("angular", "ppl", "taylor", "sleb")
FAST = Budget(batch_size=2, progress=False)


def _gates_installed(model) -> bool:
    return any("forward" in layer.__dict__ for layer in model.model.layers)


def test_registered_with_default_recovery():
    for name in BASELINES:
        get_method(name)
        assert method_recovery(name) == {}
    assert method_recovery("clp") == {"scope": "endpoints"}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("name", BASELINES)
def test_contract_n_removed_and_model_untouched(name, family):
    model = tiny_model(family, num_layers=6)
    model.model.embed_tokens.weight.requires_grad_(False)  # a non-default flag to keep
    marker = torch.full_like(model.model.layers[0].mlp.up_proj.weight, 0.25)
    model.model.layers[0].mlp.up_proj.weight.grad = marker  # a pre-existing grad to keep
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}

    sel = get_method(name)(model, _data(), 2, FAST)

    assert len(sel.removed) == 2 and len(sel.keep) == 4 and sel.num_layers == 6
    assert sel.scores is not None and len(sel.scores) == 6
    assert all(torch.isfinite(torch.tensor(sel.scores)))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}
    assert model.model.layers[0].mlp.up_proj.weight.grad is marker
    assert all(p.grad is None for n, p in model.named_parameters() if "layers.0.mlp.up_proj" not in n)
    assert not _gates_installed(model)


@pytest.mark.parametrize("name", BASELINES)
def test_keeps_an_installed_mask(name):
    model = tiny_model("llama", num_layers=6)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 1.0])
    set_mask(model, mask)
    get_method(name)(model, _data(), 2, FAST)
    assert get_mask(model) is not None and torch.equal(get_mask(model), mask)


def _self_sampled_data(model, n=4, length=32, temp=0.7, seed=0) -> PruneData:
    """Calibration text sampled from the model itself. A random model is a poor predictor
    of any other text (dropping one of its layers may well *lower* the NLL there), but on
    its own samples E[NLL without layer l] - E[NLL] = KL(p || p without l) >= 0: the
    identity layers are then the ones whose removal costs least."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (n, 1), generator=g)
    with torch.no_grad():
        for _ in range(length - 1):
            probs = torch.softmax(model(input_ids=ids).logits[:, -1].float() / temp, -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return PruneData(calib=ids)


@pytest.mark.parametrize("name", ("ppl", "taylor", "sleb"))
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_identity_layers_are_removed(name, family):
    model = _model_with_dead_layers(family)
    sel = get_method(name)(model, _self_sampled_data(model), 2, FAST)
    assert sel.removed == list(DEAD), sel.scores
    dead = [abs(sel.scores[i]) for i in DEAD]
    live = [sel.scores[i] for i in range(6) if i not in DEAD]
    assert max(dead) < 1e-5 and min(live) > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("block", [(2, 3), (4, 5)])
def test_angular_removes_an_identity_block(family, block):
    model = dead_block_model(family, block)
    sel = get_method("angular")(model, _data(), 2, FAST)
    assert sel.removed == list(block)
    d = torch.tensor(sel.info["distances"])
    assert d.shape == (5,) and torch.isfinite(d).all()
    assert d[block[0]] < 1e-6 and (d[torch.arange(5) != block[0]] > 1e-3).all()
    # scores: the least distance of a block containing the layer; the removed ones share it
    assert sel.scores[block[0]] == sel.scores[block[1]] == min(sel.scores)


def test_angular_distance_has_no_nan_when_cos_rounds_above_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g) * 5
    raw = torch.nn.functional.cosine_similarity(x.double(), x.double(), dim=-1)
    assert (raw > 1).any()  # the case the clamp is for: arccos(raw) would be NaN
    states = torch.stack([x, x, torch.randn(64, 48, generator=g)])  # [L + 1 = 3, B, D]
    d = angular_distances(states, 1)
    assert torch.isfinite(d).all() and d[0] < 1e-6 and 0.2 < d[1] < 0.8
    assert torch.isfinite(angular_distances(states, 2)).all()
    with pytest.raises(ValueError):
        angular_distances(states, 3)


def test_lm_nll_matches_transformers_loss():
    model = tiny_model("llama", num_layers=3)
    ids = _data().calib[:2]
    with torch.no_grad(), gated(model, None):
        ours = lm_nll(model, final_hidden(model, ids), ids, chunk=17).mean()
    ref = model(input_ids=ids, labels=ids).loss
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_sleb_candidates_match_full_gated_forwards():
    """The restart-from-recorded-input shortcut gives the NLL of a plain gated forward."""
    model = tiny_model("qwen3", num_layers=5)
    calib = _data().calib[:2]
    removed = [3, 1]
    nll, current = candidate_nll(model, calib, removed, batch_size=1)
    assert sorted(nll) == [0, 2, 4]

    def full(off):
        mask = torch.ones(5)
        mask[off] = 0
        with torch.no_grad(), gated(model, mask):
            return lm_nll(model, final_hidden(model, calib), calib).mean().item()

    assert current == pytest.approx(full(removed), rel=1e-5)
    for c, v in nll.items():
        assert v == pytest.approx(full(removed + [c]), rel=1e-5)
    # round one of SLEB is the drop-one PPL criterion
    first, _ = candidate_nll(model, calib, [], batch_size=2)
    ppl, base = drop_one_nll(model, calib, batch_size=1)
    assert [first[c] for c in range(5)] == pytest.approx(ppl.tolist(), rel=1e-5)
    assert base == pytest.approx(full([]), rel=1e-5)


def test_sleb_is_greedy():
    model = tiny_model("llama", num_layers=5)
    data = _data()
    sel = get_method("sleb")(model, data, 3, FAST)
    order = sel.info["order"]
    assert sorted(order) == sel.removed
    for r, rec in enumerate(sel.info["rounds"]):
        cands = {int(k): v for k, v in rec["candidates"].items()}
        assert set(cands) == set(range(5)) - set(order[:r])
        assert rec["removed"] == order[r] == min(cands, key=lambda c: (cands[c], c))


def test_taylor_matches_full_batch_autograd():
    """Micro-batch accumulation equals one full-batch gradient of the mean token loss."""
    model = tiny_model("llama", num_layers=3)
    data = _data()
    calib = data.calib
    ours = get_method("taylor")(model, data, 1, Budget(batch_size=3, progress=False))
    loss = model(input_ids=calib, labels=calib).loss
    loss.backward()
    ref = [sum((p * p.grad).abs().sum().item() for p in layer.parameters())
           for layer in model.model.layers]
    model.zero_grad(set_to_none=True)
    assert ours.scores == pytest.approx(ref, rel=1e-4)
    with pytest.raises(ValueError, match="2 tokens"):
        get_method("taylor")(model, PruneData(calib=calib[:, :1]), 1, FAST)


@pytest.mark.parametrize("name", BASELINES + ("clp",))
def test_bad_n_prune(name):
    model = tiny_model("llama", num_layers=4)
    for bad in (0, 4, 5, -1):
        with pytest.raises(ValueError, match="n_prune"):
            get_method(name)(model, _data(), bad, FAST)
