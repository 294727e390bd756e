"""Offline teacher: the teacher's top-K token ids and log-probs of every training block,
built once with `e3kernels.teacher_topk` into sharded safetensors, read back per batch."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from e3pruner.models.activations import final_hidden
from e3pruner.models.families import kd_head_kwargs, lm_head
from e3pruner.train import write_json


def build_teacher_cache(teacher, blocks: torch.Tensor, out_dir: str | Path, k: int = 64,
                        batch_size: int = 4, shard_blocks: int = 256,
                        progress: bool = True) -> Path:
    """Top-k teacher token ids and log-probs for every block: shards of
    {"ids": int32 [n, T, k], "logprobs": fp32 [n, T, k]} + index.json. Existing complete
    shards are reused (resumable); each shard is written atomically."""
    from e3kernels import teacher_topk

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weight, head = lm_head(teacher).weight, kd_head_kwargs(teacher)
    device = weight.device
    n = blocks.shape[0]
    shards = []
    bar = tqdm(total=n, desc="teacher top-k cache", disable=not progress, leave=False)
    for s0 in range(0, n, shard_blocks):
        name = f"teacher-{s0:08d}.safetensors"
        shards.append(name)
        if (out / name).is_file():
            bar.update(min(shard_blocks, n - s0))
            continue
        ids_all, lp_all = [], []
        for i in range(s0, min(n, s0 + shard_blocks), batch_size):
            ids = blocks[i:min(i + batch_size, s0 + shard_blocks, n)].to(device)
            with torch.no_grad():
                ht = final_hidden(teacher, ids)
                top = teacher_topk(ht.reshape(-1, ht.shape[-1]), weight, k, **head)
            ids_all.append(top[0].reshape(ids.shape[0], ids.shape[1], k).to(torch.int32).cpu())
            lp_all.append(top[1].reshape(ids.shape[0], ids.shape[1], k).float().cpu())
            bar.update(ids.shape[0])
        tmp = out / f".{name}.tmp"
        save_file({"ids": torch.cat(ids_all), "logprobs": torch.cat(lp_all)}, str(tmp))
        tmp.replace(out / name)
    bar.close()
    write_json(out / "index.json",
               {"blocks": n, "block_len": int(blocks.shape[1]), "k": k,
                "shard_blocks": shard_blocks, "shards": shards}, indent=None)
    return out


class TeacherCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.index = json.loads((self.path / "index.json").read_text())
        self._shard: tuple[int, dict] | None = None

    def get(self, rows: list[int]):
        ids, lps = [], []
        per = self.index["shard_blocks"]
        for r in rows:
            s = r // per
            if self._shard is None or self._shard[0] != s:
                self._shard = (s, load_file(str(self.path / self.index["shards"][s])))
            ids.append(self._shard[1]["ids"][r - s * per])
            lps.append(self._shard[1]["logprobs"][r - s * per])
        return torch.stack(ids).long(), torch.stack(lps)
