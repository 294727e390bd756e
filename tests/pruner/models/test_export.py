import json
import os

import pytest
import torch
from safetensors import safe_open

from e3pruner.models import export as export_mod
from e3pruner.models.export import export_pruned, read_pruning_info
from e3pruner.models.gates import keep_mask, set_mask
from tests.pruner.tiny_models import FAMILIES, tiny_model

KEEP = [0, 2, 3, 5]


def _ids(seed=0, b=2, t=29):
    return torch.randint(3, 211, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_export_reload_matches_gated_model(family, tie, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, tie=tie)
    out = export_pruned(model, KEEP, tmp_path / "pruned")
    files = sorted(os.listdir(out))
    assert {"config.json", "model.safetensors", "pruning.json"} <= set(files)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp dir left

    info = read_pruning_info(out)
    assert info["kept_layers"] == KEEP and info["removed_layers"] == [1, 4]
    assert info["original_num_layers"] == 6

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4
    assert "quantization_config" not in cfg
    if family in ("qwen2", "qwen3"):
        # originals: layers 0-2 full, 3-5 sliding -> kept [0, 2 | 3, 5]
        assert cfg["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 2
        assert cfg["max_window_layers"] == 2

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    layer_ids = {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")}
    assert layer_ids == {0, 1, 2, 3}
    assert ("lm_head.weight" in keys) == (not tie)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        # renumbered layer 1 is original layer 2, bit for bit
        w = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert torch.equal(w, model.model.layers[2].mlp.down_proj.weight)

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert [a.self_attn.layer_idx for a in reloaded.model.layers] == [0, 1, 2, 3]
    ids = _ids()
    set_mask(model, keep_mask(6, KEEP))
    with torch.no_grad():
        want = model(ids).logits
        got = reloaded(ids).logits
    assert (want - got).abs().max().item() <= 1e-5
    gen = reloaded.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        gen_gated = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 11) and torch.equal(gen, gen_gated)


def test_export_does_not_modify_model(tmp_path):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_pruned(model, [1, 2], tmp_path / "p")
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_sharded_export(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen2")
    out = export_pruned(model, KEEP, tmp_path / "p", max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    set_mask(model, keep_mask(6, KEEP))
    ids = _ids(1)
    with torch.no_grad():
        assert (model(ids).logits - reloaded(ids).logits).abs().max().item() <= 1e-5


def test_export_bf16(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("mistral")
    out = export_pruned(model, KEEP, tmp_path / "p", dtype=torch.bfloat16)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert next(reloaded.parameters()).dtype == torch.bfloat16


def test_failed_export_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_model("llama")
    out = export_pruned(model, KEEP, tmp_path / "p")
    original = (out / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(export_mod, "save_file", boom)
    with pytest.raises(OSError, match="simulated"):
        export_pruned(model, [0, 1], tmp_path / "p")
    assert (out / "model.safetensors").read_bytes() == original
    assert read_pruning_info(out)["kept_layers"] == KEEP
    assert sorted(os.listdir(tmp_path)) == ["p"]  # temp dir cleaned up


@pytest.mark.parametrize("keep,match", [([], "empty"), ([0, 0, 1], "duplicates"),
                                        ([0, 6], "out of range"), ("ab", "indices|range")])
def test_bad_keep_layers(keep, match, tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        export_pruned(model, keep, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_overwrite_false(tmp_path):
    model = tiny_model("llama")
    export_pruned(model, KEEP, tmp_path / "p")
    with pytest.raises(FileExistsError):
        export_pruned(model, KEEP, tmp_path / "p", overwrite=False)
