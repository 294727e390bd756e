"""LLM evolutionary operators for Self-Pruner: prompts, answer parsing, validation, repair.

A chat model is any callable `chat(messages: list[dict]) -> str` (messages in the OpenAI
form [{"role": "system"|"user", "content": str}, ...]); `ChatModel` wraps a local HF chat
model (its `tokenizer.apply_chat_template`, batched left-padded sampling). The operators
ask for JSON and read the answer in three steps:

1. parse    `extract_json`: the first JSON object/array in the text, tolerating code
            fences, text before/after it, single quotes, trailing commas, Python literals
            and a truncated answer (unclosed brackets are closed).
2. extract  `scalar_lists`: the lists of numbers inside the parsed value, depth first
            (so {"sets": [[..], [..]]}, [[..]], {"child": [..]} and [..] all work).
3. repair   genome constraints (below). Each operator output is counted once as
            llm_ok (valid as answered), repaired (made valid by the rule) or fallback
            (nothing usable: the classic operator produced it instead).

Repair rules (`min_frac` = 0.5: at least half of the required entries must come from
the answer, otherwise it is a fallback):
* layer set (exactly n distinct ints in [0, L)): entries that are not integers (ints,
  integral floats, digit strings) are dropped, then out-of-range entries and repeats;
  if more than n remain the first n (answer order) are kept, if fewer the set is filled
  with uniformly random other layers.
* rates (L values on the grid {0, s, 2s, ..., max}, mean = target): non-numbers dropped,
  the list cut or padded (with the target) to L, values clipped to [0, max] and snapped to
  the grid, then the sum is restored by `balance_units` (proportional rescale, floor,
  largest remainders get the missing units).
* parent pool (distinct population indices): out-of-range and repeated indices dropped,
  cut to the pool size or filled by the classic tournament; fewer than 2 usable: fallback.
* mutation: a valid answer equal to its input is repaired by one classic mutation step.

Constrained decoding (`constrained=True`, a local `ChatModel` only; constrained.py): each
answer is decoded under a grammar that admits only the asked JSON with valid genomes
(layer sets: exactly n distinct layers of [0, L); rates: L grid values with the budgeted
sum; parents: `pool` distinct population indices), different from the forbidden genomes
(init: the population so far and the answer's other sets; mutation: its input). Every
answer is then llm_ok; an answer that still fails validation is a bug: it is logged,
counted in `violations` and replaced by the classic operator (fallback, never repaired).
Init genomes that repeat a genome of another answer of the same batch are asked again,
one prompt at a time, with the grown population forbidden.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from e3pruner.methods.self_pruner.constrained import (
    AnswerGrammar,
    GrammarLogitsProcessor,
    ListSpec,
    eos_ids,
    token_vocabulary,
)

log = logging.getLogger(__name__)

Messages = list[dict]
ChatFn = Callable[[Messages], str]

SYSTEM_PROMPT = ("You are an expert in compressing large language models. You answer with "
                 "one JSON value only, no explanation.")


# ---------------------------------------------------------------------------- parsing

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)(?:```|$)", re.S)
_TRAILING_COMMA = re.compile(r",\s*(?=[\]}])")
_SINGLE_QUOTED = re.compile(r"'((?:[^'\\]|\\.)*)'")
_PY_LITERALS = {"True": "true", "False": "false", "None": "null"}


def _balanced(text: str, start: int) -> str:
    """text[start:] up to the bracket closing text[start]; an unclosed (truncated) value is
    closed by appending the missing quote and brackets."""
    closer = {"[": "]", "{": "}"}
    stack: list[str] = []
    quote = None
    i = start
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c in closer:
            stack.append(closer[c])
        elif c in "]}":
            if not stack or stack[-1] != c:
                return text[start:i] + "".join(reversed(stack))  # mismatched: cut here
            stack.pop()
            if not stack:
                return text[start:i + 1]
        i += 1
    return text[start:].rstrip() + (quote or "") + "".join(reversed(stack))


def _loads_tolerant(s: str) -> Any:
    """json.loads, then with single quotes / trailing commas / Python literals fixed, then
    ast.literal_eval. Returns None when nothing parses."""
    try:
        return json.loads(s)
    except ValueError:
        pass
    fixed = _SINGLE_QUOTED.sub(lambda m: json.dumps(m.group(1)), s)
    fixed = _TRAILING_COMMA.sub("", fixed)
    fixed = re.sub(r"\b(True|False|None)\b", lambda m: _PY_LITERALS[m.group(1)], fixed)
    try:
        return json.loads(fixed)
    except ValueError:
        pass
    try:
        return ast.literal_eval(_TRAILING_COMMA.sub("", s))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def extract_json(text: str, max_starts: int = 32) -> Any:
    """The first parseable JSON object/array in `text` (fenced blocks are tried first).
    Raises ValueError when there is none."""
    if not isinstance(text, str):
        raise ValueError(f"expected the model's answer as a str, got {type(text).__name__}")
    sources = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for src in sources:
        starts = [i for i, c in enumerate(src) if c in "[{"][:max_starts]
        for s in starts:
            value = _loads_tolerant(_balanced(src, s))
            if isinstance(value, (list, dict)):
                return value
    raise ValueError(f"no JSON object or array in the answer: {text[:120]!r}")


def _is_scalar(x) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return True
    return isinstance(x, str) and _as_number(x) is not None


def _as_number(x) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, str):
        try:
            v = float(x.strip().rstrip("%"))
        except ValueError:
            return None
        return v if math.isfinite(v) else None
    return None


def scalar_lists(value: Any) -> list[list]:
    """Every non-empty list of numbers (or numeric strings) inside `value`, depth first.
    A list mixing numbers and containers contributes its containers' lists only."""
    out: list[list] = []
    if isinstance(value, dict):
        for v in value.values():
            out += scalar_lists(v)
    elif isinstance(value, list):
        if value and all(_is_scalar(x) for x in value):
            out.append(value)
        else:
            for v in value:
                if isinstance(v, (list, dict)):
                    out += scalar_lists(v)
    return out


