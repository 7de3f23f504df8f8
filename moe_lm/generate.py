"""`moe-lm generate RUN_DIR|HF_DIR --prompt TEXT`: text from a trained model, streamed as it is sampled.

Generation goes through the transformers export (`moe_lm.export.hf`), the code any user of the exported folder
runs: a run, checkpoints or `step_N` folder is first exported into a temporary folder, and a folder that already
holds an export (a config.json) is loaded as it is. Tokens come from `model.generate` with a KV cache, printed by a
`TextStreamer`.

The prompt is preceded by the tokenizer's bos token (`<|endoftext|>` for moe-lm's tokenizers): in training a
document starts after the separator, so that is where the model expects a text to begin. temperature 0 is greedy
decoding; otherwise tokens are sampled at that temperature from the nucleus of mass `top_p`, reproducibly for a
given `seed` on one machine.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch


def is_hf_folder(path: str | Path) -> bool:
    """Whether `path` holds a transformers model (an export), rather than a moe-lm run or checkpoint."""
    return (Path(path) / "config.json").is_file()


@contextlib.contextmanager
def hf_folder(source: str | Path, tokenizer: str | Path | None = None) -> Iterator[Path]:
    """`source` itself if it is an export, else its newest complete checkpoint exported into a temporary folder that
    lives as long as the context."""
    if is_hf_folder(source):
        yield Path(source)
        return
    from moe_lm.export.hf import export_hf

    with tempfile.TemporaryDirectory(prefix="moe-lm-generate-") as tmp:
        yield export_hf(source, Path(tmp) / "model", tokenizer=tokenizer).path


def load_hf(folder: str | Path, device: str | None = None):
    """(model in eval mode, tokenizer) of an exported folder, on `device` (default: cuda if available, else cpu), in
    the dtype it was exported in."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype="auto")
    # the tokenizer reads config.json, whose auto_map names remote code too
    return model.to(device).eval(), AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """[1, N] token ids: the bos token, then the prompt's tokens (no other special tokens)."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    return torch.tensor([ids], dtype=torch.long)


@torch.no_grad()
def generate(source: str | Path, prompt: str, max_new_tokens: int = 128, temperature: float = 0.8,
             top_p: float = 0.95, seed: int = 0, stream: bool = True, tokenizer: str | Path | None = None,
             device: str | None = None) -> str:
    """The text generated after `prompt` (without it); with `stream`, prompt and text are printed as they come."""
    from transformers import TextStreamer, set_seed

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    with hf_folder(source, tokenizer) as folder:
        model, tok = load_hf(folder, device)
        input_ids = prompt_ids(tok, prompt).to(model.device)
        context = model.config.max_position_embeddings
        if input_ids.shape[1] + max_new_tokens > context:
            warnings.warn(f"{input_ids.shape[1]} prompt tokens + {max_new_tokens} new ones exceed the {context} "
                          f"positions the model was trained on: expect the text to degrade past them", stacklevel=2)
        # top_k=0: the nucleus is the only cut (transformers would otherwise keep its default top-50 as well)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 \
            else {"do_sample": False}
        set_seed(seed)
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                streamer=TextStreamer(tok, skip_special_tokens=True) if stream else None,
                                **sampling)
        return tok.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
