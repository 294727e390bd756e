import gzip
import json

import pytest
import torch

from e3pruner import data as data_mod
from e3pruner.data import (
    TokenBlocks,
    bundled_heldout_texts,
    bundled_train_texts,
    load_texts,
    pack_blocks,
    tokenize_stream,
)


class CharTokenizer:
    """Tiny stand-in tokenizer: one id per character."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1 + (ord(c) % 250) for c in t] for t in texts]}

    def get_vocab(self):
        return {chr(i): i for i in range(1, 251)}


def test_bundled_train_is_deduplicated_and_large():
    texts = bundled_train_texts()
    assert len(texts) == len(set(texts)) > 5000
    words = sum(len(t.split()) for t in texts)
    assert words > 1_000_000  # >= 1M tokens of any subword tokenizer
    assert texts == bundled_train_texts()  # deterministic
    assert texts != bundled_train_texts(seed=1)


def test_heldout_never_overlaps_train():
    train = bundled_train_texts()
    held = bundled_heldout_texts()
    assert len(held) > 4000
    assert not set(train) & set(held)

    def shingles(t, n=12):
        w = t.split()
        return {" ".join(w[i:i + n]) for i in range(0, max(0, len(w) - n + 1), 3)}

    held_sh = set().union(*(shingles(t) for t in held))
    train_sh = set().union(*(shingles(t) for t in train[::2]))
    assert len(held_sh & train_sh) == 0


def test_bundled_tokens_over_one_million(bundled):
    _, tok = bundled
    stream = data_mod.token_stream("bundled", tok)
    assert stream.numel() > 1_000_000
    assert stream.dtype == torch.long and int(stream.max()) < len(tok)
    held = data_mod.token_stream("heldout", tok)
    assert held.numel() > 100_000


def test_pack_blocks_and_token_blocks():
    stream = torch.arange(1000)
    blocks = pack_blocks(stream, 64)
    assert blocks.shape == (15, 64) and torch.equal(blocks[1], torch.arange(64, 128))
    tb = TokenBlocks(stream, 64, seed=3)
    calib, train = tb.take(4, 0), tb.take(11, 4)
    rows = {tuple(r.tolist()) for r in torch.cat([calib, train])}
    assert len(rows) == 15  # disjoint, complete
    with pytest.raises(ValueError, match="not enough data"):
        tb.take(12, 4)
    with pytest.raises(ValueError):
        pack_blocks(torch.arange(10), 64)
    it = tb.batches(4, start=4)
    b = [next(it) for _ in range(4)]
    assert all(x.shape == (4, 64) for x in b)


def test_tokenize_stream_separates_documents():
    s = tokenize_stream(["ab", "c"], CharTokenizer())
    assert s.tolist() == [1 + ord("a"), 1 + ord("b"), 0, 1 + ord("c"), 0]


def test_local_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline two\n\nsecond doc\n\nfirst doc\nline two")
    assert load_texts(str(txt)) == ["first doc\nline two", "second doc"]
    js = tmp_path / "b.jsonl.gz"
    with gzip.open(js, "wt") as f:
        f.write(json.dumps({"body": "x y"}) + "\n" + json.dumps({"body": "z"}) + "\n")
    assert load_texts(str(js), field="body") == ["x y", "z"]
    with pytest.raises(ValueError, match="field"):
        load_texts(str(js))
    with pytest.raises(FileNotFoundError, match="bundled"):
        load_texts(str(tmp_path / "missing.txt"))


def test_token_stream_cache(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello\n\nworld")
    a = data_mod.token_stream(str(txt), CharTokenizer(), cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.pt"))) == 1
    b = data_mod.token_stream(str(txt), CharTokenizer(), cache_dir=tmp_path / "c")
    assert torch.equal(a, b)


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown bundled source"):
        bundled_train_texts(sources=("wikitext",))
