"""Physical layer removal and checkpoint writing (HF format that transformers and vLLM load).

`export_pruned` keeps `keep_layers` (original indices), renumbers them contiguously
(`model.layers.{i}`), carries every per-layer config field over (`pruned_config`: per-layer
lists, layer-index lists, thresholds, periods), checks that the pruned config builds layers
of the kept layers' structure, writes safetensors (sharded past `max_shard_size`) into a temp dir next to `out_dir` and
renames it into place, so an interrupted export never leaves a half-written checkpoint.
`pruning.json` records the kept and removed original indices and the files the export
wrote: a later export replaces a previous one of ours, but never a directory with other
files in it (unless asked: overwrite="force"), and never deletes a file it did not write.
"""

from __future__ import annotations

import copy
import json
import operator
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from e3pruner.models.families import decoder_layers, get_adapter, num_layers
from e3pruner.disk_space import full_disk_as_error, require_free_space, tensor_bytes
from e3pruner.train import json_text

PRUNING_FILE = "pruning.json"
SAVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)?")


def validate_keep_layers(keep_layers, n_layers: int) -> list[int]:
    try:
        items = list(keep_layers)
        if any(isinstance(i, bool) for i in items):
            raise TypeError("bool")
        keep = [operator.index(i) for i in items]  # an int, not a float that int() truncates
    except TypeError as err:
        raise ValueError(f"keep_layers must be a list of integer layer indices, got "
                         f"{keep_layers!r}") from err
    if len(set(keep)) != len(keep):
        raise ValueError(f"keep_layers has duplicates: {keep}")
    if not keep:
        raise ValueError("keep_layers is empty: a model needs at least one decoder layer")
    bad = [i for i in keep if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"keep_layers {bad} out of range [0, {n_layers - 1}] "
                         f"(the model has {n_layers} layers)")
    return sorted(keep)


# Per-layer config fields by meaning (any family; the reload check in export_pruned catches
# a field this does not know):
# - lists with one entry per layer (layer_types, mlp_layer_types, no_rope_layers, ...): any
#   list of length num_hidden_layers not named below; subset to the kept layers;
# - lists of layer indices: remapped old -> new, removed layers dropped;
# - thresholds t meaning "layers with index < t are of one kind": the kept layers below t;
# - a period p meaning "layer i is of kind B iff (i + 1) % p == 0": made explicit (below).
INDEX_LIST_FIELDS = ("mlp_only_layers",)
BELOW_THRESHOLD_FIELDS = ("max_window_layers", "first_k_dense_replace", "num_dense_layers")
SLIDING_PATTERN_FIELDS = ("sliding_window_pattern", "_sliding_window_pattern")
_NOT_PER_LAYER = ("architectures",)


def _per_layer_list(key: str, value, n: int) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == n and key not in _NOT_PER_LAYER
            and key not in INDEX_LIST_FIELDS and "token_id" not in key and "mtp" not in key)


def _explicit_sparse_step(config, new: dict, keep: list[int]) -> None:
    """Qwen2/3-MoE `decoder_sparse_step` k: layer i is MoE iff i not in mlp_only_layers and
    num_experts > 0 and (i + 1) % k == 0. A period does not survive removing layers: set k = 1
    and list every kept dense layer in mlp_only_layers, so each keeps its MLP kind."""
    step = getattr(config, "decoder_sparse_step", None)
    if not isinstance(step, int) or step == 1 or not hasattr(config, "mlp_only_layers"):
        return
    dense_only = set(getattr(config, "mlp_only_layers", None) or ())
    experts = getattr(config, "num_experts", 0) or 0
    dense = [i for i in range(config.num_hidden_layers)
             if i in dense_only or not (experts > 0 and (i + 1) % step == 0)]
    new["decoder_sparse_step"] = 1
    new["mlp_only_layers"] = dense  # original indices: remapped with the other index lists


def _sliding_pattern(layer_types: list[str]) -> int | None:
    """The period p with layer_types[i] == "full_attention" iff (i + 1) % p == 0, if any."""
    for p in range(1, len(layer_types) + 2):
        if all((lt == "full_attention") == ((i + 1) % p == 0) for i, lt in enumerate(layer_types)):
            return p
    return None


def pruned_config(config, keep: list[int]):
    """Copy of `config` describing the model with only `keep` layers (original indices)."""
    n = config.num_hidden_layers
    new_index = {old: i for i, old in enumerate(keep)}
    new = copy.deepcopy(config)
    for key in ("quantization_config",):
        if hasattr(new, key):
            try:
                delattr(new, key)
            except AttributeError:
                setattr(new, key, None)
    values = dict(vars(new))
    changed: dict = {}
    _explicit_sparse_step(config, changed, keep)
    values.update(changed)
    for key, value in values.items():
        if key in INDEX_LIST_FIELDS and isinstance(value, (list, tuple)):
            changed[key] = type(value)(new_index[i] for i in value if i in new_index)
        elif _per_layer_list(key, value, n):
            changed[key] = type(value)(value[i] for i in keep)
        elif key in BELOW_THRESHOLD_FIELDS and isinstance(value, int) and not isinstance(value, bool):
            changed[key] = sum(1 for i in keep if i < value)
    for key, value in changed.items():
        setattr(new, key, value)
    layer_types = getattr(new, "layer_types", None)
    if isinstance(layer_types, (list, tuple)):  # authoritative: make the period agree with it
        period = _sliding_pattern(list(layer_types))
        for key in SLIDING_PATTERN_FIELDS:
            if isinstance(vars(new).get(key), int) and period is not None:
                setattr(new, key, period)
            elif key.startswith("_") and key in vars(new):
                delattr(new, key)  # private (not saved): only a stale default if kept
    new.num_hidden_layers = len(keep)
    return new


