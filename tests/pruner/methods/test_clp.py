"""CLP: the soft segment gate, the search finding a known removable segment from far away,
and the method contract."""

import pytest
import torch

from e3pruner.models.gates import gated
from e3pruner.models.activations import final_hidden
from e3pruner.methods import Budget, PruneData, get_method
from e3pruner.methods.clp import CLPConfig, kd_loss, segment_gates
from tests.pruner.test_methods import _data
from tests.pruner.tiny_models import tiny_model

L, N = 8, 3


def _model_with_weak_segment(family, start, scale=0.01):
    """Layers [start, start + N) scaled to near-identities (o_proj, down_proj * scale)."""
    model = tiny_model(family, num_layers=L)
    with torch.no_grad():
        for i in range(start, start + N):
            model.model.layers[i].self_attn.o_proj.weight.mul_(scale)
            model.model.layers[i].mlp.down_proj.weight.mul_(scale)
    return model


def _hard_segment_losses(model, data) -> list[float]:
    """KD loss of removing [s, s + N) outright, for every start s (ground truth)."""
    ids = data.blocks.blocks[data.blocks.order[data.train_start:data.train_start + 8]]
    with torch.no_grad(), gated(model, None):
        ht = final_hidden(model, ids)
    out = []
    for s in range(L - N + 1):
        mask = torch.ones(L)
        mask[s:s + N] = 0
        with torch.no_grad(), gated(model, mask):
            hs = final_hidden(model, ids)
        out.append(kd_loss(hs, ht, model.lm_head.weight, CLPConfig()).item())
    return out


def test_gate_formula():
    a = torch.tensor(2.0, requires_grad=True)
    g = segment_gates(a, N, L, 0.05)
    assert g.shape == (L,) and g.dtype == torch.float32
    assert (g[2:5] < 1e-3).all()  # centres 2.5, 3.5, 4.5 inside [2, 5]
    assert (g[[0, 1, 5, 6, 7]] > 0.999).all()
    for t in (3.0, 1.0, 0.3, 0.05):
        for start in (0.0, 1.3, 2.5, 5.0):
            g = segment_gates(torch.tensor(start), N, L, t)
            assert ((g >= 0) & (g <= 1)).all()
            assert (1 - g).sum().item() == pytest.approx(N, abs=0.05)  # removed mass held at n
    # differentiable in a; moving the window right turns layer 1 on and layer 5 off
    g = segment_gates(a, N, L, 1.0)
    (ga,) = torch.autograd.grad(g[1] - g[5], a)
    assert ga.item() > 1e-3
    # as T -> 0: the hard mask [round(a), round(a) + n)
    hard = segment_gates(torch.tensor(3.3), N, L, 1e-3).round()
    assert hard.tolist() == [1, 1, 1, 0, 0, 0, 1, 1]
    with pytest.raises(ValueError):
        segment_gates(a, N, L, 0.0)
    with pytest.raises(ValueError):
        segment_gates(a, L + 1, L, 1.0)


@pytest.mark.parametrize("family,start,init", [("llama", 4, 0.0), ("qwen3", 1, float(L - N))])
def test_search_finds_the_weak_segment_from_far_away(family, start, init):
    model = _model_with_weak_segment(family, start)
    data = _data()
    hard = _hard_segment_losses(model, data)
    assert min(range(len(hard)), key=hard.__getitem__) == start, hard  # the known answer
    budget = Budget(search_tokens=4 * 32 * 30, batch_size=4, progress=False)
    sel = get_method("clp")(model, data, N, budget, config=CLPConfig(init=init))
    assert sel.removed == list(range(start, start + N)), sel.info["trajectory"]["a"]
    traj = sel.info["trajectory"]
    assert traj["a"][0] != init and abs(traj["a"][-1] - start) < 0.5
    assert sel.info["a_init"] == init and sel.info["start"] == start


def test_contract_and_trajectory():
    model = tiny_model("llama", num_layers=6)
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    data = _data()
    cfg = CLPConfig(min_steps=7, t_start=2.5, t_end=0.05, init="middle")
    sel = get_method("clp")(model, data, 2, Budget(search_tokens=4 * 32 * 3, batch_size=4,
                                                   progress=False), config=cfg)
    assert sel.info["steps"] == 7 and sel.tokens == 7 * 4 * 32  # min_steps wins over the budget
    s = sel.info["start"]
    assert sel.removed == [s, s + 1] and 0 <= s <= 4
    traj = sel.info["trajectory"]
    assert len(traj["a"]) == len(traj["T"]) == len(traj["loss"]) == 7
    assert traj["T"][0] == pytest.approx(2.5) and traj["T"][-1] == pytest.approx(0.05)
    assert all(x > y for x, y in zip(traj["T"], traj["T"][1:]))
    assert all(0 <= x <= 4 for x in traj["a"]) and sel.info["a_init"] == 2.0
    assert len(sel.scores) == 6 and max(sel.scores[i] for i in sel.removed) < 0.5
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    assert not any("forward" in layer.__dict__ for layer in model.model.layers)


def test_angular_init():
    model = tiny_model("qwen3", num_layers=6)
    data = _data()
    ang = get_method("angular")(model, data, 2, Budget(progress=False))
    sel = get_method("clp")(model, data, 2, Budget(batch_size=4, progress=False),
                            config=CLPConfig(min_steps=1))
    assert sel.info["a_init"] == ang.info["start"]
    assert sel.info["angular_distances"] == pytest.approx(ang.info["distances"])


def test_bad_input():
    model = tiny_model("llama", num_layers=6)
    with pytest.raises(ValueError, match="blocks"):
        get_method("clp")(model, PruneData(calib=_data().calib), 2, Budget(progress=False))
    with pytest.raises(ValueError, match="init start"):
        get_method("clp")(model, _data(), 2, Budget(progress=False), config=CLPConfig(init=4.5))
    for bad in (dict(init="nope"), dict(lr=0.0), dict(t_start=0.01, t_end=0.1), dict(min_steps=0)):
        with pytest.raises(ValueError):
            CLPConfig(**bad)