# ----------------------------------------------------------------------------- repair

OK, REPAIRED, FALLBACK = "llm_ok", "repaired", "fallback"


def _as_int(x) -> int | None:
    v = _as_number(x)
    if v is None or v != int(v):
        return None
    return int(v)


def repair_layer_set(items: Sequence, num_layers: int, n: int, rng: random.Random,
                     min_frac: float = 0.5) -> tuple[tuple[int, ...] | None, str]:
    """(sorted genome of exactly n distinct layers in [0, L), status) or (None, FALLBACK).
    See the module docstring for the rule."""
    valid: list[int] = []
    dropped = False
    for x in items:
        v = _as_int(x)
        if v is None or not 0 <= v < num_layers or v in valid:
            dropped = True
            continue
        valid.append(v)
    if not dropped and len(valid) == n:
        return tuple(sorted(valid)), OK
    if min(len(valid), n) < max(1, math.ceil(min_frac * n)):
        return None, FALLBACK
    valid = valid[:n]
    rest = [i for i in range(num_layers) if i not in valid]
    valid += rng.sample(rest, n - len(valid))
    return tuple(sorted(valid)), REPAIRED


def balance_units(units: Sequence[int], target: int, max_units: int) -> list[int]:
    """Integers u_l in [0, max_units] with sum = target, close to `units` in shape:
    u'_l = floor(u_l target / sum u) (uniform when sum u = 0), capped at max_units; the
    missing units go to the largest fractional parts first (ties: lower layer), cycling."""
    L = len(units)
    if not 0 <= target <= L * max_units:
        raise ValueError(f"target of {target} units is not reachable with {L} layers of at "
                         f"most {max_units} units")
    u = [min(max(int(x), 0), max_units) for x in units]
    s = sum(u)
    if s == target:
        return u
    scaled = [min(x * target / s, max_units) for x in u] if s else [target / L] * L
    base = [int(math.floor(x + 1e-9)) for x in scaled]
    order = sorted(range(L), key=lambda i: (-(scaled[i] - base[i]), i))
    missing = target - sum(base)
    while missing > 0:
        for i in order:
            if missing and base[i] < max_units:
                base[i] += 1
                missing -= 1
    return base


