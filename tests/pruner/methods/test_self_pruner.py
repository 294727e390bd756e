import random

import pytest
import torch

from e3pruner.methods.self_pruner.constrained import ListSpec
from e3pruner.methods.self_pruner.llm_operator import (
    FALLBACK,
    OK,
    REPAIRED,
    ChatModel,
    balance_units,
    extract_json,
    repair_layer_set,
    repair_rates,
    scalar_lists,
)
from e3pruner.methods import Budget, PruneData, get_method
from e3pruner.methods.self_pruner import (
    CalibFitness,
    LayerSpace,
    SelfPrunerConfig,
    WidthSpace,
)
from e3pruner.methods.self_pruner.width import apply_width_masks, collect_width_stats, width_keep_masks
from tests.pruner.test_methods import DEAD, _data, _model_with_dead_layers
from tests.pruner.tiny_models import tiny_model, word_tokenizer

NO_BAR = Budget(progress=False, batch_size=2)


class ScriptedChat:
    """A fake chat model: answers from a queue (then "" = unusable), records the prompts."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.prompts = []

    def __call__(self, messages):
        assert messages[-1]["role"] == "user"
        self.prompts.append(messages[-1]["content"])
        return self.answers.pop(0) if self.answers else ""


# ----------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text,expected", [
    ('[1, 2, 3]', [1, 2, 3]),
    ('```json\n{"sets": [[1, 2], [3, 4]]}\n```\nHope this helps!', {"sets": [[1, 2], [3, 4]]}),
    ('Sure, here it is: {"child": [5, 7]} -- these layers are redundant.', {"child": [5, 7]}),
    ("{'parents': [0, 2, 3,],}", {"parents": [0, 2, 3]}),
    ('[[1, 2,], [3, 4,],]', [[1, 2], [3, 4]]),
    ('{"ok": True, "x": [1]}', {"ok": True, "x": [1]}),
    ('{"sets": [[1, 2], [3, 4', {"sets": [[1, 2], [3, 4]]}),  # truncated generation
    ('```\n[0.1, 0.2]', [0.1, 0.2]),  # unclosed fence
    ('Layer [3] is (maybe) {bad json here} but [4, 5] works', [3]),
    ('not json [oops} then {"a": [1]}', {"a": [1]}),
])
def test_extract_json(text, expected):
    assert extract_json(text) == expected


@pytest.mark.parametrize("text", ["", "no json at all", "layers 1, 2 and 3", "{oops"])
def test_extract_json_raises(text):
    with pytest.raises(ValueError, match="no JSON"):
        extract_json(text)


def test_scalar_lists():
    assert scalar_lists({"sets": [[1, 2], ["3", 4.0]], "note": "x"}) == [[1, 2], ["3", 4.0]]
    assert scalar_lists({"child": {"layers": [5]}}) == [[5]]
    assert scalar_lists([[], {"a": "b"}, [True]]) == []
    assert scalar_lists([1, [2, 3]]) == [[2, 3]]


# ------------------------------------------------------------------------------ repair

def test_repair_layer_set_rules():
    rng = random.Random(0)
    assert repair_layer_set([4, 1, 2], 6, 3, rng) == ((1, 2, 4), OK)
    assert repair_layer_set(["4", 1.0, 2], 6, 3, rng) == ((1, 2, 4), OK)
    # too many: the first n in answer order are kept
    assert repair_layer_set([5, 0, 3, 1], 6, 3, rng) == ((0, 3, 5), REPAIRED)
    # duplicates / out of range / non-integers dropped, then filled with other layers
    g, st = repair_layer_set([2, 2, 9, -1, 1.5, "x", 0], 6, 3, rng)
    assert st == REPAIRED and len(set(g)) == 3 and {0, 2} <= set(g) and max(g) < 6
    # fewer than half the entries usable: fallback
    assert repair_layer_set([7, 8, 1], 6, 4, rng) == (None, FALLBACK)
    assert repair_layer_set([], 6, 1, rng) == (None, FALLBACK)


def test_balance_units_and_rates_mean_equals_target():
    rng = random.Random(1)
    L, max_u = 30, 9
    for _ in range(200):
        target = rng.randint(0, L * max_u)
        units = [rng.randint(-3, 12) for _ in range(L)]
        u = balance_units(units, target, max_u)
        assert sum(u) == target and all(0 <= x <= max_u for x in u)
    assert balance_units([2, 2, 0], 4, 9) == [2, 2, 0]
    assert balance_units([0, 0, 0, 0], 6, 9) == [2, 2, 1, 1]  # uniform, remainders to the front
    with pytest.raises(ValueError, match="not reachable"):
        balance_units([1, 1], 19, 9)
    # rates: valid as given, off-grid, wrong mean, wrong length, garbage
    assert repair_rates([0.1, 0.3, 0.2], 3, 0.1, 9, 6) == ((1, 3, 2), OK)
    g, st = repair_rates([0.12, 0.5, "0.9", 0.0], 4, 0.1, 9, 8)
    assert st == REPAIRED and sum(g) == 8
    g, st = repair_rates([0.2] * 5, 4, 0.1, 9, 8)
    assert st == REPAIRED and sum(g) == 8 and len(g) == 4
    assert repair_rates(["a", "b", 0.1], 4, 0.1, 9, 8) == (None, FALLBACK)


def test_spaces_keep_constraints():
    rng = random.Random(2)
    sp = LayerSpace(10, 3, "one-point")
    wp = WidthSpace(10, 3, 0.1, 0.9, stats=None, crossover="one-point")
    for _ in range(100):
        a, b = sp.random(rng), sp.random(rng)
        for g in (sp.crossover(a, b, rng), sp.mutate(a, rng)):
            assert len(set(g)) == 3 and list(g) == sorted(g) and 0 <= g[0] and g[-1] < 10
        assert sp.mutate(a, rng) != a
        a, b = wp.random(rng), wp.random(rng)
        for g in (wp.crossover(a, b, rng), wp.mutate(a, rng)):
            assert sum(g) == wp.target_units == 30 and all(0 <= u <= 9 for u in g)
        assert sum(wp.rates(a)) / 10 == pytest.approx(3 / 10)


# ------------------------------------------------------------------- scripted operators

def test_scripted_llm_operator_counters():
    """Every kind of bad answer: each output counted once as ok / repaired / fallback."""
    script = [
        # init, call 1 (2 genomes): both valid
        '```json\n{"sets": [[1, 4], [2, 3]]}\n```',
        # init, call 2: a duplicate inside a set (repaired) and an out-of-range set (fallback)
        "Sure! [[0, 0, 5], [9, 10]]",
        # selection: single quotes, trailing comma, index 7 out of range -> repaired
        "{'parents': [0, 2, 7,]}",
        # crossover x3: valid / no JSON / too many layers
        "[1, 4]", "I cannot do that.", '{"child": [1, 2, 3]}',
        # mutation x3: same as its input (1, 4) / empty / valid and new
        "[1, 4]", "[[", '{"child": [0, 5]}',
    ]
    chat = ScriptedChat(script)
    cfg = SelfPrunerConfig(population=4, generations=1, elite=1, crossover_rate=1.0,
                           mutation_rate=1.0, parents=3, init_per_call=2, operator_model=chat)
    sel = get_method("self-pruner")(_model_with_dead_layers(), _data(), 2, NO_BAR, config=cfg)
    assert chat.answers == [] and len(chat.prompts) == len(script)
    assert "exactly 2" in chat.prompts[0] and "0 to 5" in chat.prompts[0]
    assert "perplexity" in chat.prompts[2]
    c = sel.info["operator_counts"]
    assert c["init"] == {"llm_ok": 2, "repaired": 1, "fallback": 1, "classic": 0}
    assert c["selection"] == {"llm_ok": 0, "repaired": 1, "fallback": 0, "classic": 0}
    assert c["crossover"] == {"llm_ok": 1, "repaired": 1, "fallback": 1, "classic": 0}
    assert c["mutation"] == {"llm_ok": 1, "repaired": 1, "fallback": 1, "classic": 0}
    assert len(sel.removed) == 2 and len(sel.keep) == 4
    assert len(sel.info["best_fitness"]) == 2
    assert sel.info["best_ppl"] == min(sel.info["best_fitness"])


@pytest.mark.parametrize("answer", ["", "I think layer 3.", "[99, 100]", "{'child': 'none'}"])
def test_unusable_llm_always_falls_back(answer):
    chat = lambda messages: answer  # noqa: E731
    calls = []
    fn = lambda m: calls.append(m) or chat(m)  # noqa: E731
    cfg = SelfPrunerConfig(population=5, generations=3, elite=1, crossover_rate=0.5,
                           mutation_rate=0.5, init_per_call=2, operator_model=fn)
    sel = get_method("self-pruner")(_model_with_dead_layers(), _data(), 3, NO_BAR, config=cfg)
    c = sel.info["operator_counts"]
    assert all(v["llm_ok"] == 0 and v["repaired"] == 0 and v["classic"] == 0 for v in c.values())
    assert c["init"]["fallback"] == 5 and c["selection"]["fallback"] == 3
    # one call per init prompt (3), selection (3), crossover and mutation child
    assert len(calls) == 3 + 3 + c["crossover"]["fallback"] + c["mutation"]["fallback"]
    assert len(sel.removed) == 3


# ------------------------------------------------------------------------------ search

def _dead_model(num_layers=10, dead=(1, 4, 7)):
    model = tiny_model("llama", num_layers=num_layers, seed=3)
    with torch.no_grad():
        for i in dead:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return model


@torch.no_grad()
def _own_samples(model, n_blocks=8, T=32, seed=0):
    """Blocks sampled from the model itself: in expectation no configuration predicts them
    better than the full model (cross-entropy >= entropy), so a random tiny model has the
    identity layers as its best removal under the perplexity fitness."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (n_blocks, 1), generator=g)
    for _ in range(T - 1):
        p = torch.softmax(model(ids).logits[:, -1].double(), -1)
        ids = torch.cat([ids, torch.multinomial(p, 1, generator=g)], 1)
    return PruneData(calib=ids)


