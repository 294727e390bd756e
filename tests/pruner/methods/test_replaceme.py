"""ReplaceMe: the least-squares and cosine fits, the fold into down_proj, the block choice, the
weight updates in the pruned student and its export, and `compare` with both variants."""

import copy
import json
from pathlib import Path

import pytest
import torch

from e3pruner.methods import Budget, get_method, method_recovery
from e3pruner.methods.replaceme import (
    FOLD_FILE,
    ReplaceMeConfig,
    block_activations,
    cosine_fit,
    cosine_loss,
    fold_into_down_proj,
    lstsq_fit,
    outlier_rows,
    solve_lstsq,
)
from e3pruner.models.activations import layer_inputs
from e3pruner.models.export import export_pruned
from e3pruner.models.gates import gated
from e3pruner.models.weight_updates import apply_weight_updates, load_weight_updates
from e3pruner.recovery.distill import make_student
from tests.pruner.test_methods import _data
from tests.pruner.tiny_models import dead_block_model, tiny_model, tiny_model_dir

FAST = Budget(batch_size=2, progress=False)


@pytest.mark.parametrize("n,d", [(300, 17), (1000, 48), (577, 64), (65, 64)])
def test_lstsq_recovers_a_known_linear_map(n, d):
    g = torch.Generator().manual_seed(n + d)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 1
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    assert (lstsq_fit(x, x @ a) - a).abs().max().item() <= 1e-10
    # the normal equations summed over ragged chunks give the same map
    cuts = [0, n // 3, n // 3 + 7, n]
    xtx = sum(x[i:j].T @ x[i:j] for i, j in zip(cuts, cuts[1:]))
    xty = sum(x[i:j].T @ (x[i:j] @ a) for i, j in zip(cuts, cuts[1:]))
    assert (solve_lstsq(xtx, xty) - a).abs().max().item() <= 1e-10
    # a small ridge shrinks the map a little, towards 0
    ridged = lstsq_fit(x, x @ a, ridge=1e-6)
    assert 0 < (ridged - a).abs().max().item() <= 1e-2 and ridged.norm() < a.norm()


def test_lstsq_is_the_least_squares_solution_with_noise():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 24, generator=g, dtype=torch.float64)
    a = torch.randn(24, 24, generator=g, dtype=torch.float64)
    y = x @ a + torch.randn(400, 24, generator=g, dtype=torch.float64)
    want = torch.linalg.lstsq(x, y).solution
    assert (lstsq_fit(x, y) - want).abs().max().item() <= 1e-10
    with pytest.raises(ValueError, match="singular"):
        lstsq_fit(torch.zeros(10, 4, dtype=torch.float64), torch.ones(10, 4, dtype=torch.float64))


def test_cosine_fit_lowers_the_cosine_loss_and_ignores_row_scale():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2000, 16, generator=g)
    a = torch.eye(16) + 0.5 * torch.randn(16, 16, generator=g)
    y = (x @ a) * torch.rand(2000, 1, generator=g).add(0.1)  # rows rescaled: same directions
    eye = torch.eye(16, dtype=torch.float64)
    t, losses = cosine_fit(x, y, eye, steps=200, lr=2e-2, batch=256, seed=0)
    start, end = float(cosine_loss(x, y)), float(cosine_loss(x @ t.float(), y))
    assert losses[0] == pytest.approx(start, abs=0.05) and end < 0.05 * start
    again, _ = cosine_fit(x, y, eye, steps=200, lr=2e-2, batch=256, seed=0)
    assert torch.equal(t, again)  # seeded minibatches


def test_fold_into_down_proj_multiplies_the_mlp_output_by_t():
    model = tiny_model("llama", num_layers=2).double()
    mlp = model.model.layers[0].mlp
    g = torch.Generator().manual_seed(3)
    t = torch.randn(48, 48, generator=g, dtype=torch.float64)
    h = torch.randn(3, 7, 48, generator=g, dtype=torch.float64)
    with torch.no_grad():
        want = mlp(h) @ t
        folded = copy.deepcopy(mlp)
        folded.down_proj.weight.copy_(fold_into_down_proj(mlp.down_proj.weight, t))
        assert (folded(h) - want).abs().max().item() <= 1e-10 * want.abs().max().item()
    assert fold_into_down_proj(mlp.down_proj.weight.float(), t).dtype == torch.float32


