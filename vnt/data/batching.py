"""Cropping, padding collate and length-bucketed, rank-sharded batching.

Everything random here is a pure function of (seed, epoch, ...): a resumed run, or another rank,
recomputes exactly the same order and crops.
"""
from __future__ import annotations

import numpy as np
import torch

from vnt.data.core import NUM_ATOMS, ProteinExample


def crop_window(length: int, max_length: int, *, rng: np.random.Generator | None) -> tuple[int, int]:
    """[start, stop) of at most max_length residues: random if rng is given, else the first window."""
    if length <= max_length:
        return 0, length
    start = int(rng.integers(0, length - max_length + 1)) if rng is not None else 0
    return start, start + max_length


def chunk_windows(length: int, max_length: int) -> list[tuple[int, int]]:
    """Deterministic validation chunks covering every residue once."""
    return [(s, min(s + max_length, length)) for s in range(0, length, max_length)]


def collate(examples: list[ProteinExample], windows: list[tuple[int, int]] | None = None) -> dict:
    """Pad to the longest (cropped) example. Returns tensors:
    tokens (B, L) long, coords (B, L, 4, 3) float32, atom_mask (B, L, 4) bool, mask (B, L) bool."""
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
            "names": [e.name for e in examples]}


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    """Fraction of residue slots in padded batches that are padding."""
    total = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    used = sum(lengths[i] for b in batches for i in b)
    return 1.0 - used / total if total else 0.0


class ShardedBatchSampler:
    """Batches of example indices for one rank, deterministic from (seed, epoch).

    bucket=True sorts a seeded shuffle by (cropped) length inside windows of ``bucket_size``
    batches, so a batch holds similar lengths (less padding), then shuffles the batch order.
    Rank r of w takes batches r, r + w, ...: shards are disjoint and together cover the epoch.
    Ranks may hold one batch more or less; the trainer counts steps, not epochs, so ranks never
    wait on each other at an epoch boundary.
    """

    def __init__(self, lengths: list[int], *, batch_size: int, max_length: int, bucket: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, bucket_size: int = 50):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.lengths = [min(l, max_length) for l in lengths]
        self.batch_size, self.bucket, self.seed = batch_size, bucket, seed
        self.rank, self.world_size, self.bucket_size = rank, world_size, bucket_size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of the epoch (every rank's), in order."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        if self.bucket:
            window = self.batch_size * self.bucket_size
            order = np.concatenate([sorted(order[s:s + window], key=lambda i: self.lengths[i])
                                    for s in range(0, len(order), window)]) if len(order) else order
        batches = [order[s:s + self.batch_size].tolist() for s in range(0, len(order), self.batch_size)]
        if self.bucket:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def batches(self, epoch: int) -> list[list[int]]:
        return self.epoch_batches(epoch)[self.rank::self.world_size]


class ProteinBatches:
    """Iterates collated batches for one rank over epochs, forever, from a given position.

    Crops are random from (seed, epoch, example index); validation uses ``validation_batches``.
    ``position`` (epoch, batch index) is what a checkpoint stores to resume the same stream.
    """

    def __init__(self, examples: list[ProteinExample], sampler: ShardedBatchSampler, *, max_length: int):
        self.examples, self.sampler, self.max_length = examples, sampler, max_length

    def batch(self, epoch: int, indices: list[int]) -> dict:
        exs = [self.examples[i] for i in indices]
        windows = [crop_window(len(e), self.max_length,
                               rng=np.random.default_rng([self.sampler.seed, epoch, i]))
                   for e, i in zip(exs, indices)]
        return collate(exs, windows)

    def stream(self, *, epoch: int = 0, index: int = 0):
        """Yields ((epoch, index_after_this_batch), batch)."""
        while True:
            batches = self.sampler.batches(epoch)
            for k in range(index, len(batches)):
                yield (epoch, k + 1), self.batch(epoch, batches[k])
            epoch, index = epoch + 1, 0


def validation_batches(examples: list[ProteinExample], *, max_length: int, batch_size: int,
                       rank: int = 0, world_size: int = 1):
    """Every residue of every example once, in deterministic chunks; sharded by rank."""
    items = [(e, w) for e in examples for w in chunk_windows(len(e), max_length)]
    items.sort(key=lambda t: t[1][1] - t[1][0])
    items = items[rank::world_size]
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        yield collate([e for e, _ in chunk], [w for _, w in chunk])
