import pytest
import torch

from e3pruner.models.activations import final_hidden, hidden_from, layer_inputs, on_outputs
from e3pruner.models.families import decoder_layers
from e3pruner.models.gates import gated
from e3pruner.models.teacher_prefix import student_and_teacher_hidden
from tests.pruner.tiny_models import tiny_model

IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
@pytest.mark.parametrize("removed", [(), (2,), (1, 4)])
def test_restart_from_a_recorded_input_is_the_full_forward(removed):
    model = tiny_model("llama", num_layers=6).eval()
    mask = torch.ones(6)
    mask[list(removed)] = 0
    with gated(model, mask):
        full = final_hidden(model, IDS)
    inputs, out = layer_inputs(model, IDS, removed)
    assert torch.equal(out, full)
    for p in range(6):
        if p in removed:
            continue
        assert torch.allclose(hidden_from(model, IDS, p, inputs[p], removed), full, atol=1e-6)
    with pytest.raises(ValueError, match="start_layer"):
        hidden_from(model, IDS, 7, inputs[0])


@torch.no_grad()
def test_recorded_inputs_are_the_previous_layer_outputs():
    model = tiny_model("qwen3", num_layers=4).eval()
    outs = {}
    with on_outputs(decoder_layers(model), outs.__setitem__):
        inputs, _ = layer_inputs(model, IDS)
    for i in range(1, 4):
        assert torch.equal(inputs[i], outs[i - 1])
    assert not decoder_layers(model)[0]._forward_hooks  # hooks removed


def test_teacher_shares_the_student_prefix():
    model = tiny_model("llama", num_layers=6).eval()
    mask = torch.tensor([1.0, 1, 0, 1, 0, 1])
    with torch.no_grad():
        hs, ht = student_and_teacher_hidden(model, IDS, mask)
        with gated(model, mask):
            ref_s = final_hidden(model, IDS)
        with gated(model, None):
            ref_t = final_hidden(model, IDS)
    assert torch.equal(hs, ref_s)
    assert torch.allclose(ht, ref_t, atol=1e-6)
