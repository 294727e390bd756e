"""Self-Pruner (Huang et al. 2025, "Towards Efficient Automatic Self-Pruning of Large
Language Models", arXiv 2502.14413): evolutionary search over pruning configurations in
which an LLM writes the initial population and performs selection, crossover and mutation
through prompts (llm_operator.py); a local operator model's answers are decoded under a
grammar that admits only valid genomes meeting the budget (constrained.py); classic
operators are the fallback and an option. info["operator_shares"]: the share of llm_ok /
repaired / fallback / classic operations.

Search spaces (a genome is hashable; fitness is cached by genome):
* "layers" (registered "self-pruner"): the sorted tuple of the n removed layers (exactly
  n distinct indices of L). Removal through the layer gates (gates.py).
* "width" ("self-pruner-width"): L integer rate units u_l, rate r_l = u_l * rate_step in
  {0, s, ..., max_rate}, with sum u_l = round(n / rate_step), i.e. mean rate n / L (the
  layer space's removed fraction); structured Wanda-sp masks (width.py), NOT exportable:
  Selection.keep is every layer, info["width_rates"] the rates, info["exportable"] False.

Fitness (lower is better), on the calibration blocks x (first `calib_blocks` blocks,
first `calib_len` tokens each):

    ppl(g) = exp( -(1/N) sum_{b,t} log p_g(x_{b,t+1} | x_{b,<=t}) ),   N = B (T - 1)

without gradients, `batch_size` blocks per forward, logits in chunks (ppl.lm_nll). Every
configuration leaves the layers before its first changed layer p (first removed layer;
first layer with a positive rate) untouched, so one full forward caches every layer's
input and each evaluation restarts at layer p (ppl.hidden_from); searches that settle on
deep layers cost a fraction of a forward. Several genomes are not batched as per-sample
masks [B, L]: a gated layer is skipped only when its gate is 0 for the whole batch, so a
batch of different genomes would run every layer (L instead of L - n layers per sample).

Generation: elitist. The `elite` best genomes survive; the other P - elite are children:
the selection operator picks a pool of `parents` distinct individuals, each child takes two
distinct pool members, is their crossover with probability crossover_rate (else a copy
of the first), then is mutated with probability mutation_rate. A child equal to a genome
already in the next population gets classic mutations until it is new (info
"dedup_mutations"). The result is the best genome ever evaluated.

Classic operators: tournament selection (size `tournament_size`, without replacement),
crossover "uniform" (layers: keep A & B, fill from the symmetric difference at random;
width: per-layer pick then rebalance) or "one-point" (on the 0/1 removal vector, then
repaired to n removed, preferring the parents' layers), mutation = swap one removed layer
for a kept one (width: move one rate unit from one layer to another).

Selection.scores (higher = more important): layers: 1 - the fraction of the final
population that removes layer l; width: 1 - the mean rate of layer l in the final
population. Selection.tokens: calibration tokens processed (all forwards).
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from e3pruner.methods.self_pruner.llm_operator import (
    LLMOperators,
    ListSpec,
    OpCounts,
    balance_units,
    distinct_random,
    make_chat,
    operator_shares,
    repair_layer_set,
    repair_rates,
)
from e3pruner.methods.base import (
    Budget,
    PruneData,
    Selection,
    check_n_prune,
    preserved_model_state,
    register,
)
from e3pruner.losses import lm_nll
from e3pruner.models.activations import final_hidden, hidden_from, layer_inputs
from e3pruner.models.families import decoder_layers
from e3pruner.models.gates import gated


@dataclass
class SelfPrunerConfig:
    population: int = 30
    generations: int = 20
    elite: int = 2
    crossover_rate: float = 0.9
    mutation_rate: float = 0.3
    tournament_size: int = 3
    parents: int | None = None  # mating-pool size chosen by selection; None: population // 2
    operator: str = "llm"  # "llm" or "classic"
    # "smollm2-135m" (bundled SmolLM2-135M-Instruct), an HF chat-model dir, a
    # (model, tokenizer) pair, or a callable chat(messages: list[dict]) -> str
    operator_model: Any = "smollm2-135m"
    max_new_tokens: int | None = None  # None: sized to each requested answer (llm_operator)
    temperature: float = 0.7  # <= 0: greedy decoding
    operator_batch: int = 8  # prompts per generate call
    prefill: bool = True  # force a local chat model's answer to start with the JSON key
    constrained: bool = True  # decode a local chat model's answers under their grammar
    init_per_call: int = 2  # initial-population genomes asked for per prompt
    seed: int | None = None  # None: Budget.seed
    space: str = "layers"  # "layers" or "width"
    classic_crossover: str = "uniform"  # "uniform" or "one-point"
    rate_step: float = 0.1  # width space: rate grid step
    max_rate: float = 0.9  # width space: largest per-layer rate
    calib_blocks: int | None = None  # fitness on the first k calibration blocks (None: all)
    calib_len: int | None = None  # ... and their first T tokens (None: whole blocks)
    batch_size: int | None = None  # blocks per fitness forward (None: Budget.batch_size)
    prefix_cache: bool = True  # restart each evaluation at its first changed layer
    max_evaluations: int | None = None  # stop after this many fitness forwards

    def validate(self) -> None:
        if self.population < 2:
            raise ValueError(f"population must be >= 2, got {self.population}")
        if self.generations < 0:
            raise ValueError(f"generations must be >= 0, got {self.generations}")
        if not 0 <= self.elite < self.population:
            raise ValueError(f"elite must be in [0, population), got {self.elite}")
        for name in ("crossover_rate", "mutation_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.tournament_size < 1:
            raise ValueError(f"tournament_size must be >= 1, got {self.tournament_size}")
        if self.parents is not None and not 2 <= self.parents <= self.population:
            raise ValueError(f"parents must be in [2, population], got {self.parents}")
        if self.operator not in ("llm", "classic"):
            raise ValueError(f"operator must be 'llm' or 'classic', got {self.operator!r}")
        if self.space not in ("layers", "width"):
            raise ValueError(f"space must be 'layers' or 'width', got {self.space!r}")
        if self.classic_crossover not in ("uniform", "one-point"):
            raise ValueError("classic_crossover must be 'uniform' or 'one-point', got "
                             f"{self.classic_crossover!r}")
        if not 0 < self.rate_step <= self.max_rate <= 1:
            raise ValueError(f"need 0 < rate_step <= max_rate <= 1, got {self.rate_step}, "
                             f"{self.max_rate}")
        for name in ("init_per_call", "operator_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("calib_blocks", "batch_size", "max_evaluations", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.calib_len is not None and self.calib_len < 2:
            raise ValueError(f"calib_len must be >= 2 or None, got {self.calib_len}")

    @property
    def pool_size(self) -> int:
        return self.parents or max(2, self.population // 2)

    def as_info(self) -> dict:
        plain = (int, float, str, bool, type(None))
        return {f.name: (v if isinstance(v := getattr(self, f.name), plain)
                         else f"<{type(v).__name__}>") for f in fields(self)}


# ------------------------------------------------------------------------------ spaces

class LayerSpace:
    """Genome: sorted tuple of exactly n distinct removed layers of L."""

    kind = "layers"

    def __init__(self, num_layers: int, n: int, crossover: str = "uniform", model_desc: str = ""):
        self.num_layers, self.n, self.crossover_kind = num_layers, n, crossover
        self.model_desc = model_desc
        self.answer_tokens = 4 * n + 2  # "12, " is about 4 tokens

    def describe(self) -> str:
        L, n = self.num_layers, self.n
        return (f"A {self.model_desc} language model has {L} decoder layers, numbered 0 to "
                f"{L - 1}. We remove exactly {n} layers without retraining and want the "
                f"lowest perplexity. A configuration is the list of the {n} distinct layer "
                "indices to remove.")

    def answer_format(self, key: str) -> str:
        one = f"[exactly {self.n} distinct integers from 0 to {self.num_layers - 1}]"
        return f'{{"{key}": [{one}, ...]}}' if key == "sets" else f'{{"{key}": {one}}}'

    def fmt(self, genome) -> str:
        return f"removes {list(genome)}"

    def from_items(self, items, rng):
        return repair_layer_set(items, self.num_layers, self.n, rng)

    def list_spec(self) -> ListSpec:
        """A genome's JSON list: n distinct integers "0".."L-1"."""
        return ListSpec({str(i): i for i in range(self.num_layers)}, self.n, distinct=True)

    def random(self, rng: random.Random):
        return tuple(sorted(rng.sample(range(self.num_layers), self.n)))

    def crossover(self, a, b, rng: random.Random):
        sa, sb = set(a), set(b)
        if self.crossover_kind == "uniform":
            common = sa & sb
            child = common | set(rng.sample(sorted((sa | sb) - common), self.n - len(common)))
            return tuple(sorted(child))
        cut = rng.randrange(1, self.num_layers)
        child = {i for i in sa if i < cut} | {i for i in sb if i >= cut}
        if len(child) > self.n:
            child = set(rng.sample(sorted(child), self.n))
        for pool in (sorted((sa | sb) - child), [i for i in range(self.num_layers)
                                                  if i not in child]):
            pool = [i for i in pool if i not in child]
            child |= set(rng.sample(pool, min(len(pool), self.n - len(child))))
        return tuple(sorted(child))

    def mutate(self, genome, rng: random.Random):
        kept = [i for i in range(self.num_layers) if i not in genome]
        out = set(genome)
        out.remove(rng.choice(list(genome)))
        out.add(rng.choice(kept))
        return tuple(sorted(out))

    def first_changed(self, genome) -> int:
        return min(genome)

    def removed(self, genome) -> list[int]:
        return list(genome)

    def hooks(self, model, genome):
        return nullcontext()


