"""export_pruned never deletes files it did not write, refuses non-float dtypes and leaves
no temp or backup directory behind."""

import json
import os

import pytest
import torch

from e3pruner.models.export import export_pruned, read_pruning_info
from tests.pruner.tiny_models import tiny_model

KEEP = [0, 2, 3, 5]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _hidden(d):
    return sorted(p for p in os.listdir(d) if p.startswith("."))


def test_refuses_a_directory_of_other_files(model, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(FileExistsError, match="not an e3pruner export"):
        export_pruned(model, KEEP, out)
    assert os.listdir(out) == ["notes.txt"] and not _hidden(tmp_path)
    # asked explicitly: the export is added, the user's file stays
    export_pruned(model, KEEP, out, overwrite="force")
    assert (out / "notes.txt").read_text() == "the user's"
    assert read_pruning_info(out)["kept_layers"] == KEEP and not _hidden(tmp_path)


def test_replacing_an_export_keeps_files_it_did_not_write(model, tmp_path):
    out = export_pruned(model, KEEP, tmp_path / "p")
    assert "files" in read_pruning_info(out)
    (out / "README.md").write_text("my notes")
    export_pruned(model, [0, 1], out)
    assert read_pruning_info(out)["kept_layers"] == [0, 1]
    assert (out / "README.md").read_text() == "my notes"
    assert not _hidden(tmp_path)
    (tmp_path / "empty").mkdir()  # an empty directory is fine too
    assert read_pruning_info(export_pruned(model, KEEP, tmp_path / "empty"))["num_layers"] == 4


def test_onto_an_existing_file(model, tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("a file")
    with pytest.raises(FileExistsError, match="not a directory"):
        export_pruned(model, KEEP, target)
    assert target.read_text() == "a file"
    assert sorted(os.listdir(tmp_path)) == ["model.bin"]  # no .model.bin.old-PID


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, "int8"])
def test_only_floating_dtypes(model, tmp_path, dtype):
    with pytest.raises(ValueError, match="floating dtype"):
        export_pruned(model, KEEP, tmp_path / "p", dtype=dtype)
    assert not os.listdir(tmp_path)


def test_float_layer_indices_are_refused(model, tmp_path):
    with pytest.raises(ValueError, match="integer"):
        export_pruned(model, [0.0, 2.7], tmp_path / "p")
    assert not os.listdir(tmp_path)


def test_stale_temp_dirs_of_a_killed_export_are_removed(model, tmp_path):
    dead = tmp_path / ".p.tmp-999999999-abcd"  # no such process
    legacy = tmp_path / ".p.tmp-x1y2z3"  # an older version's name
    alive = tmp_path / f".p.tmp-{os.getpid()}-live"  # an export under way
    for d in (dead, legacy, alive):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    export_pruned(model, KEEP, tmp_path / "p")
    assert not dead.exists() and not legacy.exists() and alive.exists()
    json.loads((tmp_path / "p" / "pruning.json").read_text())
