import pytest
import torch

from e3pruner.amp import autocast, frozen_amp_copy
from e3pruner.models.activations import final_hidden
from e3pruner.models.families import decoder_layers, embed_tokens, final_norm
from e3pruner.models.gates import install_gates
from tests.pruner.tiny_models import tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [False, True])
def test_frozen_amp_copy_is_bit_identical_under_autocast(family, tie):
    model = tiny_model(family, tie=tie, seed=3)
    install_gates(model)  # the teacher of a run carries gates
    ids = torch.randint(3, 200, (2, 37))
    with torch.no_grad(), autocast("cpu", "bf16"):
        want = final_hidden(model, ids)
    twin = frozen_amp_copy(model, "bf16", list(decoder_layers(model)))
    with torch.no_grad(), autocast("cpu", "bf16"):
        got = final_hidden(twin, ids)
    assert torch.equal(got, want)
    lin = decoder_layers(twin)[0].self_attn.q_proj
    assert lin.weight.dtype == torch.bfloat16
    assert decoder_layers(model)[0].self_attn.q_proj.weight.dtype == torch.float32
    assert embed_tokens(twin).weight is embed_tokens(model).weight  # shared, not copied
    assert final_norm(twin).weight is final_norm(model).weight
    assert "forward" not in decoder_layers(twin)[0].__dict__  # no gate wrapper


def test_frozen_amp_copy_without_amp_is_the_model():
    model = tiny_model("llama")
    assert frozen_amp_copy(model, None, list(decoder_layers(model))) is model
    assert frozen_amp_copy(model, "none", list(decoder_layers(model))) is model
