"""The decoder-only MoE language model: building blocks in `layers.py`, the model and its parameter counts in
`transformer.py` (import from there: this package stays import-free so `moe_lm.moe` can use `layers`)."""
