"""Every tested family through the generic adapter: gates, the E3 search, recovery, export,
reload equality with the gated model and generate; per-layer config fields by meaning; the
head's logit transform; clear errors for what is not a decoder-only layer list."""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from e3pruner.models import export as export_mod
from e3pruner.models.activations import final_hidden
from e3pruner.models.export import export_pruned, pruned_config, remove_layers_inplace
from e3pruner.models.families import (
    UnsupportedArchitectureError,
    adapter_for_config,
    config_head_transform,
    decoder_layers,
    embed_tokens,
    final_norm,
    get_adapter,
    head_transform,
    kd_head_kwargs,
    lm_head,
)
from e3pruner.models.gates import keep_mask, set_mask
from tests.pruner.tiny_models import ALL_FAMILIES, NEW_FAMILIES, tiny_config, tiny_model

KEEPS = ([0, 2, 3, 5], [1, 2, 4, 5])  # the second drops layer 0 (DeepSeek's dense layer)


def _ids(seed=0, b=2, t=21, vocab=211):
    """Token ids; t=21 is longer than the sliding windows (8) of Gemma 2/3."""
    return torch.randint(3, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _data(seed=3):
    from e3pruner.data import TokenBlocks, tokenize_stream
    from e3pruner.methods.base import PruneData
    from tests.pruner.tiny_models import markov_text, word_tokenizer

    stream = tokenize_stream(markov_text(40, seed=seed).split("\n\n"), word_tokenizer())
    blocks = TokenBlocks(stream, 32, seed=0)
    return PruneData(calib=blocks.take(2, 0), blocks=blocks, train_start=2)


def _skipped(model, removed):
    """A copy of `model` whose layers in `removed` return their input (the manual skip)."""
    other = copy.deepcopy(model)
    for i in removed:
        decoder_layers(other)[i].forward = lambda hidden_states, *a, **k: hidden_states
    return other


@pytest.mark.parametrize("family", NEW_FAMILIES)
@torch.no_grad()
def test_adapter_and_gates(family):
    model = tiny_model(family)
    a = get_adapter(model)
    assert decoder_layers(model) is model.model.layers and final_norm(model) is model.model.norm
    assert embed_tokens(model) is model.get_input_embeddings() and lm_head(model) is model.lm_head
    assert (a.layers_path, a.base_path) == ("model.layers", "model")
    ids = _ids()
    want = model(ids).logits
    set_mask(model, torch.ones(6))
    assert torch.equal(model(ids).logits, want)  # all on == the original
    for removed in ([2], [0, 4]):
        set_mask(model, keep_mask(6, [i for i in range(6) if i not in removed]))
        got = model(ids).logits
        ref = _skipped(model, removed)
        set_mask(ref, None)
        assert torch.equal(got, ref(ids).logits)
        assert (got - want).abs().max() > 1e-2  # the layers matter


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_export_reload_equals_gated_and_generates(family, tmp_path):
    from transformers import AutoModelForCausalLM

    for case, (keep, tie, vocab) in enumerate([(KEEPS[0], False, 211), (KEEPS[1], True, 256)]):
        model = tiny_model(family, tie=tie, vocab=vocab)  # 256: a padded vocabulary
        out = export_pruned(model, keep, tmp_path / f"p{case}")
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["num_hidden_layers"] == 4 and cfg["model_type"] == family
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        assert [layer.self_attn.layer_idx for layer in reloaded.model.layers] == [0, 1, 2, 3]
        assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tie
        set_mask(model, keep_mask(6, keep))
        ids = _ids(case)
        with torch.no_grad():
            want, got = model(ids).logits, reloaded(ids).logits
        assert (want - got).abs().max().item() <= 1e-5
        prompt = ids[:1, :5]
        greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        gen, gen_gated = reloaded.generate(prompt, **greedy), model.generate(prompt, **greedy)
        assert gen.shape == (1, 11) and torch.equal(gen, gen_gated)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_e3_search_recovery_export(family, tmp_path):
    """The method API end to end: a short E3 search, recovery of the pruned student, export of
    the recovered student and reload equality with it."""
    from transformers import AutoModelForCausalLM

    from e3pruner.methods import Budget, get_method
    from e3pruner.methods.e3 import E3Config
    from e3pruner.recovery.distill import RecoveryConfig, make_student, recover

    model, data = tiny_model(family), _data()
    budget = Budget(search_tokens=2 * 32 * 4, batch_size=2, progress=False)
    sel = get_method("e3")(model, data, 2, budget, E3Config())
    assert len(sel.keep) == 4 and sel.info["steps"] == 2  # 4 less the polish's 2 batches
    assert sel.tokens == budget.search_tokens
    assert all(v == v for v in sel.scores) and all(v > 0 for v in sel.info["init_kl"])
    student = make_student(model, sel.keep)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = RecoveryConfig(tokens=2 * 32 * 2, batch_size=2, lr=1e-3, amp="bf16")  # (the teacher
    # then runs as its amp copy, checked head transform included)
    student, summary = recover(student, model, data, cfg, keep=sel.keep, progress=False)
    assert summary["steps"] == 2
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())
    out = export_pruned(student, list(range(4)), tmp_path / "recovered")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids(1)
    with torch.no_grad():
        assert (student(ids).logits - reloaded(ids).logits).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------