@pytest.mark.parametrize("name", ["replaceme", "replaceme-cosine"])
def test_an_identity_block_is_found_and_replaced_exactly(name):
    model = dead_block_model("qwen3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = ReplaceMeConfig(objective="lstsq" if name == "replaceme" else "cosine", ridge=0.0)
    sel = get_method(name)(model, _data(), 2, FAST, config=cfg)
    assert sel.removed == [2, 3] and sel.info["start"] == 2 and sel.info["fold_layer"] == 1
    assert sel.info["distances"][2] == pytest.approx(0.0, abs=1e-6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("forward" in layer.__dict__ for layer in model.model.layers)  # no gates
    (key, w), = sel.info["weight_updates"].items()
    assert key == "model.layers.1.mlp.down_proj.weight"
    # Y = h_4 - h_2 + M = M: the map is the identity, the fold changes nothing
    tol = 1e-4 if name == "replaceme" else 2e-2
    original = model.model.layers[1].mlp.down_proj.weight
    assert (w - original).abs().max().item() <= tol * w.abs().max().item()


def test_lstsq_fold_matches_an_independent_fit_on_a_real_block():
    model = tiny_model("llama", num_layers=6)
    data = _data()
    sel = get_method("replaceme")(model, data, 2, FAST)
    s = sel.info["start"]
    assert 1 <= s <= 4 and sel.removed == [s, s + 1]
    assert s == 1 + min(range(4), key=lambda i: sel.info["distances"][i + 1])
    # X, Y again from layer_inputs and plain hooks on the MLP of layer s-1 and the final norm
    box = {}
    mlp = model.model.layers[s - 1].mlp
    h1 = mlp.register_forward_hook(lambda _m, _a, out: box.setdefault("m", out))
    h2 = model.model.norm.register_forward_pre_hook(lambda _m, a: box.setdefault("final", a[0]))
    with torch.no_grad():
        inputs, _ = layer_inputs(model, data.calib)
    h1.remove()
    h2.remove()
    end = (inputs + [box["final"]])[s + 2]
    m = box["m"].reshape(-1, 48).double()
    y = (end - inputs[s]).reshape(-1, 48).double() + m
    t = lstsq_fit(m, y, ridge=ReplaceMeConfig().ridge)
    want = fold_into_down_proj(model.model.layers[s - 1].mlp.down_proj.weight, t)
    (w,) = sel.info["weight_updates"].values()
    assert (w - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    assert sel.info["fit"]["rel_sq_error"] < sel.info["fit"]["rel_sq_error_identity"]


def test_cosine_variant_improves_the_cosine_of_the_block_output():
    model = tiny_model("llama", num_layers=6)
    sel = get_method("replaceme-cosine")(model, _data(), 2, FAST)
    c = sel.info["cosine_loss"]
    assert c["first_step"] == pytest.approx(c["identity"], abs=0.05)  # starts at T = I
    assert c["fitted"] < 0.8 * c["identity"]
    assert sel.info["fit"]["rel_sq_error"] < sel.info["fit"]["rel_sq_error_identity"]


def _kl(p_logits, q_logits):
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.parametrize("family,tie", [("llama", False), ("qwen3", True), ("mistral", False)])
def test_export_of_the_folded_student_equals_the_in_memory_model(family, tie, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, num_layers=6, tie=tie)
    data = _data()
    budget = Budget(batch_size=8, progress=False, run_dir=str(tmp_path / "run"),
                    search_tokens=32 * 40)  # calibration + 40 training blocks for the fit
    sel = get_method("replaceme")(model, data, 2, budget)
    assert sel.tokens == 32 * 44
    path = sel.info["weight_updates"]
    assert path == str(tmp_path / "run" / FOLD_FILE) and Path(path).is_file()
    json.dumps(sel.info)  # the Selection stays JSON (compare's state.json)
    student = apply_weight_updates(make_student(model, sel.keep), path, sel.keep)
    (key, w), = load_weight_updates(path).items()
    new = sel.keep.index(sel.info["fold_layer"])
    assert torch.equal(student.model.layers[new].mlp.down_proj.weight, w)
    out = export_pruned(student, list(range(len(sel.keep))), tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(reloaded.model.layers[new].mlp.down_proj.weight, w)
    ids = data.blocks.take(8, 150)  # blocks the fit did not see
    with torch.no_grad():
        got, want, full = reloaded(ids).logits, student(ids).logits, model(ids).logits
        with gated(model, sel.mask()):
            plain = model(ids).logits
    assert (got - want).abs().max().item() <= 1e-5
    assert _kl(full, want) < 0.95 * _kl(full, plain)  # the map beats dropping the block


def test_weight_updates_bad_input(tmp_path):
    model = tiny_model("llama", num_layers=6)
    w = model.model.layers[1].mlp.down_proj.weight.clone()
    student = make_student(model, [0, 1, 4, 5])
    with pytest.raises(ValueError, match="removed layer 2"):
        apply_weight_updates(student, {"model.layers.2.mlp.down_proj.weight": w}, [0, 1, 4, 5])
    with pytest.raises(ValueError, match="shape"):
        apply_weight_updates(student, {"model.layers.1.mlp.down_proj.weight": w.T}, [0, 1, 4, 5])
    with pytest.raises(ValueError, match="pruned student"):
        apply_weight_updates(copy.deepcopy(model), {}, [0, 1, 4, 5])
    with pytest.raises(FileNotFoundError, match="missing"):
        apply_weight_updates(student, str(tmp_path / "nope.safetensors"), [0, 1, 4, 5])
    for kw, msg in (({"objective": "l1"}, "objective"), ({"ridge": -1.0}, "ridge"),
                    ({"cosine_steps": 0}, "cosine_steps"),
                    ({"cosine_init": "zeros"}, "cosine_init")):
        with pytest.raises(ValueError, match=msg):
            ReplaceMeConfig(**kw)
    with pytest.raises(ValueError, match="n_prune"):
        get_method("replaceme")(model, _data(), 6, FAST)
    assert method_recovery("replaceme") == {} and method_recovery("replaceme-cosine") == {}


def test_compare_runs_both_methods_and_exports_the_fold(tmp_path):
    from transformers import AutoModelForCausalLM

    from e3pruner.compare import CompareArgs, run_compare
    from e3pruner.models import load_model

    model_dir, train, held = tiny_model_dir(tmp_path, "llama")
    args = CompareArgs(methods="reverse-order,replaceme,replaceme-cosine", model=str(model_dir),
                       data=str(train), heldout=str(held), block_len=32, batch_size=2,
                       calib_blocks=4, search_tokens=32 * 2 * 2, recovery_tokens=0,
                       eval_tokens=300, eval_ctx=64, zeroshot_limit=0, prune_layers=2,
                       out=str(tmp_path / "cmp"), progress=False, amp="none", export=True)
    report = run_compare(args, log=lambda *_: None)
    assert report["methods"]["reverse-order"]["removed_layers"] == [3, 4]
    assert report["methods"]["reverse-order"]["recovery_scope"] == "last"
    teacher, _ = load_model(str(model_dir))
    ids = torch.randint(3, 211, (2, 21), generator=torch.Generator().manual_seed(6))
    for name in ("replaceme", "replaceme-cosine"):
        m = report["methods"][name]
        keep = [i for i in range(6) if i not in m["removed_layers"]]
        fold = tmp_path / "cmp" / name / FOLD_FILE
        want_model = apply_weight_updates(make_student(teacher, keep), str(fold), keep)
        reloaded = AutoModelForCausalLM.from_pretrained(m["export"]).eval()
        with torch.no_grad():
            assert (reloaded(ids).logits - want_model(ids).logits).abs().max().item() <= 1e-5
            assert m["ppl_before_recovery"] == pytest.approx(m["ppl_after_recovery"])


def test_outlier_rows_are_the_massive_ones_only():
    g = torch.Generator().manual_seed(7)
    y = torch.randn(500, 32, generator=g, dtype=torch.float64)
    y[[0, 17, 250]] *= 300
    assert outlier_rows(y, 10.0).nonzero().flatten().tolist() == [0, 17, 250]
    assert not outlier_rows(y, None).any()
    for bad in (1.0, 0.5, float("inf")):
        with pytest.raises(ValueError, match="outlier_factor"):
            ReplaceMeConfig(outlier_factor=bad)


def _sink_model(start=2, scale=300.0):
    """A tiny Llama whose layer `start` adds a massive vector to the first token's hidden
    state (an attention sink created inside the block [start, start+2), as in SmolLM2)."""
    model = tiny_model("llama", num_layers=6)
    v = torch.randn(48, generator=torch.Generator().manual_seed(8))
    v = v / v.norm() * scale

    def add_sink(_mod, _args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, 0] += v
        return (h, *out[1:]) if isinstance(out, tuple) else h

    model.model.layers[start].register_forward_hook(add_sink)
    return model


@pytest.mark.parametrize("start,fit_blocks", [(2, 40), (3, 80)])
def test_a_sink_made_inside_the_block_does_not_spoil_the_map(start, fit_blocks):
    """The SmolLM2 failure: the sink rows (|Y| ~ 300x the rest) dominate the least squares,
    so the map fits them and leaks into every other token; with outlier_factor they are
    left as plain removal leaves them and the map fits the other tokens."""
    model, data = _sink_model(start), _data()
    fit_sets = [data.blocks.take(fit_blocks, 4)]
    held = [data.blocks.take(40, 4 + fit_blocks)]
    ridge = ReplaceMeConfig().ridge
    maps = {}
    for factor in (None, 10.0):
        sums, _, _ = block_activations(model, fit_sets, start, 2, 8, False, factor)
        maps[factor] = solve_lstsq(*sums.system(), ridge)
    sums, x, y = block_activations(model, held, start, 2, 8, True, 10.0)
    assert sums.rows_o == 40 and sums.yty_o > 0.9 * (sums.yty_o + sums.yty_n)  # one per block
    out = torch.zeros(40, 32, dtype=torch.bool)
    out[:, 0] = True
    x, y, out = x.double(), y.double(), out.flatten()

    def rel_err(t, rows):
        return float(((x[rows] @ t - y[rows]) ** 2).sum() / (y[rows] ** 2).sum())

    eye = torch.eye(48, dtype=torch.float64)
    fixed, unfixed, plain = (rel_err(t, ~out) for t in (maps[10.0], maps[None], eye))
    assert fixed < 0.95 * plain  # the map helps the ordinary tokens on unseen blocks
    assert unfixed > 1.5 * plain  # without the fix the sink rows spoil it (SmolLM2)
    # the sink tokens stay near plain removal (X T ~ X), not near the massive target
    assert rel_err(maps[10.0], out) < 0.5 < 2 < rel_err(maps[None], out)
