"""The settings `e3pruner prune` and `e3pruner compare` share (PruneArgs and CompareArgs
extend RunArgs)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunArgs:
    model: str = "smollm2-135m"
    prune_layers: int | None = None
    ratio: float | None = None  # default 0.25 when prune_layers is None
    data: str = "bundled"
    heldout: str = "heldout"
    block_len: int = 256
    batch_size: int = 4  # blocks per search step (the score estimator needs >= 2 rows)
    recovery_batch_size: int | None = None  # blocks per recovery micro-batch (None: batch_size)
    calib_blocks: int = 4
    search_tokens: int = 32_768
    recovery_tokens: int = 32_768  # 0: no recovery
    lr: float = 4e-4  # recovery peak learning rate
    amp: str = "auto"  # autocast for the search and recovery forward/backward: "auto" (bf16
    # where the CPU/GPU runs bf16 natively, else fp32), "bf16", "fp16" or "none" (off)
    weighting: str = "entropy"  # KD token weighting
    eval_tokens: int = 8_192
    eval_ctx: int = 512
    out: str = "runs/e3"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def recovery_batch(self) -> int:
        """Blocks per recovery micro-batch: recovery_batch_size, else batch_size."""
        return self.batch_size if self.recovery_batch_size is None else self.recovery_batch_size