class WidthSpace:
    """Genome: tuple of L rate units u_l in [0, max_units], sum = target_units."""

    kind = "width"

    def __init__(self, num_layers: int, n: int, step: float, max_rate: float, stats,
                 crossover: str = "uniform", model_desc: str = ""):
        self.num_layers, self.step, self.stats = num_layers, step, stats
        self.max_units = int(math.floor(max_rate / step + 1e-9))
        self.target_units = int(round(n / step))
        if self.target_units > num_layers * self.max_units:
            raise ValueError(f"mean rate {n}/{num_layers} exceeds max_rate {max_rate}")
        self.crossover_kind, self.model_desc = crossover, model_desc
        self.answer_tokens = 5 * num_layers + 2  # "0.3, " is about 5 tokens

    def rates(self, genome) -> list[float]:
        return [round(u * self.step, 6) for u in genome]

    def describe(self) -> str:
        L = self.num_layers
        levels = [round(u * self.step, 6) for u in range(self.max_units + 1)]
        mean = self.target_units * self.step / L
        return (f"A {self.model_desc} language model has {L} decoder layers. We prune the width "
                f"of every layer (MLP channels and attention heads) without retraining and want "
                f"the lowest perplexity. A configuration is the list of {L} per-layer pruning "
                f"rates (layer 0 first), each one of {levels}, whose mean must be {mean:.4f} "
                f"(sum {self.target_units * self.step:.4g}).")

    def answer_format(self, key: str) -> str:
        one = f"[{self.num_layers} rates]"
        return f'{{"{key}": [{one}, ...]}}' if key == "sets" else f'{{"{key}": {one}}}'

    def fmt(self, genome) -> str:
        return f"rates {self.rates(genome)}"

    def from_items(self, items, rng):
        return repair_rates(items, self.num_layers, self.step, self.max_units, self.target_units)

    def list_spec(self) -> ListSpec:
        """A genome's JSON list: L rates written as in `describe` (e.g. "0.1"; "0" and "1"
        too), value = rate units, summing to target_units."""
        literals = {}
        for u in range(self.max_units + 1):
            r = round(u * self.step, 6)
            literals[repr(r)] = u
            if r == int(r):
                literals[str(int(r))] = u
        return ListSpec(literals, self.num_layers, total=self.target_units)

    def random(self, rng: random.Random):
        raw = [rng.randint(0, self.max_units) for _ in range(self.num_layers)]
        return tuple(balance_units(raw, self.target_units, self.max_units))

    def crossover(self, a, b, rng: random.Random):
        if self.crossover_kind == "uniform":
            raw = [x if rng.random() < 0.5 else y for x, y in zip(a, b)]
        else:
            cut = rng.randrange(1, self.num_layers)
            raw = list(a[:cut]) + list(b[cut:])
        return tuple(balance_units(raw, self.target_units, self.max_units))

    def mutate(self, genome, rng: random.Random):
        u = list(genome)
        src = [i for i, x in enumerate(u) if x > 0]
        dst = [i for i, x in enumerate(u) if x < self.max_units]
        if not src or not dst:  # all rates 0 or all at max_rate: the only genome
            return genome
        i = rng.choice(src)
        j = rng.choice([k for k in dst if k != i] or dst)
        u[i] -= 1
        u[j] += 1
        return tuple(u)

    def first_changed(self, genome) -> int:
        return next((i for i, u in enumerate(genome) if u > 0), 0)

    def removed(self, genome) -> list[int]:
        return []

    def hooks(self, model, genome):
        from e3pruner.methods.self_pruner.width import apply_width_masks

        return apply_width_masks(model, self.rates(genome), self.stats)


