"""A pruned GGUF from the original GGUF: the quantized tensors of the kept layers, bit for bit.

`export_pruned_gguf(src, keep_layers, out)` copies every metadata field of `src` in its
order and type, except:
  * `{arch}.block_count` -> len(keep);
  * every `{arch}.*` array of length block_count (per-layer values: head counts, feed-forward
    lengths, sliding-window patterns...) -> its entries at `keep`;
  * `{arch}.leading_dense_block_count` (the first N blocks are dense) -> the number of kept
    blocks below N.
Tensors `blk.{old}.*` of kept layers become `blk.{new}.*` (new = rank of old in keep), those
of removed layers are dropped, all others are copied; order, GGML type, shape and raw bytes
are those of the source, and so is the data alignment. The file is written to a temp file
`.{name}.tmp-PID-*` in `out`'s directory, fsynced and renamed into place; temp files of
killed exports are removed by the next one.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-")


class GGUFExportError(ValueError):
    pass


def read_gguf(path: str | Path):
    """GGUFReader of `path`, or a GGUFExportError naming the file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise GGUFExportError(f"{path} is not a file: pass the .gguf file the model was "
                              "loaded from")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as err:
        raise GGUFExportError(f"cannot read {path} as GGUF ({err}): the file is damaged or "
                              "truncated; use an intact copy") from err


def _arch_and_blocks(reader, path: Path) -> tuple[str, int]:
    arch_field = reader.get_field("general.architecture")
    if arch_field is None:
        raise GGUFExportError(f"{path} has no general.architecture field: not a model GGUF")
    arch = arch_field.contents()
    blocks = reader.get_field(f"{arch}.block_count")
    if blocks is None:
        raise GGUFExportError(f"{path} has no {arch}.block_count field: it holds no decoder "
                              "blocks to prune")
    return arch, int(blocks.contents())


def _check_layer_structure(reader, arch: str, path: Path) -> None:
    nextn = reader.get_field(f"{arch}.nextn_predict_layers")
    if nextn is not None and int(nextn.contents()) > 0:
        raise GGUFExportError(f"{path}: its last {int(nextn.contents())} blocks are "
                              f"multi-token-prediction heads ({arch}.nextn_predict_layers); "
                              "pruning such a GGUF is not supported")


def _new_value(field, arch: str, n_blocks: int, keep: list[int]):
    """The value `field` takes in the pruned file."""
    import gguf

    value = field.contents()
    if field.name == f"{arch}.block_count":
        return len(keep)
    if field.name == f"{arch}.leading_dense_block_count":
        return sum(1 for i in keep if i < int(value))
    if (field.name.startswith(arch + ".") and field.types[0] == gguf.GGUFValueType.ARRAY
            and len(value) == n_blocks):
        return [value[i] for i in keep]
    return value


def per_layer_fields(src: str | Path) -> list[str]:
    """Names of the metadata fields of `src` that a pruned export subsets (see module doc)."""
    import gguf

    reader = read_gguf(src)
    arch, n = _arch_and_blocks(reader, Path(src))
    return [f.name for f in reader.fields.values()
            if f.name.startswith(arch + ".") and f.types and f.types[0] == gguf.GGUFValueType.ARRAY
            and len(f.contents()) == n]


def _kept_tensors(reader, keep: list[int]) -> list[tuple[str, object]]:
    """(new name, ReaderTensor) of the tensors the pruned file holds, in source order."""
    new_index = {old: new for new, old in enumerate(keep)}
    out = []
    for tensor in reader.tensors:
        m = _BLOCK_RE.match(tensor.name)
        if m is None:
            out.append((tensor.name, tensor))
        elif int(m[1]) in new_index:
            out.append((f"blk.{new_index[int(m[1])]}.{m[2]}", tensor))
    return out


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete `.{out.name}.tmp-PID-*` files that an export killed mid-write left beside
    `out` (PID no longer alive); returns what went."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        m = _TEMP_RE.match(p.name)
        if (m and m["name"] == out.name and p.is_file() and not p.is_symlink()
                and int(m["pid"]) != os.getpid() and not _process_alive(int(m["pid"]))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def export_pruned_gguf(src: str | Path, keep_layers, out: str | Path) -> Path:
    """Write `out`: the GGUF `src` with only the blocks `keep_layers` (original indices).

    Raises GGUFExportError (a ValueError) for an unreadable source or one without blocks,
    ValueError for bad keep_layers (the messages say what to pass). An existing file `out`
    is replaced atomically; on any failure it is left as it was and no temp file stays.
    """
    import gguf

    from e3pruner.disk_space import full_disk_as_error, require_free_space
    from e3pruner.models.export import validate_keep_layers

    src, out = Path(src), Path(out)
    if out.exists() and out.resolve() == src.resolve():
        raise GGUFExportError(f"the pruned GGUF {out} would replace its source: write it "
                              "elsewhere")
    if out.is_dir():
        raise GGUFExportError(f"{out} is a directory: give the path of the .gguf file to write")
    reader = read_gguf(src)
    arch, n_blocks = _arch_and_blocks(reader, src)
    _check_layer_structure(reader, arch, src)
    keep = validate_keep_layers(keep_layers, n_blocks)
    tensors = _kept_tensors(reader, keep)

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    needed = reader.data_offset + sum(t.n_bytes + reader.alignment for _, t in tensors)
    what = f"the pruned GGUF {out.name}"
    require_free_space(out.parent, needed, what)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    writer = None
    try:
        writer = gguf.GGUFWriter(tmp, arch, endianess=reader.endianess)
        with full_disk_as_error(out.parent, needed, what):
            writer.kv_data[0].clear()  # general.architecture is copied in its source place
            writer.data_alignment = reader.alignment
            for field in reader.fields.values():
                if field.name.startswith("GGUF."):  # header values, written by the writer
                    continue
                sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(field.name, _new_value(field, arch, n_blocks, keep),
                                     field.types[0], sub_type=sub_type)
            for name, t in tensors:
                writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes,
                                       raw_dtype=t.tensor_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _, t in tensors:
                writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
            writer.flush()
            os.fsync(writer.fout[0].fileno())
            writer.close()
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
