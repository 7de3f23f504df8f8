"""Weighted blends of datasets (`data.blend`; Megatron's BlendedDataset, OLMo's mixtures), deterministic and
resumable from the number of samples consumed alone.

Schedule. Sample position q of the training stream goes to source k = source(q), as its j-th sample. Within a block
of `BLOCK` positions, source k's c-th sample is due at (c + 1/2) / w_k and positions are handed out in order of due
time (ties to the lower k): the Sainte-Laguë (Webster) sequence, in which every prefix of the block holds within
about one sample of w_k times its length from each source, like the greedy error-minimising rule of Megatron's
BlendedDataset. The block repeats, so position q is found in O(1) from a table of `BLOCK` entries, for any q,
without state: source(q) = source_table[q % BLOCK], j = (q // BLOCK) * per_block[k] + rank_table[q % BLOCK].

Each source then maps its j-th sample through its own `ResumableSampler` (its own seeded permutation per epoch of
that source, so a small source repeats while a large one is still in its first epoch), and the sample id is offset
into `ConcatenatedSamples`, the training view of all sources back to back.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from moe_lm.data.indexed import PackedDataset
from moe_lm.data.sampler import ResumableSampler

BLOCK = 1 << 20  # positions of one period of the schedule; weights below 1/BLOCK would get no sample


def blend_schedule(weights: list[float], block: int = BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source_table, rank_table, per_block) of the schedule above for the normalised `weights`."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    if np.any(w * block < 1):
        raise ValueError(f"weights {weights} give a source less than one sample in {block}")
    sources, ranks, due = [], [], []
    for k, weight in enumerate(w):
        c = np.arange(int(np.ceil(weight * block)) + 2)
        sources.append(np.full(len(c), k))
        ranks.append(c)
        due.append((c + 0.5) / weight)
    sources, ranks, due = (np.concatenate(x) for x in (sources, ranks, due))
    order = np.lexsort((sources, due))[:block]
    source_table, rank_table = sources[order].astype(np.int32), ranks[order].astype(np.int64)
    return source_table, rank_table, np.bincount(source_table, minlength=len(w)).astype(np.int64)


class BlendedSampler:
    """`ResumableSampler`'s interface over several sources: `global_batch(consumed, n)` gives the ids, in
    `ConcatenatedSamples` of the sources, of stream positions [consumed, consumed + n)."""

    def __init__(self, num_samples: list[int], weights: list[float], seed: int):
        if len(num_samples) != len(weights) or not num_samples:
            raise ValueError(f"need one weight per source, got {len(weights)} for {len(num_samples)}")
        self.seed = seed
        self.weights = list(weights)
        self.num_samples = int(sum(num_samples))
        self.starts = np.concatenate([[0], np.cumsum(num_samples)[:-1]]).astype(np.int64)
        self.samplers = [ResumableSampler(n, _source_seed(seed, k)) for k, n in enumerate(num_samples)]
        self.source_table, self.rank_table, self.per_block = blend_schedule(weights)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, its sample number) of each stream position."""
        block, within = np.divmod(np.asarray(positions, dtype=np.int64), len(self.source_table))
        sources = self.source_table[within]
        return sources, block * self.per_block[sources] + self.rank_table[within]

    def global_batch(self, consumed_samples: int, global_batch_size: int) -> list[int]:
        if consumed_samples < 0 or global_batch_size < 1:
            raise ValueError(f"need consumed_samples >= 0 and global_batch_size >= 1, "
                             f"got {consumed_samples} and {global_batch_size}")
        sources, numbers = self.locate(np.arange(consumed_samples, consumed_samples + global_batch_size))
        ids = np.zeros(global_batch_size, dtype=np.int64)
        for k in np.unique(sources).tolist():
            where = np.flatnonzero(sources == k)  # a source's numbers in a range of positions are consecutive
            first = int(numbers[where[0]])
            ids[where] = self.starts[k] + np.asarray(self.samplers[k].global_batch(first, len(where)))
        return ids.tolist()


class ConcatenatedSamples(torch.utils.data.Dataset):
    """The samples of several `PackedDataset`s, one after another: id i is sample i - starts[k] of dataset k."""

    def __init__(self, datasets: list[PackedDataset]):
        self.datasets = datasets
        self.starts = np.concatenate([[0], np.cumsum([len(d) for d in datasets])]).astype(np.int64)
        self.seq_len = datasets[0].seq_len

    def __len__(self) -> int:
        return int(self.starts[-1])

    def source_of(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        return int(np.searchsorted(self.starts, i, side="right")) - 1

    def window(self, i: int) -> np.ndarray:
        k = self.source_of(i)
        return self.datasets[k].window(i - int(self.starts[k]))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = torch.from_numpy(self.window(i).astype(np.int64))
        return window[:-1], window[1:]


def _source_seed(seed: int, source: int) -> int:
    digest = hashlib.blake2b(f"blend:{seed}:{source}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
