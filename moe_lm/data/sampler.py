"""Deterministic, resumable order of training samples, and the per-rank slice of each global batch.

The sample stream is infinite: stream position q falls in epoch q // num_samples and picks
perm_epoch[q % num_samples], where perm_epoch is a `torch.randperm` seeded by (seed, epoch). The only state
is the number of samples consumed so far, so a checkpoint stores one integer and a run restarted at any
consumed count, on any number of ranks, continues with exactly the samples it would have seen.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from moe_lm.data.indexed import PackedDataset


class ResumableSampler:
    """Sample ids at stream positions, epoch after epoch; `shuffle=False` (validation) walks 0, 1, 2, ..."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self._cached_epoch: int | None = None
        self._cached_order = torch.empty(0, dtype=torch.int64)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The sample ids of one epoch, in stream order."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        if epoch != self._cached_epoch:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._cached_order = torch.randperm(self.num_samples, generator=generator)
            self._cached_epoch = epoch
        return self._cached_order

    def global_batch(self, consumed_samples: int, global_batch_size: int) -> list[int]:
        """Sample ids at stream positions [consumed_samples, consumed_samples + global_batch_size)."""
        if consumed_samples < 0 or global_batch_size < 1:
            raise ValueError(f"need consumed_samples >= 0 and global_batch_size >= 1, "
                             f"got {consumed_samples} and {global_batch_size}")
        ids: list[int] = []
        position, end = consumed_samples, consumed_samples + global_batch_size
        while position < end:
            epoch, offset = divmod(position, self.num_samples)
            take = min(end - position, self.num_samples - offset)
            ids.extend(self.epoch_order(epoch)[offset:offset + take].tolist())
            position += take
        return ids


def rank_slice(ids: list[int], dp_rank: int, dp_size: int) -> list[int]:
    """The contiguous share of a global batch that data-parallel rank `dp_rank` of `dp_size` trains on."""
    if len(ids) % dp_size:
        raise ValueError(f"a global batch of {len(ids)} samples does not split over {dp_size} data-parallel ranks")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} outside [0, {dp_size})")
    share = len(ids) // dp_size
    return ids[dp_rank * share:(dp_rank + 1) * share]


def make_batch(dataset: PackedDataset, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, targets), each [len(ids), seq_len] int64, for the given sample ids."""
    windows = np.stack([dataset.window(i) for i in ids]).astype(np.int64)
    tokens = torch.from_numpy(windows)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed that differs for every (seed, epoch) pair."""
    digest = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