def check_layer_structure(config, state: dict[str, torch.Tensor], layers_path: str) -> None:
    """The model `config` builds must have decoder layers with exactly the parameter names and
    shapes of the kept layers in `state` (a layer kind, e.g. dense vs MoE MLP, that a config
    field failed to carry over shows up here). Builds the model on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    prefix = layers_path + "."

    def layer_shapes(items) -> dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in items if k.startswith(prefix)}

    want = layer_shapes(fresh.state_dict().items())
    got = layer_shapes(state.items())
    if want == got:
        return
    differ = (set(want) ^ set(got)) | {k for k in set(want) & set(got) if want[k] != got[k]}
    bad = sorted({int(k[len(prefix):].split(".", 1)[0]) for k in differ})
    raise ValueError(
        f"the pruned config of {config.model_type} builds decoder layers {bad} unlike the kept "
        "layers (parameter names or shapes differ): a per-layer config field of this family "
        "is not carried over by e3pruner.models.export.pruned_config; add its meaning there "
        "(see 'Model families' in the README)")


def _renumbered_state_dict(model: nn.Module, keep: list[int]) -> dict[str, torch.Tensor]:
    prefix = get_adapter(model).layers_path + "."
    new_index = {old: new for new, old in enumerate(keep)}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(prefix):
            idx_str, rest = key[len(prefix):].split(".", 1)
            old = int(idx_str)
            if old not in new_index:
                continue
            key = f"{prefix}{new_index[old]}.{rest}"
        out[key] = tensor
    return out


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def write_safetensors(state: dict[str, torch.Tensor], out_dir: Path,
                      max_shard_size: int = 5 * 2**30) -> list[str]:
    """Write `state` as model.safetensors or as shards + model.safetensors.index.json."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    shards = _shards(state, max_shard_size)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names, weight_map = [], {}
    total = sum(v.numel() * v.element_size() for v in state.values())
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata=meta)
        names.append(name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json_text(index))
    return names


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() or p.is_symlink())