def test_classic_search_finds_identity_layers():
    """10 layers, 3 of them identities: C(10, 3) = 120 genomes, the search sees < 60."""
    model = _dead_model()
    cfg = SelfPrunerConfig(population=8, generations=6, elite=2, operator="classic",
                           mutation_rate=0.5)
    sel = get_method("self-pruner")(model, _own_samples(model), 3, NO_BAR, config=cfg)
    assert sel.removed == [1, 4, 7], sel.info["best_fitness"]
    assert sel.info["evaluations"] < 60
    hist = sel.info["best_fitness"]
    assert all(b <= a for a, b in zip(hist, hist[1:]))  # elitism
    assert sel.info["best_ppl"] == pytest.approx(sel.info["full_model_ppl"], rel=1e-4)
    # scores = 1 - removal frequency in the final population; every genome removes 3
    assert all(0 <= x <= 1 for x in sel.scores) and sum(1 - x for x in sel.scores) == pytest.approx(3)
    assert sel.info["operator_counts"]["init"]["classic"] == 8
    assert sel.tokens == (1 + sel.info["evaluations"]) * 8 * 32


def test_classic_one_point_crossover_search():
    model = _dead_model(num_layers=6, dead=DEAD)
    cfg = SelfPrunerConfig(population=6, generations=4, operator="classic",
                           classic_crossover="one-point")
    sel = get_method("self-pruner")(model, _own_samples(model), 2, NO_BAR, config=cfg)
    assert sel.removed == list(DEAD)


