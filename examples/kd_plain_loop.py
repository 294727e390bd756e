"""Knowledge distillation in a plain PyTorch loop with the fused linear KD loss.

The usual KD loss materializes both models' logits, [tokens, vocab] each, plus their
log-softmaxes and gradients:

    zs = student.lm_head(hs)                       # [N, V]
    with torch.no_grad():
        zt = teacher.lm_head(ht)                   # [N, V]
    loss = F.kl_div(F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1),
                    log_target=True, reduction="batchmean") * T**2

`e3kernels.fused_linear_kd_loss` takes the hidden states and the heads instead and never
builds a [N, V] tensor (C++ kernel on CPU, Triton on CUDA):

    out = fused_linear_kd_loss(hs, student.lm_head.weight, ht, teacher.lm_head.weight,
                               labels=labels, temperature=T, weighting="entropy")
    out.loss.backward()                            # out.kl, out.teacher_entropy: per token

Run it:
    python examples/kd_plain_loop.py --tiny                 # tiny random Llamas, seconds on CPU
    python examples/kd_plain_loop.py --teacher PATH_OR_ID --student PATH_OR_ID [--text FILE]

It checks that the fused loss equals the full-logit loss on the first batch (weighting
"none"), trains a few steps with the entropy weighting, and prints the peak memory of the
loss (forward + backward, from the hidden states) both ways.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from memory_probe import peak_bytes

from e3kernels import fused_linear_kd_loss


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------
def tiny_llama(vocab: int, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def load_models(args, device):
    if args.tiny:
        teacher = tiny_llama(args.vocab, 96, 4, seed=1)
        student = tiny_llama(args.vocab, 64, 2, seed=2)
        with torch.no_grad():  # a random teacher is nearly uniform: give it peaked outputs
            teacher.lm_head.weight.mul_(30.0)
    else:
        from transformers import AutoModelForCausalLM
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher, torch_dtype=torch.float32)
        student = AutoModelForCausalLM.from_pretrained(args.student, torch_dtype=torch.float32)
    teacher.to(device).eval().requires_grad_(False)
    student.to(device).train()
    return teacher, student


def batches(args, vocab: int, device):
    """Random token batches (--tiny or no --text), else blocks of a tokenized text file."""
    g = torch.Generator().manual_seed(0)
    if args.text is None:
        while True:
            yield torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.student)
    ids = tok(Path(args.text).read_text(), return_tensors="pt").input_ids[0]
    block = args.batch * args.seq
    while True:
        for i in range(0, ids.numel() - block + 1, block):
            yield ids[i:i + block].view(args.batch, args.seq).to(device)


def hidden(model, input_ids):
    """Final (normed) hidden states without computing the logits. (Under DDP/FSDP call the
    wrapped model with output_hidden_states=True, logits_to_keep=1 and take hidden_states[-1].)"""
    return model.model(input_ids=input_ids).last_hidden_state


# ------------------------------------------------------------------------------------------
# The two losses
# ------------------------------------------------------------------------------------------
def full_logit_kd(hs, ws, ht, wt, T):
    zs = hs @ ws.T
    with torch.no_grad():
        zt = ht @ wt.T
    return F.kl_div(F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1), log_target=True,
                    reduction="batchmean") * T**2


def mib(n):
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama teacher/student")
    ap.add_argument("--teacher", help="HF id or local dir (without --tiny)")
    ap.add_argument("--student", help="HF id or local dir (without --tiny)")
    ap.add_argument("--text", help="a text file to train on (default: random tokens)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary of the --tiny models")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if not args.tiny and not (args.teacher and args.student):
        ap.error("give --tiny, or both --teacher and --student")
    device = torch.device(args.device)
    T = args.temperature

    teacher, student = load_models(args, device)
    vocab = min(student.lm_head.weight.shape[0], teacher.lm_head.weight.shape[0])
    data = batches(args, vocab, device)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    ws, wt = student.lm_head.weight, teacher.lm_head.weight

    # --- one batch both ways: same value (weighting "none"), and the memory of each -------
    ids = next(data)
    with torch.no_grad():
        hs0 = hidden(student, ids)[:, :-1].reshape(-1, ws.shape[1])
        ht0 = hidden(teacher, ids)[:, :-1].reshape(-1, wt.shape[1])
    hs0.requires_grad_(True)
    n_tok = hs0.shape[0]

    def run_full():
        full_logit_kd(hs0, ws, ht0, wt, T).backward()

    def run_fused():
        fused_linear_kd_loss(hs0, ws, ht0, wt, temperature=T, weighting="none",
                             vocab_size=vocab).loss.backward()

    ref = full_logit_kd(hs0, ws[:vocab], ht0, wt[:vocab], T).item()
    val = fused_linear_kd_loss(hs0, ws, ht0, wt, temperature=T, weighting="none",
                               vocab_size=vocab).loss.item()
    print(f"first batch, {n_tok} tokens x vocab {vocab}: full-logit KD {ref:.6f}, "
          f"fused KD {val:.6f} (|diff| {abs(ref - val):.2e})")
    assert math.isclose(ref, val, rel_tol=1e-4, abs_tol=1e-5), "fused and full-logit KD differ"
    m_fused = peak_bytes(run_fused, device)
    student.zero_grad(set_to_none=True)
    m_full = peak_bytes(run_full, device) if ws.shape[0] == wt.shape[0] else None
    student.zero_grad(set_to_none=True)
    # both include the fp32 gradient of the student head (V x D): the same for both losses
    print(f"loss forward+backward peak memory: full logits {mib(m_full)}, fused {mib(m_fused)}"
          + (f" -> saved {mib(m_full - m_fused)} ({m_full / max(m_fused, 1):.1f}x less)"
             if m_full is not None and m_fused is not None else ""))

    # --- training loop ---------------------------------------------------------------------
    for step in range(args.steps):
        ids = next(data)
        t0 = time.perf_counter()
        with torch.no_grad():
            ht = hidden(teacher, ids)[:, :-1]
        hs = hidden(student, ids)[:, :-1]
        labels = ids[:, 1:]  # only the ignore mask matters here (no padding in this demo)
        out = fused_linear_kd_loss(hs.reshape(-1, hs.shape[-1]), ws, ht.reshape(-1, ht.shape[-1]),
                                   wt, labels=labels.reshape(-1), temperature=T,
                                   weighting="entropy", vocab_size=vocab)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        print(f"step {step}: loss {out.loss.item():.4f}  mean KL {out.kl.mean().item():.4f}  "
              f"mean teacher entropy {out.teacher_entropy.mean().item():.3f} nats  "
              f"({time.perf_counter() - t0:.2f} s)")


if __name__ == "__main__":
    main()
