"""Backbone bond geometry: how far a structure's bond lengths and angles are from ideal.

A denoiser that lowers the RMSD but breaks the chemistry is not done: ``vnt.evaluate`` reports
these deviations for the clean, the noisy and the denoised backbone. Ideal values: Engh & Huber
(1991), the restraints of X-ray refinement. Atoms per residue: ``vnt.data.BACKBONE_ATOMS`` (N, CA,
C, O). A peptide bond C(i)-N(i+1) exists where both atoms are present and the *clean* structure has
them within ``PEPTIDE_MAX_A`` (a chain break in the deposited structure is not a bond).
Axes: b batch, L residues, a atoms (4), c xyz.
"""
from __future__ import annotations

import math

import torch

N, CA, C, O = range(4)
# (name, atom i, atom j, residue offset of j, ideal length in Angstrom)
BONDS = (("N-CA", N, CA, 0, 1.458), ("CA-C", CA, C, 0, 1.525), ("C-O", C, O, 0, 1.231), ("C-N", C, N, 1, 1.329))
# (name, (atom, residue offset) x 3 with the vertex in the middle, ideal angle in degrees)
ANGLES = (("N-CA-C", ((N, 0), (CA, 0), (C, 0)), 111.2), ("CA-C-O", ((CA, 0), (C, 0), (O, 0)), 120.1),
          ("CA-C-N", ((CA, 0), (C, 0), (N, 1)), 116.2), ("O-C-N", ((O, 0), (C, 0), (N, 1)), 122.7),
          ("C-N-CA", ((C, 0), (N, 1), (CA, 1)), 121.7))
PEPTIDE_MAX_A = 2.0


def _at(coords, mask, atom: int, offset: int, length: int):
    """Atom ``atom`` of residues offset..offset+length: coordinates (b, length, 3), mask (b, length)."""
    return coords[:, offset:offset + length, atom], mask[:, offset:offset + length, atom]


def peptide_bonds(clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(b, L - 1) bool: residue i's C is bonded to residue i + 1's N in the clean structure."""
    length = clean.shape[1] - 1
    (c, mc), (n, mn) = _at(clean, mask, C, 0, length), _at(clean, mask, N, 1, length)
    return mc & mn & ((c - n).norm(dim=-1) < PEPTIDE_MAX_A)


def geometry_sums(coords: torch.Tensor, mask: torch.Tensor, bonded: torch.Tensor) -> torch.Tensor:
    """float64 [sum of squared bond-length deviations (A^2), bonds, sum of squared angle deviations
    (degrees^2), angles] of ``coords`` (b, L, 4, 3) over the atoms in ``mask`` (b, L, 4); terms that
    cross residues need ``bonded`` (b, L - 1), from ``peptide_bonds`` of the clean structure."""
    coords, L = coords.double(), coords.shape[1]
    if coords.shape[-2:] != (4, 3) or mask.shape != coords.shape[:-1] or bonded.shape != (coords.shape[0], max(L - 1, 0)):
        raise ValueError(f"geometry_sums wants coords (b, L, 4, 3), mask (b, L, 4), bonded (b, L - 1); got "
                         f"{tuple(coords.shape)}, {tuple(mask.shape)}, {tuple(bonded.shape)}")
    sums = torch.zeros(4, dtype=torch.float64)
    for _, i, j, off, ideal in BONDS:
        length = L - off
        (a, ma), (b, mb) = _at(coords, mask, i, 0, length), _at(coords, mask, j, off, length)
        valid = ma & mb & (bonded[:, :length] if off else True)
        dev = ((a - b).norm(dim=-1) - ideal)[valid]
        sums[0] += dev.square().sum()
        sums[1] += dev.numel()
    for _, atoms, ideal in ANGLES:
        length = L - max(off for _, off in atoms)
        (a, ma), (v, mv), (b, mb) = (_at(coords, mask, atom, off, length) for atom, off in atoms)
        valid = ma & mv & mb & (bonded[:, :length] if length < L else True)
        u, w = a - v, b - v
        cos = (u * w).sum(-1) / (u.norm(dim=-1) * w.norm(dim=-1)).clamp(min=1e-12)
        dev = (torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0))) - ideal)[valid]
        sums[2] += dev.square().sum()
        sums[3] += dev.numel()
    return sums


def geometry_summary(sums: torch.Tensor) -> dict:
    """RMS deviations from ideal of ``geometry_sums``: bond lengths (Angstrom), angles (degrees)."""
    return {"bond_rmsd_A": math.sqrt(sums[0].item() / max(sums[1].item(), 1)),
            "angle_rmsd_deg": math.sqrt(sums[2].item() / max(sums[3].item(), 1)),
            "bonds": int(sums[1].item()), "angles": int(sums[3].item())}
