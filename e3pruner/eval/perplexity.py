"""Evaluation: held-out perplexity here; zero-shot accuracy in zeroshot.py (re-exported).

Perplexity = exp(mean NLL over predicted tokens). The split's documents are concatenated
with EOS between them into one stream and scored in windows of `ctx_len` tokens:
* stride=None (default): back-to-back windows that share one token (window w covers
  [w(ctx_len-1), w(ctx_len-1) + ctx_len)); every token after the first is predicted
  exactly once, from the context that precedes it inside its window.
* stride=s < ctx_len: sliding windows that advance by s; each window scores only its last
  s tokens (the first window scores all), so every token after the first sees at least
  ctx_len - s tokens of context. Slower, lower (better) perplexity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm



def _windows(n: int, ctx_len: int, stride: int | None):
    """(begin, end, first_scored) triples covering positions 1..n-1 exactly once."""
    if stride is None or stride >= ctx_len:
        for b in range(0, n - 1, ctx_len - 1):
            yield b, min(b + ctx_len, n), b + 1
        return
    prev_end = 1
    b = 0
    while prev_end < n:
        e = min(b + ctx_len, n)
        yield b, e, max(prev_end, b + 1)
        prev_end = e
        b += stride


@torch.no_grad()
def perplexity(model, split, ctx_len: int = 512, *, tokenizer=None, stride: int | None = None,
               batch_size: int = 8, max_tokens: int | None = None, progress: bool = True,
               device: str | torch.device | None = None) -> dict:
    """Perplexity of `model` on `split`.

    split: a 1-D token tensor, or a data spec ("heldout", a file...; needs `tokenizer`).
    max_tokens: score only the first this-many tokens of the stream (faster; stated in the
    result). Returns {"ppl", "nll", "tokens", "ctx_len", "stride", "window_nll" (the summed
    NLL of each window, for paired comparisons), "window_tokens" (the tokens it scored)}.
    """
    if ctx_len < 2:
        raise ValueError(f"ctx_len must be >= 2, got {ctx_len}")
    if stride is not None and not 1 <= stride <= ctx_len:
        raise ValueError(f"stride must be in [1, ctx_len={ctx_len}], got {stride}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 (or None: all), got {max_tokens}")
    if isinstance(split, str):
        if tokenizer is None:
            raise ValueError("a data spec needs tokenizer=")
        from e3pruner.data import token_stream

        stream = token_stream(split, tokenizer)
    else:
        stream = torch.as_tensor(split).reshape(-1).long()
    if max_tokens is not None:
        stream = stream[:max_tokens]
    if stream.numel() < 2:
        raise ValueError("need at least 2 tokens")
    device = torch.device(device) if device else next(model.parameters()).device
    windows = list(_windows(stream.numel(), ctx_len, stride))
    total_nll, total = 0.0, 0
    window_nll: list[float] = []
    window_tokens: list[int] = []
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(windows), desc="perplexity", unit="win", disable=not progress,
               leave=False)
    try:
        for i in range(0, len(windows), batch_size):
            group = windows[i:i + batch_size]
            width = max(e - b for b, e, _ in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            target = torch.full((len(group), width), -100, dtype=torch.long)
            for r, (b, e, s) in enumerate(group):
                ids[r, : e - b] = stream[b:e]
                target[r, s - b: e - b] = stream[s:e]
            ids, target = ids.to(device), target.to(device)
            attn = (torch.arange(width, device=device)[None, :]
                    < torch.tensor([e - b for b, e, _ in group], device=device)[:, None])
            logits = model(input_ids=ids, attention_mask=attn.long(), use_cache=False).logits
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                  target[:, 1:].reshape(-1), ignore_index=-100,
                                  reduction="none").view(len(group), -1).sum(1)
            counts = (target[:, 1:] != -100).sum(1)
            window_nll += nll.tolist()
            window_tokens += counts.tolist()
            total_nll += float(nll.sum())
            total += int(counts.sum())
            bar.update(len(group))
    finally:
        bar.close()
        model.train(was_training)
    mean = total_nll / total
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total, "ctx_len": ctx_len,
            "stride": stride, "window_nll": window_nll, "window_tokens": window_tokens}