# ---------------------------------------------------------------------------- operators

def tournament(fitness: list[float], k: int, rng: random.Random, size: int = 3) -> list[int]:
    """min(k, P) distinct indices; each the fittest (lowest) of `size` random remaining ones."""
    remaining = list(range(len(fitness)))
    pool = []
    for _ in range(min(k, len(fitness))):
        cand = rng.sample(remaining, min(size, len(remaining)))
        best = min(cand, key=lambda i: (fitness[i], i))
        pool.append(best)
        remaining.remove(best)
    return pool


class ClassicOperators:
    """Random initial population, tournament selection, classic crossover and mutation."""

    def __init__(self, space, rng: random.Random, tournament_size: int = 3):
        self.space, self.rng, self.size = space, rng, tournament_size
        self.counts = {k: OpCounts() for k in ("init", "selection", "crossover", "mutation")}
        self.samples: dict = {}

    def initial(self, k: int) -> list:
        pop: list = []
        for _ in range(k):
            pop.append(distinct_random(self.space, pop, self.rng))
            self.counts["init"].classic += 1
        return pop

    def select(self, population, fitness, pool_size: int) -> list[int]:
        self.counts["selection"].classic += 1
        return tournament(fitness, pool_size, self.rng, self.size)

    def crossover(self, pairs) -> list:
        self.counts["crossover"].classic += len(pairs)
        return [self.space.crossover(a, b, self.rng) for a, b in pairs]

    def mutate(self, genomes) -> list:
        self.counts["mutation"].classic += len(genomes)
        return [self.space.mutate(g, self.rng) for g in genomes]


