import json
import math
import os

import pytest
import torch

from e3pruner.cli import main
from e3pruner.models.kv_cache import layer_cache
from e3pruner.eval.zeroshot import (
    TASKS,
    Encoder,
    Item,
    evaluate_items,
    item_scores,
    load_docs,
    load_items,
    loglikelihoods,
    resolve_tasks,
    task_data_files,
    zero_shot,
)
from tests.pruner.tiny_models import tiny_model, tiny_model_dir, word_tokenizer

ENGLISH = ["The cat sat on the mat.", "Question: Is water wet?\nAnswer: yes",
           "A man is sitting on a roof. He starts pulling up roofing.",
           "Sarah was a much better surgeon than Maria so Maria always got the easier cases."]


def bpe_tokenizer(vocab: int = 300):
    """A small byte-level BPE (GPT-2 style: spaces attach to the next word)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(ENGLISH * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def bos_word_tokenizer():
    """Word tokenizer over w0..w197 that prepends <s> (id 200) like Llama tokenizers."""
    from tokenizers import processors

    tok = word_tokenizer(vocab=200)
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


@torch.no_grad()
def brute_force(model, tok, context, continuation, max_length):
    """Per-request reference: lm-eval's split of context/continuation, one unbatched forward."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.encode(context)
    cont = tok.encode(context + continuation)[len(ctx):]
    seq = (ctx + cont)[-(max_length + 1):]
    logp = model(torch.tensor([seq[:-1]])).logits[0].float().log_softmax(-1)
    return sum(logp[len(seq) - 1 - len(cont) + j, t].item() for j, t in enumerate(cont))


def test_loglikelihoods_match_brute_force():
    model = tiny_model("llama", vocab=300)
    tok = bpe_tokenizer()
    long_ctx = " ".join(ENGLISH * 12)  # over max_position_embeddings=256: left-truncated
    reqs = [("Question: Is water wet?\nAnswer:", " yes"), ("Question: Is water wet?\nAnswer:", " no"),
            ("The cat sat on the ", "mat."), ("A man is", " sitting on a roof. He starts"),
            ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
            (long_ctx, " The cat sat on the mat."), (long_ctx, " yes")]
    assert len(tok.encode(long_ctx)) > 300
    ref = [brute_force(model, tok, c, x, 256) for c, x in reqs]
    for bs in (1, 3, 16):
        got = loglikelihoods(model, tok, reqs, batch_size=bs)
        assert got == pytest.approx(ref, abs=1e-4)
    assert len(set(ref)) == len(ref)


def test_bos_is_added_once_and_stays_in_the_context():
    tok = bos_word_tokenizer()
    enc = Encoder(tok)
    ctx, cont = enc.pair("w1 w2 ", "w3 w4")
    assert ctx == [200, 3, 4] and cont == [5, 6]
    ctx, cont = enc.pair("<s> w1", " w3")
    assert ctx == [200, 3] and cont == [5]
    model = tiny_model("llama")
    reqs = [("w1 w2", " w3 w4"), ("w5", " w6")]
    got = loglikelihoods(model, tok, reqs)
    assert got == pytest.approx([brute_force(model, tok, c, x, 256) for c, x in reqs], abs=1e-4)


def test_single_token_choices_share_one_forward():
    calls = []
    model = tiny_model("llama")
    model.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    tok = word_tokenizer()
    reqs = [("w1 w2 w3", " w4"), ("w1 w2 w3", " w5"), ("w1 w2 w3", " w6 w7")]
    loglikelihoods(model, tok, reqs, batch_size=16, share_context=False)
    assert calls == [(2, 4)]  # inputs [w1 w2 w3] (shared by two requests) and [w1 w2 w3 w6]
    calls.clear()
    loglikelihoods(model, tok, reqs, batch_size=16)
    assert calls == [(1, 3), (1, 1)]  # the context once, then [w6] on its cache


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_shared_context_matches_unshared(family):
    """Context KV sharing gives the per-request padded rows' numbers (Qwen3: sliding window 16)."""
    model = tiny_model(family, vocab=300)
    tok = bpe_tokenizer()
    q, cat, man = "Question: Is water wet?\nAnswer:", "The cat sat on the ", ENGLISH[3]
    long_cont = " A man is sitting on a roof. He starts pulling up roofing."
    reqs = [(q, " yes"), (q, " no"), (q, long_cont),
            (cat, "mat."), (cat, "roof. He starts"), (cat, "mat."),  # a duplicate request
            ("A man is", " sitting on a roof."),  # a group of size 1
            ("", " The cat"), ("", " Sarah was a much better surgeon"),  # context [EOS]
            (man, " yes"), (man, " The cat sat."), (man, long_cont)]
    enc = Encoder(tok)
    lens = [(len(c), len(x)) for c, x in (enc.pair(*r) for r in reqs)]
    assert len({c for c, _ in lens}) == 5 and lens[7][0] == 1 and lens[0][0] > 16
    assert [c + x > 49 for c, x in lens] == [False, False, True] + [False] * 8 + [True]
    shared = []
    model.register_forward_hook(lambda m, a, kw, o: shared.append(layer_cache(kw) is not None),
                                with_kwargs=True)
    for max_length, bs in ((None, 16), (None, 2), (48, 3), (48, 16)):
        ref = loglikelihoods(model, tok, reqs, batch_size=bs, max_length=max_length,
                             share_context=False)
        assert not any(shared)
        got = loglikelihoods(model, tok, reqs, batch_size=bs, max_length=max_length)
        assert any(shared)
        shared.clear()
        assert got == pytest.approx(ref, abs=1e-4)
    assert len(set(ref)) == len(ref) - 1


