"""Evaluation: held-out perplexity, zero-shot accuracy, decode throughput (HF and vLLM)."""