# ----------------------------------------------------------------------------- fitness

class CalibFitness:
    """Cached calibration perplexity of genomes (module docstring). `evaluations` counts
    model evaluations (cache misses), `hits` cache hits, `tokens` calibration tokens run."""

    def __init__(self, model, calib: torch.Tensor, space, batch_size: int, prefix_cache: bool):
        self.model, self.space = model, space
        device = next(model.parameters()).device
        self.batches = [calib[i:i + batch_size].to(device)
                        for i in range(0, calib.shape[0], batch_size)]
        self.cache: dict[Any, float] = {}
        self.evaluations = self.hits = self.tokens = 0
        self.seconds = 0.0
        self.inputs: list[list[torch.Tensor]] | None = None
        self.full_ppl = None
        if prefix_cache:
            t0 = time.perf_counter()
            self.inputs, nll, count = [], 0.0, 0
            for ids in self.batches:
                with torch.no_grad(), gated(model, None):
                    inputs, out = layer_inputs(model, ids)
                    nll += lm_nll(model, out, ids).double().sum().item()
                self.inputs.append(inputs)
                count += ids.shape[0] * (ids.shape[1] - 1)
                self.tokens += ids.numel()
            self.full_ppl = _ppl(nll / count)
            self.seconds += time.perf_counter() - t0

    @torch.no_grad()
    def __call__(self, genome) -> float:
        if genome in self.cache:
            self.hits += 1
            return self.cache[genome]
        sp, model = self.space, self.model
        t0 = time.perf_counter()
        p = sp.first_changed(genome) if self.inputs is not None else 0
        removed = sp.removed(genome)
        n = len(decoder_layers(model))
        nll, count = 0.0, 0
        with sp.hooks(model, genome):
            for b, ids in enumerate(self.batches):
                if p > 0:
                    hs = hidden_from(model, ids, p, self.inputs[b][p], removed)
                else:
                    mask = torch.ones(n, device=ids.device)
                    mask[removed] = 0
                    with gated(model, mask):
                        hs = final_hidden(model, ids)
                nll += lm_nll(model, hs, ids).double().sum().item()
                count += ids.shape[0] * (ids.shape[1] - 1)
                self.tokens += ids.numel()
        self.evaluations += 1
        self.seconds += time.perf_counter() - t0
        self.cache[genome] = _ppl(nll / count)
        return self.cache[genome]

    def many(self, genomes) -> list[float]:
        return [self(g) for g in genomes]


