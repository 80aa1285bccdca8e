"""python -m vnt.denoise --run-dir RUN --input IN.pdb --output OUT.pdb: denoise a structure's backbone.

Reads a PDB or mmCIF file, denoises the backbone atoms (N, CA, C, O) of each protein chain (or of
``--chain``) with a trained model, and writes a PDB with the same residues, atom names and chain
ids. Every other atom (side chains, hydrogens, ligands, water) is kept where it was, or dropped
with ``--backbone-only``. Chains are denoised in windows of the run's ``--data-max-length``
residues, as the run validated, or whole when the run trained on whole chains (``--data-max-length
0``) or ``--max-length 0`` says so. ``--add-noise SIGMA --seed S`` first adds Gaussian noise to the
backbone and prints the RMSD to the input before and after denoising: the demo on a clean file.
``--export model.pt`` writes the model as a plain torch.save file that loads without DeepSpeed.
Bad input (a missing file, no protein chain, an unknown chain, a run without a checkpoint) is one
line on stderr, exit status 2, and nothing is written.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from vnt import checkpoint, cli
from vnt.data import BACKBONE_ATOMS, NUM_ATOMS, DataError, collate
from vnt.data.batching import chunk_windows
from vnt.data.sources import chain_example
from vnt.denoiser import backbone_points, denoise, export_denoiser, load_denoiser


@dataclasses.dataclass(frozen=True)
class DenoiseConfig:
    run_dir: str | None = None          # a training run directory (its latest checkpoint, or --step)
    model: str | None = None            # or a model file written by --export
    step: int | None = None             # the run's checkpoint of this step; None: the latest
    input: str | None = None            # a PDB (.pdb) or mmCIF (.cif) file
    output: str | None = None           # the denoised structure, PDB
    chain: str | None = None            # only this chain id; None: every protein chain
    add_noise: float = 0.0              # Gaussian noise (Angstrom) added to the backbone first; 0: none
    seed: int = 0                       # of that noise
    backbone_only: bool = False         # write only the backbone atoms (N, CA, C, O)
    export: str | None = None           # also write the model as a plain torch.save file
    max_length: int | None = None       # residues per window; 0: whole chains; None: the run's data max_length


def _read_structure(path: str):
    import prody

    prody.confProDy(verbosity="none")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"input {path}: no such file")
    try:
        parse = prody.parseMMCIF if p.suffix.lower() in (".cif", ".mmcif") else prody.parsePDB
        structure = parse(str(p), model=1)  # the first model of an NMR ensemble
    except (ValueError, OSError, IndexError, KeyError) as err:
        raise DataError(f"input {path} could not be parsed as PDB/mmCIF ({type(err).__name__}: {err})") from None
    if structure is None:
        raise DataError(f"input {path} could not be parsed as PDB/mmCIF")
    return structure


@torch.no_grad()
def denoise_structure(model, structure, *, chain: str | None, add_noise: float, seed: int, max_length: int):
    """Denoises ``structure`` in place (its backbone coordinates). Returns per-chain statistics."""
    protein = structure.select("protein")
    if protein is None:
        raise DataError("the input has no protein chain")
    chains = list(protein.getHierView().iterChains())
    ids = sorted({c.getChid() for c in chains})
    if chain is not None:
        chains = [c for c in chains if c.getChid() == chain]
        if not chains:
            raise DataError(f"the input has no protein chain {chain!r}; its chains: {', '.join(ids)}")
    coords = structure.getCoords().astype(np.float64)
    generator = torch.Generator().manual_seed(seed)
    stats = []
    for c in chains:
        example, index = chain_example(c, name=c.getChid(), source="input")
        atoms = c.getIndices()  # indices into the whole structure
        clean = torch.from_numpy(example.coords.copy())
        mask = torch.from_numpy(example.atom_mask)
        noisy = clean + add_noise * torch.randn(clean.shape, generator=generator, dtype=torch.float64).float()
        noisy = noisy.masked_fill(~mask[..., None], 0.0)
        example.coords = noisy.numpy()
        out = noisy.clone()
        windows = chunk_windows(len(example), max_length)
        for start, stop in windows:
            batch = collate([example], [(start, stop)])
            points, tokens, points_mask = backbone_points(batch)
            pred = denoise(model, points, tokens, points_mask, scale=model.task["coord_scale"])
            out[start:stop] = pred[0].reshape(stop - start, NUM_ATOMS, 3)
        valid = mask.sum().item()
        sq = lambda a: ((a - clean) ** 2).sum(-1)[mask].sum().item()  # noqa: E731
        stats.append({"chain": c.getChid(), "residues": len(example), "windows": len(windows), "backbone_atoms": int(valid),
                      "rmsd_noisy_A": math.sqrt(sq(noisy) / valid) if add_noise else None,
                      "rmsd_denoised_A": math.sqrt(sq(out) / valid) if add_noise else None,
                      "rmsd_moved_A": math.sqrt(sq(out) / valid) if not add_noise else None})
        rows = index[example.atom_mask]
        coords[atoms[rows]] = out[mask].double().numpy()
    structure.setCoords(coords)
    return stats


def run(cfg: DenoiseConfig) -> dict:
    if not (cfg.run_dir or cfg.model):
        raise ValueError("give --run-dir (a training run) or --model (a file written by --export)")
    if cfg.input and not cfg.output:
        raise ValueError("--input needs --output")
    if not cfg.input and not cfg.export:
        raise ValueError("nothing to do: give --input and --output, or --export")
    structure = _read_structure(cfg.input) if cfg.input else None  # bad input fails before the model loads
    if cfg.run_dir and not (Path(cfg.run_dir) / "config.json").is_file():
        raise checkpoint.CheckpointError(f"{cfg.run_dir} is not a run directory (no config.json)")
    model = load_denoiser(cfg.model or cfg.run_dir, step=cfg.step)
    result: dict = {}
    if structure is not None:
        stats = denoise_structure(model, structure, chain=cfg.chain, add_noise=cfg.add_noise, seed=cfg.seed,
                                  max_length=model.task["max_length"] if cfg.max_length is None else cfg.max_length)
        atoms = structure
        if cfg.backbone_only:
            atoms = structure.select("protein and name " + " ".join(BACKBONE_ATOMS))
        import prody
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        prody.writePDB(cfg.output, atoms)
        result.update(output=cfg.output, chains=stats)
        if cfg.add_noise:
            sums = [(s["backbone_atoms"], s["rmsd_noisy_A"], s["rmsd_denoised_A"]) for s in stats]
            atoms_n = sum(n for n, _, _ in sums)
            result["rmsd_noisy_A"] = math.sqrt(sum(n * a * a for n, a, _ in sums) / atoms_n)
            result["rmsd_denoised_A"] = math.sqrt(sum(n * b * b for n, _, b in sums) / atoms_n)
    if cfg.export:
        export_denoiser(model, cfg.export)
        result["exported"] = cfg.export
    return result


def main(argv=None) -> int:
    p = cli.Parser(prog="python -m vnt.denoise", description=__doc__)
    dests = cli.add_options(p, DenoiseConfig, DenoiseConfig(), title="denoise")
    args = p.parse_args(argv)
    try:
        result = run(DenoiseConfig(**cli.given(args, dests)))
    except (ValueError, checkpoint.CheckpointError) as err:  # DataError is a ValueError
        cli.fail(p, err)
    print(json.dumps(result))
    if "rmsd_noisy_A" in result:
        print(f"backbone RMSD to the input: noisy {result['rmsd_noisy_A']:.3f} A -> denoised "
              f"{result['rmsd_denoised_A']:.3f} A", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
