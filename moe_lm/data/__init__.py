"""The data pipeline: sources -> shards (dedup, split, tokenization) -> index -> token streams -> packed samples,
in a resumable deterministic order. `prepare_data` (or `prepare_shards` jobs and `index_data`) builds a data folder
once (docs/data.md); the trainer reads it, or a blend of several, through `prepare_training_data` and
`open_training_data`, and the pieces below them: `open_split`, `PackedDataset`, `ResumableSampler`,
`BlendedSampler`, `rank_slice` and `make_batch`. Unusable data raises `DataError` (a `ValueError`) with a one-line
message naming the file."""

from moe_lm.data.blend import BlendedSampler, ConcatenatedSamples
from moe_lm.data.corpus import ReadReport, load_corpus, stdlib_files
from moe_lm.data.errors import DataError
from moe_lm.data.indexed import PackedDataset, TokenFile, TokenFileError, write_tokens
from moe_lm.data.megatron import MegatronTokenFile
from moe_lm.data.prepare import (drop_duplicates, index_data, load_meta, parse_shard, prepare_data, prepare_shards,
                                 split_corpus, unigram_perplexity, unigram_perplexity_from_counts)
from moe_lm.data.sampler import ResumableSampler, make_batch, rank_slice
from moe_lm.data.stream import TokenStream, load_unigram_counts, open_split
from moe_lm.data.tokenizer import EOS_TOKEN, load_tokenizer, train_tokenizer
from moe_lm.data.training import TrainingData, ValidationSource, open_training_data, prepare_training_data

__all__ = [
    "EOS_TOKEN", "BlendedSampler", "ConcatenatedSamples", "DataError", "MegatronTokenFile", "PackedDataset",
    "ReadReport", "ResumableSampler", "TokenFile", "TokenFileError", "TokenStream", "TrainingData",
    "ValidationSource", "drop_duplicates", "index_data", "load_corpus", "load_meta", "load_tokenizer",
    "load_unigram_counts", "make_batch", "open_split", "open_training_data", "parse_shard", "prepare_data",
    "prepare_shards", "prepare_training_data", "rank_slice", "split_corpus", "stdlib_files", "train_tokenizer",
    "unigram_perplexity", "unigram_perplexity_from_counts", "write_tokens",
]