def test_item_scores_acc_and_acc_norm():
    item = Item((("q", " a"), ("q", " bbbb"), ("q", " cc")), (1, 4, 2), gold=1)
    assert item_scores(item, [-2.0, -4.0, -3.0]) == (0.0, 1.0)  # per char: -2, -1, -1.5
    assert item_scores(item, [-5.0, -1.0, -3.0]) == (1.0, 1.0)
    assert item_scores(item, [-1.0, -1.0, -9.0]) == (0.0, 1.0)  # tie on acc -> first index
    assert item_scores(item, [-1.0, -8.0, -1.5]) == (0.0, 0.0)


def test_evaluate_items_means_and_stderr(monkeypatch):
    items = [Item((("x", " a"), ("x", " b")), (1, 1), gold=g) for g in (0, 1, 0, 0)]
    monkeypatch.setattr("e3pruner.eval.zeroshot.loglikelihoods",
                        lambda *a, **k: [-1.0, -2.0] * 4)  # always picks choice 0
    res = evaluate_items(None, None, items)
    assert res["acc"] == res["acc_norm"] == 0.75 and res["n"] == 4
    assert res["acc_stderr"] == pytest.approx(math.sqrt((3 * 0.25**2 + 0.75**2) / 3) / 2)


def test_task_items_follow_lm_eval_prompts():
    wino = TASKS["winogrande"].to_item(
        {"sentence": "Sarah beat Maria so _ got the easy cases.", "option1": "Sarah",
         "option2": "Maria", "answer": "2"})
    assert wino.requests == (("Sarah beat Maria so Sarah", " got the easy cases."),
                             ("Sarah beat Maria so Maria", " got the easy cases."))
    assert wino.lengths == (25, 25) and wino.gold == 1
    hs = TASKS["hellaswag"].to_item(
        {"activity_label": "Roof", "ctx_a": "A man [title] climbs.", "ctx_b": "he", "label": "1",
         "endings": ["falls [step] down.", " waves. "]})
    assert hs.requests[0][0] == "Roof: A man. climbs. He"
    assert [c for _, c in hs.requests] == [" falls down.", " waves."] and hs.gold == 1
    bq = TASKS["boolq"].to_item({"passage": "P.", "question": "is it", "answer": True})
    assert bq.requests == (("P.\nQuestion: is it?\nAnswer:", " no"),
                           ("P.\nQuestion: is it?\nAnswer:", " yes")) and bq.gold == 1
    ob = TASKS["openbookqa"].to_item({"question_stem": "Sun is", "answerKey": " B",
                                      "choices": {"text": ["hot", "cold"], "label": ["A", "B"]}})
    assert ob.requests[1] == ("Sun is", " cold") and ob.gold == 1 and ob.lengths == (3, 4)


def test_resolve_tasks_and_bad_names():
    assert resolve_tasks(None) == list(TASKS) and len(TASKS) == 7
    assert resolve_tasks("arc_easy, piqa") == ["arc_easy", "piqa"]
    with pytest.raises(ValueError, match="available: arc_easy, arc_challenge"):
        resolve_tasks("arc_easy,mmlu")
    with pytest.raises(ValueError, match="unknown"):
        zero_shot(None, None, ["hellaswag_x"])
    with pytest.raises(ValueError, match="limit"):
        zero_shot(tiny_model("llama"), word_tokenizer(), "piqa", limit=0)


