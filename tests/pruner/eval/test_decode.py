"""Decode benchmark: bytes-ideal arithmetic, timing plumbing, the bench-decode CLI and the
GPU script's dry run, all on tiny models (fast; no speed is asserted)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from e3pruner.cli import main
from e3pruner.eval.decode import (
    DecodeBenchConfig,
    decode_weight_bytes,
    generation_config,
    ideal_ratios,
    kv_bytes_per_position,
    model_on_meta,
    stats,
    time_generate,
)
from e3pruner.models.export import export_pruned
from tests.pruner.tiny_models import tiny_config, tiny_model, tiny_model_dir, word_tokenizer

# tiny_config: hidden 48, intermediate 96, 4 heads x 12, 2 KV heads, vocab 211
H, FF, V, KV_DIM = 48, 96, 211, 2 * 12
PER_LAYER = (H * H + H * KV_DIM + H * KV_DIM + H * H) + 3 * H * FF + 2 * H  # attn, mlp, 2 norms


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: OpenMP only adds noise on a shared CPU
    yield
    torch.set_num_threads(old)


def test_bytes_per_token_hand_computed():
    b = decode_weight_bytes(tiny_model("llama", num_layers=6))  # fp32, untied
    assert b["per_layer"] == 4 * PER_LAYER == 4 * 20832
    assert b["layers"] == 6 * 4 * PER_LAYER
    assert (b["head"], b["norm"], b["embed_row"], b["other"]) == (4 * V * H, 4 * H, 4 * H, 0)
    assert b["total"] == 4 * (6 * PER_LAYER + V * H + H + H)


def test_tied_and_untied_heads_read_the_same_bytes():
    tied, untied = tiny_model("llama", tie=True), tiny_model("llama", tie=False)
    bt, bu = decode_weight_bytes(tied), decode_weight_bytes(untied)
    assert bt["tied_head"] and not bu["tied_head"]
    # the untied model stores one more [V, H] matrix, but a decode step reads the head
    # matrix once and one embedding row either way
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == V * H
    assert bt["total"] == bu["total"]


def test_ideal_ratios_hand_computed():
    orig = {"total": 1000, "num_layers": 10}
    pruned = {"total": 800, "num_layers": 8}  # 2 layers of 100 bytes removed, 0 head share
    r = ideal_ratios(orig, pruned)
    assert r["ideal_bytes"] == pytest.approx(1.25) and r["ideal_naive"] == pytest.approx(1.25)
    # KV: 4 sequences x 10 positions x 5 bytes per layer -> 200 bytes per layer per step
    r = ideal_ratios(orig, pruned, batch_size=4, mean_context=10, kv_per_position=5)
    assert r["ideal_bytes_kv"] == pytest.approx((1000 + 2000) / (800 + 1600))
    head_heavy = ideal_ratios({"total": 1000, "num_layers": 10}, {"total": 900, "num_layers": 8})
    assert head_heavy["ideal_bytes"] < head_heavy["ideal_naive"]


def test_meta_model_bytes_match_the_real_model(tmp_path):
    model = tiny_model("qwen3", tie=True)
    d = export_pruned(model, [0, 2, 3, 5], tmp_path / "m")
    real = decode_weight_bytes(tiny_model("qwen3", tie=True))
    meta = decode_weight_bytes(model_on_meta(str(d), torch.float32))
    assert meta["num_layers"] == 4 and meta["per_layer"] == real["per_layer"]
    assert meta["total"] == real["total"] - 2 * real["per_layer"]
    assert kv_bytes_per_position(tiny_config("qwen3"), 2) == 2 * 2 * 12 * 2


def test_stats_and_config_checks():
    s = stats([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"]) == (2.5, 1.0, 10.0) and s["q1"] <= s["q3"]
    assert stats([4.0])["q1"] == 4.0
    with pytest.raises(ValueError, match="new-tokens"):
        DecodeBenchConfig(new_tokens=1).check()
    with pytest.raises(ValueError, match="batch-sizes"):
        DecodeBenchConfig(batch_sizes=(0,)).check()


def test_time_generate_isolates_exactly_n_tokens(one_thread):
    model = tiny_model("llama")
    ids = torch.randint(0, V, (2, 5))
    gen = generation_config(model, 6)
    t = time_generate(model, ids, gen)
    assert 0 < t["prefill_s"] and 0 < t["decode_s"] < t["total_s"]
    # min_new_tokens = max_new_tokens: EOS (id 2) cannot end a sequence early
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    assert out.shape == (2, 11)


def test_bench_decode_cli_on_tiny_models(tmp_path, capsys, one_thread):
    root = tmp_path / "tiny"
    model_dir, _, _ = tiny_model_dir(root)
    pruned = export_pruned(tiny_model("llama"), [0, 1, 3, 5], root / "pruned", word_tokenizer())
    out = tmp_path / "decode.json"
    rc = main(["bench-decode", str(pruned), "--against", str(model_dir), "--prompt-len", "6",
               "--new-tokens", "4", "--batch-sizes", "1,3", "--warmup", "0", "--repeats", "2",
               "--dtype", "float32", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["engine"] == "hf" and res["dtype"] == "float32" and res["device_info"]["device_name"]
    assert res["pruning"]["removed_layers"] == [2, 4]
    wb = res["weight_bytes_per_token"]
    assert wb["original"]["num_layers"] == 6 and wb["pruned"]["num_layers"] == 4
    assert [r["batch_size"] for r in res["results"]] == [1, 3]
    for r in res["results"]:
        o, p = r["models"]["original"], r["models"]["pruned"]
        assert len(o["raw"]["decode_s"]) == len(p["raw"]["decode_s"]) == 2
        assert r["speedup"] == pytest.approx(p["tokens_per_s"]["median"] / o["tokens_per_s"]["median"])
        assert r["speedup_best"] == pytest.approx(min(o["raw"]["decode_s"]) / min(p["raw"]["decode_s"]))
        assert r["ideal_bytes"] == pytest.approx(wb["original"]["total"] / wb["pruned"]["total"])
        assert r["ideal_naive"] == pytest.approx(1.5)
        assert r["ideal_bytes"] < r["ideal_bytes_kv"] < r["ideal_naive"]
        # tokens/s counts every sequence of the batch over the N - 1 = 3 decode steps
        t = o["raw"]["decode_s"][0]
        assert r["batch_size"] * 3 / t in (o["tokens_per_s"]["min"], o["tokens_per_s"]["max"])
    assert "| batch |" in capsys.readouterr().out


def test_bench_decode_clear_errors(tmp_path, capsys):
    assert main(["bench-decode", str(tmp_path / "missing")]) == 2
    assert "not an HF model directory" in capsys.readouterr().err
    model_dir, _, _ = tiny_model_dir(tmp_path / "tiny")
    assert main(["bench-decode", str(model_dir), "--against", str(model_dir), "--engine", "vllm",
                 "--vllm-venv", str(tmp_path / "no-venv")]) == 2
    err = capsys.readouterr().err
    assert "no vLLM venv" in err and "tools/make_vllm_env.sh" in err


def test_gpu_script_dry_run(tmp_path, capsys):
    path = Path(__file__).resolve().parents[3] / "bench" / "decode_gpu.py"
    spec = importlib.util.spec_from_file_location("decode_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.CONFIGS["qwen3-8b"]["num_hidden_layers"] == 36
    assert mod.removed_layers(36) == list(range(26, 35)) and len(mod.removed_layers(64)) == 16
    out = tmp_path / "gpu.json"
    assert mod.main(["--dry-run", "--models", "qwen3-8b,qwen3-32b", "--batch-sizes", "1",
                     "--new-tokens", "3", "--prompt-len", "4", "--warmup", "0", "--repeats", "1",
                     "--threads", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["dry_run"] and [m["model"] for m in res["models"]] == ["qwen3-8b", "qwen3-32b"]
    for m in res["models"]:
        wb = m["weight_bytes_per_token"]
        assert wb["original"]["num_layers"] == 8 and wb["pruned"]["num_layers"] == 6
        assert not wb["original"]["tied_head"]
        assert m["results"][0]["ideal_naive"] == pytest.approx(8 / 6)
    assert "random weights" in capsys.readouterr().out
