"""Cropping, padding collate and length-bucketed, rank-sharded batching.

Everything random here is a pure function of (seed, epoch, ...): a resumed run, or another rank,
recomputes exactly the same order and crops.
"""
from __future__ import annotations

import numpy as np
import torch

from vnt.data.core import NUM_ATOMS, ProteinExample


def crop_window(length: int, max_length: int, *, rng: np.random.Generator | None) -> tuple[int, int]:
    """[start, stop) of at most max_length residues (0: the whole chain): random if rng is given,
    else the first window."""
    if not max_length or length <= max_length:
        return 0, length
    start = int(rng.integers(0, length - max_length + 1)) if rng is not None else 0
    return start, start + max_length


def chunk_windows(length: int, max_length: int) -> list[tuple[int, int]]:
    """Deterministic validation chunks covering every residue once (max_length 0: the whole chain)."""
    if not max_length:
        return [(0, length)]
    return [(s, min(s + max_length, length)) for s in range(0, length, max_length)]


def collate(examples: list[ProteinExample], windows: list[tuple[int, int]] | None = None) -> dict:
    """Pad to the longest (cropped) example. Returns tensors:
    tokens (B, L) long, coords (B, L, 4, 3) float32, atom_mask (B, L, 4) bool, mask (B, L) bool;
    and per example its name and residue window [start, stop)."""
    windows = windows or [(0, len(e)) for e in examples]
    L = max(b - a for a, b in windows)
    B = len(examples)
    tokens = torch.zeros(B, L, dtype=torch.long)
    coords = torch.zeros(B, L, NUM_ATOMS, 3)
    atom_mask = torch.zeros(B, L, NUM_ATOMS, dtype=torch.bool)
    for i, (ex, (a, b)) in enumerate(zip(examples, windows)):
        tokens[i, : b - a] = torch.from_numpy(ex.tokens[a:b])
        coords[i, : b - a] = torch.from_numpy(ex.coords[a:b])
        atom_mask[i, : b - a] = torch.from_numpy(ex.atom_mask[a:b])
    return {"tokens": tokens, "coords": coords, "atom_mask": atom_mask, "mask": atom_mask.any(-1),
            "names": [e.name for e in examples], "windows": windows}


def token_batches(order: list[int], lengths: list[int], *, max_tokens: int, max_rows: int) -> list[list[int]]:
    """Consecutive runs of ``order`` (sort it by length first) as batches whose padded size, rows x
    longest length, stays within ``max_tokens``, at most ``max_rows`` rows each. A chain longer than
    the budget is a batch of its own (over budget: ``over_budget`` counts them)."""
    batches: list[list[int]] = []
    longest = 0
    for i in order:
        if batches and len(batches[-1]) < max_rows and (len(batches[-1]) + 1) * max(longest, lengths[i]) <= max_tokens:
            batches[-1].append(i)
            longest = max(longest, lengths[i])
        else:
            batches.append([i])
            longest = lengths[i]
    return batches


def over_budget(lengths: list[int], max_tokens: int) -> int:
    """Chains longer than the token budget (each trains alone, over the budget); 0 without a budget."""
    return sum(length > max_tokens for length in lengths) if max_tokens else 0


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    """Fraction of residue slots in padded batches that are padding."""
    total = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    used = sum(lengths[i] for b in batches for i in b)
    return 1.0 - used / total if total else 0.0