def _ppl(nll: float) -> float:
    return math.exp(nll) if math.isfinite(nll) and nll < 700 else math.inf


# ------------------------------------------------------------------------------ search

def evolve(space, ops, fitness: CalibFitness, cfg: SelfPrunerConfig, rng: random.Random,
           progress: bool = False) -> dict:
    """Run the evolutionary search; returns the final population, its fitness and the
    per-generation best fitness (index 0: the initial population)."""
    P = cfg.population
    pop = ops.initial(P)
    fits = fitness.many(pop)
    history = [min(fits)]
    dedup = 0
    stopped = False
    bar = tqdm(total=cfg.generations, desc=f"self-pruner ({cfg.operator})", unit="gen",
               disable=not progress)
    try:
        for _ in range(cfg.generations):
            if cfg.max_evaluations is not None and fitness.evaluations >= cfg.max_evaluations:
                stopped = True
                break
            order = sorted(range(P), key=lambda i: (fits[i], i))
            elites: list = []
            for i in order:
                if len(elites) < cfg.elite and pop[i] not in elites:
                    elites.append(pop[i])
            n_child = P - len(elites)
            pool = ops.select(pop, fits, min(cfg.pool_size, P))
            pairs = [tuple(rng.sample(pool, 2)) for _ in range(n_child)]
            children = [pop[a] for a, _ in pairs]
            cross = [i for i in range(n_child) if rng.random() < cfg.crossover_rate]
            for i, c in zip(cross, ops.crossover([(pop[pairs[i][0]], pop[pairs[i][1]])
                                                  for i in cross])):
                children[i] = c
            mut = [i for i in range(n_child) if rng.random() < cfg.mutation_rate]
            for i, c in zip(mut, ops.mutate([children[i] for i in mut])):
                children[i] = c
            seen = set(elites)
            for i, c in enumerate(children):
                for _ in range(20):
                    if c not in seen:
                        break
                    c = space.mutate(c, rng)
                    dedup += 1
                children[i] = c
                seen.add(c)
            pop = elites + children
            fits = fitness.many(pop)
            history.append(min(fits))
            bar.set_postfix(best=f"{min(history):.4g}", evals=fitness.evaluations)
            bar.update(1)
    finally:
        bar.close()
    return {"population": pop, "fitness": fits, "history": history, "dedup": dedup,
            "stopped_early": stopped}


