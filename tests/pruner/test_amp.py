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


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_is_bf16_only_where_bf16_is_native(monkeypatch, native):
    import e3pruner.amp as amp_mod
    from e3pruner.pipeline import PruneArgs, with_resolved_amp

    monkeypatch.setattr(amp_mod, "native_bf16", lambda device="cpu": native)
    assert amp_mod.resolve_amp("auto") == ("bf16" if native else "none")
    assert amp_mod.resolve_amp("fp16") == "fp16" and amp_mod.resolve_amp("none") == "none"
    logged = []
    args = with_resolved_amp(PruneArgs(), logged.append)
    assert args.amp == ("bf16" if native else "none") and "auto ->" in logged[0]
    logged.clear()
    assert with_resolved_amp(PruneArgs(amp="bf16"), logged.append).amp == "bf16"
    assert bool(logged) == (not native) and (native or "emulates" in logged[0])
    with pytest.raises(ValueError, match="auto, bf16"):
        amp_mod.resolve_amp("int8")


def test_native_bf16_matches_onednn():
    from e3pruner.amp import native_bf16

    assert native_bf16("cpu") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert native_bf16("meta") is False