def test_fitness_cache_and_prefix_restart():
    model = _dead_model(num_layers=6, dead=())
    calib = _data().calib
    sp = LayerSpace(6, 2)
    norm_calls = []
    handle = model.model.norm.register_forward_hook(lambda *a: norm_calls.append(1))
    try:
        cached = CalibFitness(model, calib, sp, batch_size=2, prefix_cache=True)
        plain = CalibFitness(model, calib, sp, batch_size=2, prefix_cache=False)
        assert len(norm_calls) == 2  # the prefix pass: one forward per batch
        for g in [(3, 5), (0, 1), (2, 4)]:
            before = len(norm_calls)
            a = cached(g)
            assert len(norm_calls) == before + 2
            assert cached(g) == a and len(norm_calls) == before + 2  # served from the cache
            assert plain(g) == pytest.approx(a, rel=1e-5)
    finally:
        handle.remove()
    assert cached.evaluations == 3 and cached.hits == 3
    assert cached.tokens == 4 * 4 * 32  # prefix pass + 3 evaluations of 4 blocks x 32


def test_config_and_input_errors():
    model, data = _model_with_dead_layers(), _data()
    fn = get_method("self-pruner")
    for bad, match in [(dict(population=1), "population"), (dict(space="depth"), "space"),
                       (dict(operator="gpt"), "operator"), (dict(elite=4, population=4), "elite"),
                       (dict(parents=9, population=4), "parents"),
                       (dict(classic_crossover="two"), "classic_crossover")]:
        with pytest.raises(ValueError, match=match):
            fn(model, data, 2, NO_BAR, config=SelfPrunerConfig(**bad))
    for n in (0, 6):
        with pytest.raises(ValueError, match="n_prune"):
            fn(model, data, n, NO_BAR, config=SelfPrunerConfig(operator="classic"))
    with pytest.raises(ValueError, match="operator_model"):
        fn(model, data, 2, NO_BAR, config=SelfPrunerConfig(operator_model=3))


