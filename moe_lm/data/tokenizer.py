"""Train and load the byte-level BPE tokenizer of a prepared corpus.

Byte-level (GPT-2 style) so that any text, code and odd Unicode included, round-trips losslessly:
decode(encode(text)) == text. The single special token `<|endoftext|>` separates documents and doubles
as the padding token. The tokenizer is saved with `save_pretrained`, so `AutoTokenizer.from_pretrained`
(and therefore any Hugging Face tool) loads it as it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
TRAIN_BATCH_SIZE = 1000


def train_tokenizer(dataset: datasets.Dataset, vocab_size: int, out_dir: str | Path,
                    progress: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most `vocab_size` tokens on the `text` column and save it to `out_dir`.

    A small corpus may yield fewer tokens than asked for: `len(tokenizer)` is the real vocabulary size.
    """
    if vocab_size <= len(pre_tokenizers.ByteLevel.alphabet()):
        raise ValueError(f"vocab_size={vocab_size} must exceed the 256 byte tokens of a byte-level BPE")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    batches = (batch["text"] for batch in dataset.iter(batch_size=TRAIN_BATCH_SIZE))
    backend.train_from_iterator(batches, trainer, length=len(dataset))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                        clean_up_tokenization_spaces=False)
    save_tokenizer(tokenizer, out_dir)
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A tokenizer folder in AutoTokenizer format (ours or any fast Hugging Face tokenizer), from disk only."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(f"{path}: {type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer")
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """Save into `out_dir`, replacing whatever tokenizer was there (stale files could shadow the new one)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tokenizer.save_pretrained(str(out_dir))
