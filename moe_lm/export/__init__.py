"""Export: a checkpoint as a folder that transformers loads (`hf.py`, `moe-lm export --hf`), with the modeling code
shipped beside its weights (`hf_modeling.py`). One safetensors file (`--out`) is `moe_lm.checkpoint`'s."""
