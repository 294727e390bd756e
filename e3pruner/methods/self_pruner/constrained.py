"""Constrained decoding of Self-Pruner's operator answers: a character automaton for the
JSON answer format and a transformers `LogitsProcessor` that admits only tokens keeping it
alive, so that every answer is well formed and meets the budget.

Answer format (one `AnswerGrammar`): `head` (e.g. '{"child": [' or '{"sets": [['), then
`groups` lists of exactly `count` numbers written as `spec.literals` (e.g. "0".."L-1", or
the rate grid "0.0", "0.1", ...), items separated by "," with at most one space, groups by
"], [" (the space optional), each group closed by "]", then `tail` ('}' or ']}'). Each
group must also be `distinct` (no value twice) or sum to `total`, and differ from the
`forbidden` groups and from the earlier groups of the answer (as a set when distinct, as
a tuple otherwise).

Liveness: a number is admitted only if, after it, the group can still be completed:
with r = count - k values still to write after the k written ones (values c_1..c_k),

    completions(c) = C(|V| - k, r)                         (distinct)
                   = #{r-tuples of V with sum total - sum c}   (total; dynamic programme)
    live(c) <=> completions(c) > #{forbidden or earlier groups that extend c}

and the grammar is built only when at least `groups` valid groups are not forbidden (then
each completed group leaves enough for the others).

Every state reached through admitted characters can therefore reach the end (the
tokenizer must have a one-character token for each character of the format, as byte-level
BPE and SentencePiece with byte fallback do; checked), and the
answer has at most `max_chars` characters, so decoding ends within that many tokens (an
admitted token has >= 1 character). EOS is admitted only at the end.

The token texts are computed once per tokenizer (`token_vocabulary`): the text token i
adds to a decoded answer, decode([ref, i]) minus decode([ref]) (exact for byte-level BPE
and SentencePiece alike), indexed by first character.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import LogitsProcessor

log = logging.getLogger(__name__)

HEAD, NUM, GROUP_SEP, TAIL, DONE = range(5)
SEPARATORS = ",] ["


@dataclass(frozen=True)
class ListSpec:
    """What one list of the answer holds: `count` numbers written as the keys of `literals`
    (value = literals[text]), all different (`distinct`) or with values summing to `total`."""

    literals: Mapping[str, int]
    count: int
    distinct: bool = False
    total: int | None = None

    def __post_init__(self):
        if self.count < 1:
            raise ValueError(f"a list needs count >= 1, got {self.count}")
        if not self.literals:
            raise ValueError("a list needs at least one admissible number (literals is empty)")
        bad = [s for s in self.literals if not s or any(c in SEPARATORS for c in s)]
        if bad:
            raise ValueError(f"number literals must be non-empty and free of ',] [': {bad}")
        if self.distinct and self.total is not None:
            raise ValueError("a list is either distinct or has a total, not both")
        if self.distinct and len(set(self.literals.values())) < self.count:
            raise ValueError(f"{self.count} distinct values asked from only "
                             f"{len(set(self.literals.values()))}")

    def key(self, values: Sequence[int]) -> tuple:
        """The identity of a group: sorted when distinct (a set), else the tuple."""
        return tuple(sorted(values)) if self.distinct else tuple(values)


class AnswerGrammar:
    """Character automaton of one answer (module docstring). States are hashable tuples
    (phase, pos, done groups, current values, current number text); `step` returns the
    next state or None (dead)."""

    def __init__(self, spec: ListSpec, head: str, tail: str, groups: int = 1,
                 forbidden: Iterable[Sequence[int]] = ()):
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self.spec, self.head, self.tail, self.groups = spec, head, tail, groups
        self.values = sorted(set(spec.literals.values()))
        self.forbidden = frozenset(k for k in (spec.key(f) for f in forbidden) if self._valid(k))
        self._by_value: dict[int, list[str]] = {}
        for text, v in spec.literals.items():
            self._by_value.setdefault(v, []).append(text)
        self.alphabet = frozenset(head + tail + SEPARATORS + "".join(spec.literals))
        self._body_alphabet = frozenset(tail + SEPARATORS + "".join(spec.literals))
        self._steps: dict = {}
        self._admissible: dict = {}
        self._tokens: dict = {}
        if self._completions(()) - len(self.forbidden) < groups:
            raise ValueError(f"fewer than {groups} groups meet the constraints and differ from "
                             f"the {len(self.forbidden)} forbidden ones")
        self.initial = (HEAD, 0, (), (), "") if head else (NUM, 0, (), (), "")

    @property
    def max_chars(self) -> int:
        """An upper bound on the answer's length in characters."""
        lit = max(map(len, self.spec.literals))
        return (len(self.head) + self.groups * (self.spec.count * (lit + 2) + 1)
                + 3 * (self.groups - 1) + len(self.tail))

    # -------------------------------------------------------------- liveness

    def _completions(self, cur: tuple) -> int:
        r = self.spec.count - len(cur)
        if self.spec.distinct:
            return math.comb(len(self.values) - len(cur), r)
        if self.spec.total is not None:
            return _tuples_with_sum(tuple(self.values), r, self.spec.total - sum(cur))
        return len(self.values) ** r

    def _valid(self, group: tuple) -> bool:
        values = set(self.values)
        return (len(group) == self.spec.count and all(v in values for v in group)
                and (not self.spec.distinct or len(set(group)) == len(group))
                and (self.spec.total is None or sum(group) == self.spec.total))

    def _extends(self, group: tuple, cur: tuple) -> bool:
        if self.spec.distinct:
            return set(cur) <= set(group)
        return group[:len(cur)] == cur

    def _live(self, done: tuple, cur: tuple) -> bool:
        if len(cur) > self.spec.count:
            return False
        taken = self.forbidden | set(done)
        if len(cur) == self.spec.count:
            return self._completions(cur) == 1 and self.spec.key(cur) not in taken
        blocked = sum(self._extends(g, cur) for g in taken)
        return self._completions(cur) > blocked

    def admissible(self, done: tuple, cur: tuple) -> frozenset[str]:
        """Number texts that may come next: their value keeps the group live."""
        key = (done, cur)
        if key not in self._admissible:
            ok = set()
            for v, texts in self._by_value.items():
                if self.spec.distinct and v in cur:
                    continue
                if self._live(done, cur + (v,)):
                    ok.update(texts)
            prefixes = {t[:i] for t in ok for i in range(1, len(t) + 1)}
            self._admissible[key] = (frozenset(ok), frozenset(prefixes))
        return self._admissible[key][0]

    def _prefixes(self, done: tuple, cur: tuple) -> frozenset[str]:
        self.admissible(done, cur)
        return self._admissible[(done, cur)][1]

    # -------------------------------------------------------------- automaton

    def step(self, state: tuple | None, c: str) -> tuple | None:
        if state is None:
            return None
        key = (state, c)
        if key not in self._steps:
            self._steps[key] = self._step(state, c)
        return self._steps[key]

    def _step(self, state: tuple, c: str) -> tuple | None:
        phase, pos, done, cur, num = state
        if phase == HEAD:
            if c != self.head[pos]:
                return None
            return (HEAD, pos + 1, done, cur, "") if pos + 1 < len(self.head) else \
                (NUM, 0, done, cur, "")
        if phase == NUM:
            if c == " ":
                return (NUM, 0, done, cur, "") if pos == 1 and not num else None
            if c in ",]":
                if num not in self.admissible(done, cur):
                    return None
                cur = cur + (self.spec.literals[num],)
                if c == ",":
                    return (NUM, 1, done, cur, "") if len(cur) < self.spec.count else None
                if len(cur) < self.spec.count:
                    return None
                done = done + (self.spec.key(cur),)
                if len(done) < self.groups:
                    return (GROUP_SEP, 0, done, (), "")
                return (TAIL, 0, done, (), "") if self.tail else (DONE, 0, done, (), "")
            text = num + c
            if text in self._prefixes(done, cur):
                return (NUM, 0, done, cur, text)
            return None
        if phase == GROUP_SEP:  # after "]": "," then an optional " " then "["
            if pos == 0:
                return (GROUP_SEP, 1, done, cur, "") if c == "," else None
            if c == " " and pos == 1:
                return (GROUP_SEP, 2, done, cur, "")
            return (NUM, 0, done, cur, "") if c == "[" else None
        if phase == TAIL:
            if c != self.tail[pos]:
                return None
            return (TAIL, pos + 1, done, cur, "") if pos + 1 < len(self.tail) else \
                (DONE, 0, done, cur, "")
        return None

    def feed(self, state: tuple | None, text: str) -> tuple | None:
        for c in text:
            state = self.step(state, c)
            if state is None:
                return None
        return state

    def start(self, prefill: str = "") -> tuple:
        """The state after the answer's forced start `prefill`."""
        state = self.feed(self.initial, prefill)
        if state is None:
            raise ValueError(f"the prefill {prefill!r} does not start a valid answer "
                             f"(the answer begins with {self.head!r})")
        return state

    def accepts(self, text: str, prefill: str = "") -> bool:
        state = self.feed(self.start(prefill), text)
        return state is not None and state[0] == DONE

    def allowed_tokens(self, state: tuple, vocab: TokenVocabulary) -> list[int]:
        """Token ids whose text keeps the automaton live from `state` (no EOS)."""
        key = (vocab.key, state)
        if key not in self._tokens:
            ids = []
            body = state[0] != HEAD
            if (vocab.key, body) not in self._tokens:
                self._tokens[(vocab.key, body)] = vocab.restricted(
                    self._body_alphabet if body else self.alphabet)
            for c, tokens in self._tokens[(vocab.key, body)].items():
                after = self.step(state, c)
                if after is None:
                    continue
                for tid, text in tokens:
                    if self.feed(after, text[1:]) is not None:
                        ids.append(tid)
            self._tokens[key] = ids
        return self._tokens[key]


