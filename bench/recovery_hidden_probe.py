"""Probe (issue 19): recovery plus a hidden-state matching term, on a fixed pruned model.

Student layer j's output is pulled toward the teacher's input of original layer keep[j+1]
(what the teacher feeds the next kept layer): relative squared error per token,
|h_s - h_t|^2 / |h_t|^2, mean over tokens and over the matched layers, times --weight,
added to the per-token recovery loss (entropy-weighted KD + 0.3 CE, 2 x 256 blocks).
--pairs cuts matches only the layers followed by a cut. It patches `recovery.distill`
in this process only (no option of the product: it did not help, docs/design-changes.md)
and runs `recovery_sweep.py`'s setting on the same data, seed and held-out text.

    python bench/recovery_hidden_probe.py --weight 1.0 [--pairs all|cuts] [--tokens 32768]
        [--removed 5,12,13,14,16,17,18,25] [--out /tmp/hidden_probe.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import e3pruner.recovery.distill as distill  # noqa: E402
import recovery_sweep  # noqa: E402
from e3pruner.models.activations import hidden_input, hidden_output  # noqa: E402
from e3pruner.models.families import decoder_layers  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weight", type=float, required=True)
    p.add_argument("--pairs", choices=["all", "cuts"], default="all")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--removed", default="5,12,13,14,16,17,18,25")
    p.add_argument("--num-layers", type=int, default=30)
    p.add_argument("--out", default="/tmp/hidden_probe.json")
    a = p.parse_args()
    removed = {int(x) for x in a.removed.split(",")}
    keep = [i for i in range(a.num_layers) if i not in removed]
    pairs = [(j, keep[j + 1]) for j in range(len(keep) - 1)]
    if a.pairs == "cuts":
        pairs = [(j, t) for j, t in pairs if t != keep[j] + 1]
    box = {"steps": 0}
    make_student, micro_batch = distill.make_student, distill._micro_batch

    def capture_student(model, keep_):
        box["student"] = make_student(model, keep_)
        return box["student"]

    def with_hidden_term(student_forward, teacher, *args, **kwargs):
        s_out, t_in = {}, {}
        s_layers, t_layers = decoder_layers(box["student"]), decoder_layers(teacher)
        hooks = [s_layers[j].register_forward_hook(
            lambda _m, _a, o, j=j: s_out.__setitem__(j, hidden_output(o))) for j, _ in pairs]
        hooks += [t_layers[t].register_forward_pre_hook(
            lambda _m, a_, kw, t=t: t_in.__setitem__(t, hidden_input(a_, kw).detach()),
            with_kwargs=True) for _, t in pairs]
        try:
            out, scale = micro_batch(student_forward, teacher, *args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        terms = [(((s_out[j].float() - t_in[t].float()) ** 2).sum(-1)
                  / (t_in[t].float() ** 2).sum(-1).clamp_min(1e-6)).mean() for j, t in pairs]
        hidden = torch.stack(terms).mean()
        box["steps"] += 1
        if box["steps"] == 1 or box["steps"] % 32 == 0:
            print(f"micro-batch {box['steps']}: hidden term {float(hidden):.4f}, "
                  f"KD+CE per token {float(out.loss) / scale:.4f}", flush=True)
        out.loss = out.loss + a.weight * scale * hidden
        return out, scale

    distill.make_student, distill._micro_batch = capture_student, with_hidden_term
    name = f"hidden{a.weight:g}_{a.pairs}"
    sys.argv = [sys.argv[0], "--tokens", str(a.tokens), "--removed", a.removed,
                "--settings", f'{name}={{"batch_size": 2, "ce_weight": 0.3}}', "--out", a.out]
    recovery_sweep.main()


if __name__ == "__main__":
    main()
