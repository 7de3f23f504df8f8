"""The data pipeline: sources -> corpus -> byte-level BPE -> memory-mapped token files -> packed samples,
in a resumable deterministic order. `prepare_data` builds a data folder once; the trainer reads it with
`TokenFile`, `PackedDataset`, `ResumableSampler`, `rank_slice` and `make_batch`. Unusable data raises
`DataError` (a `ValueError`) with a one-line message naming the file."""

from moe_lm.data.corpus import ReadReport, load_corpus, stdlib_files
from moe_lm.data.errors import DataError
from moe_lm.data.indexed import PackedDataset, TokenFile, TokenFileError, write_tokens
from moe_lm.data.prepare import drop_duplicates, load_meta, prepare_data, split_corpus, unigram_perplexity
from moe_lm.data.sampler import ResumableSampler, make_batch, rank_slice
from moe_lm.data.tokenizer import EOS_TOKEN, load_tokenizer, train_tokenizer

__all__ = [
    "EOS_TOKEN", "DataError", "PackedDataset", "ReadReport", "ResumableSampler", "TokenFile", "TokenFileError",
    "drop_duplicates", "load_corpus", "load_meta", "load_tokenizer", "make_batch", "prepare_data", "rank_slice",
    "split_corpus", "stdlib_files", "train_tokenizer", "unigram_perplexity", "write_tokens",
]