# ------------------------------------------------------------------------------- width

def _width_model():
    model = tiny_model("llama", num_layers=4, seed=5)
    with torch.no_grad():  # a dead channel (7) and a dead head (2) in layer 1
        model.model.layers[1].mlp.down_proj.weight[:, 7] = 0
        model.model.layers[1].self_attn.o_proj.weight[:, 2 * 12:3 * 12] = 0
    return model


def test_width_masks_change_output_and_are_removable():
    model = _width_model()
    ids = _data().calib[:2]
    stats = collect_width_stats(model, _data().calib, batch_size=2)
    assert stats.mlp[1][7] == 0 and stats.heads[1][2] == 0
    assert int(stats.mlp_order[1][0]) == 7 and int(stats.head_order[1][0]) == 2
    with torch.no_grad():
        ref = model(ids).logits
        with apply_width_masks(model, [0.0] * 4, stats):  # rate 0: no hook, same output
            assert torch.equal(model(ids).logits, ref)
        rates = [0.0, 0.5, 0.25, 0.0]
        handle = apply_width_masks(model, rates, stats)
        masked = model(ids).logits
        handle.remove()
        assert not torch.allclose(masked, ref, atol=1e-3)
        assert torch.equal(model(ids).logits, ref)  # hooks removed
        for layer in model.model.layers:
            assert not layer.mlp.down_proj._forward_pre_hooks
            assert not layer.self_attn.o_proj._forward_pre_hooks
        # the hooks equal zeroing the pruned columns of down_proj / o_proj
        surgery = _width_model()  # (not deepcopy: gates installed by the stats pass bind the original)
        for layer, (ch, hd) in zip(surgery.model.layers, width_keep_masks(rates, stats)):
            layer.mlp.down_proj.weight[:, ~ch] = 0
            layer.self_attn.o_proj.weight[:, ~hd.repeat_interleave(12)] = 0
        torch.testing.assert_close(surgery(ids).logits, masked, rtol=1e-5, atol=1e-5)
    keep = width_keep_masks(rates, stats)
    assert [int((~c).sum()) for c, _ in keep] == [0, 48, 24, 0]
    assert [int((~h).sum()) for _, h in keep] == [0, 2, 1, 0]
    assert not keep[1][0][7] and not keep[1][1][2]  # dead channel and head pruned first
    with pytest.raises(ValueError, match="one rate per layer"):
        apply_width_masks(model, [0.1], stats)


def test_width_search_end_to_end():
    model = _width_model()
    cfg = SelfPrunerConfig(population=4, generations=2, operator="classic", rate_step=0.125,
                           max_rate=0.75)
    sel = get_method("self-pruner-width")(model, _data(), 1, NO_BAR, config=cfg)
    rates = sel.info["width_rates"]
    assert sel.keep == [0, 1, 2, 3] and sel.removed == []
    assert sel.info["exportable"] is False and sel.info["space"] == "width"
    assert sum(rates) / 4 == pytest.approx(1 / 4)
    assert all(r in [k * 0.125 for k in range(7)] for r in rates)
    assert 0 < sel.info["masked_param_fraction"] < 0.25
    for layer in model.model.layers:  # no hook left behind
        assert not layer.mlp.down_proj._forward_pre_hooks
    assert sel.tokens == (2 + sel.info["evaluations"]) * 4 * 32  # stats + prefix + evals


