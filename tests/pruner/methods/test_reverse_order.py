"""Reverse-order pruning and its recovery scope "last" (partial-layer fine-tuning)."""

import pytest
import torch

from e3pruner.methods import Budget, get_method, method_recovery
from e3pruner.methods.base import keep_lowest_removed
from e3pruner.methods.reverse_order import ReverseOrderConfig
from e3pruner.recovery.distill import RecoveryConfig, make_student, recover, set_trainable
from tests.pruner.test_methods import _data
from tests.pruner.tiny_models import tiny_model

FAST = Budget(batch_size=2, progress=False)


@pytest.mark.parametrize("num_layers,n_prune,keep_last,removed", [
    (6, 2, 1, [3, 4]), (6, 2, 0, [4, 5]), (6, 2, 2, [2, 3]), (7, 3, 1, [3, 4, 5]),
    (5, 4, 1, [0, 1, 2, 3]), (5, 1, 1, [3])])
def test_removes_the_layers_before_the_last(num_layers, n_prune, keep_last, removed):
    model = tiny_model("llama", num_layers=num_layers)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sel = get_method("reverse-order")(model, _data(), n_prune, FAST,
                                      config=ReverseOrderConfig(keep_last=keep_last))
    assert sel.removed == removed and sel.num_layers == num_layers
    assert keep_lowest_removed(torch.tensor(sel.scores), n_prune) == sel.keep
    assert sel.info["segment"] == [removed[0], removed[-1] + 1] and sel.tokens == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_registered_with_the_last_layers_recovery():
    assert method_recovery("reverse-order") == {"scope": "last", "last_layers": 3}
    assert RecoveryConfig(**method_recovery("reverse-order")).scope == "last"


def test_bad_input():
    model = tiny_model("llama", num_layers=6)
    with pytest.raises(ValueError, match="before the last 2"):
        get_method("reverse-order")(model, _data(), 5, FAST, config=ReverseOrderConfig(keep_last=2))
    with pytest.raises(ValueError, match="n_prune"):
        get_method("reverse-order")(model, _data(), 0, FAST)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="keep_last"):
            ReverseOrderConfig(keep_last=bad)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="last_layers"):
            RecoveryConfig(scope="last", last_layers=bad)
    student = make_student(model, [0, 1, 2, 5])
    with pytest.raises(ValueError, match=r"keeps only 4 layers.*\[1, 4\]"):
        set_trainable(student, RecoveryConfig(scope="last", last_layers=5), [0, 1, 2, 5], 6)


def _trainable(student, cfg, keep):
    student, params = set_trainable(student, cfg, keep, 6)
    ids = {id(p) for p in params}
    assert ids == {id(p) for p in student.parameters() if p.requires_grad}
    return {n for n, p in student.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("m", [1, 3, 4])
def test_scope_last_trains_the_last_kept_layers_norm_and_head(tie, m):
    keep = [0, 1, 2, 5]
    student = make_student(tiny_model("qwen3", num_layers=6, tie=tie), keep)
    names = _trainable(student, RecoveryConfig(scope="last", last_layers=m), keep)
    layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
    assert layers == set(range(4 - m, 4))
    per_layer = {n for n, _ in student.named_parameters() if n.startswith("model.layers.3.")}
    assert per_layer <= names  # whole layers, not parts
    assert "model.norm.weight" in names
    # a tied head is the embedding (one parameter, named once); an untied one trains alone
    head = "model.embed_tokens.weight" if tie else "lm_head.weight"
    assert head in names and ("model.embed_tokens.weight" in names) == tie
    with_emb = _trainable(make_student(tiny_model("qwen3", num_layers=6, tie=tie), keep),
                          RecoveryConfig(scope="last", last_layers=m, train_embeddings=True), keep)
    assert with_emb == names | {"model.embed_tokens.weight"}


def test_recovery_with_scope_last_changes_only_that_scope():
    model = tiny_model("llama", num_layers=6)
    data = _data()
    sel = get_method("reverse-order")(model, data, 2, FAST)
    student = make_student(model, sel.keep)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = RecoveryConfig(tokens=32 * 2 * 3, batch_size=2, lr=1e-2, scope="last", last_layers=2)
    student, summary = recover(student, model, data, cfg, keep=sel.keep, progress=False)
    assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["final_loss"]))
    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trained = {k for k in before if k.startswith(("model.layers.2.", "model.layers.3."))
               and k.endswith("weight")} | {"model.norm.weight", "lm_head.weight"}
    assert changed == trained
    n_trained = sum(after[k].numel() for k in trained)
    assert summary["trainable_params"] == n_trained
