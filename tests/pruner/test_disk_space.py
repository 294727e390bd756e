"""A full disk gives a DiskSpaceError that says how much room is needed, before the write
when the free space is known to be short, and leaves no partial file behind."""

import collections
import os

import pytest
import torch
from safetensors import SafetensorError

import e3pruner.disk_space as disk_space
import e3pruner.models.export as export
from e3pruner.cli import main
from e3pruner.disk_space import DiskSpaceError, require_free_space
from e3pruner.models.export import export_pruned
from e3pruner.train import atomic_torch_save
from tests.pruner.test_reliability import _args
from tests.pruner.tiny_models import tiny_model, tiny_model_dir

Usage = collections.namedtuple("Usage", "total used free")


def _free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda p: Usage(10**12, 0, free))


def test_require_free_space_names_the_need(tmp_path, monkeypatch):
    require_free_space(tmp_path, 1000, "a thing")  # this machine has room for 1 kB
    _free(monkeypatch, 5 * 10**6)
    with pytest.raises(DiskSpaceError, match=r"a thing: it needs about 0\.07 GB .* 0\.01 GB free"):
        require_free_space(tmp_path / "not" / "yet", 1000, "a thing")


def test_checkpoint_refused_before_writing_when_space_is_short(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"w": torch.ones(4)}, path)
    _free(monkeypatch, 0)
    with pytest.raises(DiskSpaceError, match="checkpoint ckpt.pt"):
        atomic_torch_save({"w": torch.zeros(4)}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert torch.load(path, weights_only=True)["w"].sum() == 4


def test_torch_save_full_disk_becomes_a_clear_error(tmp_path, monkeypatch):
    def full(obj, f):
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                           "failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskSpaceError, match="disk filled up while writing the checkpoint"):
        atomic_torch_save({"w": torch.ones(4)}, tmp_path / "ckpt.pt")
    assert os.listdir(tmp_path) == []


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    def broken(obj, f):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="some other failure") as info:
        atomic_torch_save({"w": torch.ones(4)}, tmp_path / "ckpt.pt")
    assert not isinstance(info.value, DiskSpaceError)


def test_export_full_disk_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama")

    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                              'StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(export, "save_file", full)
    with pytest.raises(DiskSpaceError, match="disk filled up while writing the export out"):
        export_pruned(model, [0, 1, 2], tmp_path / "out")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    _free(monkeypatch, 1000)
    with pytest.raises(DiskSpaceError, match="not enough free space for the export out"):
        export_pruned(model, [0, 1, 2], tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_prune_on_a_full_disk_exits_1_with_the_need(tmp_path, monkeypatch, capsys):
    model_dir, train, held = tiny_model_dir(tmp_path, "llama")
    a = _args(tmp_path, model_dir, train, held)
    _free(monkeypatch, 0)
    argv = ["prune", "--model", a["model"], "--data", a["data"], "--heldout", a["heldout"],
            "--out", a["out"], "--prune-layers", "2", "--block-len", "32", "--batch-size", "2",
            "--search-tokens", "384", "--recovery-tokens", "256", "--eval-tokens", "1500",
            "--checkpoint-every", "2", "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "not enough free space" in err and "GB" in err
