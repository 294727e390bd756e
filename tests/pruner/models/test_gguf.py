"""GGUF in (load_model of a .gguf) and GGUF out (export_pruned_gguf): tiny synthetic GGUFs
written with GGUFWriter, and the bundled SmolLM2 GGUF (slow)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from e3pruner.models.gguf_export import GGUFExportError, export_pruned_gguf, per_layer_fields
from e3pruner.models.loading import GGUFLoadError, gguf_source, load_model

HIDDEN, FFN, HEADS, KV_HEADS = 64, 128, 4, 2


def _byte_tokens() -> list[str]:
    """The 256 byte-level BPE symbols of GPT-2 (every byte is a token: no unknowns):
    printable bytes stand for themselves, the others for chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tiny_gguf(path, *, n_layers: int = 6, seed: int = 0, arch: str = "llama",
                    per_layer_arrays: bool = False, extra: dict | None = None,
                    tokenizer: bool = True):
    """A tiny random llama GGUF that transformers' GGUF loader reads: byte-level GPT-2
    tokenizer, Q8_0 projections, an F16 value projection, F32 norms, an untied head.
    per_layer_arrays: also per-layer metadata arrays (which transformers does not read);
    extra: more fields {key: (value, GGUFValueType)}; tokenizer=False: no tokenizer fields."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>"] + _byte_tokens() + ["Ġw", "Ġw1"]
    merges = ["Ġ w", "Ġw 1"]
    vocab = len(tokens)
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny-test")
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(vocab)
    if per_layer_arrays:
        w.add_array(f"{arch}.attention.sliding_window_pattern",
                    [bool(i % 2) for i in range(n_layers)])
        w.add_key_value(f"{arch}.test.per_layer_width", [100 + i for i in range(n_layers)],
                        gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT16)
        w.add_array("general.tags", [f"t{i}" for i in range(n_layers)])  # not {arch}.: kept
    for key, (value, vtype) in (extra or {}).items():
        w.add_key_value(key, value, vtype)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([3] + [1] * (vocab - 1))
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)

    def weight(name, shape, qtype):
        x = (rng.standard_normal(shape) * 0.3).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, x)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    q8, f16, f32 = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16,
                    gguf.GGMLQuantizationType.F32)
    kv = KV_HEADS * HIDDEN // HEADS
    weight("token_embd.weight", (vocab, HIDDEN), q8)
    for i in range(n_layers):
        weight(f"blk.{i}.attn_norm.weight", (HIDDEN,), f32)
        weight(f"blk.{i}.attn_q.weight", (HIDDEN, HIDDEN), q8)
        weight(f"blk.{i}.attn_k.weight", (kv, HIDDEN), q8)
        weight(f"blk.{i}.attn_v.weight", (kv, HIDDEN), f16)
        weight(f"blk.{i}.attn_output.weight", (HIDDEN, HIDDEN), q8)
        weight(f"blk.{i}.ffn_norm.weight", (HIDDEN,), f32)
        weight(f"blk.{i}.ffn_gate.weight", (FFN, HIDDEN), q8)
        weight(f"blk.{i}.ffn_up.weight", (FFN, HIDDEN), q8)
        weight(f"blk.{i}.ffn_down.weight", (HIDDEN, FFN), q8)
    weight("output_norm.weight", (HIDDEN,), f32)
    weight("output.weight", (vocab, HIDDEN), q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _source_name(name: str, keep: list[int]) -> str:
    m = re.match(r"^blk\.(\d+)\.(.+)$", name)
    return f"blk.{keep[int(m[1])]}.{m[2]}" if m else name


def assert_pruned_copy(src, out, keep: list[int], subset: tuple[str, ...]) -> None:
    """`out` is `src` with the blocks `keep`: fields equal (block_count and `subset` arrays
    subset), tensors in source order with the same type, shape and bytes."""
    import gguf

    a, b = gguf.GGUFReader(src), gguf.GGUFReader(out)
    arch = a.get_field("general.architecture").contents()
    src_fields = [f for f in a.fields if not f.startswith("GGUF.")]
    assert [f for f in b.fields if not f.startswith("GGUF.")] == src_fields
    for name in src_fields:
        fa, fb = a.get_field(name), b.get_field(name)
        assert fb.types == fa.types, name
        if name == f"{arch}.block_count":
            assert fb.contents() == len(keep)
        elif name in subset:
            assert fb.contents() == [fa.contents()[i] for i in keep], name
        else:
            assert fb.contents() == fa.contents(), name
    assert b.alignment == a.alignment
    src_tensors = {t.name: t for t in a.tensors}
    order = [t.name for t in a.tensors]
    expected = [n for n in order if not re.match(r"^blk\.", n)
                or int(n.split(".")[1]) in set(keep)]
    assert [_source_name(t.name, keep) for t in b.tensors] == expected
    for t in b.tensors:
        s = src_tensors[_source_name(t.name, keep)]
        assert t.tensor_type == s.tensor_type and list(t.shape) == list(s.shape), t.name
        assert t.data.tobytes() == s.data.tobytes(), t.name


# --- GGUF out, synthetic -------------------------------------------------------------------

@pytest.mark.parametrize("keep", [[0, 2, 3, 5], [4], [0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5]])
def test_export_pruned_gguf_subsets_blocks_and_per_layer_fields(tmp_path, keep):
    src = write_tiny_gguf(tmp_path / "src.gguf", per_layer_arrays=True, seed=len(keep))
    assert per_layer_fields(src) == ["llama.attention.sliding_window_pattern",
                                     "llama.test.per_layer_width"]
    out = export_pruned_gguf(src, keep, tmp_path / "out" / "pruned.gguf")
    assert out == tmp_path / "out" / "pruned.gguf"
    assert_pruned_copy(src, out, keep, subset=tuple(per_layer_fields(src)))
    import gguf

    b = gguf.GGUFReader(out)
    assert b.get_field("general.tags").contents() == [f"t{i}" for i in range(6)]
    assert {t.tensor_type.name for t in b.tensors} == {"Q8_0", "F16", "F32"}
    assert [p.name for p in out.parent.iterdir()] == ["pruned.gguf"]  # no temp file left


def test_export_pruned_gguf_unsorted_keep_is_sorted(tmp_path):
    src = write_tiny_gguf(tmp_path / "src.gguf", per_layer_arrays=True, seed=3)
    out = export_pruned_gguf(src, (5, 1, 3), tmp_path / "p.gguf")
    assert_pruned_copy(src, out, [1, 3, 5], subset=tuple(per_layer_fields(src)))


def test_export_pruned_gguf_layer_structure_scalars(tmp_path):
    import gguf

    src = write_tiny_gguf(tmp_path / "src.gguf", seed=9, extra={
        "llama.leading_dense_block_count": (3, gguf.GGUFValueType.UINT32)})
    out = export_pruned_gguf(src, [0, 2, 4, 5], tmp_path / "p.gguf")
    assert gguf.GGUFReader(out).get_field("llama.leading_dense_block_count").contents() == 2
    mtp = write_tiny_gguf(tmp_path / "mtp.gguf", extra={
        "llama.nextn_predict_layers": (1, gguf.GGUFValueType.UINT32)})
    with pytest.raises(GGUFExportError, match="multi-token-prediction.*not supported"):
        export_pruned_gguf(mtp, [0, 1], tmp_path / "q.gguf")
    assert not (tmp_path / "q.gguf").exists()


@pytest.mark.parametrize("keep,match", [([], "empty"), ([0, 0], "duplicates"),
                                         ([0, 6], r"out of range \[0, 5\]"),
                                         ([0.0, 1], "integer"), ([True], "integer")])
def test_export_pruned_gguf_bad_keep_layers(tmp_path, keep, match):
    src = write_tiny_gguf(tmp_path / "src.gguf")
    with pytest.raises(ValueError, match=match):
        export_pruned_gguf(src, keep, tmp_path / "p.gguf")
    assert not (tmp_path / "p.gguf").exists()


def test_export_pruned_gguf_bad_source_and_target(tmp_path):
    src = write_tiny_gguf(tmp_path / "src.gguf")
    with pytest.raises(GGUFExportError, match="not a file"):
        export_pruned_gguf(tmp_path / "nope.gguf", [0], tmp_path / "p.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(range(200)))
    with pytest.raises(GGUFExportError, match="junk.gguf.*damaged or truncated"):
        export_pruned_gguf(tmp_path / "junk.gguf", [0], tmp_path / "p.gguf")
    with pytest.raises(GGUFExportError, match="replace its source"):
        export_pruned_gguf(src, [0], src)
    (tmp_path / "d").mkdir()
    with pytest.raises(GGUFExportError, match="is a directory"):
        export_pruned_gguf(src, [0], tmp_path / "d")


def test_export_pruned_gguf_failure_mid_write_leaves_no_file(tmp_path, monkeypatch):
    import gguf

    src = write_tiny_gguf(tmp_path / "src.gguf", seed=1)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real = gguf.GGUFWriter.write_tensor_data
    calls = []

    def failing(self, tensor, *a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk went away")
        return real(self, tensor, *a, **kw)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    with pytest.raises(OSError, match="disk went away"):
        export_pruned_gguf(src, [0, 2], out_dir / "p.gguf")
    assert list(out_dir.iterdir()) == []
    # an earlier export stays as it was
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", real)
    export_pruned_gguf(src, [1], out_dir / "p.gguf")
    before = (out_dir / "p.gguf").read_bytes()
    calls.clear()
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    with pytest.raises(OSError):
        export_pruned_gguf(src, [0, 2], out_dir / "p.gguf")
    assert (out_dir / "p.gguf").read_bytes() == before
    assert [p.name for p in out_dir.iterdir()] == ["p.gguf"]
    # a temp file of a killed export goes at the next export; a live process's stays
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = out_dir / f".p.gguf.tmp-{dead}-x1"
    live = out_dir / f".p.gguf.tmp-{os.getppid()}-x2"
    other = out_dir / f".q.gguf.tmp-{dead}-x3"
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", real)
    export_pruned_gguf(src, [0, 2], out_dir / "p.gguf")
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(["p.gguf", live.name,
                                                                 other.name])


# --- GGUF in, synthetic --------------------------------------------------------------------

def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_load_gguf_file_and_directory(tmp_path):
    src = write_tiny_gguf(tmp_path / "m" / "tiny.gguf", seed=4)
    cache = tmp_path / "cache"
    model, tok = load_model(str(src), cache_dir=cache)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == HIDDEN
    (entry,) = list(cache.iterdir())
    assert entry.name.startswith("tiny-") and (entry / "config.json").is_file()
    again, _ = load_model(str(tmp_path / "m"), cache_dir=cache)  # the directory: same cache
    assert list(cache.iterdir()) == [entry]
    ids = torch.tensor([tok("w1 w12 w3 hello").input_ids])
    assert ids.shape[1] > 3
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids), rtol=0, atol=0)
    # the weights are the dequantized GGUF tensors
    import gguf

    r = gguf.GGUFReader(src)
    up = next(t for t in r.tensors if t.name == "blk.2.ffn_up.weight")
    ref = torch.from_numpy(gguf.dequantize(up.data, up.tensor_type).copy())
    torch.testing.assert_close(model.model.layers[2].mlp.up_proj.weight.data, ref,
                               rtol=0, atol=0)
    assert gguf_source(str(tmp_path / "m")) == src and gguf_source(str(src)) == src


def test_gguf_source_cases(tmp_path):
    assert gguf_source("Qwen/Qwen3-8B") is None
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / "x.gguf").write_bytes(b"GGUF")
    assert gguf_source(str(tmp_path / "hf")) is None  # an HF directory wins
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"several GGUF files \(a.gguf, b.gguf\).*pass"):
        gguf_source(str(tmp_path / "two"))
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        gguf_source(str(tmp_path / "missing.gguf"))


def test_bad_gguf_is_a_clear_error(tmp_path):
    src = write_tiny_gguf(tmp_path / "ok.gguf", seed=5)
    data = src.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.gguf").write_bytes(np.random.default_rng(0).bytes(4096))
    write_tiny_gguf(tmp_path / "arch.gguf", arch="rwkv6", n_layers=2)
    cache = tmp_path / "cache"
    with pytest.raises(GGUFLoadError, match=r"trunc\.gguf.*damaged or truncated"):
        load_model(str(tmp_path / "trunc.gguf"), cache_dir=cache)
    with pytest.raises(GGUFLoadError, match=r"garbage\.gguf is not a GGUF file"):
        load_model(str(tmp_path / "garbage.gguf"), cache_dir=cache)
    with pytest.raises(GGUFLoadError, match=r"arch\.gguf: transformers cannot dequantize.*"
                                            r"rwkv6.*HF checkpoint"):
        load_model(str(tmp_path / "arch.gguf"), cache_dir=cache)
    write_tiny_gguf(tmp_path / "notok.gguf", tokenizer=False, n_layers=2)
    with pytest.raises(GGUFLoadError, match=r"tokenizer of .*notok\.gguf.*HF directory"):
        load_model(str(tmp_path / "notok.gguf"), cache_dir=cache)
    assert not cache.exists() or not [p for p in cache.iterdir()
                                      if (p / "config.json").exists()]


def test_pruned_tiny_gguf_reloads_equal_to_pruned_hf_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from e3pruner.models.export import export_pruned

    src = write_tiny_gguf(tmp_path / "tiny.gguf", seed=6)
    keep = [0, 1, 3, 5]
    pruned = export_pruned_gguf(src, keep, tmp_path / "pruned" / "tiny-pruned.gguf")
    model, tok = load_model(str(src), cache_dir=tmp_path / "cache")
    hf = AutoModelForCausalLM.from_pretrained(export_pruned(model, keep, tmp_path / "hf", tok))
    back = AutoModelForCausalLM.from_pretrained(pruned.parent, gguf_file=pruned.name,
                                                dtype=torch.float32)
    assert back.config.num_hidden_layers == 4
    _assert_same_model(back, hf, torch.tensor([tok("w1 w2 w13 abc").input_ids]))


def _assert_same_model(a, b, ids):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(_logits(a.eval(), ids), _logits(b.eval(), ids),
                               rtol=0, atol=1e-5)


# --- the prune command on a GGUF -----------------------------------------------------------

def _prune_flags(src, out, train, held, recovery_tokens):
    return ["prune", "--no-progress", "--model", str(src), "--out", str(out), "--data",
            str(train), "--heldout", str(held), "--block-len", "32", "--batch-size", "2",
            "--calib-blocks", "2", "--search-tokens", "256", "--recovery-tokens",
            str(recovery_tokens), "--eval-tokens", "400", "--eval-ctx", "64",
            "--prune-layers", "2", "--no-baseline"]


@pytest.mark.parametrize("recovery_tokens", [0, 128])
def test_cli_prune_gguf_writes_pruned_gguf(tmp_path, monkeypatch, capsys, recovery_tokens):
    from e3pruner.cli import main
    from tests.pruner.tiny_models import markov_text

    monkeypatch.setattr("e3pruner.models.loading.default_cache_dir", lambda: tmp_path / "c")
    src = write_tiny_gguf(tmp_path / "tiny.gguf", seed=7)
    (tmp_path / "train.txt").write_text(markov_text(40, seed=1))
    (tmp_path / "held.txt").write_text(markov_text(10, seed=2))
    out = tmp_path / "run"
    assert main(_prune_flags(src, out, tmp_path / "train.txt", tmp_path / "held.txt",
                             recovery_tokens)) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    keep = report["kept_layers"]
    assert len(keep) == 4 and report["model"] == str(src)
    if recovery_tokens:
        assert report["gguf"] is None and not (out / "model.gguf").exists()
        assert "convert_hf_to_gguf.py" in printed and "llama-quantize" in printed
        return
    assert report["gguf"] == str(out / "model.gguf")
    assert "pruned GGUF" in printed and str(out / "model.gguf") in printed
    assert_pruned_copy(src, out / "model.gguf", keep, subset=())
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf",
                                                dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(out / "model")
    ids = torch.randint(0, hf.config.vocab_size, (1, 12),
                        generator=torch.Generator().manual_seed(0))
    _assert_same_model(back, hf, ids)


def test_cli_info_eval_ppl_and_bad_gguf(tmp_path, monkeypatch, capsys):
    from e3pruner.cli import main
    from tests.pruner.tiny_models import markov_text

    monkeypatch.setattr("e3pruner.models.loading.default_cache_dir", lambda: tmp_path / "c")
    src = write_tiny_gguf(tmp_path / "m" / "tiny.gguf", seed=8)
    assert main(["info", "--model", str(tmp_path / "m"), "--json"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[out.index("\n{") + 1:])  # after the list of tested families
    assert info["layers"] == 6 and info["model_type"] == "llama"
    (tmp_path / "held.txt").write_text(markov_text(10, seed=3))
    assert main(["eval-ppl", "--model", str(src), "--data", str(tmp_path / "held.txt"),
                 "--ctx-len", "64", "--max-tokens", "256", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] == 255 and res["ppl"] > 1
    (tmp_path / "bad.gguf").write_bytes(src.read_bytes()[:5000])
    flags = _prune_flags(tmp_path / "bad.gguf", tmp_path / "run", tmp_path / "held.txt",
                         tmp_path / "held.txt", 0)
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "bad.gguf" in err and "damaged or truncated" in err
    assert not (tmp_path / "run").exists()
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(b"GGUF")
    assert main(["eval-ppl", "--model", str(tmp_path / "two")]) == 2
    assert "several GGUF files" in capsys.readouterr().err


def test_cli_compare_on_gguf(tmp_path, monkeypatch, capsys):
    from e3pruner.cli import main
    from tests.pruner.tiny_models import markov_text

    monkeypatch.setattr("e3pruner.models.loading.default_cache_dir", lambda: tmp_path / "c")
    src = write_tiny_gguf(tmp_path / "tiny.gguf", seed=10)
    (tmp_path / "train.txt").write_text(markov_text(40, seed=1))
    (tmp_path / "held.txt").write_text(markov_text(10, seed=2))
    rc = main(["compare", "--methods", "shortgpt", "--model", str(src), "--data",
               str(tmp_path / "train.txt"), "--heldout", str(tmp_path / "held.txt"),
               "--block-len", "32", "--batch-size", "2", "--search-tokens", "64",
               "--recovery-tokens", "0", "--eval-tokens", "400", "--eval-ctx", "64",
               "--zeroshot-limit", "0", "--prune-layers", "2", "--out", str(tmp_path / "cmp"),
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "| shortgpt |" in capsys.readouterr().out


# --- the bundled SmolLM2 GGUF --------------------------------------------------------------

@pytest.mark.slow
def test_bundled_gguf_pruned_reloads_equal_to_pruned_hf_model(tmp_path):
    """The acceptance check: the bundled Q4_1 SmolLM2 (30 layers) pruned to 22 layers keeps
    every kept tensor's quantized bytes, and transformers reloads it equal to the pruned HF
    model; load_model of the file and of its directory equals the bundled alias."""
    from transformers import AutoModelForCausalLM

    from e3pruner.models.export import remove_layers_inplace
    from e3pruner.models.loading import bundled_gguf_path

    src = bundled_gguf_path()
    removed = (3, 7, 11, 15, 19, 22, 25, 27)
    keep = [i for i in range(30) if i not in removed]
    out = export_pruned_gguf(src, keep, tmp_path / "smollm2-22.gguf")
    assert out.stat().st_size < src.stat().st_size
    assert_pruned_copy(src, out, keep, subset=tuple(per_layer_fields(src)))

    cache = tmp_path / "cache"
    model, tok = load_model(str(src), cache_dir=cache)
    alias, _ = load_model("smollm2-135m", cache_dir=cache)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / src.name).symlink_to(src)
    in_dir, _ = load_model(str(tmp_path / "dir"), cache_dir=cache)
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.").input_ids])
    _assert_same_model(alias, model, ids)
    _assert_same_model(in_dir, model, ids)
    assert len(list(cache.iterdir())) == 1  # alias, file and directory: one cache entry
    back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name,
                                                dtype=torch.float32)
    assert back.config.num_hidden_layers == 22
    _assert_same_model(back, remove_layers_inplace(model, keep), ids)