def test_bundled_splits_and_limit():
    pytest.importorskip("pyarrow")
    sizes = {"arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "piqa": 1838,
             "boolq": 3270, "winogrande": 1267, "openbookqa": 500}
    for task, n in sizes.items():
        assert task_data_files(task)[0].parent.name == "validation"
        assert len(load_docs(task)) == n
        items = load_items(task, 7)
        assert len(items) == 7 and items == load_items(task, 20)[:7]
        assert all(0 <= it.gold < len(it.requests) == len(it.lengths) for it in items)


def test_zero_shot_on_tiny_model():
    pytest.importorskip("pyarrow")
    model = tiny_model("llama", vocab=300)
    res = zero_shot(model, bpe_tokenizer(), "boolq,winogrande,arc_easy", limit=3, progress=False)
    for t in ("boolq", "winogrande", "arc_easy"):
        assert res[t]["n"] == 3 and res[t]["score"] == res[t][TASKS[t].metric]
        assert res[t]["acc"] in (0, 1 / 3, 2 / 3, 1)
    assert res["average"] == pytest.approx(
        (res["boolq"]["acc"] + res["winogrande"]["acc"] + res["arc_easy"]["acc_norm"]) / 3)


def test_cli_eval_zeroshot(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    model_dir, _, _ = tiny_model_dir(tmp_path)
    assert main(["eval-zeroshot", "--model", str(model_dir), "--tasks", "piqa,openbookqa",
                 "--limit", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["piqa"]["n"] == out["openbookqa"]["n"] == 2 and "average" in out
    assert main(["eval-zeroshot", "--model", str(model_dir), "--tasks", "nope"]) == 2
    assert "available:" in capsys.readouterr().err


# lm-eval's stock task file for each of our tasks
LM_EVAL_YAML = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                "hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml",
                "boolq": "super_glue/boolq/default.yaml", "winogrande": "winogrande/default.yaml",
                "openbookqa": "openbookqa/openbookqa.yaml"}


def lm_eval_task_dir(root):
    """Local task YAMLs: lm-eval's stock configs pointed at the bundled arrow files."""
    from pathlib import Path

    import lm_eval
    import yaml

    stock = Path(lm_eval.__file__).parent / "tasks"
    for task, rel in LM_EVAL_YAML.items():
        cfg = {"include": str(stock / rel), "task": f"e3zs_{task}", "tag": [],
               "dataset_path": "arrow", "dataset_name": None,
               "dataset_kwargs": {"data_files": {"validation": [str(f) for f in task_data_files(task)]},
                                  "cache_dir": str(root / "hf_cache")},
               "training_split": None, "validation_split": "validation", "test_split": None,
               "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
        if task == "boolq":  # bundled google/boolq has a bool `answer`, super_glue an int `label`
            cfg["doc_to_target"] = "{{ 1 if answer else 0 }}"
        (root / f"{task}.yaml").write_text(yaml.safe_dump(cfg))
    return root


@pytest.mark.slow
def test_same_numbers_as_lm_eval(bundled, tmp_path):
    pytest.importorskip("lm_eval")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    n = int(os.environ.get("E3_ZEROSHOT_LMEVAL_N", "6"))
    model, tok = bundled
    out = simple_evaluate(HFLM(pretrained=model, tokenizer=tok, batch_size=16),
                          tasks=[f"e3zs_{t}" for t in TASKS], limit=n, log_samples=True,
                          bootstrap_iters=0,
                          task_manager=TaskManager(include_path=str(lm_eval_task_dir(tmp_path))))
    for task in TASKS:
        samples = sorted(out["samples"][f"e3zs_{task}"], key=lambda s: s["doc_id"])
        items = load_items(task, n)
        ours = evaluate_items(model, tok, items)
        assert len(samples) == n == ours["n"]
        for s, item, lls in zip(samples, items, ours["loglikelihoods"]):
            assert [tuple(a) for a in s["arguments"]] == list(item.requests), task
            theirs = [r[0] for r in s["filtered_resps"]]
            assert lls == pytest.approx(theirs, abs=1e-4), (task, s["doc_id"])
            assert item_scores(item, lls) == (s["acc"], s["acc_norm"]), (task, s["doc_id"])
        res = out["results"][f"e3zs_{task}"]
        assert (ours["acc"], ours["acc_norm"]) == (res["acc,none"], res["acc_norm,none"])