@lru_cache(maxsize=4096)
def _tuples_with_sum(values: tuple, r: int, s: int) -> int:
    """#{(v_1..v_r) in values^r : sum = s}."""
    if r == 0:
        return int(s == 0)
    if s < r * values[0] or s > r * values[-1]:
        return 0
    return sum(_tuples_with_sum(values, r - 1, s - v) for v in values if v <= s)


# ---------------------------------------------------------------------- vocabulary

class TokenVocabulary:
    """The text of every token id inside a decoded answer, [V] strings ("" for special
    tokens), and its non-empty ones grouped by first character."""

    def __init__(self, tokenizer):
        ref = tokenizer.encode("0", add_special_tokens=False)[-1]
        size = len(tokenizer)
        both = tokenizer.batch_decode([[ref, i] for i in range(size)], skip_special_tokens=True)
        lead = tokenizer.decode([ref], skip_special_tokens=True)
        self.strings = [s[len(lead):] if s.startswith(lead) else "" for s in both]
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        for i in special:
            if 0 <= i < size:
                self.strings[i] = ""
        self.key = id(self)
        self.chars = frozenset(s for s in self.strings if len(s) == 1)
        self._restricted: dict[frozenset, dict[str, list[tuple[int, str]]]] = {}

    def restricted(self, alphabet: frozenset) -> dict[str, list[tuple[int, str]]]:
        """first char -> [(id, text)] of the tokens written in `alphabet` only."""
        if alphabet not in self._restricted:
            out: dict[str, list[tuple[int, str]]] = {}
            for i, s in enumerate(self.strings):
                if s and all(c in alphabet for c in s):
                    out.setdefault(s[0], []).append((i, s))
            self._restricted[alphabet] = out
        return self._restricted[alphabet]


