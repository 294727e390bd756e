import json
import subprocess
import sys

import pytest

from e3pruner.cli import main
from e3pruner.models.export import export_pruned
from tests.pruner.tiny_models import tiny_model


def test_info_lists_families(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for fam in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "qwen3_moe",
                "deepseek_v3"):
        assert fam in out


def test_info_on_local_model(tmp_path, capsys):
    model = tiny_model("qwen3")
    d = export_pruned(model, [0, 1, 2, 3, 4, 5], tmp_path / "m")
    # info loads a tokenizer too: save a small word-level one next to the weights
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="b").save_pretrained(d)
    assert main(["info", "--model", str(d), "--json"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[out.index("\n{") + 1:])  # after the list of tested families
    assert info["layers"] == 6 and info["model_type"] == "qwen3" and info["vocab"] == 211
    assert info["params"] == sum(p.numel() for p in model.parameters())


def test_bad_model_is_a_clear_error(tmp_path, capsys):
    assert main(["eval-ppl", "--model", str(tmp_path / "nope")]) == 2
    assert "not a model directory" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_ppl_bundled_subprocess():
    res = subprocess.run([sys.executable, "-m", "e3pruner", "eval-ppl", "--max-tokens", "2048",
                          "--json"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout[res.stdout.index("{"):])
    assert out["tokens"] == 2047 and 5 < out["ppl"] < 200