def _run(model, data: PruneData, n_prune: int, budget: Budget | None,
         cfg: SelfPrunerConfig) -> Selection:
    budget = budget or Budget()
    cfg.validate()
    L = len(decoder_layers(model))
    check_n_prune(n_prune, L)
    calib = data.calib
    if calib.dim() != 2 or calib.shape[0] == 0 or calib.shape[1] < 2:
        raise ValueError(f"calib must be [n_blocks >= 1, T >= 2] token ids, got {tuple(calib.shape)}")
    calib = calib[: cfg.calib_blocks or calib.shape[0], : cfg.calib_len or calib.shape[1]]
    seed = budget.seed if cfg.seed is None else cfg.seed
    rng = random.Random(seed)
    batch_size = cfg.batch_size or budget.batch_size
    desc = getattr(model.config, "model_type", "")
    t0 = time.perf_counter()
    with preserved_model_state(model):
        stats, extra_tokens = None, 0
        if cfg.space == "layers":
            space = LayerSpace(L, n_prune, cfg.classic_crossover, desc)
        else:
            from e3pruner.methods.self_pruner.width import collect_width_stats

            stats = collect_width_stats(model, calib, batch_size)
            extra_tokens = stats.tokens
            space = WidthSpace(L, n_prune, cfg.rate_step, cfg.max_rate, stats,
                               cfg.classic_crossover, desc)
        if cfg.operator == "classic":
            ops = ClassicOperators(space, rng, cfg.tournament_size)
        else:
            chat = make_chat(cfg.operator_model, reuse_model=model,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             seed=seed, batch_size=cfg.operator_batch,
                             device=next(model.parameters()).device)
            ops = LLMOperators(chat, space,
                               lambda f, k, r: tournament(f, k, r, cfg.tournament_size), rng,
                               init_per_call=cfg.init_per_call, max_new_tokens=cfg.max_new_tokens,
                               prefill=cfg.prefill, constrained=cfg.constrained)
        fitness = CalibFitness(model, calib, space, batch_size, cfg.prefix_cache)
        out = evolve(space, ops, fitness, cfg, rng, budget.progress)
    best = min(fitness.cache, key=lambda g: (fitness.cache[g], g))
    pop = out["population"]
    info = {
        "space": cfg.space, "operator": cfg.operator, "fitness": "calibration perplexity",
        "best_ppl": fitness.cache[best], "full_model_ppl": fitness.full_ppl,
        "best_fitness": out["history"],
        "operator_counts": {k: vars(c).copy() for k, c in ops.counts.items()},
        "operator_shares": operator_shares(ops.counts),
        "operator_constrained": bool(getattr(ops, "is_constrained", False)),
        "operator_violations": getattr(ops, "violations", 0),
        "init_retries": getattr(ops, "init_retries", 0),
        "evaluations": fitness.evaluations, "cache_hits": fitness.hits,
        "dedup_mutations": out["dedup"], "stopped_early": out["stopped_early"],
        "llm_samples": ops.samples, "calib_shape": list(calib.shape),
        "seconds": time.perf_counter() - t0, "seconds_fitness": fitness.seconds,
        "seconds_operator": getattr(ops, "seconds", 0.0), "config": cfg.as_info(),
    }
    if cfg.space == "layers":
        freq = [sum(i in g for g in pop) / len(pop) for i in range(L)]
        keep = [i for i in range(L) if i not in best]
        info["score"] = "1 - fraction of the final population removing the layer"
        scores = [1.0 - f for f in freq]
    else:
        from e3pruner.methods.self_pruner.width import masked_param_fraction

        keep = list(range(L))
        rates = space.rates(best)
        info.update(width_rates=rates, exportable=False,
                    masked_param_fraction=masked_param_fraction(model, rates, stats),
                    score="1 - mean rate of the layer in the final population",
                    note="width masks (hooks) only: not exported, not loadable by vLLM")
        scores = [1.0 - sum(g[i] for g in pop) * cfg.rate_step / len(pop) for i in range(L)]
    return Selection(keep=keep, num_layers=L, scores=scores, info=info,
                     tokens=fitness.tokens + extra_tokens)


@register("self-pruner", config=SelfPrunerConfig,
          shared=("population", "generations", "operator"))
def select(model, data: PruneData, n_prune: int, budget: Budget | None = None,
           config: SelfPrunerConfig | None = None) -> Selection:
    """Self-Pruner over `config.space` (default "layers": remove exactly n_prune layers)."""
    return _run(model, data, n_prune, budget, config or SelfPrunerConfig())


@register("self-pruner-width", config=SelfPrunerConfig,
          shared=("population", "generations", "operator"))
def select_width(model, data: PruneData, n_prune: int, budget: Budget | None = None,
                 config: SelfPrunerConfig | None = None) -> Selection:
    """Self-Pruner in the width space at mean rate n_prune / L (masking; not exportable)."""
    return _run(model, data, n_prune, budget, replace(config or SelfPrunerConfig(),
                                                      space="width"))
