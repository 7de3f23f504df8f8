"""Train and load the byte-level BPE tokenizer of a prepared corpus.

Byte-level (GPT-2 style) so that any text, code and odd Unicode included, round-trips losslessly:
decode(encode(text)) == text. The single special token `<|endoftext|>` separates documents and doubles as the
beginning-of-sequence and padding token (GPT-2's convention: a document starts after an `<|endoftext|>`). The
tokenizer is saved with `save_pretrained`, so `AutoTokenizer.from_pretrained` (and therefore any Hugging Face tool)
loads it as it is; `tokenizer_for_model` sets it up for one model (its context length) when a model is exported.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

import datasets
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from moe_lm.data.errors import DataError

EOS_TOKEN = "<|endoftext|>"
MIN_VOCAB_SIZE = len(pre_tokenizers.ByteLevel.alphabet()) + 1  # every byte, plus EOS_TOKEN
TRAIN_BATCH_SIZE = 1000


def train_tokenizer(texts: datasets.Dataset | Iterable[str], vocab_size: int, out_dir: str | Path,
                    progress: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most `vocab_size` tokens on `texts` (a Dataset's `text` column, or strings)
    and save it to `out_dir`.

    A small corpus may yield fewer tokens than asked for: `len(tokenizer)` is the real vocabulary size.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is below {MIN_VOCAB_SIZE}: a byte-level BPE needs the 256 byte "
                         f"tokens and {EOS_TOKEN}")
    _require_empty(out_dir)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if isinstance(texts, datasets.Dataset):
        batches = (batch["text"] for batch in texts.iter(batch_size=TRAIN_BATCH_SIZE))
        backend.train_from_iterator(batches, trainer, length=len(texts))
    else:
        texts = iter(texts)
        batches = iter(lambda: list(itertools.islice(texts, TRAIN_BATCH_SIZE)), [])
        backend.train_from_iterator(batches, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                        pad_token=EOS_TOKEN, clean_up_tokenization_spaces=False)
    save_tokenizer(tokenizer, out_dir)
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A tokenizer folder in AutoTokenizer format (ours or any fast Hugging Face tokenizer), from disk only."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(f"{path}: {type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer")
    return tokenizer


def tokenizer_for_model(path: str | Path, model_max_length: int) -> PreTrainedTokenizerFast:
    """The tokenizer at `path` set up to ship with a model of context `model_max_length` (`model.seq_len`).

    Without it, `model_max_length` is left at transformers' "unlimited" 1e30, and tools that truncate by it (e.g.
    lm-evaluation-harness) feed the model sequences longer than it was trained on. A tokenizer without a bos or pad
    token (ours from before they were set, or an external one) gets its eos token for both.
    """
    tokenizer = load_tokenizer(path)
    if tokenizer.eos_token is None:
        raise ValueError(f"{path}: the tokenizer defines no eos token")
    tokenizer.model_max_length = model_max_length
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """Save into `out_dir`, which must be new or empty: a stale file there (an old vocab.json) could shadow the new
    tokenizer, and a file moe-lm did not write is never deleted to make room."""
    _require_empty(out_dir)
    tokenizer.save_pretrained(str(out_dir))


def _require_empty(folder: str | Path) -> None:
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DataError(f"{folder} is not an empty folder: a tokenizer is saved only into a new or empty one")