_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_vocabulary(tokenizer) -> TokenVocabulary:
    """The (cached, per tokenizer object) TokenVocabulary of `tokenizer`."""
    vocab = _VOCABS.get(tokenizer)
    if vocab is None:
        vocab = _VOCABS[tokenizer] = TokenVocabulary(tokenizer)
    return vocab


def eos_ids(model, tokenizer) -> list[int]:
    """The ids that end an answer: the generation config's EOS ids and the tokenizer's
    (pass them to generate as eos_token_id, so that generation stops on exactly these)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the operator model has no EOS token: constrained decoding needs one")
    return sorted(set(ids))


# ------------------------------------------------------------------ logits processor

class GrammarLogitsProcessor(LogitsProcessor):
    """Masks (to -inf) every token that cannot extend row b's answer under grammars[b].

    scores [B, V'] (V' >= tokenizer size; ids beyond it are masked). The first call sees
    the prompt (input_ids [B, T0]); each later call reads the token just generated. At the
    end of an answer only EOS is allowed; a row with no admissible token (a tokenizer that
    cannot write the next character) gets EOS too and is reported in `stuck`. A row whose
    grammar is None is left free."""

    def __init__(self, grammars: Sequence[AnswerGrammar | None], vocab: TokenVocabulary,
                 eos: Sequence[int], prefill: str = ""):
        self.grammars, self.vocab, self.eos = list(grammars), vocab, list(eos)
        for g in self.grammars:
            missing = sorted(g.alphabet - vocab.chars) if g is not None else []
            if missing:
                raise ValueError(f"the tokenizer has no one-character token for {missing}: "
                                 "constrained decoding needs one per character of the answer "
                                 "format (use constrained=False with this operator model)")
        self.states: list[tuple | None] = [g.start(prefill) if g is not None else None
                                           for g in self.grammars]
        self.finished = [False] * len(self.grammars)
        self.stuck: list[int] = []
        self._started = False
        self._ids: dict = {}

    def _text_tokens(self, g: AnswerGrammar, state: tuple, width: int) -> list[int]:
        """g's admissible tokens at `state` below the scores' width, EOS ids excluded (an
        EOS id stops generation, whatever its text)."""
        key = (id(g), state, width)
        if key not in self._ids:
            eos = set(self.eos)
            self._ids[key] = [i for i in g.allowed_tokens(state, self.vocab)
                              if i not in eos and i < width]
        return self._ids[key]

    def _advance(self, b: int, token: int) -> None:
        if self.finished[b] or self.grammars[b] is None:
            return
        if token in self.eos:
            self.finished[b] = True
            return
        text = self.vocab.strings[token] if token < len(self.vocab.strings) else ""
        self.states[b] = self.grammars[b].feed(self.states[b], text) if text else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[0] != len(self.grammars):
            raise ValueError(f"{input_ids.shape[0]} rows for {len(self.grammars)} grammars")
        if self._started:
            for b, token in enumerate(input_ids[:, -1].tolist()):
                self._advance(b, token)
        self._started = True
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        for b, (g, state) in enumerate(zip(self.grammars, self.states)):
            if g is None:
                allowed[b] = True
                continue
            ids = [] if state is None or self.finished[b] or state[0] == DONE else \
                self._text_tokens(g, state, scores.shape[-1])
            if not ids:
                if state is None or (state[0] != DONE and not self.finished[b]):
                    if b not in self.stuck:
                        self.stuck.append(b)
                        log.warning("constrained decoding: row %d has no admissible token "
                                    "(state %s); ending it", b, state)
                ids = self.eos
            allowed[b, torch.tensor(ids, dtype=torch.long, device=scores.device)] = True
        return scores.masked_fill(~allowed, float("-inf"))