def repair_rates(items: Sequence, num_layers: int, step: float, max_units: int,
                 target_units: int, min_frac: float = 0.5
                 ) -> tuple[tuple[int, ...] | None, str]:
    """(genome of L rate units u_l (rate = u_l * step) with sum = target_units, status) or
    (None, FALLBACK). See the module docstring for the rule."""
    values = [_as_number(x) for x in items]
    nums = [v for v in values if v is not None]
    if len(nums) < max(1, math.ceil(min_frac * num_layers)):
        return None, FALLBACK
    changed = len(nums) != len(values) or len(nums) != num_layers
    target_rate = target_units * step / num_layers
    nums = (nums + [target_rate] * num_layers)[:num_layers]
    units = []
    for v in nums:
        u = round(v / step)
        c = min(max(u, 0), max_units)
        changed |= c != u or abs(v - u * step) > 1e-6
        units.append(c)
    if sum(units) != target_units:
        units = balance_units(units, target_units, max_units)
        changed = True
    return tuple(units), REPAIRED if changed else OK


# ------------------------------------------------------------------------- chat models

class ChatModel:
    """A local HF chat model as `chat(messages) -> str`, plus `batch(list of messages)`
    (left-padded, one generate call per `batch_size` prompts). temperature <= 0: greedy.
    Sampling is seeded per call (seed, call index) without touching the global RNG.
    max_new_tokens: the default answer length; `batch(..., max_new_tokens=k)` overrides it.
    prefill: text the assistant's answer starts with (e.g. '{"child": ['); it is appended
    after the chat template's generation prompt and returned as part of the answer.
    grammars (one per conversation, None = free): answers decoded under
    GrammarLogitsProcessor; the length is then the grammar's bound (it always ends)."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 128, temperature: float = 0.7,
                 seed: int = 0, batch_size: int = 8):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the operator model's tokenizer has no chat template: use an "
                             "instruction-tuned chat model or pass a chat callable")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.seed, self.batch_size, self.calls = seed, batch_size, 0

    def __call__(self, messages: Messages) -> str:
        return self.batch([messages])[0]

    @torch.no_grad()
    def batch(self, conversations: list[Messages], max_new_tokens: int | None = None,
              prefill: str = "", grammars: list[AnswerGrammar | None] | None = None
              ) -> list[str]:
        tok = self.tokenizer
        max_new = max_new_tokens or self.max_new_tokens
        if grammars is not None and len(grammars) != len(conversations):
            raise ValueError(f"{len(grammars)} grammars for {len(conversations)} conversations")
        device = next(self.model.parameters()).device
        texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) + prefill
                 for m in conversations]
        answers: list[str] = []
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            for i in range(0, len(texts), self.batch_size):
                enc = tok(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
                sample = self.temperature > 0
                kw = dict(do_sample=True, temperature=self.temperature, top_p=1.0, top_k=0) \
                    if sample else dict(do_sample=False)
                chunk = grammars[i:i + self.batch_size] if grammars is not None else None
                if chunk is not None and any(g is not None for g in chunk):
                    from transformers import LogitsProcessorList

                    eos = eos_ids(self.model, tok)
                    proc = GrammarLogitsProcessor(chunk, token_vocabulary(tok), eos, prefill)
                    kw.update(logits_processor=LogitsProcessorList([proc]), eos_token_id=eos)
                    n_new = max(g.max_chars for g in chunk if g is not None) + 1
                    if any(g is None for g in chunk):
                        n_new = max(n_new, max_new)
                else:
                    n_new = max_new
                devices = [device] if device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(self.seed * 1_000_003 + self.calls)
                    out = self.model.generate(**enc, max_new_tokens=n_new,
                                              pad_token_id=tok.pad_token_id, **kw)
                self.calls += 1
                new = out[:, enc["input_ids"].shape[1]:]
                answers += [prefill + a for a in tok.batch_decode(new, skip_special_tokens=True)]
        finally:
            tok.padding_side = side
        return answers


def chat_many(chat: ChatFn, conversations: list[Messages],
              max_new_tokens: int | None = None, prefill: str = "",
              grammars: list[AnswerGrammar | None] | None = None) -> list[str]:
    """Answers to several conversations: batched when the chat model can, else one by one.
    max_new_tokens, prefill (the answer's forced start) and grammars (constrained
    decoding) apply to a ChatModel only; a plain callable gets the messages alone."""
    if not conversations:
        return []
    if isinstance(chat, ChatModel):
        return chat.batch(conversations, max_new_tokens, prefill, grammars)
    if hasattr(chat, "batch"):
        return list(chat.batch(conversations))
    return [chat(m) for m in conversations]


def make_chat(spec, *, reuse_model=None, max_new_tokens: int | None = None, temperature: float = 0.7,
              seed: int = 0, batch_size: int = 8, device=None) -> ChatFn:
    """A chat callable from `spec`: a callable (used as is), a (model, tokenizer) pair, or
    a model name/dir for `load_model` ("smollm2-135m" = the bundled SmolLM2-135M-Instruct).
    reuse_model: an already loaded model used instead of a second copy when it is the same
    checkpoint (then only the tokenizer is loaded)."""
    if isinstance(spec, tuple) and len(spec) == 2:
        model, tok = spec
    elif callable(spec):
        return spec
    elif isinstance(spec, str):
        from e3pruner.models.loading import load_model, resolve_model_path

        path = resolve_model_path(spec)
        if reuse_model is not None and getattr(reuse_model.config, "_name_or_path", None) == path:
            from transformers import AutoTokenizer

            model, tok = reuse_model, AutoTokenizer.from_pretrained(path)
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
        else:
            model, tok = load_model(path, device=device or "cpu", check_supported=False)
    else:
        raise ValueError("operator_model must be a model name/dir, a (model, tokenizer) pair "
                         f"or a callable chat(messages) -> str, got {type(spec).__name__}")
    return ChatModel(model, tok, max_new_tokens=max_new_tokens or 128, temperature=temperature,
                     seed=seed, batch_size=batch_size)


# --------------------------------------------------------------------------- operators

class Space(Protocol):
    """What the operators need from a search space (self_pruner.LayerSpace / WidthSpace)."""

    kind: str
    num_layers: int
    answer_tokens: int  # about how many tokens one genome takes in a JSON answer

    def describe(self) -> str: ...
    def answer_format(self, key: str) -> str: ...
    def fmt(self, genome) -> str: ...
    def from_items(self, items: Sequence, rng: random.Random) -> tuple[Any, str]: ...
    def list_spec(self) -> ListSpec: ...  # what a genome's JSON list may hold
    def random(self, rng: random.Random): ...
    def crossover(self, a, b, rng: random.Random): ...
    def mutate(self, genome, rng: random.Random): ...


@dataclass
class OpCounts:
    llm_ok: int = 0
    repaired: int = 0
    fallback: int = 0
    classic: int = 0  # produced by the classic operator by configuration (operator="classic")

    def add(self, status: str) -> None:
        setattr(self, status, getattr(self, status) + 1)

    @property
    def total(self) -> int:
        return self.llm_ok + self.repaired + self.fallback + self.classic


def operator_shares(counts: dict[str, OpCounts]) -> dict[str, float | int]:
    """Over all operations of all operators: the share of each outcome (llm_ok, repaired,
    fallback, classic; they sum to 1) and the number of operations."""
    total = sum(c.total for c in counts.values())
    out: dict[str, float | int] = {
        k: (sum(getattr(c, k) for c in counts.values()) / total if total else 0.0)
        for k in (OK, REPAIRED, FALLBACK, "classic")}
    out["operations"] = total
    return out


def _head(key: str, groups: bool) -> tuple[str, str]:
    """(answer start, answer end) around the numbers: '{"key": [' / '}' ('[[' / ']}')."""
    return (f'{{"{key}": [[', "]}") if groups else (f'{{"{key}": [', "}")


@dataclass
class LLMOperators:
    """Initial population, parent selection, crossover and mutation by prompting `chat`;
    every output is validated/repaired, and replaced by the classic operator (fallback)
    when unusable. `tournament(fitness, k, rng) -> k distinct indices` is the classic
    selection. Counters: per generated genome (init), per call (the others).
    constrained: decode a ChatModel's answers under their grammar (module docstring);
    `violations` counts constrained answers that still failed validation (bugs)."""

    chat: ChatFn
    space: Space
    tournament: Callable[[list[float], int, random.Random], list[int]]
    rng: random.Random
    init_per_call: int = 2
    max_new_tokens: int | None = None  # None: sized to the requested answer (`_budget`)
    prefill: bool = True  # start a ChatModel's answers with the JSON key (e.g. '{"child": [')
    constrained: bool = True
    counts: dict[str, OpCounts] = field(default_factory=lambda: {
        k: OpCounts() for k in ("init", "selection", "crossover", "mutation")})
    samples: dict[str, list[str]] = field(default_factory=dict)
    keep_samples: int = 2
    seconds: float = 0.0  # wall time spent in the chat model
    violations: int = 0
    init_retries: int = 0  # init prompts asked again for repeated genomes (constrained)

    @property
    def is_constrained(self) -> bool:
        return self.constrained and isinstance(self.chat, ChatModel)

    def _budget(self, answer_tokens: int) -> int:
        """New tokens for an answer of ~answer_tokens: 1.25 x + 24 (key, fences, slack)."""
        auto = int(1.25 * answer_tokens) + 24
        return min(auto, self.max_new_tokens) if self.max_new_tokens else auto

    def _grammar(self, key: str, spec: ListSpec | None = None, groups: int = 0,
                 forbidden=()) -> AnswerGrammar | None:
        """The answer grammar for `key` (groups > 0: that many lists, the "sets" form), or
        None when not constrained or when no answer can meet it (the space is exhausted)."""
        if not self.is_constrained:
            return None
        head, tail = _head(key, groups > 0)
        try:
            return AnswerGrammar(spec or self.space.list_spec(), head, tail, max(groups, 1),
                                 forbidden)
        except ValueError as err:
            log.info("self-pruner: no constrained answer for %r (%s)", key, err)
            return None

    def _ask(self, op: str, prompts: list[str], answer_tokens: int, prefill: str,
             grammars: list[AnswerGrammar | None] | None = None) -> list[str]:
        convs = [[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": p}]
                 for p in prompts]
        t0 = time.perf_counter()
        answers = chat_many(self.chat, convs, self._budget(answer_tokens),
                            prefill if self.prefill else "",
                            grammars if self.is_constrained else None)
        self.seconds += time.perf_counter() - t0
        if len(answers) != len(prompts):
            raise RuntimeError(f"chat returned {len(answers)} answers to {len(prompts)} prompts")
        kept = self.samples.setdefault(op, [])
        for a in answers[: max(0, self.keep_samples - len(kept))]:
            kept.append(str(a)[:400])
        return answers

    def _checked(self, op: str, genome, status: str, answer: str, constrained: bool):
        """(genome, status) with a constrained answer that is not llm_ok turned into a
        logged violation: (None, FALLBACK)."""
        if constrained and status != OK:
            self.violations += 1
            log.warning("self-pruner: the constrained %s answer %r failed validation (%s); "
                        "using the classic operator", op, str(answer)[:200], status)
            return None, FALLBACK
        return genome, status

    @staticmethod
    def _lists(answer: str) -> list[list]:
        try:
            return scalar_lists(extract_json(answer))
        except ValueError:
            return []

    def _init_prompt(self, m: int) -> str:
        return (f"{self.space.describe()}\nPropose {m} different candidate configurations. "
                f"Answer with JSON only: {self.space.answer_format('sets')}")

    def _init_genomes(self, answer: str, m: int, constrained: bool) -> list[tuple[Any, str]]:
        """m (genome, status) from an init answer; None genome: unusable."""
        lists = self._lists(answer)
        out = []
        for j in range(m):
            g, status = (self.space.from_items(lists[j], self.rng) if j < len(lists)
                         else (None, FALLBACK))
            out.append(self._checked("init", g, status, answer, constrained))
        return out

    def initial(self, k: int) -> list:
        sp = self.space
        calls = math.ceil(k / self.init_per_call)
        sizes = [min(self.init_per_call, k - c * self.init_per_call) for c in range(calls)]
        grammars = [self._grammar("sets", groups=m) for m in sizes]
        answers = self._ask("init", [self._init_prompt(m) for m in sizes],
                            min(k, self.init_per_call) * (sp.answer_tokens + 2), '{"sets": [[',
                            grammars)
        slots = [gs for m, grammar, answer in zip(sizes, grammars, answers)
                 for gs in self._init_genomes(answer, m, grammar is not None)]
        pop: list = []
        for g, status in slots:
            if g is not None and g in pop and self.is_constrained:
                g, status = self._init_again(pop)
            if g is None or g in pop:
                g, status = distinct_random(sp, pop, self.rng), FALLBACK
            pop.append(g)
            self.counts["init"].add(status)
        return pop

    def _init_again(self, pop: list) -> tuple[Any, str]:
        """One init genome not in `pop`, asked alone with `pop` forbidden; (None, FALLBACK)
        when the space has no other genome or the answer fails."""
        grammar = self._grammar("sets", groups=1, forbidden=pop)
        if grammar is None:
            return None, FALLBACK
        self.init_retries += 1
        answer = self._ask("init", [self._init_prompt(1)], self.space.answer_tokens + 2,
                           '{"sets": [[', [grammar])[0]
        g, status = self._init_genomes(answer, 1, True)[0]
        if g in pop:
            return self._checked("init", g, "repeat", answer, True)
        return g, status

    def select(self, population: list, fitness: list[float], pool_size: int) -> list[int]:
        sp = self.space
        lines = "\n".join(f"{i}: {sp.fmt(g)}  perplexity {f:.4g}"
                          for i, (g, f) in enumerate(zip(population, fitness)))
        prompt = (f"{sp.describe()}\nLower perplexity is better. Current population:\n{lines}\n"
                  f"Choose {pool_size} different candidates (by index) as parents for the next "
                  f"generation. Answer with JSON only: {{\"parents\": [index, ...]}}")
        spec = ListSpec({str(i): i for i in range(len(population))}, pool_size, distinct=True)
        grammar = self._grammar("parents", spec)
        answer = self._ask("selection", [prompt], 4 * pool_size, '{"parents": [', [grammar])[0]
        lists = self._lists(answer)
        pool: list[int] = []
        dropped = not lists
        for x in (lists[0] if lists else []):
            v = _as_int(x)
            if v is None or not 0 <= v < len(population) or v in pool:
                dropped = True
            else:
                pool.append(v)
        status = OK if not dropped and len(pool) == pool_size else REPAIRED
        if len(pool) < 2 or self._checked("selection", pool, status, answer,
                                          grammar is not None)[0] is None:
            self.counts["selection"].add(FALLBACK)
            return self.tournament(fitness, pool_size, self.rng)
        pool = pool[:pool_size]
        if len(pool) < pool_size:
            rest = [i for i in range(len(population)) if i not in pool]
            extra = self.tournament([fitness[i] for i in rest], pool_size - len(pool), self.rng)
            pool += [rest[i] for i in extra]
        self.counts["selection"].add(status)
        return pool

    def crossover(self, pairs: list[tuple]) -> list:
        sp = self.space
        prompts = [f"{sp.describe()}\nParent A: {sp.fmt(a)}\nParent B: {sp.fmt(b)}\n"
                   "Combine the two parents into one child configuration that mixes them. "
                   f"Answer with JSON only: {sp.answer_format('child')}" for a, b in pairs]
        grammar = self._grammar("child")
        answers = self._ask("crossover", prompts, sp.answer_tokens, '{"child": [',
                            [grammar] * len(pairs))
        children = []
        for (a, b), answer in zip(pairs, answers):
            lists = self._lists(answer)
            g, status = sp.from_items(lists[0], self.rng) if lists else (None, FALLBACK)
            g, status = self._checked("crossover", g, status, answer, grammar is not None)
            if g is None:
                g = sp.crossover(a, b, self.rng)
            self.counts["crossover"].add(status)
            children.append(g)
        return children

    def mutate(self, genomes: list) -> list:
        sp = self.space
        prompts = [f"{sp.describe()}\nCandidate: {sp.fmt(g)}\nMutate it: change it slightly so "
                   "that it stays a valid configuration. "
                   f"Answer with JSON only: {sp.answer_format('child')}" for g in genomes]
        grammars = [self._grammar("child", forbidden=[g]) for g in genomes]
        out = []
        for g0, grammar, answer in zip(genomes, grammars, self._ask(
                "mutation", prompts, sp.answer_tokens, '{"child": [', grammars)):
            lists = self._lists(answer)
            g, status = sp.from_items(lists[0], self.rng) if lists else (None, FALLBACK)
            if g is not None and g == g0:
                status = REPAIRED
            g, status = self._checked("mutation", g, status, answer, grammar is not None)
            if g is None or g == g0:
                g = sp.mutate(g0, self.rng)
            self.counts["mutation"].add(status)
            out.append(g)
        return out


def distinct_random(space: Space, taken: list, rng: random.Random, tries: int = 100):
    """A random genome not in `taken` (a repeat if none is found in `tries` draws)."""
    g = space.random(rng)
    for _ in range(tries):
        if g not in taken:
            return g
        g = space.random(rng)
    return g
