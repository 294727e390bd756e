import copy

import pytest
import torch

from e3pruner.models.export import remove_layers_inplace
from e3pruner.models.gates import gated, get_mask, install_gates, keep_mask, remove_gates, set_mask
from e3pruner.models import (UnsupportedArchitectureError, adapter_for_config, decoder_layers,
                             get_adapter)
from tests.pruner.tiny_models import FAMILIES, tiny_model


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def _ids(seed=0, b=2, t=37, vocab=211):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (b, t), generator=g)


@torch.no_grad()
def test_all_gates_on_reproduce_logits(family):
    model = tiny_model(family)
    ids = _ids()
    ref = model(ids).logits
    set_mask(model, torch.ones(6))
    out = model(ids).logits
    assert (out - ref).abs().max().item() <= 1e-5
    set_mask(model, None)
    assert torch.equal(model(ids).logits, ref)


@torch.no_grad()
def test_zero_one_mask_equals_deleting_layers(family):
    model = tiny_model(family)
    ids = _ids(1)
    keep = [0, 2, 3, 5]
    full = model(ids).logits
    set_mask(model, keep_mask(6, keep))
    gated_logits = model(ids).logits
    deleted = remove_layers_inplace(copy.deepcopy(model), keep)
    assert len(decoder_layers(deleted)) == 4
    assert deleted.config.num_hidden_layers == 4
    ref = deleted(ids).logits
    assert (gated_logits - ref).abs().max().item() <= 1e-5
    # and removing layers really changes the output (the test can fail)
    assert (gated_logits - full).abs().max().item() > 1e-2


@torch.no_grad()
def test_fractional_gate_interpolates(family):
    model = tiny_model(family)
    ids = _ids(2)
    captured = {}

    def hook(_m, _inp, out):
        captured["h"] = out[0] if isinstance(out, tuple) else out

    mask_on = torch.ones(6)
    mask_off = torch.ones(6)
    mask_off[2] = 0
    h_layer = decoder_layers(model)[2].register_forward_hook(hook)
    set_mask(model, mask_on)
    model(ids)
    on = captured["h"].clone()
    set_mask(model, mask_off)
    model(ids)
    off = captured["h"].clone()
    half = mask_on.clone()
    half[2] = 0.25
    set_mask(model, half)
    model(ids)
    mid = captured["h"].clone()
    h_layer.remove()
    torch.testing.assert_close(mid, off + 0.25 * (on - off), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_per_sample_masks(family):
    model = tiny_model(family)
    ids = _ids(3, b=3)
    masks = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 1], [0, 1, 1, 1, 1, 0]],
                         dtype=torch.float32)
    set_mask(model, masks)
    batched = model(ids).logits
    for b in range(3):
        set_mask(model, masks[b])
        single = model(ids[b:b + 1]).logits
        assert (batched[b:b + 1] - single).abs().max().item() <= 1e-5


def test_gradient_reaches_mask(family):
    model = tiny_model(family)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = _ids(4)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0], requires_grad=True)
    set_mask(model, mask)
    model(ids).logits.logsumexp(-1).mean().backward()
    assert mask.grad is not None and mask.grad.abs().min() > 0  # gated-off layer too


def test_remove_gates_restores_class_forward(family):
    model = tiny_model(family)
    keys = list(model.state_dict())
    install_gates(model)
    assert list(model.state_dict()) == keys  # no wrapper modules, same names
    assert all("forward" in layer.__dict__ for layer in decoder_layers(model))
    remove_gates(model)
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))
    assert get_mask(model) is None


@torch.no_grad()
def test_gated_context_restores_previous_mask():
    model = tiny_model("llama")
    first = keep_mask(6, [0, 1, 2, 3])
    set_mask(model, first)
    with gated(model, None):
        assert get_mask(model) is None
    assert torch.equal(get_mask(model), first)


@torch.no_grad()
def test_gated_generate_matches_mask():
    """generate() through gates (KV cache: gated-off layers still fill their cache)."""
    model = tiny_model("qwen3")
    keep = [0, 1, 3, 4]
    deleted = remove_layers_inplace(copy.deepcopy(model), keep)
    set_mask(model, keep_mask(6, keep))
    ids = _ids(5, b=1, t=6)
    a = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    b = deleted.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_bad_mask_shape_and_keep_range():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="shape"):
        set_mask(model, torch.ones(5))
    with pytest.raises(ValueError, match="range|\\[0, 5\\]"):
        keep_mask(6, [0, 6])


def test_unsupported_architecture_lists_families():
    from transformers import T5Config

    with pytest.raises(UnsupportedArchitectureError) as err:
        adapter_for_config(T5Config(d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8))
    msg = str(err.value)
    for fam in ("t5", "llama", "qwen2", "qwen3", "mistral"):
        assert fam in msg


@torch.no_grad()
def test_an_untested_family_works_through_the_generic_adapter():
    """GPT-2 keeps its layers in transformer.h and its final norm in transformer.ln_f."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=50)).eval()
    adapter = get_adapter(model)
    assert (adapter.layers_path, adapter.norm_path) == ("transformer.h", "transformer.ln_f")
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    want = remove_layers_inplace(copy.deepcopy(model), [0, 2])(ids).logits
    set_mask(model, keep_mask(3, [0, 2]))
    assert torch.allclose(model(ids).logits, want, atol=1e-5)
