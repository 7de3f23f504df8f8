"""moe-lm: Megatron-style pretraining of Mixture-of-Experts language models on DeepSpeed-MoE, routers first.

Layout: config (typed recipes), model (the decoder), routers (one file per router, one registry), moe (the
DeepSpeed-MoE adapter), data, train, metrics, export. docs/architecture.md follows a batch through them.
"""

import os

import torch

if not torch.cuda.is_available():
    # Name the accelerator before anything imports DeepSpeed, instead of its detection warning.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

__version__ = "0.1.0"