def foreign_files(export_dir: str | Path) -> list[str]:
    """Files in `export_dir` that no export of ours wrote (all of them without our
    pruning.json; none for an export that predates the file list in pruning.json)."""
    d = Path(export_dir)
    try:
        ours = json.loads((d / PRUNING_FILE).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return _files(d)
    if ours is None:
        return []
    return [f for f in _files(d) if f not in set(ours)]


def stale_export_temp(path: str | Path) -> bool:
    """True for a directory an interrupted export left: `.NAME.tmp-PID-*` (being written) or
    `.NAME.old-PID` (the export it replaced) of a process no longer alive, holding only
    files of ours."""
    path = Path(path)
    m = _TEMP_RE.match(path.name)
    if not m or not path.is_dir() or path.is_symlink():
        return False
    if m["pid"] is not None and _pid_alive(int(m["pid"])):
        return False
    if m["kind"] == "tmp":
        return True
    return m["pid"] is not None and (path / PRUNING_FILE).is_file() and not foreign_files(path)


def _remove_stale_temps(out_dir: Path) -> None:
    if not out_dir.parent.is_dir():
        return
    for p in out_dir.parent.iterdir():
        if p.name.startswith(f".{out_dir.name}.") and stale_export_temp(p):
            shutil.rmtree(p, ignore_errors=True)


def _check_target(out_dir: Path, overwrite) -> None:
    """Refuse targets an export must not replace (see export_pruned)."""
    if overwrite not in (True, False, "force"):
        raise ValueError(f"overwrite must be True, False or 'force', got {overwrite!r}")
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        what = "a symbolic link" if out_dir.is_symlink() else "not a directory"
        raise FileExistsError(f"{out_dir} exists and is {what}: export into a new or empty "
                              "directory")
    if not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True or choose another dir")
    if overwrite == "force" or not any(out_dir.iterdir()):
        return
    if not (out_dir / PRUNING_FILE).is_file():
        raise FileExistsError(
            f"{out_dir} is not empty and is not an e3pruner export (no {PRUNING_FILE}): export "
            "into a new or empty directory, or pass overwrite='force' to add the export to it "
            "(files of the same name are replaced, the others kept)")


def export_pruned(model: nn.Module, keep_layers, out_dir: str | Path, tokenizer=None, *,
                  dtype: torch.dtype | None = None, max_shard_size: int = 5 * 2**30,
                  info: dict | None = None, overwrite: bool | str = True) -> Path:
    """Write the model with only `keep_layers` (original indices) as an HF checkpoint.

    dtype: save in this floating dtype (default: the model's). Tied embeddings stay tied
    (the head tensor is not duplicated); an untied head is saved as is. `info` is merged into
    pruning.json (method, scores, tokens used...). The model itself is not modified.
    overwrite: True (default) writes into a new or empty directory or replaces a previous
    export of ours (one with pruning.json; files in it that the export did not write are
    kept); a non-empty directory of other files, or a file, is refused. False: `out_dir`
    must not exist. "force": also add the export to a directory of other files (files of the
    same name are replaced, the others kept).
    """
    from e3pruner.models.loading import parse_dtype

    n = num_layers(model)
    keep = validate_keep_layers(keep_layers, n)
    if isinstance(dtype, str):
        try:
            dtype = parse_dtype(dtype)  # "auto": the model's
        except ValueError:
            pass
    if dtype is not None:
        if dtype not in SAVE_DTYPES:
            names = ", ".join(map(str, SAVE_DTYPES))
            raise ValueError(f"dtype must be a floating dtype ({names}), got {dtype}: casting "
                             "weights to it would write garbage")
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir.parent, os.W_OK):
        raise PermissionError(f"cannot write into {out_dir.parent}")

    adapter = get_adapter(model)
    config = pruned_config(model.config, keep)
    state = _renumbered_state_dict(model, keep)
    check_layer_structure(config, state, adapter.layers_path)
    head_key = adapter.head_path + ".weight"
    embed_key = adapter.embed_path + ".weight"
    if head_key in state and embed_key in state:
        same = state[head_key].data_ptr() == state[embed_key].data_ptr()
        if getattr(config, "tie_word_embeddings", False) and same:
            del state[head_key]
        elif not same:
            config.tie_word_embeddings = False
    save_dtype = dtype or next(iter(state.values())).dtype
    state = {k: (v.to(save_dtype) if v.is_floating_point() else v) for k, v in state.items()}
    config.dtype = save_dtype
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]

    _remove_stale_temps(out_dir)
    needed, what = tensor_bytes(state), f"the export {out_dir.name}"
    require_free_space(out_dir.parent, needed, what)  # the old export stays until the rename
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        with full_disk_as_error(out_dir.parent, needed, what):
            files = write_safetensors(state, tmp, max_shard_size)
            config.save_pretrained(tmp)
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            record = {
                "original_num_layers": n,
                "kept_layers": keep,
                "removed_layers": [i for i in range(n) if i not in set(keep)],
                "num_layers": len(keep),
                "model_type": model.config.model_type,
                "source": getattr(model.config, "_name_or_path", None),
                "dtype": str(save_dtype).replace("torch.", ""),
                "weight_files": files,
            }
            record.update(info or {})
            record["files"] = sorted(set(_files(tmp)) | {PRUNING_FILE})
            (tmp / PRUNING_FILE).write_text(json_text(record))
            os.chmod(tmp, 0o755)
        _move_into_place(tmp, out_dir, record["files"])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _move_into_place(tmp: Path, out_dir: Path, new_files: list[str]) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    if not any(out_dir.iterdir()):
        os.rmdir(out_dir)
        os.replace(tmp, out_dir)
        return
    if not (out_dir / PRUNING_FILE).is_file():  # overwrite="force" into a foreign directory
        for rel in new_files:
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, out_dir / rel)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    keep = foreign_files(out_dir)  # files of the user's in our previous export: kept
    clash = sorted(set(keep) & set(new_files))
    if clash:
        raise FileExistsError(f"{out_dir} holds files the export did not write that it would "
                              f"replace: {clash}; move them away first")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    for rel in keep:
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(old / rel, out_dir / rel)
    shutil.rmtree(old)


def read_pruning_info(path: str | Path) -> dict:
    return json.loads((Path(path) / PRUNING_FILE).read_text())


def remove_layers_inplace(model: nn.Module, keep_layers) -> nn.Module:
    """Physically drop layers from a live model (for recovery training): renumbers
    `self_attn.layer_idx` and updates the config. Weights are shared, not copied."""
    from e3pruner.models.gates import remove_gates

    remove_gates(model)
    layers = decoder_layers(model)
    keep = validate_keep_layers(keep_layers, len(layers))
    new_config = pruned_config(model.config, keep)
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(kept):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    parent_path, attr = get_adapter(model).layers_path.rsplit(".", 1)
    parent = model
    for part in parent_path.split("."):
        parent = getattr(parent, part)
    setattr(parent, attr, kept)
    for key, value in vars(new_config).items():
        setattr(model.config, key, value)
    if hasattr(parent, "config") and parent.config is not model.config:
        for key, value in vars(new_config).items():
            setattr(parent.config, key, value)
    return model
