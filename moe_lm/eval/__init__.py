"""Evaluation of trained checkpoints: perplexity (`evaluate.py`, `moe-lm eval`) and the post-hoc sparsity sweep
(`sweep.py`, `moe-lm eval --sweep`)."""
