"""The effect of E3's swap polish on the bundled SmolLM2-135M at the default settings of
`e3pruner prune`: one E3 search (polish off), then the polish from its result; the search
objective (calib KD of the hard mask, eval/mask_kd.py on the calibration blocks, which
neither the search nor the polish saw) and the held-out perplexity before recovery of both
masks, beside ShortGPT's and per-layer perplexity's masks.

    python bench/polish_effect.py [--out bench/results/polish_effect_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_info  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from e3pruner.eval.mask_kd import MaskKDScorer
    from e3pruner.eval.perplexity import perplexity
    from e3pruner.methods import Budget, get_method
    from e3pruner.methods.e3 import E3Config
    from e3pruner.models import load_model
    from e3pruner.models.gates import gated, keep_mask, remove_gates
    from e3pruner.pipeline import PruneArgs, prepare_data, with_resolved_amp
    from e3pruner.train import seed_everything

    args = with_resolved_amp(PruneArgs(seed=a.seed), log=print)
    seed_everything(args.seed)
    model, tok = load_model(args.model)
    data, heldout = prepare_data(args, tok, log=lambda *_: None)
    n, n_prune = 30, 8
    budget = Budget(search_tokens=args.search_tokens, batch_size=args.batch_size,
                    seed=args.seed, progress=False)
    cfg = E3Config(lr=args.search_lr, weighting=args.weighting, amp=args.amp,
                   estimator=args.estimator)
    t = time.time()
    sel = get_method("e3")(model, data, n_prune, budget, replace(cfg, polish_evals=0))
    search_s = time.time() - t
    remove_gates(model)
    # The default select() at the same token budget: a shorter search, then the polish on
    # the budget's last batches.
    t = time.time()
    pol = get_method("e3")(model, data, n_prune, budget, cfg)
    polish_s = time.time() - t
    polished, rec = pol.keep, pol.info["polish"]
    remove_gates(model)
    masks = {"e3 (no polish)": sel.keep, "e3 + polish": polished}
    for name in ("shortgpt", "ppl"):
        masks[name] = get_method(name)(model, data, n_prune, budget).keep
        remove_gates(model)
    calib = MaskKDScorer(model, data.calib, amp=cfg.amp, weighting=cfg.weighting,
                         batch_size=budget.batch_size)
    rows = {}
    for name, keep in masks.items():
        with torch.no_grad(), gated(model, keep_mask(n, keep)):
            ppl = perplexity(model, heldout, args.eval_ctx, batch_size=4, progress=False)["ppl"]
        remove_gates(model)
        rows[name] = {"removed": [i for i in range(n) if i not in set(keep)],
                      "calib_kd": calib.loss(keep), "heldout_ppl_before_recovery": ppl}
        print(name, rows[name], flush=True)
    result = {"what": "E3 swap polish at the default prune settings (bundled SmolLM2-135M, 8 of "
                      "30 layers): search objective on the calibration blocks and held-out "
                      "perplexity before recovery",
              "device": device_info(torch.device("cpu")), "seed": args.seed,
              "select_seconds_no_polish": search_s, "select_seconds_with_polish": polish_s,
              "tokens": {"no_polish": sel.tokens, "with_polish": pol.tokens}, "polish": rec,
              "masks": rows}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
