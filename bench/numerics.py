"""float32 equivariance error at depth 4 / n = 256 against what rounding alone forces.

For each case and seed (fresh weights and inputs per seed) the same weights give four numbers:

  err_float32          ``vnt.equivariance_error`` of the float32 model (what users get)
  floor_inputs         ``vnt.rounding_floor``: float64 arithmetic on float32-rounded coordinates;
                       an implementation computing the function exactly from float32 inputs shows this
  floor_activations    the same, with every VN block's output also rounded to float32 (exact arithmetic
                       inside each block, float32 storage between blocks)
  err_float64          the float64 model (the transforms' own rounding; ~1e-12)

The original package (VN-transformer 0.1.0) is measured at the same hyper-parameters for err_float32.

    python -m bench.numerics [--seeds 6] [--out results/numerics]

writes ``latest.csv`` (one row per case and seed), ``latest.md`` (ranges over seeds) and
``latest.meta.json`` (hardware, versions, git commit, protocol).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.cases import Case
from bench.measure import build
from bench.report import environment

OUT = Path(__file__).parents[1] / "results" / "numerics"
TARGET = 1e-5  # the float32 target at depth 4 / n = 256


# depth 4, n = 256: the float32 check; dim 32 > dim_head 16, so the default plan runs it projected
DEEP = dict(dim=32, depth=4, heads=4, dim_head=16, dim_feat=16, n=256, batch=2, group="numerics")
NUM_ROTATIONS = 2

CASES = [
    *(Case(backend=backend, fusion=fusion, attn_fold=fold, **DEEP)
      for fusion in (False, True) for backend in ("math", "sdpa") for fold in (False, True)),
    *(Case(backend="l2", fusion=fusion, **DEEP) for fusion in (False, True)),
    # the paper's VN-LayerNorm and VN-ReLU (norm_subtract_mean=True, relu_k_norm_floor=0), same weights' shapes
    *(Case(backend=backend, fusion=fusion, norms="paper", **DEEP)
      for fusion in (False, True) for backend in ("math", "l2")),
    *(Case(impl="original", backend=backend, fusion=fusion, **DEEP)
      for fusion in (False, True) for backend in ("math", "sdpa", "l2")),
]


def measure(case: Case, seed: int) -> dict:
    from vnt import equivariance_error, rounding_floor
    model, coors, feats = build(case, seed=seed)

    def rotations():  # the same rotations for every number of one row
        return {"num_rotations": NUM_ROTATIONS, "generator": torch.Generator().manual_seed(seed)}

    row = {"case_id": case.id, **case.to_dict(), "seed": seed}
    row["err_float32"] = equivariance_error(model, coors, feats=feats, **rotations()).rel
    if case.impl == "original":  # the floor runs vnt's blocks in float64; it does not know the original's
        return row
    row["floor_inputs"] = rounding_floor(model, coors, feats=feats, **rotations()).rel
    row["floor_activations"] = rounding_floor(model, coors, feats=feats, activations=True, **rotations()).rel
    f64 = None if feats is None else feats.double()
    row["err_float64"] = equivariance_error(model.double(), coors.double(), feats=f64, **rotations()).rel
    return row


def summarize(df):
    """Ranges over seeds per case, the float32 / activation-floor ratio and how many seeds meet the target."""
    import pandas as pd
    out = []
    for case_id, g in df.groupby("case_id", sort=False):
        row = {"case": case_id, "seeds": len(g)}
        for col in ("err_float32", "floor_inputs", "floor_activations", "err_float64"):
            vals = g[col].dropna() if col in g else pd.Series(dtype=float)
            row[col] = f"{vals.min():.1e} – {vals.max():.1e}" if len(vals) else ""
        ratio = g["err_float32"] / g["floor_activations"] if "floor_activations" in g else None
        row["float32 / activation floor"] = (f"{ratio.min():.1f} – {ratio.max():.1f}"
                                             if ratio is not None and ratio.notna().all() else "")
        row[f"seeds <= {TARGET:g}"] = f"{int((g['err_float32'] <= TARGET).sum())}/{len(g)}"
        out.append(row)
    return pd.DataFrame(out)


def main(argv=None) -> Path:
    import pandas as pd
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    rows = []
    for case in CASES:
        for seed in range(args.seeds):
            rows.append(measure(case, seed))
            r = rows[-1]
            print(f"{case.id:50s} seed {seed}  float32 {r['err_float32']:.1e}  "
                  f"floor(inputs) {r.get('floor_inputs', float('nan')):.1e}  "
                  f"floor(activations) {r.get('floor_activations', float('nan')):.1e}", flush=True)
    df = pd.DataFrame(rows)
    env = environment()  # before writing anything, so the commit is not reported dirty by this run's own files
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "latest.csv", index=False)
    protocol = {"command": "python -m bench.numerics" + (f" --seeds {args.seeds}" if args.seeds != 6 else ""),
                "seeds": args.seeds, "target": TARGET,
                "metric": "max |f(x R^T) - f(x) R^T| over valid points / max |f(x) R^T|, max over rotations; "
                          "transforms in float64", "num_rotations": NUM_ROTATIONS, "cases": [c.to_dict() for c in CASES]}
    meta = {**env, **protocol}
    (args.out / "latest.meta.json").write_text(json.dumps(meta, indent=2))
    summary = summarize(df)
    lines = [
        "# float32 equivariance error vs. the rounding floor",
        "",
        f"Written by `{protocol['command']}` at commit {meta['git_commit']} on {meta['date']} "
        f"({meta['cpu'] or meta['device']}, {meta['torch_threads']} threads, torch {meta['torch']}).",
        "",
        f"Depth 4, n = 256, batch 2, dim 32, 4 heads x 16, dim_feat 16 where fused, {NUM_ROTATIONS} Haar-random "
        "rotations, "
        f"seeds 0-{args.seeds - 1} (fresh weights and inputs per seed), fan-in initialisation (untrained). "
        "Relative error = max abs deviation over valid points / max abs expected output. "
        "`floor_inputs`: the same weights in float64 on float32-rounded coordinates (what exact arithmetic on "
        "float32 inputs gives); `floor_activations`: also every VN block's output rounded to float32. "
        "The original package (VN-transformer 0.1.0) has `err_float32` only.",
        "",
        summary.to_markdown(index=False),
        "",
    ]
    (args.out / "latest.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return args.out


if __name__ == "__main__":
    main()
