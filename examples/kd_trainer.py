"""Knowledge distillation with the Hugging Face Trainer and the fused linear KD loss.

Override `Trainer.compute_loss`: run the student and the (frozen) teacher to their final
hidden states (no logits), then

    out = fused_linear_kd_loss(hs, student.lm_head.weight, ht, teacher.lm_head.weight,
                               labels=labels, temperature=T, weighting="entropy")
    return out.loss

which never materializes the [tokens, vocab] logits of either model (C++ kernel on CPU,
Triton on CUDA). `out.kl`, `out.teacher_entropy` and `out.weights` are per-token and
detached: handy for logging.

Run it (needs `transformers` and `accelerate`):
    python examples/kd_trainer.py --tiny                  # tiny random Llamas, seconds on CPU
    python examples/kd_trainer.py --teacher PATH_OR_ID --student PATH_OR_ID

At the end it prints the peak memory of the loss (forward + backward, from the hidden states
of one batch) with the fused kernel and with the usual full-logit F.kl_div.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F
from memory_probe import peak_bytes
from transformers import Trainer, TrainingArguments

from e3kernels import fused_linear_kd_loss


class RandomTokens(torch.utils.data.Dataset):
    """Random token blocks; replace with your tokenized corpus."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class KDTrainer(Trainer):
    """Trainer whose loss is the entropy-weighted KD loss against a frozen teacher."""

    def __init__(self, *args, teacher, temperature=2.0, weighting="entropy", ce_weight=0.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
        self.temperature = temperature
        self.weighting = weighting
        self.ce_weight = ce_weight

    @staticmethod
    def _final_hidden(model, inputs):
        # logits_to_keep=1: the model computes one position's logits instead of all of them;
        # hidden_states[-1] is the final (normed) hidden state that feeds the LM head.
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                    output_hidden_states=True, logits_to_keep=1)
        return out.hidden_states[-1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        hs = self._final_hidden(model, inputs)
        with torch.no_grad():
            ht = self._final_hidden(self.teacher, inputs)
        # next-token alignment: position t predicts token t+1
        hs, ht, labels = hs[:, :-1], ht[:, :-1], labels[:, 1:]
        if inputs.get("attention_mask") is not None:
            labels = labels.masked_fill(inputs["attention_mask"][:, 1:] == 0, -100)
        student = self.accelerator.unwrap_model(model)
        ws, wt = student.lm_head.weight, self.teacher.lm_head.weight
        out = fused_linear_kd_loss(
            hs.reshape(-1, hs.shape[-1]), ws, ht.reshape(-1, ht.shape[-1]), wt,
            labels=labels.reshape(-1), temperature=self.temperature, weighting=self.weighting,
            ignore_index=-100, vocab_size=min(ws.shape[0], wt.shape[0]),
            compute_ce=self.ce_weight > 0, ce_weight=self.ce_weight)
        if self.state.global_step % max(1, self.args.logging_steps) == 0 and model.training:
            valid = labels.reshape(-1) != -100
            self._kd_stats = {"kl": out.kl[valid].mean().item(),
                              "teacher_entropy": out.teacher_entropy[valid].mean().item()}
        return (out.loss, {"kd": out}) if return_outputs else out.loss

    def log(self, logs, *args, **kwargs):
        logs.update(getattr(self, "_kd_stats", {}))
        super().log(logs, *args, **kwargs)


# ------------------------------------------------------------------------------------------
def tiny_llama(vocab: int, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def compare_memory(trainer: KDTrainer, batch: dict) -> None:
    """Peak memory of the loss alone (forward + backward from the hidden states)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    dev = trainer.args.device
    inputs = {k: v.to(dev) for k, v in batch.items()}
    with torch.no_grad():
        hs = trainer._final_hidden(model, inputs)[:, :-1].reshape(-1, model.config.hidden_size)
        ht = trainer._final_hidden(trainer.teacher, inputs)[:, :-1]
        ht = ht.reshape(-1, ht.shape[-1])
    hs.requires_grad_(True)
    ws, wt = model.lm_head.weight, trainer.teacher.lm_head.weight
    T = trainer.temperature

    def full():
        zs = hs @ ws.T
        with torch.no_grad():
            zt = ht @ wt.T
        F.kl_div(F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1), log_target=True,
                 reduction="batchmean").mul(T * T).backward()

    def fused():
        fused_linear_kd_loss(hs, ws, ht, wt, temperature=T, weighting="none").loss.backward()

    m_fused = peak_bytes(fused, dev)
    model.zero_grad(set_to_none=True)
    m_full = peak_bytes(full, dev)
    model.zero_grad(set_to_none=True)
    n, v = hs.shape[0], ws.shape[0]
    if m_full is None or m_fused is None:
        print(f"peak memory not measurable here; the full-logit loss holds several "
              f"[{n}, {v}] fp32 tensors ({n * v * 4 / 2**20:.0f} MiB each)")
        return
    print(f"KD loss forward+backward on {n} tokens x vocab {v}: full-logit F.kl_div peak "
          f"{m_full / 2**20:.1f} MiB, fused {m_fused / 2**20:.1f} MiB -> saved "
          f"{(m_full - m_fused) / 2**20:.1f} MiB ({m_full / max(m_fused, 1):.1f}x less; both "
          f"include the student head's gradient)")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama teacher/student")
    ap.add_argument("--teacher", help="HF id or local dir (without --tiny)")
    ap.add_argument("--student", help="HF id or local dir (without --tiny)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary of the --tiny models")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--ce-weight", type=float, default=0.0, help="add ce_weight * hard-label CE")
    ap.add_argument("--out", default=None, help="Trainer output_dir (default: a temp dir)")
    args = ap.parse_args()
    if not args.tiny and not (args.teacher and args.student):
        ap.error("give --tiny, or both --teacher and --student")

    if args.tiny:
        teacher = tiny_llama(args.vocab, 96, 4, seed=1)
        student = tiny_llama(args.vocab, 64, 2, seed=2)
        with torch.no_grad():  # a random teacher is nearly uniform: give it peaked outputs
            teacher.lm_head.weight.mul_(30.0)
        vocab = args.vocab
    else:
        from transformers import AutoModelForCausalLM
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher, torch_dtype=torch.float32)
        student = AutoModelForCausalLM.from_pretrained(args.student, torch_dtype=torch.float32)
        vocab = min(teacher.config.vocab_size, student.config.vocab_size)
    data = RandomTokens(args.batch * args.steps, args.seq, vocab)

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=args.out or tmp, max_steps=args.steps,
            per_device_train_batch_size=args.batch, learning_rate=1e-3, logging_steps=1,
            save_strategy="no", report_to=[], remove_unused_columns=False,
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True)
        trainer = KDTrainer(model=student, args=targs, train_dataset=data, teacher=teacher,
                            temperature=args.temperature, weighting="entropy",
                            ce_weight=args.ce_weight)
        trainer.train()
        batch = {k: torch.stack([data[i][k] for i in range(args.batch)]) for k in data[0]}
        compare_memory(trainer, batch)


if __name__ == "__main__":
    main()