def test_width_scripted_llm_rates():
    """LLM answers in the width space: valid rates, off-mean rates, garbage."""
    answers = ['{"sets": [[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]]}',
               "[[0.9, 0.9, 0.9, 0.9], [1, 2]]"]
    chat = ScriptedChat(answers)
    cfg = SelfPrunerConfig(population=4, generations=0, init_per_call=2, rate_step=0.25,
                           max_rate=0.75, operator_model=chat)
    sel = get_method("self-pruner-width")(_width_model(), _data(), 1, NO_BAR, config=cfg)
    c = sel.info["operator_counts"]["init"]
    assert c == {"llm_ok": 2, "repaired": 1, "fallback": 1, "classic": 0}
    assert sum(sel.info["width_rates"]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- chat model

def test_chat_model_batches_seeds_and_pads_left():
    model = tiny_model("llama", num_layers=2)
    tok = word_tokenizer()
    with pytest.raises(ValueError, match="chat template"):
        ChatModel(model, tok)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    convs = [[{"role": "user", "content": c}] for c in ("w1 w2 w3 w4", "w5", "w6 w7")]
    sampled = [ChatModel(model, tok, max_new_tokens=5, temperature=1.0, seed=3, batch_size=2)
               .batch(convs) for _ in range(2)]
    assert sampled[0] == sampled[1] and len(sampled[0]) == 3  # seeded per call
    assert all(a.split() and all(w.startswith("w") for w in a.split()) for a in sampled[0])
    greedy = [ChatModel(model, tok, max_new_tokens=4, temperature=0, batch_size=b).batch(convs)
              for b in (3, 1)]
    assert greedy[0] == greedy[1]  # left padding: a batch answers like single prompts
    assert tok.padding_side == "right"  # restored


# ----------------------------------------------------------------------- real chat model

@pytest.mark.slow
def test_llm_operator_with_bundled_model(bundled):
    """The bundled SmolLM2-135M-Instruct prunes itself: 4 genomes, 1 generation."""
    from e3pruner.data import TokenBlocks, token_stream

    model, tok = bundled
    blocks = TokenBlocks(token_stream("bundled", tok), 64)
    data = PruneData(calib=blocks.take(2, 0), blocks=blocks, train_start=2)
    cfg = SelfPrunerConfig(population=4, generations=1, elite=1, crossover_rate=1.0,
                           mutation_rate=0.5, parents=3, init_per_call=2,
                           operator_model=(model, tok), max_new_tokens=48, operator_batch=4)
    sel = get_method("self-pruner")(model, data, 8, Budget(progress=False, batch_size=2),
                                    config=cfg)
    c = sel.info["operator_counts"]
    assert sum(c["init"].values()) == 4 and sum(c["selection"].values()) == 1
    assert sum(c["crossover"].values()) == 3
    assert sum(c["mutation"].values()) <= 3
    assert all(v["classic"] == 0 for v in c.values())
    assert len(sel.removed) == 8 and len(set(sel.removed)) == 8
    assert sel.info["llm_samples"]["init"]  # the raw answers are kept for inspection
    assert 1 < sel.info["full_model_ppl"] < sel.info["best_ppl"] < float("inf")



# ----------------------------------------------------------------- constrained decoding

def answer_tokenizer():
    """Word-level tokenizer that can write JSON answers (every character of the formats,
    some numbers, separators, keys) next to junk pieces; Fuse decoder (text = the pieces concatenated). Ids 0/1/2 =
    pad/bos/eos as in tiny_config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = (["<pad>", "<s>", "</s>", "<unk>"] + list("0123456789.{}:\"childsetparn")
              + ["10", "11", "12", "1,", "0.", ".5", "0.25", "0.5", "5]", ",", ", ", " ", "[",
                 "]", "],", " [", "[[", "]]", "]}", "}", '{"', "child", '":', "sets", "parents",
                 "x", "w1", "hello", "  ", ",,", "-1", "99", "]]}", "7, 7"])
    tk = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>",
                                  pad_token="<pad>", bos_token="<s>",
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tok


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    from e3pruner.models.loading import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))


def _grammar_cases(big: bool):
    """(name, spec, key, groups (0: one list), forbidden, check(values) for one group)."""
    L, n = (30, 8) if big else (12, 4)
    ls = LayerSpace(L, n)
    tight = LayerSpace(4, 3)
    ws = WidthSpace(L, n, 0.1, 0.9, None) if big else WidthSpace(6, 2, 0.25, 0.75, None)
    P, k = (30, 15) if big else (13, 5)

    def layer_set(space):
        return lambda v: (len(v) == space.n and len(set(v)) == space.n
                          and all(isinstance(x, int) and 0 <= x < space.num_layers for x in v))

    def rates(v):
        units = [x / ws.step for x in v]
        return (len(v) == ws.num_layers and all(abs(u - round(u)) < 1e-9 for u in units)
                and all(0 <= round(u) <= ws.max_units for u in units)
                and sum(round(u) for u in units) == ws.target_units)

    parents = lambda v: len(v) == k and len(set(v)) == k and all(0 <= x < P for x in v)  # noqa: E731
    return [
        ("child", ls.list_spec(), "child", 0, [], layer_set(ls)),
        ("sets", ls.list_spec(), "sets", 3, [ls.random(random.Random(0))], layer_set(ls)),
        ("mutation of a tight space", tight.list_spec(), "child", 0, [(0, 1, 2)], layer_set(tight)),
        ("rates", ws.list_spec(), "child", 0, [], rates),
        ("rate sets", ws.list_spec(), "sets", 2, [], rates),
        ("parents", ListSpec({str(i): i for i in range(P)}, k, distinct=True), "parents", 0, [],
         parents),
    ]


def _check_answer(text, key, groups, forbidden, check, distinct):
    """Independent of the grammar: the JSON parses, holds the asked lists, each valid,
    different from each other and from the forbidden ones."""
    import json

    value = json.loads(text)
    assert list(value) == [key], text
    lists = value[key] if groups else [value[key]]
    assert len(lists) == max(groups, 1), text
    keys = [tuple(sorted(v)) if distinct else tuple(v) for v in lists]
    taken = {tuple(sorted(f)) if distinct else tuple(f) for f in forbidden}
    assert len(set(keys)) == len(keys) and not set(keys) & taken, text
    assert all(check(v) for v in lists), text


def _decode_under(tok, grammars, logits, greedy, gen, prefill=True):
    """Generate-like loop without a model: scores from logits(step) [B, V'] through the
    processor, then argmax or a sample; the answers decoded as ChatModel does."""
    from e3pruner.methods.self_pruner.constrained import GrammarLogitsProcessor, token_vocabulary

    eos = [tok.eos_token_id]
    heads = [g.head if prefill else "" for g in grammars]
    assert len(set(heads)) == 1
    proc = GrammarLogitsProcessor(grammars, token_vocabulary(tok), eos, heads[0])
    ids = torch.full((len(grammars), 3), tok.pad_token_id)
    for t in range(max(g.max_chars for g in grammars) + 1):
        scores = proc(ids, logits(t))
        assert torch.isfinite(scores).any(-1).all()
        if greedy:
            nxt = scores.argmax(-1, keepdim=True)
        else:  # a sample among the admitted tokens (the others have probability 0)
            nxt = torch.empty(len(grammars), 1, dtype=torch.long)
            for b, row in enumerate(scores):
                ok = torch.isfinite(row).nonzero()[:, 0]
                nxt[b] = ok[torch.multinomial(torch.softmax(row[ok], -1), 1, generator=gen)]
        nxt[torch.tensor(proc.finished)] = tok.pad_token_id
        ids = torch.cat([ids, nxt], 1)
        if all(proc.finished):
            break
    assert all(proc.finished) and not proc.stuck
    return [heads[0] + tok.decode(r[3:], skip_special_tokens=True) for r in ids.tolist()]


@pytest.mark.parametrize("which", ["words", "smollm2"])
def test_random_logits_under_the_processor_give_valid_answers(which, request):
    """Fresh random logits (3 seeds: greedy, then sampled; 2 rows with different grammars'
    forbidden sets) always decode to answers meeting the budget; without prefill (seed 2)
    the grammar writes the JSON key too."""
    from e3pruner.methods.self_pruner.constrained import AnswerGrammar

    tok = answer_tokenizer() if which == "words" else request.getfixturevalue("smollm_tokenizer")
    V = len(tok) + 7  # a model vocabulary padded past the tokenizer
    for name, spec, key, groups, forbidden, check in _grammar_cases(which == "smollm2"):
        head, tail = (f'{{"{key}": [[', "]}") if groups else (f'{{"{key}": [', "}")
        for seed in range(3):
            gen = torch.Generator().manual_seed(seed)
            grammars = [AnswerGrammar(spec, head, tail, max(groups, 1), forbidden),
                        AnswerGrammar(spec, head, tail, max(groups, 1))]
            texts = _decode_under(tok, grammars, lambda t: 3 * torch.randn(2, V, generator=gen),
                                  seed == 0, gen, prefill=seed != 2)
            for text, g in zip(texts, grammars):
                _check_answer(text, key, groups, g.forbidden, check, spec.distinct)


@pytest.mark.parametrize("which", ["words", "smollm2"])
def test_adversarial_logits_still_give_valid_answers(which, request):
    """Logits that prefer EOS, junk, closing brackets, one repeated digit and out-of-range
    numbers (the tokens a bad model writes) yield valid answers anyway."""
    from e3pruner.methods.self_pruner.constrained import AnswerGrammar

    tok = answer_tokenizer() if which == "words" else request.getfixturevalue("smollm_tokenizer")
    V = len(tok)
    prefer = {"</s>": 60.0, "x": 50.0, "hello": 50.0, " the": 50.0, "]}": 45.0, "]": 44.0,
              "]]": 44.0, "7": 40.0, "0": 39.0, "99": 38.0, ",": 30.0, " ": 20.0}
    scores = torch.randn(V, generator=torch.Generator().manual_seed(0))
    for text, s in prefer.items():
        ids = tok.encode(text, add_special_tokens=False) if text != "</s>" else [tok.eos_token_id]
        if len(ids) == 1:
            scores[ids[0]] = s
    for name, spec, key, groups, forbidden, check in _grammar_cases(which == "smollm2"):
        head, tail = (f'{{"{key}": [[', "]}") if groups else (f'{{"{key}": [', "}")
        g = AnswerGrammar(spec, head, tail, max(groups, 1), forbidden)
        text, = _decode_under(tok, [g], lambda t: scores[None].clone(), True, None)
        _check_answer(text, key, groups, g.forbidden, check, spec.distinct)


def test_answer_grammar_accepts_exactly_the_valid_answers():
    from e3pruner.methods.self_pruner.constrained import AnswerGrammar

    layers = AnswerGrammar(LayerSpace(12, 3).list_spec(), '{"child": [', "}", forbidden=[(1, 2, 3)])
    for text, ok in [('{"child": [4, 11, 0]}', True), ('{"child": [4,11,0]}', True),
                     ('{"child": [3, 1, 2]}', False),  # forbidden (as a set)
                     ('{"child": [4, 4, 0]}', False), ('{"child": [4, 12, 0]}', False),
                     ('{"child": [4, 05, 0]}', False), ('{"child": [4, 5]}', False),
                     ('{"child": [4, 5, 6, 7]}', False), ('{"child": [4,  5, 6]}', False),
                     ('{"child": [4, 5, 6]', False), ('{"child": [ 4, 5, 6]}', False)]:
        assert layers.accepts(text) is ok, text
    ws = WidthSpace(4, 1, 0.25, 0.75, None)  # 4 rates, units sum 4
    rates = AnswerGrammar(ws.list_spec(), '{"sets": [[', "]}", groups=2)
    for text, ok in [('{"sets": [[0.25, 0.25, 0.25, 0.25], [0.0, 0.5, 0.5, 0]]}', True),
                     ('{"sets": [[0.25, 0.25, 0.25, 0.25],[0.75, 0.25, 0, 0.0]]}', True),
                     ('{"sets": [[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]]}', False),
                     ('{"sets": [[0.5, 0.5, 0.5, 0.5], [0.0, 0.5, 0.5, 0]]}', False),  # sum
                     ('{"sets": [[0.3, 0.2, 0.25, 0.25], [0.0, 0.5, 0.5, 0]]}', False),  # grid
                     ('{"sets": [[1, 0, 0, 0], [0.0, 0.5, 0.5, 0]]}', False)]:  # above max
        assert rates.accepts(text) is ok, text
    with pytest.raises(ValueError, match="forbidden"):
        AnswerGrammar(LayerSpace(3, 2).list_spec(), "[", "", forbidden=[(0, 1), (0, 2), (1, 2)])
    with pytest.raises(ValueError, match="prefill"):
        layers.start('{"sets": [[')


def _tiny_operator(seed=7):
    return tiny_model("llama", num_layers=2, seed=seed), answer_tokenizer()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_search_with_constrained_tiny_operator_never_falls_back(temperature):
    """A random tiny model as operator: every operation is llm_ok. Greedy answers to equal
    init prompts repeat each other: those are asked again (init_retries), still llm_ok."""
    cfg = SelfPrunerConfig(population=4, generations=2, elite=1, crossover_rate=1.0,
                           mutation_rate=1.0, parents=3, init_per_call=2,
                           temperature=temperature, operator_model=_tiny_operator())
    sel = get_method("self-pruner")(_model_with_dead_layers(), _data(), 2, NO_BAR, config=cfg)
    shares, counts = sel.info["operator_shares"], sel.info["operator_counts"]
    assert sel.info["operator_constrained"] and sel.info["operator_violations"] == 0
    assert shares["llm_ok"] == 1.0 and shares["fallback"] == shares["repaired"] == 0
    assert shares["operations"] == 4 + 2 * (1 + 3 + 3)
    assert counts["init"]["llm_ok"] == 4 and counts["mutation"]["llm_ok"] == 6
    if temperature == 0:
        assert sel.info["init_retries"] >= 1
    assert len(sel.removed) == 2


def test_width_search_with_constrained_tiny_operator():
    cfg = SelfPrunerConfig(population=4, generations=1, crossover_rate=1.0, mutation_rate=1.0,
                           rate_step=0.25, max_rate=0.75, operator_model=_tiny_operator(8))
    sel = get_method("self-pruner-width")(_width_model(), _data(), 1, NO_BAR, config=cfg)
    assert sel.info["operator_shares"]["llm_ok"] == 1.0
    assert sum(sel.info["width_rates"]) == pytest.approx(1.0)


def test_constrained_answer_failing_validation_is_a_counted_fallback(monkeypatch, caplog):
    """The validation stays as a check: a (here: forced) failure is logged, counted as a
    violation and replaced by the classic operator, never repaired."""
    monkeypatch.setattr(LayerSpace, "from_items",
                        lambda self, items, rng: (tuple(sorted(items)), REPAIRED))
    cfg = SelfPrunerConfig(population=4, generations=1, crossover_rate=1.0, mutation_rate=0.0,
                           operator_model=_tiny_operator())
    with caplog.at_level("WARNING"):
        sel = get_method("self-pruner")(_model_with_dead_layers(), _data(), 2, NO_BAR, config=cfg)
    c = sel.info["operator_counts"]
    assert c["init"] == {"llm_ok": 0, "repaired": 0, "fallback": 4, "classic": 0}
    assert c["crossover"]["fallback"] == sum(c["crossover"].values()) == 2  # P - elite
    assert c["selection"]["llm_ok"] == 1  # not read through from_items
    assert sel.info["operator_violations"] == 4 + 2
    assert "failed validation" in caplog.text
    # unconstrained, the same answers would count as repaired
    cfg.constrained = False
    sel = get_method("self-pruner")(_model_with_dead_layers(), _data(), 2, NO_BAR, config=cfg)
    assert not sel.info["operator_constrained"] and sel.info["operator_violations"] == 0
