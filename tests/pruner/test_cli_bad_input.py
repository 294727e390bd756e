"""Bad command-line input: exit code 2 and a message naming the flag, before any model loads
(the loader is patched to fail if called) and without creating --out."""

import time

import pytest
import torch

from e3pruner.cli import main
from tests.pruner.tiny_models import tiny_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    model_dir, train, held = tiny_model_dir(root, "llama")
    (root / "existing_dir").mkdir()
    (root / "existing_file").write_text("not a directory")
    return {"root": root, "model": str(model_dir), "train": str(train), "held": str(held)}


@pytest.fixture
def no_model_load(monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("a model was loaded before the bad input was refused")

    import transformers

    import e3pruner.models
    import e3pruner.models.loading

    monkeypatch.setattr(e3pruner.models, "load_model", boom)
    monkeypatch.setattr(e3pruner.models.loading, "load_model", boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def _prune(t, out):
    return ["prune", "--model", t["model"], "--data", t["train"], "--heldout", t["held"],
            "--out", out, "--block-len", "32", "--batch-size", "2", "--calib-blocks", "4",
            "--search-tokens", "768", "--recovery-tokens", "640", "--eval-tokens", "1500",
            "--eval-ctx", "64", "--no-progress"]


def _compare(t, out):
    return ["compare", "--methods", "shortgpt,e3", "--model", t["model"], "--data", t["train"],
            "--heldout", t["held"], "--out", out, "--block-len", "32", "--batch-size", "2",
            "--search-tokens", "128", "--recovery-tokens", "128", "--eval-tokens", "600",
            "--eval-ctx", "64", "--zeroshot-limit", "0", "--no-progress"]


def _eval_ppl(t, out):
    return ["eval-ppl", "--model", t["model"], "--data", t["held"]]


def _bench(t, out):
    return ["bench-decode", t["model"], "--against", t["model"], "--out", out + ".json",
            "--dtype", "float32"]


NO_CUDA = not torch.cuda.is_available()
CASES = [
    # (command, extra flags, text the message must contain)
    ("prune", ["--lr", "-1"], "--lr"),
    ("prune", ["--lr", "nan"], "--lr"),
    ("prune", ["--search-lr", "nan"], "--search-lr"),
    ("prune", ["--search-lr", "0"], "--search-lr"),
    ("prune", ["--grad-accum", "0"], "--grad-accum"),
    ("prune", ["--weighting", "bogus"], "--weighting"),
    ("prune", ["--batch-size", "1"], "--batch-size"),
    ("prune", ["--batch-size", "0"], "--batch-size"),
    ("prune", ["--recovery-batch-size", "0"], "--recovery-batch-size"),
    ("prune", ["--block-len", "4"], "--block-len"),
    ("prune", ["--calib-blocks", "0"], "--calib-blocks"),
    ("prune", ["--eval-tokens", "1"], "--eval-tokens"),
    ("prune", ["--eval-ctx", "1"], "--eval-ctx"),
    ("prune", ["--checkpoint-every", "0"], "--checkpoint-every"),
    ("prune", ["--ce-weight", "-5"], "--ce-weight"),
    ("prune", ["--ce-weight", "inf"], "--ce-weight"),
    ("prune", ["--ratio", "1.5"], "--ratio"),
    ("prune", ["--ratio", "nan"], "--ratio"),
    ("prune", ["--prune-layers", "0"], "--prune-layers"),
    ("prune", ["--prune-layers", "6"], "--prune-layers"),
    ("prune", ["--search-tokens", "inf"], "--search-tokens"),
    ("prune", ["--search-tokens", "-5"], "--search-tokens"),
    ("prune", ["--search-tokens", "10"], "--search-tokens"),
    ("prune", ["--recovery-tokens", "5"], "--recovery-tokens"),
    ("prune", ["--tokens", "inf"], "--tokens"),
    ("prune", ["--amp", "fp8"], "--amp"),
    ("prune", ["--scope", "all"], "--scope"),
    ("prune", ["--estimator", "reinforce"], "--estimator"),
    ("prune", ["--per-sample"], "--per-sample"),
    ("prune", ["--device", "tpu9"], "--device"),
    pytest.param("prune", ["--device", "cuda"], "--device",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")),
    ("prune", ["--dtype", "int8"], "--dtype"),
    ("prune", ["--data", "/nonexistent/train.txt"], "--data"),
    ("prune", ["--heldout", "/nonexistent/held.txt"], "--heldout"),
    ("prune", ["--model", "/nonexistent/model"], "--model"),
    ("compare", ["--lr", "-1"], "--lr"),
    ("compare", ["--batch-size", "1"], "--batch-size"),
    ("compare", ["--population", "1"], "--population"),
    ("compare", ["--generations", "0"], "--generations"),
    ("compare", ["--zeroshot-limit", "-5"], "--zeroshot-limit"),
    ("compare", ["--weighting", "bogus"], "--weighting"),
    ("compare", ["--eval-ctx", "1"], "--eval-ctx"),
    ("compare", ["--search-tokens", "inf"], "--search-tokens"),
    ("compare", ["--ratio", "2"], "--ratio"),
    ("compare", ["--methods", "e3,bogus"], "--methods"),
    ("compare", ["--device", "tpu9"], "--device"),
    ("compare", ["--dtype", "int8"], "--dtype"),
    ("eval-ppl", ["--max-tokens", "-3"], "--max-tokens"),
    ("eval-ppl", ["--max-tokens", "1"], "--max-tokens"),
    ("eval-ppl", ["--ctx-len", "1"], "--ctx-len"),
    ("eval-ppl", ["--stride", "0"], "--stride"),
    ("eval-ppl", ["--stride", "1000"], "--stride"),
    ("eval-ppl", ["--batch-size", "0"], "--batch-size"),
    ("eval-ppl", ["--device", "tpu9"], "--device"),
    ("eval-ppl", ["--dtype", "int8"], "--dtype"),
    ("eval-ppl", ["--data", "/nonexistent/held.txt"], "--data"),
    ("bench-decode", ["--prompt-len", "0"], "--prompt-len"),
    ("bench-decode", ["--new-tokens", "1"], "--new-tokens"),
    ("bench-decode", ["--repeats", "0"], "--repeats"),
    ("bench-decode", ["--warmup", "-1"], "--warmup"),
    ("bench-decode", ["--batch-sizes", "0"], "--batch-sizes"),
    ("bench-decode", ["--threads", "0"], "--threads"),
    ("bench-decode", ["--dtype", "auto"], "--dtype"),
    ("bench-decode", ["--device", "tpu9"], "--device"),
    ("bench-decode", ["--engine", "trt"], "--engine"),
]
BUILDERS = {"prune": _prune, "compare": _compare, "eval-ppl": _eval_ppl,
            "bench-decode": _bench}


def _run(argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse errors
        return exc.code


@pytest.mark.parametrize("command,extra,flag", CASES)
def test_bad_value_exits_2_naming_the_flag(tiny, no_model_load, capsys, command, extra, flag):
    out = str(tiny["root"] / f"out-{command}")
    t0 = time.time()
    rc = _run(BUILDERS[command](tiny, out) + extra)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert flag in err, err
    assert "Traceback" not in err
    assert time.time() - t0 < 10
    assert not (tiny["root"] / f"out-{command}").exists()  # nothing created


@pytest.mark.parametrize("command", ["prune", "compare"])
def test_out_that_is_a_file_or_a_foreign_dir(tiny, no_model_load, capsys, command):
    for out in ("existing_file", "existing_dir"):
        if out == "existing_dir":
            (tiny["root"] / out / "mine.txt").write_text("the user's")
        rc = _run(BUILDERS[command](tiny, str(tiny["root"] / out)) + ["--overwrite"])
        err = capsys.readouterr().err
        assert rc == 2 and "--out" in err, err
    assert (tiny["root"] / "existing_file").read_text() == "not a directory"
    assert (tiny["root"] / "existing_dir" / "mine.txt").read_text() == "the user's"


def test_bench_decode_out_is_a_directory(tiny, no_model_load, capsys):
    argv = _bench(tiny, "x")
    argv[argv.index("--out") + 1] = str(tiny["root"] / "existing_dir")
    t0 = time.time()
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is a directory" in err, err
    assert time.time() - t0 < 10


def test_prune_help_has_no_double_percent(capsys):
    assert _run(["prune", "--help"]) == 0
    out = capsys.readouterr().out
    assert "25% of its layers" in out and "%%" not in out