# Per-layer config fields, by meaning
# ------------------------------------------------------------------------------------------
def test_pruned_config_fields():
    moe = tiny_config("qwen3_moe", num_layers=8)  # MoE at (i + 1) % 2 == 0 but 3: 1, 5, 7
    new = pruned_config(moe, [0, 1, 3, 5, 6])  # kinds: dense, MoE, dense, MoE, dense
    assert (new.decoder_sparse_step, new.mlp_only_layers) == (1, [0, 2, 4])
    ds = tiny_config("deepseek_v3")
    ds.first_k_dense_replace = 3
    assert pruned_config(ds, [0, 2, 3, 5]).first_k_dense_replace == 2
    assert pruned_config(ds, [3, 4]).first_k_dense_replace == 0
    q2 = tiny_config("qwen2")  # sliding from layer 3 (max_window_layers)
    new = pruned_config(q2, [1, 2, 4])
    assert new.max_window_layers == 2
    assert new.layer_types == ["full_attention"] * 2 + ["sliding_attention"]
    g3 = tiny_config("gemma3_text", num_layers=12)
    g3.layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                      for i in range(12)]
    assert g3._sliding_window_pattern == 6
    new = pruned_config(g3, [0, 1, 2, 5, 6, 7, 8, 11])  # the pattern is broken: layer_types rule
    assert new.layer_types == ["sliding_attention"] * 3 + ["full_attention"] \
        + ["sliding_attention"] * 3 + ["full_attention"]
    assert new._sliding_window_pattern == 4  # made consistent with layer_types
    assert "_sliding_window_pattern" not in vars(pruned_config(g3, [0, 5, 11]))  # no period fits
    assert g3.num_hidden_layers == 12 and moe.decoder_sparse_step == 2  # originals untouched


def test_export_refuses_a_config_that_builds_other_layers(tmp_path, monkeypatch):
    """A per-layer field that the export did not carry over (here: the MoE period) is caught
    before anything is written."""
    monkeypatch.setattr(export_mod, "_explicit_sparse_step", lambda *a: None)
    with pytest.raises(ValueError, match=r"builds decoder layers \[0, 1\]"):
        export_pruned(tiny_model("qwen3_moe"), [1, 2, 4, 5], tmp_path / "p")
    assert not (tmp_path / "p").exists()


# ------------------------------------------------------------------------------------------
# The head's transform
# ------------------------------------------------------------------------------------------
def test_head_transforms_from_config_match_the_models_logits():
    from transformers import AutoModelForCausalLM, CohereConfig

    from e3pruner.losses import lm_nll

    cohere = AutoModelForCausalLM.from_config(CohereConfig(
        vocab_size=211, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, logit_scale=0.3)).eval()
    models = {"gemma2": tiny_model("gemma2"), "granite": tiny_model("granite"), "cohere": cohere}
    want = {"gemma2": (1.0, 5.0), "granite": (0.25, None), "cohere": (0.3, None)}
    ids = _ids(2)
    for name, model in models.items():
        assert config_head_transform(model.config) == pytest.approx(want[name])
        assert head_transform(model) == pytest.approx(want[name])  # checked on the logits
        with torch.no_grad():
            logits = model(ids).logits.float()
            nll = lm_nll(model, final_hidden(model, ids), ids)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                             ids[:, 1:].reshape(-1), reduction="none")
        assert torch.allclose(nll.reshape(-1), ce, atol=1e-5, rtol=1e-5)
    assert kd_head_kwargs(models["gemma2"]) == {"softcap": 5.0}
    assert kd_head_kwargs(models["granite"]) == {"logit_scale": 0.25}
    assert kd_head_kwargs(tiny_model("llama")) == {}