class ShardedBatchSampler:
    """Batches of example indices, deterministic from (seed, epoch), sharded over ranks.

    bucket=True sorts a seeded shuffle by (cropped) length inside windows of ``bucket_size``
    batches, so a batch holds similar lengths (less padding), then shuffles the batch order.

    The job reads one endless sequence of batches: epoch 0's, then epoch 1's, ... (every epoch has
    ``num_batches``). Global batch g is ``global_batch(g)``; rank r of w takes g = start + r,
    start + r + w, ... so the ranks' batches are disjoint and, together, consecutive: after any
    number of steps the job has consumed a prefix of the sequence, whatever the world size. That
    prefix length is what a checkpoint stores, and a job of another world size continues after it.

    ``max_tokens`` > 0 batches by a token budget instead of a count: the chains sorted by (cropped)
    length are cut into runs whose padded size (rows x longest) fits the budget, with at most
    ``batch_size`` rows (``token_batches``). Those batches are formed once, so every epoch has the
    same number; their order is shuffled every epoch.
    """

    def __init__(self, lengths: list[int], *, batch_size: int, max_length: int, bucket: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, bucket_size: int = 50, max_tokens: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if not lengths:
            raise ValueError("no examples to batch")
        self.lengths = [min(l, max_length) if max_length else l for l in lengths]
        self.batch_size, self.bucket, self.seed, self.max_tokens = batch_size, bucket, seed, max_tokens
        self._budget_batches = (token_batches(sorted(range(len(lengths)), key=lambda i: (self.lengths[i], i)),
                                              self.lengths, max_tokens=max_tokens, max_rows=batch_size)
                                if max_tokens else None)
        self.rank, self.world_size, self.bucket_size = rank, world_size, bucket_size
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    @property
    def num_batches(self) -> int:
        """Batches per epoch (every epoch has the same number)."""
        if self._budget_batches is not None:
            return len(self._budget_batches)
        return -(-len(self.lengths) // self.batch_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of the epoch (every rank's), in order."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        if self._budget_batches is not None:
            batches = [self._budget_batches[i] for i in rng.permutation(len(self._budget_batches))]
            self._epoch_cache = (epoch, batches)
            return batches
        order = rng.permutation(len(self.lengths))
        if self.bucket:
            window = self.batch_size * self.bucket_size
            order = np.concatenate([sorted(order[s:s + window], key=lambda i: self.lengths[i])
                                    for s in range(0, len(order), window)])
        batches = [order[s:s + self.batch_size].tolist() for s in range(0, len(order), self.batch_size)]
        if self.bucket:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._epoch_cache = (epoch, batches)
        return batches

    def global_batch(self, g: int) -> tuple[int, list[int]]:
        """(epoch, example indices) of global batch g of the job's sequence."""
        epoch, k = divmod(g, self.num_batches)
        return epoch, self.epoch_batches(epoch)[k]

    def global_indices(self, start: int = 0):
        """This rank's global batch numbers from ``start`` on: start + rank, start + rank + world, ..."""
        g = start + self.rank
        while True:
            yield g
            g += self.world_size


class ProteinBatches:
    """Iterates collated batches for one rank, forever, from a position in the job's sequence.

    Crops are random from (seed, epoch, example index); validation uses ``validation_batches``.
    The position is the number of global batches the whole job has consumed (see
    ``ShardedBatchSampler``): what a checkpoint stores to resume the same stream.
    """

    def __init__(self, examples: list[ProteinExample], sampler: ShardedBatchSampler, *, max_length: int):
        self.examples, self.sampler, self.max_length = examples, sampler, max_length

    def batch(self, epoch: int, indices: list[int]) -> dict:
        exs = [self.examples[i] for i in indices]
        windows = [crop_window(len(e), self.max_length,
                               rng=np.random.default_rng([self.sampler.seed, epoch, i]))
                   for e, i in zip(exs, indices)]
        return collate(exs, windows)

    def stream(self, *, start: int = 0):
        """Yields this rank's batches of the job's sequence after the first ``start`` global batches."""
        for g in self.sampler.global_indices(start):
            yield self.batch(*self.sampler.global_batch(g))


def validation_batches(examples: list[ProteinExample], *, max_length: int, batch_size: int,
                       rank: int = 0, world_size: int = 1, max_tokens: int = 0):
    """Every residue of every example once, in deterministic chunks (max_length 0: whole chains);
    sharded by rank; ``batch_size`` chunks per batch, or with ``max_tokens`` as many (at most
    batch_size) as fit the token budget (``token_batches``)."""
    items = [(e, w) for e in examples for w in chunk_windows(len(e), max_length)]
    items.sort(key=lambda t: t[1][1] - t[1][0])
    items = items[rank::world_size]
    if max_tokens:
        groups = token_batches(list(range(len(items))), [b - a for _, (a, b) in items], max_tokens=max_tokens,
                               max_rows=batch_size)
    else:
        groups = [list(range(s, min(s + batch_size, len(items)))) for s in range(0, len(items), batch_size)]
    for group in groups:
        chunk = [items[i] for i in group]
        yield collate([e for e, _ in chunk], [w for _, w in chunk])
