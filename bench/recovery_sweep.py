"""Recovery settings on a fixed pruned model: held-out perplexity and seconds per setting.

    python bench/recovery_sweep.py [--tokens 32768] [--removed 4,12,13,14,15,17,18,25]
        [--settings NAME=JSON ...] [--out bench/results/recovery_sweep_cpu.json]

Each setting is a JSON object of RecoveryConfig fields (plus "block_len"), e.g.
'bs2_ce03={"batch_size": 2, "ce_weight": 0.3}'; the default list is the sweep behind the
recovery defaults (docs/design-changes.md). Every setting starts from the same pruned copy
of the bundled model (the layers in --removed are removed), trains on the same data with the
same seed, and is evaluated on the same held-out tokens (fp32, ctx 512). Run it alone: the
seconds are wall time on a shared CPU otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import cpu_name  # noqa: E402

DEFAULT_SETTINGS = {
    "bs4_kd": {"batch_size": 4},
    "bs2x512_kd": {"batch_size": 2, "block_len": 512},
    "bs4_kd_uniform": {"batch_size": 4, "weighting": "none"},
    "bs4_ce01": {"batch_size": 4, "ce_weight": 0.1},
    "bs4_ce03": {"batch_size": 4, "ce_weight": 0.3},
    "bs4_ce10": {"batch_size": 4, "ce_weight": 1.0},
    "bs2_kd": {"batch_size": 2},
    "bs2_ce03": {"batch_size": 2, "ce_weight": 0.3},
    "bs2_ce10": {"batch_size": 2, "ce_weight": 1.0},
    "bs1_ce03": {"batch_size": 1, "ce_weight": 0.3},
}


def parse_setting(text: str) -> tuple[str, dict]:
    name, sep, body = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--settings wants NAME=JSON, got {text!r}")
    try:
        cfg = json.loads(body)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--settings {name}: not JSON: {err}") from err
    if not isinstance(cfg, dict):
        raise SystemExit(f"--settings {name}: want a JSON object, got {body!r}")
    return name, cfg


def run_setting(model, data, heldout, removed: list[int], tokens: int, setting: dict,
                seed: int) -> dict:
    from e3pruner.recovery.distill import RecoveryConfig, make_student, recover
    from e3pruner.eval.perplexity import perplexity
    from e3pruner.train import seed_everything

    seed_everything(seed)
    n_layers = model.config.num_hidden_layers
    keep = [i for i in range(n_layers) if i not in set(removed)]
    cfg = RecoveryConfig(**{"tokens": tokens, "lr": 4e-4, "amp": "bf16",
                            **{k: v for k, v in setting.items() if k != "block_len"}})
    t0 = time.time()
    student, summary = recover(make_student(model, keep), model, data, cfg, keep=keep,
                               seed=seed, progress=False)
    seconds = time.time() - t0
    ppl = perplexity(student, heldout, 512, batch_size=4, progress=False)["ppl"]
    return {"ppl": ppl, "seconds": seconds, "steps": summary["steps"],
            "tokens": summary["tokens"], "final_loss": summary["final_loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--removed", default="4,12,13,14,15,17,18,25")
    p.add_argument("--settings", nargs="*", default=None, help="NAME=JSON, see the docstring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench/results/recovery_sweep_cpu.json"))
    a = p.parse_args()
    from e3pruner.eval.perplexity import perplexity
    from e3pruner.models import load_model
    from e3pruner.pipeline import PruneArgs, prepare_data

    settings = dict(parse_setting(s) for s in a.settings) if a.settings else DEFAULT_SETTINGS
    removed = [int(x) for x in a.removed.split(",") if x.strip()]
    model, tok = load_model("smollm2-135m", dtype="auto", device="cpu")
    data_by_len = {}  # block_len -> (PruneData, held-out ids): tokenized once per length

    def data_for(block_len: int):
        if block_len not in data_by_len:
            data_by_len[block_len] = prepare_data(PruneArgs(block_len=block_len, seed=a.seed,
                                                            recovery_batch_size=1), tok)
        return data_by_len[block_len]

    heldout = data_for(256)[1]
    teacher_ppl = perplexity(model, heldout, 512, batch_size=4, progress=False)["ppl"]
    rows = {}
    for name, setting in settings.items():
        data, held = data_for(setting.get("block_len", 256))
        rows[name] = {"setting": setting, **run_setting(model, data, held, removed, a.tokens,
                                                         setting, a.seed)}
        r = rows[name]
        print(f"{name:<16} ppl {r['ppl']:8.3f} ({r['ppl'] / teacher_ppl:.3f}x teacher)  "
              f"{r['seconds']:6.1f} s  {r['steps']} steps  {json.dumps(setting)}", flush=True)
    out = {"device": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "model": "smollm2-135m", "removed": removed,
           "recovery_tokens": a.tokens, "teacher_ppl": teacher_ppl,
           "heldout": {"tokens": int(heldout.numel()), "ctx": 512}, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