def test_kd_from_hidden_passes_the_transform_only_when_not_the_default(monkeypatch):
    import e3kernels

    from e3pruner.losses import kd_from_hidden

    seen = []
    monkeypatch.setattr(e3kernels, "fused_linear_kd_loss", lambda *a, **k: seen.append(k))
    h, w = torch.randn(2, 3, 8), torch.randn(11, 8)
    kd_from_hidden(h, w, h, reduction="sum")
    kd_from_hidden(h, w, h, reduction="sum", logit_scale=0.5, softcap=None)
    kd_from_hidden(h, w, h, reduction="sum", softcap=30.0)
    assert seen == [{"reduction": "sum"}, {"reduction": "sum", "logit_scale": 0.5},
                    {"reduction": "sum", "softcap": 30.0}]


def test_a_head_transform_the_kernel_lacks_raises():
    model = tiny_model("llama")
    model.lm_head.register_forward_hook(lambda _m, _i, out: 3.0 * out)  # not in the config
    with pytest.raises(UnsupportedArchitectureError, match="applies a transform"):
        kd_head_kwargs(model)
    lied = tiny_model("llama")
    lied.config.logits_scaling = 2.0  # llama's head ignores it: the config does not describe it
    with pytest.raises(UnsupportedArchitectureError, match="llama.*applies a transform"):
        head_transform(lied)
    biased = tiny_model("qwen3")
    biased.lm_head = nn.Linear(48, 211, bias=True)
    with pytest.raises(UnsupportedArchitectureError, match="bias"):
        kd_head_kwargs(biased)


# ------------------------------------------------------------------------------------------
# What is not a decoder-only layer list
# ------------------------------------------------------------------------------------------
def test_encoder_decoder_and_non_list_stacks_give_clear_errors():
    from transformers import LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    t5 = T5Config(d_model=16, d_ff=32, num_layers=2, num_heads=2, vocab_size=50, d_kv=8)
    with pytest.raises(UnsupportedArchitectureError, match="'t5'.*encoder-decoder"):
        adapter_for_config(t5)
    with pytest.raises(UnsupportedArchitectureError, match="'t5'"):
        get_adapter(T5ForConditionalGeneration(t5))

    class SequentialStackLlama(LlamaForCausalLM):
        pass

    model = SequentialStackLlama(tiny_config("llama"))
    model.model.layers = nn.Sequential(*model.model.layers)
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"'llama'.*one nn.ModuleList.*layers: Sequential\(6\)"):
        get_adapter(model)
    with pytest.raises(UnsupportedArchitectureError, match="not a transformers causal LM"):
        adapter_for_config(type("C", (), {"model_type": "my_custom_lm"})())


@pytest.mark.parametrize("family", ["gemma3_text", "deepseek_v3"])
def test_remove_layers_inplace_renumbers_and_matches_gated(family):
    model = tiny_model(family)
    keep = KEEPS[1]
    pruned = remove_layers_inplace(copy.deepcopy(model), keep)
    assert pruned.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2, 3]
    set_mask(model, keep_mask(6, keep))
    ids = _ids(4)
    with torch.no_grad():
        assert (model(ids).logits - pruned(ids).logits).abs().max().item() <= 1e-5


def test_every_family_is_listed():
    from e3pruner.models.families import TESTED_FAMILIES

    assert set(TESTED_FAMILIES) == set(ALL_FAMILIES)


@torch.no_grad()
def test_the_tiny_configs_make_the_special_parts_matter():
    """Gemma 2's softcap and Granite's scaling change the logits; Gemma 3's sliding window is
    shorter than the test sequences (its layer_types change the logits)."""
    ids = _ids(5)
    for family in ("gemma2", "granite"):
        model = tiny_model(family)
        raw = F.linear(final_hidden(model, ids), lm_head(model).weight)
        assert (model(ids).logits - raw).abs().max() > 0.3
    model = tiny_model("gemma3_text")
    want = model(ids).logits
    model.config.layer_types = ["full_attention"] * 6
    assert (model(ids).logits - want).abs().max() > 1e-2
