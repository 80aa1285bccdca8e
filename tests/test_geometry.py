"""vnt.geometry: bond lengths and angles of a backbone against Engh & Huber's ideal values. A
backbone built from the ideal values measures zero; a known distortion measures what it should;
a chain break is not a bond; the numbers do not move under rotation; bad shapes fail naming them."""
import math

import pytest
import torch

from vnt import geometry
from vnt.rotations import random_rotations


def place(a, b, c, *, length: float, angle: float, torsion: float) -> torch.Tensor:
    """The atom d with |cd| = length, angle bcd = angle (degrees), torsion abcd (degrees): NeRF."""
    bc = (c - b) / (c - b).norm()
    n = torch.linalg.cross(b - a, bc)
    n = n / n.norm()
    m = torch.linalg.cross(n, bc)
    th, ph = math.radians(angle), math.radians(torsion)
    d2 = torch.tensor([-length * math.cos(th), length * math.sin(th) * math.cos(ph), length * math.sin(th) * math.sin(ph)],
                      dtype=torch.float64)
    return c + d2[0] * bc + d2[1] * m + d2[2] * n


def ideal_backbone(residues: int) -> torch.Tensor:
    """(1, L, 4, 3) N, CA, C, O built from the ideal lengths and angles (phi -60, psi -45, omega 180)."""
    bonds = {name: ideal for name, *_, ideal in geometry.BONDS}
    angles = {name: ideal for name, _, ideal in geometry.ANGLES}
    n = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
    ca = torch.tensor([bonds["N-CA"], 0.0, 0.0], dtype=torch.float64)
    th = math.radians(angles["N-CA-C"])
    c = ca + bonds["CA-C"] * torch.tensor([-math.cos(th), math.sin(th), 0.0], dtype=torch.float64)
    out = []
    for i in range(residues):
        o = place(n, ca, c, length=bonds["C-O"], angle=angles["CA-C-O"], torsion=-45.0 + 180.0)
        out.append(torch.stack([n, ca, c, o]))
        n_next = place(n, ca, c, length=bonds["C-N"], angle=angles["CA-C-N"], torsion=-45.0)
        ca_next = place(ca, c, n_next, length=bonds["N-CA"], angle=angles["C-N-CA"], torsion=180.0)
        c_next = place(c, n_next, ca_next, length=bonds["CA-C"], angle=angles["N-CA-C"], torsion=-60.0)
        n, ca, c = n_next, ca_next, c_next
    return torch.stack(out)[None]


def report(coords, mask=None, clean=None):
    mask = torch.ones(coords.shape[:-1], dtype=torch.bool) if mask is None else mask
    bonded = geometry.peptide_bonds(coords if clean is None else clean, mask)
    return geometry.geometry_summary(geometry.geometry_sums(coords, mask, bonded))


def test_an_ideal_backbone_measures_zero_and_a_stretched_bond_what_it_should():
    chain = ideal_backbone(6)
    ideal = report(chain)
    # 4 bonds per residue but the last peptide bond; 5 angles per residue, 3 of them across residues
    assert (ideal["bonds"], ideal["angles"]) == (6 * 4 - 1, 6 * 5 - 3)
    # Engh & Huber's three angles at C sum to 359 degrees: the planar peptide built here has O-C-N at
    # 360 - 120.1 - 116.2 = 123.7, 1 degree off, in each of the 5 residues that have a next one
    assert ideal["bond_rmsd_A"] < 1e-9
    assert ideal["angle_rmsd_deg"] == pytest.approx(math.sqrt(5 * 1.0 ** 2 / ideal["angles"]), rel=1e-6)
    stretched = chain.clone()
    co = chain[0, 2, 3] - chain[0, 2, 2]
    stretched[0, 2, 3] += 0.1 * co / co.norm()  # C=O of residue 2 longer by 0.1 A
    got = report(stretched, clean=chain)
    assert got["bond_rmsd_A"] == pytest.approx(math.sqrt(0.1 ** 2 / ideal["bonds"]), rel=1e-6)
    assert got["angle_rmsd_deg"] == pytest.approx(ideal["angle_rmsd_deg"], rel=1e-9)  # moved along its bond


def test_a_chain_break_is_not_a_bond_and_rotation_changes_nothing():
    chain = ideal_backbone(8)
    broken = chain.clone()
    broken[0, 4:] += torch.tensor([0.0, 0.0, 10.0], dtype=torch.float64)  # residues 4.. 10 A away
    got = report(broken)
    assert (got["bonds"], got["angles"]) == (8 * 4 - 2, 8 * 5 - 6) and got["bond_rmsd_A"] < 1e-9
    noisy = chain + 0.3 * torch.randn(chain.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rotated = noisy @ random_rotations(1, generator=torch.Generator().manual_seed(1))[0].T
    a, b = report(noisy, clean=chain), report(rotated, clean=chain)
    assert a["bond_rmsd_A"] > 0.2 and a["bond_rmsd_A"] == pytest.approx(b["bond_rmsd_A"], rel=1e-9)
    assert a["angle_rmsd_deg"] == pytest.approx(b["angle_rmsd_deg"], rel=1e-9)
    masked = torch.ones(chain.shape[:-1], dtype=torch.bool)
    masked[0, 3, 1] = False  # residue 3 without its CA: its 2 bonds and the 4 angles at or beside it are gone
    without = report(chain, masked)
    assert (without["bonds"], without["angles"]) == (8 * 4 - 1 - 2, 8 * 5 - 3 - 4)


def test_bad_shapes_fail_naming_the_expected_shape():
    chain = ideal_backbone(3)
    with pytest.raises(ValueError, match=r"coords \(b, L, 4, 3\)"):
        geometry.geometry_sums(chain[..., :3, :], torch.ones(1, 3, 3, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool))
