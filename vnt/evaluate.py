"""python -m vnt.evaluate --run-dir RUN: the validation RMSD of a trained run, from its checkpoint.

Recomputes what the run's summary.json reports (val_rmsd_noisy, val_rmsd_denoised, their ratio):
the same held-out chains in the same chunks, the same per-example noise, the model in the dtype it
was trained in, and, when the run validated only ``--run-val-max-batches`` per process, the same
per-process shards. In one process, without DeepSpeed except to consolidate a ZeRO checkpoint.

Then, as a user would meet it, ``by_sigma``: the held-out ratio at each of ``--sigmas`` (0.25, 0.5,
1 and 2 A), with the backbone's bond-length and bond-angle deviations from ideal (``vnt.geometry``)
for the clean, the noisy and the denoised chains: a denoiser that lowers the RMSD but breaks the
chemistry shows it here.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from einops import rearrange

from vnt import checkpoint, cli
from vnt.config import TrainConfig
from vnt.data import NUM_ATOMS, DataError, DownloadUnavailable, load_proteins, validation_batches
from vnt.denoiser import denoised_batches, load_denoiser, rmsd_summary, rmsd_sums
from vnt.geometry import geometry_sums, geometry_summary, peptide_bonds


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    run_dir: str                              # the run directory (config.json, checkpoints/)
    step: int | None = None                   # the checkpoint of this step; None: the latest
    split: str = "valid"                      # held-out split: valid (or test, where the data has one)
    sigma: float | None = None                # noise, Angstrom; None: the run's
    dtype: str | None = None                  # float32 or bfloat16; None: the dtype the run trained in
    all_batches: bool = False                 # every held-out batch, even if the run validated fewer
    sigmas: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)  # noise levels of the by_sigma report, Angstrom; empty: none


def evaluate(cfg: EvaluateConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    train = TrainConfig.from_dict(saved["config"])
    world = int(saved.get("world_size", 1))
    model = load_denoiser(run_dir, step=cfg.step)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype or ("bfloat16" if train.run.bf16 else "float32")]
    model = model.to(dtype)
    examples = load_proteins(train.data, progress=False).split(cfg.split)
    if not examples:
        raise DataError(f"the data of {run_dir} has no {cfg.split!r} split")
    kw = dict(max_length=train.data.max_length, batch_size=train.data.batch_size, max_tokens=train.data.max_tokens)
    limit = 0 if cfg.all_batches else train.run.val_max_batches
    batches = []
    for rank in range(world):  # the run's shards, one after the other
        shard = list(validation_batches(examples, rank=rank, world_size=world, **kw))
        batches += shard[:limit] if limit else shard
    sigma = cfg.sigma or train.run.sigma
    reports = {s: sigma_report(model, batches, sigma=s, seed=train.run.seed, scale=train.run.coord_scale)
               for s in dict.fromkeys((sigma, *cfg.sigmas))}  # the run's sigma once, even when it is in sigmas
    rmsd = {k: v for k, v in reports[sigma].items() if k.startswith("val_")}
    result = {**rmsd, "split": cfg.split, "dtype": str(dtype).removeprefix("torch."),
              "sigma_A": sigma, "world_size_of_run": world, "batches": len(batches),
              "by_sigma": [reports[s] for s in cfg.sigmas]}
    summary_file = run_dir / "summary.json"
    if summary_file.is_file() and cfg.split == "valid" and cfg.sigma is None and not cfg.all_batches:
        reported = json.loads(summary_file.read_text()).get("val_rmsd_denoised")
        if reported:
            result["summary_val_rmsd_denoised"] = reported
            result["rel_diff_to_summary"] = abs(result["val_rmsd_denoised"] - reported) / reported
    return result


def _per_residue(t: torch.Tensor) -> torch.Tensor:
    """Points (b, L a, ...) -> residues (b, L, a, ...)."""
    return rearrange(t, "b (L a) ... -> b L a ...", a=NUM_ATOMS)


def sigma_report(model, batches, *, sigma: float, seed: int, scale: float) -> dict:
    """The held-out RMSD ratio at ``sigma`` and the bond geometry of the clean, noisy and denoised chains."""
    rmsd = torch.zeros(3, dtype=torch.float64)
    geometry = {k: torch.zeros(4, dtype=torch.float64) for k in ("clean", "noisy", "denoised")}
    for noisy, clean, pred, mask in denoised_batches(model, batches, sigma=sigma, seed=seed, scale=scale, device="cpu"):
        rmsd += rmsd_sums(noisy, clean, pred, mask)
        atoms = _per_residue(mask)
        bonded = peptide_bonds(_per_residue(clean), atoms)
        for key, coords in (("clean", clean), ("noisy", noisy), ("denoised", pred)):
            geometry[key] += geometry_sums(_per_residue(coords), atoms, bonded)
    out = {"sigma_A": sigma, **rmsd_summary(rmsd)}
    for key, sums in geometry.items():
        g = geometry_summary(sums)
        out[f"bond_rmsd_A_{key}"], out[f"angle_rmsd_deg_{key}"] = g["bond_rmsd_A"], g["angle_rmsd_deg"]
    out["bonds"], out["angles"] = g["bonds"], g["angles"]
    return out


def main(argv=None) -> int:
    p = cli.Parser(prog="python -m vnt.evaluate", description=__doc__)
    dests = cli.add_options(p, EvaluateConfig, EvaluateConfig(run_dir=""), title="evaluate",
                            flags={"run_dir": ["--run-dir"]})
    args = p.parse_args(argv)
    if not getattr(args, "run_dir", None):
        p.error("the following argument is required: --run-dir")
    try:
        cfg = EvaluateConfig(**cli.given(args, dests))
        if cfg.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {cfg.dtype}")
        if not (Path(cfg.run_dir) / "config.json").is_file():
            raise checkpoint.CheckpointError(f"{cfg.run_dir} is not a run directory (no config.json)")
        result = evaluate(cfg)
    except (ValueError, checkpoint.CheckpointError, DownloadUnavailable) as err:  # DataError is a ValueError
        cli.fail(p, err)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
