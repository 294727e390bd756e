"""Within one machine, the same seed gives E3 the same mask (issue 19): two fresh processes
(different hash seeds, so no accidental dependence on set or dict order) with one seed agree
bit for bit, while another seed moves the learned scores."""
from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, sys
import torch
from e3pruner.methods import Budget, get_method
from e3pruner.methods.e3 import E3Config
from tests.pruner.test_pipeline import _tiny_model_and_data

torch.manual_seed(1234)  # the model's init; the search is seeded by Budget.seed alone
model, data = _tiny_model_and_data("llama", 2)
budget = Budget(search_tokens=2 * 32 * 8, batch_size=2, seed=int(sys.argv[1]), progress=False)
sel = get_method("e3")(model, data, 2, budget, E3Config(amp="bf16", polish_evals=6))
print(json.dumps({"keep": sel.keep, "scores": sel.scores, "polish": sel.info["polish"]}))
"""


def _select(seed: int, hash_seed: str) -> dict:
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(seed)], env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_same_seed_same_mask_in_fresh_processes():
    a, b = _select(3, "1"), _select(3, "2")
    assert a == b  # mask, every score and the polish record, bit for bit (json floats)
    c = _select(4, "1")
    assert c["scores"] != a["scores"]
