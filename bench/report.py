"""Rows -> one tidy DataFrame -> results/bench/{latest.csv, <date>.csv, latest.md, *.png}.

``python -m bench.report [results/bench]`` regenerates the Markdown and plots from latest.csv.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from bench import stats

RESULTS = Path(__file__).parents[1] / "results" / "bench"

COLUMNS = [  # the tidy schema; results/README.md explains each
    "kind", "group", "case_id", "impl", "backend", "bias_epsilon", "dtype", "ftz", "n", "batch", "fusion", "dim", "depth", "heads",
    "dim_head", "dim_feat", "device", "status", "rounds", "warmup", "fwd_ms", "fwd_ms_q1", "fwd_ms_q3",
    "fwd_bwd_ms", "fwd_bwd_ms_q1", "fwd_bwd_ms_q3", "tokens_per_s", "fwd_bwd_gflop", "achieved_gflop_per_s",
    "gemm_peak_gflop_per_s", "peak_fraction", "peak_mem_mib", "mem_method", "equiv_rel_err", "equiv_floor_rel_err",
    "max_abs_diff_vs_math", "world_size", "steps_per_s", "scaling_efficiency",
]


def cpu_flags() -> list[str]:
    """The CPU feature flags that decide float32/bfloat16 speed here (from /proc/cpuinfo)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
    if not Path("/proc/cpuinfo").exists():
        return []
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [f for f in wanted if f in present]
    return []


def environment() -> dict:
    import torch
    from importlib.metadata import PackageNotFoundError, version
    try:
        ds = version("deepspeed")  # read without importing it
    except PackageNotFoundError:
        ds = "not installed"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parents[1]).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parents[1]).stdout.strip()
    except OSError:
        sha, dirty = "unknown", ""
    if sha == "unknown" and os.environ.get("VNT_GIT_COMMIT"):  # a copy of the tree without .git (a lent GPU machine)
        sha = os.environ["VNT_GIT_COMMIT"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or platform.machine())
    cpu_model = ""
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {"device": device, "cpu": cpu_model, "cpu_flags": " ".join(cpu_flags()), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "torch": torch.__version__, "cuda": torch.version.cuda or "", "deepspeed": ds, "python": platform.python_version(),
            "git_commit": sha + ("+dirty" if dirty else ""), "date": datetime.datetime.now().isoformat(timespec="seconds")}


def to_frame(rows: list[dict]):
    import pandas as pd
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df:
            df[col] = pd.NA
    df["ftz"] = df["ftz"].fillna(False).astype(bool)  # rows measured without touching it ran at PyTorch's default
    return df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]


def _save(df, *, protocol: dict, out_dir: Path) -> None:
    """latest.csv and a dated copy, each with its metadata sidecar (<name>.meta.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {**environment(), **protocol}  # a protocol that carries the session's environment keeps it
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in ("latest", stamp):  # every dated CSV carries its own metadata in a sidecar
        df.to_csv(out_dir / f"{name}.csv", index=False)
        (out_dir / f"{name}.meta.json").write_text(json.dumps(meta, indent=2))


def write(rows: list[dict], *, protocol: dict, out_dir: Path = RESULTS) -> Path:
    _save(to_frame(rows), protocol=protocol, out_dir=out_dir)
    render(out_dir)
    return out_dir


def _table(df) -> str:
    return df.to_markdown() if len(df) else "(no rows)"


def _config(row) -> str:
    i = lambda k: int(row[k])  # noqa: E731  (CSV columns with NaN rows read back as floats)
    return (f"dim {i('dim')}, depth {i('depth')}, {i('heads')} heads x {i('dim_head')}, "
            f"dim_feat {i('dim_feat') if row['fusion'] else 'none'}, batch {i('batch')}")


def _interval_columns(df, key: str, *, above: str, below: str):
    """``df`` with "95% interval" (``{key}_lo``-``{key}_hi``) and "verdict" columns (``bench.stats``)."""
    lo, hi = df.get(f"{key}_lo"), df.get(f"{key}_hi")
    if lo is None or hi is None:
        return df.assign(**{"95% interval": "", "verdict": ""})
    return df.assign(**{"95% interval": [_interval_text(a, b) for a, b in zip(lo, hi)],
                        "verdict": [stats.verdict(a, b, above=above, below=below) for a, b in zip(lo, hi)]})


def _interval_text(lo: float, hi: float) -> str:
    """A 95% interval as table text; empty without one (NaN bounds: too few repeats)."""
    return f"{lo:.3g}-{hi:.3g}" if lo == lo else ""


def _rounds_ratio(num, den) -> tuple[float, float, float]:
    """median(num) / median(den) of two ``*_rounds`` cells and its 95% interval (NaN without rounds)."""
    import statistics
    a, b = stats.decode_rounds(num), stats.decode_rounds(den)
    if not a or not b:
        return float("nan"), float("nan"), float("nan")
    return (statistics.median(a) / statistics.median(b), *stats.ratio_interval(a, b))


def _unpaired_table(pairs: list[tuple[str, object, object]], *, label: str, above: str, below: str):
    """One row per (name, numerator row, denominator row): both medians, their ratio with its 95%
    interval from the rows' repeats, and the verdict."""
    import pandas as pd
    out = []
    for name, num, den in pairs:
        ratio, lo, hi = _rounds_ratio(num.get("fwd_bwd_ms_rounds"), den.get("fwd_bwd_ms_rounds"))
        out.append({"": name, "numerator_ms": num["fwd_bwd_ms"], "denominator_ms": den["fwd_bwd_ms"], label: ratio,
                    "95% interval": _interval_text(lo, hi), "verdict": stats.verdict(lo, hi, above=above, below=below)})
    return pd.DataFrame(out).set_index("").round(3)


def render(out_dir: Path = RESULTS) -> None:
    import pandas as pd
    df = pd.read_csv(out_dir / "latest.csv")
    if "ftz" not in df:  # reports from before the flush-to-zero column ran at PyTorch's default
        df["ftz"] = False
    meta = json.loads((out_dir / "latest.meta.json").read_text())
    ok = df[(df["kind"] == "case") & (df["status"] == "ok")]
    grid, _, length = split_views(ok)
    lines = [f"# Benchmark report ({meta.get('profile', '?')} profile)", "",
             "## Protocol", "",
             *[f"- {k}: {v}" for k, v in meta.items()], "",
             "Times are medians over `rounds` timed steps after `warmup` untimed ones (quartiles in the CSV; "
             "the README-configuration rows, readme, readme_eps0 and fold_off, use `readme_rounds`). "
             "FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on one forward+backward of the same model "
             "on its written-out attention path (the counter does not see inside fused SDPA kernels); "
             "`peak_fraction` divides achieved FLOP/s by a dense GEMM measured in the same run and dtype. "
             "Equivariance error: `vnt.equivariance_error`, max relative error over 3 Haar-random rotations; "
             "its floor (vnt rows): `vnt.rounding_floor`, the same weights in float64 with the inputs and every VN "
             "block's output rounded to the row's dtype, i.e. what the function forces at that storage precision. "
             "bfloat16 runs under autocast over float32 weights.", ""]
    paired = df[df["kind"] == "paired"]
    if len(paired):
        paired = paired.assign(ftz=paired["ftz"].map(lambda v: "on" if v else "off"))
        lines += ["## Paired speed-up over the original (float32, forward+backward)", "",
                  "Steps of the two models alternate in one process; speed-up = median of the per-pair time "
                  "ratios original / vnt, with a 95% bootstrap interval over the pairs (`bench.stats`; an interval "
                  "that contains 1 is no measurable difference on this machine). `ftz`: flush-to-zero "
                  "(`torch.set_flush_denormal`) off, PyTorch's default, or on, for both packages. `readme` is the "
                  "original's README example (dim 64, depth 2, 8 heads x 64, dim_feat 64, bias_epsilon 1e-6, n 128, "
                  "batch 2); `readme-eps0` the same at epsilon 0; `n512` the README example at n 512, batch 1; "
                  "`depth6` the README example at depth 6 (vnt's first attention layer runs on proj_in's rank-1 "
                  "factor, nearly free, so deeper models gain less); `protein-n512` the README example at depth 8, "
                  "n 512, batch 1 (the protein profile).", "",
                  _table(_interval_columns(paired, "speedup_paired", above="vnt faster", below="vnt slower")
                         .set_index(["paired_config", "backend", "ftz"])[
                      ["original_ms", "fwd_bwd_ms", "speedup_paired", "95% interval", "verdict", "rounds"]]
                         .rename(columns={"fwd_bwd_ms": "vnt_ms"}).sort_index().round(3)), ""]
        cost = []
        for (config, backend), g in paired.groupby(["paired_config", "backend"]):
            off, on = g[g["ftz"] == "off"], g[g["ftz"] == "on"]
            if not len(off) or not len(on):
                continue
            off, on = off.iloc[0], on.iloc[0]
            for package, column in (("original", "original_ms_rounds"), ("vnt", "fwd_bwd_ms_rounds")):
                ratio, lo, hi = _rounds_ratio(off.get(column), on.get(column))
                cost.append({"paired_config": config, "backend": backend, "package": package,
                             "ftz off / on": ratio, "95% interval": _interval_text(lo, hi),
                             "verdict": stats.verdict(lo, hi, above="slower with denormals",
                                                      below="faster with denormals")})
        if cost:
            import pandas as pd
            lines += ["What denormal floats cost each package: its median step with flush-to-zero off / on (the "
                      "two settings' repeats resampled independently; 1 = no cost).", "",
                      _table(pd.DataFrame(cost).set_index(["paired_config", "backend", "package"]).round(3)), ""]
        if "flop_ratio" in paired:
            lines += ["Where the speed-up comes from: FLOPs of one forward+backward (FlopCounterMode, written-out "
                      "attention paths), and the FLOP/s each step achieved at the medians above; speed-up = "
                      "flop_ratio x vnt_gflop_per_s / original_gflop_per_s.", "",
                      _table(paired.set_index(["paired_config", "backend", "ftz"])[
                          ["original_gflop", "fwd_bwd_gflop", "flop_ratio", "original_gflop_per_s",
                           "achieved_gflop_per_s"]].rename(columns={"fwd_bwd_gflop": "vnt_gflop",
                                                                    "achieved_gflop_per_s": "vnt_gflop_per_s"})
                      .round(2)), ""]
    for group, title in (("readme", "the original's README example (eps 1e-6)"), ("readme_eps0", "the same at eps 0")):
        rows_ = ok[ok["group"] == group]
        if not len(rows_):
            continue
        r = rows_.iloc[0]
        speed = rows_.pivot_table(index="backend", columns="impl", values="fwd_bwd_ms", aggfunc="first")
        if "original" in speed and "vnt" in speed:
            speed["speedup_vs_original"] = speed["original"] / speed["vnt"]
        extra = {"fold_off": "vnt_projected", "compile": "vnt_compiled", "bf16": "vnt_bf16_autocast"}
        for other, column in extra.items():
            timed = ok[(ok["group"] == other) & (ok["bias_epsilon"] == r["bias_epsilon"])].set_index("backend")
            if len(timed):
                speed[column] = timed["fwd_bwd_ms"]
        if "attn_kernel" in rows_:
            speed["vnt_kernel"] = rows_[rows_["impl"] == "vnt"].set_index("backend")["attn_kernel"]
        lines += [f"## Forward+backward time, {title} (ms; {_config(r)}, n {int(r['n'])}, float32, timed one "
                  f"model at a time)", "", _table(speed.round(2)), "",
                  "Fraction of the measured float32 GEMM peak:", "",
                  _table(rows_.pivot_table(index="backend", columns="impl", values="peak_fraction",
                                           aggfunc="first").round(3)), ""]
    eager = ok[(ok["group"] == "readme") & (ok["impl"] == "vnt")]

    def against_eager(rows_, *, label, above, below):
        """Each row of ``rows_`` against the eager float32 README row of its backend and epsilon."""
        pairs = []
        for _, r in rows_.iterrows():
            base = eager[(eager["backend"] == r["backend"]) & (eager["bias_epsilon"] == r["bias_epsilon"])]
            if len(base):
                pairs.append((f"{r['backend']}, eps {r['bias_epsilon']:g}", base.iloc[0], r))
        return _unpaired_table(pairs, label=label, above=above, below=below) if pairs else None

    compiled = df[(df["kind"] == "case") & (df["group"] == "compile")]
    if len(compiled):
        lines += ["## torch.compile (inductor) at the README example", "",
                  "Compile time is the first forward and forward+backward; the compiled output is checked against "
                  "the same weights run eagerly before timing. A build that fails is a row with its reason.", "",
                  _table(compiled.set_index("backend")[[c for c in ("status", "compile_s", "fwd_bwd_ms",
                                                                    "max_abs_diff_vs_eager") if c in compiled]]
                         .round(4)), ""]
        table = against_eager(compiled[compiled["status"] == "ok"], label="eager / compiled",
                              above="compiled faster", below="compiled slower")
        if table is not None:
            lines += ["Eager (numerator) / compiled (denominator) step, timed one model at a time; the interval "
                      "resamples both rows' repeats:", "", _table(table), ""]
    protein = ok[ok["group"].isin(("protein_readme", "protein_main"))]
    if len(protein):
        lines += [f"## Protein sizes: depth-8 models at 256-2048 points, batch 1 (CPU flags: {meta.get('cpu_flags', '?')})", "",
                  "`protein_readme`: the original's README model (dim 64, 8 heads x 64, dim_feat 64, eps 1e-6) at depth 8; "
                  "`protein_main`: the main job's model scaled to dim 128, depth 8, 8 heads x 16, dim_feat 16, eps 1e-6. "
                  "`peak_fraction`: achieved FLOP/s (vnt's own FLOP count) / the dense GEMM measured in this run and "
                  "dtype; `attn_kernel`: the attention kernel that ran; bfloat16 under autocast.", "",
                  _table(_protein_table(protein)), ""]
    bf16 = ok[ok["group"] == "bf16"]
    if len(bf16):
        lines += [f"## bfloat16 autocast at the README example (CPU flags: {meta.get('cpu_flags', '?')})", "",
                  "`bf16_native`: the device multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16 on a CPU); "
                  "without it bf16 matmuls are emulated and slower than float32, which says nothing about vnt.", "",
                  _table(bf16.set_index("backend")[["bf16_native", "fwd_bwd_ms", "equiv_rel_err",
                                                    "equiv_floor_rel_err"]].round(4)), ""]
        table = against_eager(bf16, label="float32 / bf16", above="bf16 faster", below="bf16 slower")
        if table is not None:
            lines += ["float32 (numerator) / bf16 autocast (denominator) step:", "", _table(table), ""]
    alloc = df[df["kind"] == "allocator"]
    if len(alloc):
        lines += ["## Allocator: vnt's glibc malloc settings on and off (README example, fresh processes)", "",
                  "malloc_speedup: system malloc / vnt's settings, median of pairs of processes, 95% interval.", "",
                  _table(_interval_columns(alloc, "malloc_speedup", above="vnt's settings faster",
                                           below="vnt's settings slower").set_index("backend")[
                      ["system_malloc_ms", "fwd_bwd_ms", "malloc_speedup", "95% interval", "verdict", "rounds"]]
                         .round(3)), ""]
    compat = df[df["kind"] == "compat"]
    if len(compat):
        lines += ["## The original's layout: public encoder (b, n, dim, c) / vnt.layers encoder (b, n, c, dim)", "",
                  _table(_interval_columns(compat, "overhead_paired", above="public layout slower",
                                           below="public layout faster").set_index("backend")[
                      ["fwd_bwd_ms", "layers_fwd_bwd_ms", "overhead_paired", "95% interval", "verdict", "rounds"]]
                         .round(3)), ""]
    if len(length):
        r = length.iloc[0]
        lines += [f"## Tokens/s (forward+backward) by backend and length ({_config(r)}, float32, eps 0)", "",
                  _table(length.pivot_table(index="n", columns="backend", values="tokens_per_s").round(0)), "",
                  "## Peak memory of one forward+backward by backend and length (MiB)", "",
                  _table(length.pivot_table(index="n", columns="backend", values="peak_mem_mib").round(1)), ""]
        if "attn_kernel" in length:
            lines += ["The attention kernel that ran (`einsum`: written out; l2 runs written out on a CPU while "
                      "batch x heads x n^2 <= the kernel plan's `l2_written_out_max_scores`, 2^21 by default):", "",
                      _table(length.pivot_table(index="n", columns="backend", values="attn_kernel",
                                                aggfunc="first")), ""]
    attn = ok[ok["group"] == "attn_memory"]
    if len(attn):
        lines += [f"## Peak memory where attention dominates (MiB; {_config(attn.iloc[0])}, float32)", "",
                  _table(attn.pivot_table(index="n", columns="backend", values="peak_mem_mib").round(1)), ""]
    if len(grid):
        r = grid.iloc[0]
        lines += [f"## Equivariance error by bias epsilon, dtype and backend ({_config(r)}, n {int(r['n'])})", "",
                  _table(grid.pivot_table(index="bias_epsilon", columns=["dtype", "backend"], values="equiv_rel_err",
                                          aggfunc="max").map(lambda v: f"{v:.1e}")), "",
                  "## Its floor: the same weights in float64, inputs and VN block outputs rounded to the dtype", "",
                  _table(grid.pivot_table(index="bias_epsilon", columns=["dtype", "backend"],
                                          values="equiv_floor_rel_err", aggfunc="max").map(lambda v: f"{v:.1e}")), "",
                  "## Forward+backward time by backend and dtype (ms, eps 0, same configuration)", "",
                  _table(grid[grid["bias_epsilon"] == 0].pivot_table(index="backend", columns="dtype",
                                                                     values="fwd_bwd_ms").round(1)), ""]
    scaling = df[df["kind"] == "scaling"]
    if len(scaling):
        lines += ["## Data-parallel scaling (DeepSpeed, weak scaling, same per-process batch)", "",
                  "steps_per_s: 1 / the median step time after warm-up; scaling_efficiency: the one-process median "
                  "step / this one's, with a 95% interval that resamples both runs' steps. On a machine with fewer "
                  "cores than threads asked for, the processes share cores: the figure then measures sharing. "
                  "compute_ms / allreduce_ms: the median time per step outside and inside the gradient all-reduce "
                  "(where measured).", "",
                  _table(_interval_columns(scaling, "scaling_efficiency", above="superlinear", below="below linear")
                         .set_index("world_size")[[c for c in ("steps_per_s", "scaling_efficiency", "95% interval",
                                                               "verdict", "compute_ms", "allreduce_ms", "status")
                                                   if c in scaling or c in ("95% interval", "verdict")]].round(3)), ""]
    skipped = df[df["status"] != "ok"]
    if len(skipped):
        lines += ["## Rows not measured", "", _table(skipped[["case_id", "status"]].set_index("case_id")), ""]
    (out_dir / "latest.md").write_text("\n".join(lines))
    plot(ok, out_dir)


def _protein_table(protein):
    """The protein rows by (group, dtype, n, backend): times and rates rounded, errors in 1e notation."""
    table = protein.set_index(["group", "dtype", "n", "backend"]).sort_index()[
        ["fwd_bwd_ms", "achieved_gflop_per_s", "peak_fraction", "peak_mem_mib", "attn_kernel", "equiv_rel_err",
         "equiv_floor_rel_err"]].round({"fwd_bwd_ms": 1, "achieved_gflop_per_s": 1, "peak_fraction": 3, "peak_mem_mib": 1})
    for column in ("equiv_rel_err", "equiv_floor_rel_err"):
        table[column] = table[column].map(lambda v: f"{v:.1e}")
    return table


def split_views(ok):
    """(grid, readme, length): the epsilon x dtype grid, the README-configuration rows, and the
    float32 eps-0 length sweep (the grid's rows at that point included)."""
    grid = ok[ok["group"] == "grid"]
    readme = ok[ok["group"] == "readme"]
    length = ok[ok["group"].isin(("length", "grid")) & (ok["dtype"] == "float32")
                & (ok["bias_epsilon"] == 0) & (ok["impl"] == "vnt")]
    return grid, readme, length


def plot(ok, out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, _, length = split_views(ok)
    for value, fname, label in (("tokens_per_s", "throughput_vs_length.png", "tokens/s (fwd+bwd)"),
                                ("peak_mem_mib", "memory_vs_length.png", "peak memory of one step (MiB)")):
        if not len(length):
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for backend, g in length.groupby("backend"):
            g = g.sort_values("n")
            ax.plot(g["n"], g[value], marker="o", label=backend)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("points n")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)
    eq = grid[grid["impl"] == "vnt"]
    if len(eq):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for (dtype, backend), g in eq.groupby(["dtype", "backend"]):
            g = g.sort_values("bias_epsilon")
            x = g["bias_epsilon"].where(g["bias_epsilon"] > 0, 1e-8)
            ax.plot(x, g["equiv_rel_err"], marker="o", label=f"{dtype} {backend}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bias epsilon (0 plotted at 1e-8)")
        ax.set_ylabel("relative equivariance error")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "equivariance_vs_epsilon.png", dpi=120)
        plt.close(fig)


# ------------------------------------------------------------------------------------------------
# the training league (bench/train_cases.py): results/train-bench

TRAIN = RESULTS.parent / "train-bench"


def write_train(rows: list[dict], *, protocol: dict, out_dir: Path = TRAIN) -> Path:
    import pandas as pd
    _save(pd.DataFrame(rows), protocol=protocol, out_dir=out_dir)
    render_train(out_dir)
    return out_dir


def settings_table(df):
    """One row per setting: mean over seeds, and the spread (max - min) of the RMSD ratio."""
    ok = df[df["status"] == "ok"]
    if "ftz" not in ok:  # leagues from before the flush-to-zero cases
        ok = ok.assign(ftz=False)
    g = ok.groupby("setting")
    table = g.agg(group=("group", "first"), network=("network", "first"), backend=("backend", "first"),
                  bias_epsilon=("bias_epsilon", "first"), bf16=("bf16", "first"), world=("world", "first"),
                  ftz=("ftz", "first"), seeds=("seed", "count"), val_rmsd_ratio=("val_rmsd_ratio", "mean"),
                  ratio_spread=("val_rmsd_ratio", lambda v: v.max() - v.min()),
                  val_rmsd_denoised=("val_rmsd_denoised", "mean"), equiv_rel_err=("equiv_rel_err", "max"),
                  equiv_floor_rel_err=("equiv_floor_rel_err", "max"), tokens_per_s=("tokens_per_s", "mean"),
                  train_time_s=("train_time_s", "mean"), wall_s=("wall_s", "mean"),
                  peak_mem_mib=("peak_mem_mib", "max"), parameters=("parameters", "first"),
                  steps=("steps_run", "first"))
    return table.sort_values(["group", "val_rmsd_ratio"])


def _best(table, mask, label: str) -> dict:
    rows = table[mask]
    if not len(rows):
        return {}
    best = rows["val_rmsd_ratio"].idxmin()
    r = rows.loc[best]
    others = rows.drop(index=best)
    margin = (others["val_rmsd_ratio"].min() - r["val_rmsd_ratio"]) if len(others) else float("nan")
    noise = max(rows["ratio_spread"].max(), 0.0)
    verdict = "within seed noise" if len(others) and margin <= noise else "beyond seed noise" if len(others) else ""
    return {"question": label, "best setting": best, "val_rmsd_ratio": round(r["val_rmsd_ratio"], 4),
            "margin to the next": round(margin, 4), "largest seed spread": round(noise, 4), "verdict": verdict}


def render_train(out_dir: Path = TRAIN) -> None:
    import pandas as pd
    df = pd.read_csv(out_dir / "latest.csv")
    if "ftz" not in df:  # reports from before the flush-to-zero column ran at PyTorch's default
        df["ftz"] = False
    meta = json.loads((out_dir / "latest.meta.json").read_text())
    table = settings_table(df)
    plain = ~table["ftz"].astype(bool)  # the questions compare settings at PyTorch's default; ftz has its own table
    base = (table["network"] == "vnt") & plain
    fp32w2 = base & ~table["bf16"].astype(bool) & (table["world"] == 2)
    heads = [
        _best(table, fp32w2 & (table["bias_epsilon"] == 0), "which attention backend (eps 0, float32)"),
        _best(table, fp32w2 & (table["backend"] == "sdpa"), "which bias epsilon (sdpa, float32)"),
        _best(table, (table["backend"] == "sdpa") & (table["bias_epsilon"] == 0) & (table["world"] == 2) & base,
              "float32 or bf16 (sdpa, eps 0)"),
        _best(table, (table["backend"] == "sdpa") & (table["bias_epsilon"] == 0) & ~table["bf16"].astype(bool) & base,
              "1 or 2 processes (same global batch)"),
        _best(table, (table["backend"] == "sdpa") & (table["bias_epsilon"] == 0) & ~table["bf16"].astype(bool)
              & (table["world"] == 2) & plain, "vnt or a peer network"),
    ]
    if set(table["group"]) <= {"quality", "steps"}:  # the quality profile: which network, at equal time and steps
        heads = [_best(table, table["group"] == "quality", "which network at an equal training time"),
                 _best(table, table["group"] == "steps", "which network at an equal number of steps")]
    heads = pd.DataFrame([h for h in heads if h]).set_index("question") if any(heads) else pd.DataFrame()
    cols = ["seeds", "val_rmsd_ratio", "ratio_spread", "val_rmsd_denoised", "equiv_rel_err", "equiv_floor_rel_err",
            "tokens_per_s", "train_time_s", "peak_mem_mib", "parameters", "steps"]
    lines = ["# Training league", "",
             "The main job (`launch/train.sh`, backbone denoising on the embedded set, noise sigma 1 A) per "
             "setting, each at the same budget of optimizer steps, with the same seeds, data order, crops, noise "
             "and optimizer; peers are trained by the same loop (`vnt.peers`). `val_rmsd_ratio` = validation "
             "RMSD denoised / noisy on held-out chains (lower is better), mean over seeds; `ratio_spread` = its "
             "max - min over seeds: a difference smaller than the spread is noise. `equiv_rel_err`: the trained "
             "model's SE(3) error in its dtype; `equiv_floor_rel_err`: exact arithmetic on inputs rounded to that "
             "dtype (`vnt.rounding_floor`).", "", "## Protocol", "", *[f"- {k}: {v}" for k, v in meta.items()], "",
             "## The best setting per question", "", _table(heads), "",
             "## Every setting", "", _table(table[cols].round(6)), ""]
    ftz = _ftz_throughput(df)
    if len(ftz):
        lines += ["## Throughput with denormals flushed to zero", "",
                  "Per network (sdpa, eps 0, float32, 2 processes): tokens/s with PyTorch's default and with "
                  "`--run-flush-denormal true`, mean over seeds, and the per-seed ratios default / ftz (separate "
                  "launches, so machine drift is in them: a range that contains 1 is no measurable difference).",
                  "", _table(ftz), ""]
    skipped = df[df["status"] != "ok"] if "status" in df else df.iloc[0:0]
    if len(skipped):
        lines += ["## Cases not run", "", _table(skipped[["case_id", "status"]].set_index("case_id")), ""]
    (out_dir / "latest.md").write_text("\n".join(lines))
    plot_train(df, table, meta, out_dir)


def _ftz_throughput(df):
    """tokens/s per network at PyTorch's default and with flush-to-zero, for the settings run both ways."""
    import pandas as pd
    ok = df[(df["status"] == "ok") & (df["backend"] == "sdpa") & (df["bias_epsilon"] == 0) & ~df["bf16"].astype(bool)
            & (df["world"] == 2) & (df["steps"] == df["steps"].max())]
    out = []
    for network, g in ok.groupby("network"):
        off, on = (g[g["ftz"].astype(bool) == v].set_index("seed")["tokens_per_s"] for v in (False, True))
        seeds = off.index.intersection(on.index)
        if not len(seeds):
            continue
        ratios = (off[seeds] / on[seeds]).sort_values()
        out.append({"network": network, "tokens_per_s default": off[seeds].mean(), "tokens_per_s ftz": on[seeds].mean(),
                    "default / ftz per seed": ", ".join(f"{r:.3f}" for r in ratios),
                    "verdict": ("ftz faster" if ratios.max() < 1 else "ftz slower" if ratios.min() > 1
                                else "no measurable difference")})
    return pd.DataFrame(out).set_index("network").round(1) if out else pd.DataFrame()


def plot_train(df, table, meta, out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df["status"] == "ok"]
    stamp = (f"{meta.get('profile', '?')} profile, commit {meta.get('git_commit', '?')}, "
             f"{meta.get('cpu', meta.get('device', '?'))}, {meta.get('cpu_count', '?')} cores")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "os^vD<>ph*"
    for k, (setting, g) in enumerate(ok.groupby("setting")):
        color = f"C{k % 10}"
        for i, curve in enumerate(g["curve"]):  # one line per seed, one colour and marker per setting
            points = json.loads(curve)
            ax.plot([t for _, t, _ in points], [r for _, _, r in points], marker=markers[k % len(markers)],
                    color=color, alpha=0.85, label=setting if i == 0 else None)
    ax.set_xscale("log")  # the peers' steps are 5-20x slower: a linear axis crowds vnt's settings
    ax.set_xlabel("training time, s (each seed; log scale)")
    ax.set_ylabel("validation RMSD denoised / noisy")
    ax.set_title(f"RMSD ratio against training time\n{stamp}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(out_dir / "ratio_vs_time.png", dpi=120)
    plt.close(fig)

    eps = table[(table["network"] == "vnt") & ~table["bf16"].astype(bool) & (table["world"] == 2)]
    if len(eps):
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
        for k, (backend, g) in enumerate(eps.groupby("backend")):
            g = g.sort_values("bias_epsilon")
            x = g["bias_epsilon"].where(g["bias_epsilon"] > 0, 1e-8) * (1.15 ** k)  # offset: overlapping lines
            a.errorbar(x, g["val_rmsd_ratio"], yerr=g["ratio_spread"] / 2, marker=markers[k], label=backend, capsize=3)
            b.plot(x, g["equiv_rel_err"], marker=markers[k], label=f"{backend} error")
            b.plot(x, g["equiv_floor_rel_err"], marker=markers[k], linestyle=":", label=f"{backend} rounding floor")
        for axis in (a, b):
            axis.set_xscale("log")
            axis.set_xlabel("bias epsilon (0 plotted at 1e-8)")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        a.set_ylabel("validation RMSD ratio (bars: seed spread)")
        b.set_yscale("log")
        b.set_ylabel("trained model's SE(3) error")
        fig.suptitle(f"RMSD ratio and equivariance against bias epsilon, float32, 2 processes\n{stamp}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "ratio_vs_epsilon.png", dpi=120)
        plt.close(fig)


# ------------------------------------------------------------------------------------------------
# comparing two runs


def load_run(path: Path):
    """Rows of a benchmark run: a report CSV, or a pytest-benchmark JSON (its extra_info)."""
    import pandas as pd
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return pd.DataFrame([{**b.get("extra_info", {}), "case_id": b.get("extra_info", {}).get("case_id", b["name"])}
                             for b in data["benchmarks"]])
    return pd.read_csv(path)


# metric: (its repeats: a rounds column, or the two columns whose per-pair ratio it is; its quartile
# columns (older reports); whether higher is better; the words for a change up and down)
COMPARED = {
    "fwd_bwd_ms": ("fwd_bwd_ms_rounds", ("fwd_bwd_ms_q1", "fwd_bwd_ms_q3"), False, ("faster", "slower")),
    "speedup_paired": (("original_ms_rounds", "fwd_bwd_ms_rounds"), ("speedup_paired_q1", "speedup_paired_q3"), True,
                       ("faster", "slower")),
    "overhead_paired": (None, ("overhead_paired_q1", "overhead_paired_q3"), False, ("faster", "slower")),
    "malloc_speedup": (None, ("malloc_speedup_q1", "malloc_speedup_q3"), True, ("faster", "slower")),
    "scaling_efficiency": (None, (None, None), True, ("faster", "slower")),
    "tokens_per_s": (None, (None, None), True, ("faster", "slower")),
    "val_rmsd_ratio": (None, (None, None), False, ("better", "worse")),
}
COMPARE_TEST = ("95% percentile-bootstrap interval of median(new) / median(old), both runs' repeats resampled "
                "independently (bench.stats.ratio_interval); without repeats, disjoint 95% intervals (the rows' "
                "_lo/_hi), else disjoint quartile ranges; otherwise within noise")


def _repeats(row, source):
    """A row's repeats of a metric: a rounds column, or per-pair ratios of two (None: not recorded)."""
    if source is None:
        return None
    if isinstance(source, str):
        return stats.decode_rounds(row.get(source))
    num, den = (stats.decode_rounds(row.get(c)) for c in source)
    return [a / b for a, b in zip(num, den)] if num and den and len(num) == len(den) else None


def _quartile_columns(frame, q1: str, q3: str) -> tuple[str, str]:
    """The quartile columns of a run (before the 95% intervals, speedup_paired's were speedup_q1/_q3)."""
    if q1 and q1 not in frame and q1.startswith("speedup_paired"):
        return "speedup_q1", "speedup_q3"
    return q1, q3


def compare(old: Path, new: Path, *, png: Path | None = None):
    """Per case and metric: old, new, new / old with its 95% interval from both runs' repeats, and
    whether the case got faster, slower or stayed within noise (``COMPARE_TEST``)."""
    import pandas as pd
    a, b = (load_run(p).drop_duplicates("case_id").set_index("case_id") for p in (old, new))
    rows = []
    for metric, (source, (q1, q3), higher, (up, down)) in COMPARED.items():
        if metric not in a or metric not in b:
            continue
        qa, qb = _quartile_columns(a, q1, q3), _quartile_columns(b, q1, q3)
        for case in a.index.intersection(b.index):
            ra, rb = a.loc[case], b.loc[case]
            if pd.isna(ra[metric]) or pd.isna(rb[metric]) or not ra[metric]:
                continue
            ratio = rb[metric] / ra[metric]
            lo = hi = float("nan")
            reps_a, reps_b = _repeats(ra, source), _repeats(rb, source)
            if reps_a and reps_b:
                lo, hi = stats.ratio_interval(reps_b, reps_a)
                basis = "repeats"
                change = stats.verdict(lo, hi, above="up", below="down")
            elif all(pd.notna(r.get(f"{metric}_{e}")) for r in (ra, rb) for e in ("lo", "hi")):
                basis = "intervals"
                change = ("up" if rb[f"{metric}_lo"] > ra[f"{metric}_hi"] else
                          "down" if rb[f"{metric}_hi"] < ra[f"{metric}_lo"] else stats.NO_DIFFERENCE)
            elif (qa[0] and qa[0] in ra and qb[0] in rb
                  and all(pd.notna(v) for v in (ra[qa[0]], ra[qa[1]], rb[qb[0]], rb[qb[1]]))):
                basis = "quartiles"
                change = ("up" if rb[qb[0]] > ra[qa[1]] else "down" if rb[qb[1]] < ra[qa[0]] else stats.NO_DIFFERENCE)
            else:
                basis, change = "none", stats.NO_DIFFERENCE
            if change == "up":
                change = up if higher else down
            elif change == "down":
                change = down if higher else up
            else:
                change = "within noise"
            rows.append({"case_id": case, "metric": metric, "old": ra[metric], "new": rb[metric], "new/old": ratio,
                         "95% interval": _interval_text(lo, hi), "basis": basis, "change": change})
    table = pd.DataFrame(rows, columns=["case_id", "metric", "old", "new", "new/old", "95% interval", "basis", "change"])
    if png is not None and len(table):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        t = table[table["metric"] == table["metric"].iloc[0]]
        fig, ax = plt.subplots(figsize=(7, max(2.5, 0.22 * len(t))))
        colors = ["tab:gray" if c == "within noise" else "tab:red" for c in t["change"]]
        ax.barh(t["case_id"], t["new/old"], color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel(f"{t['metric'].iloc[0]}: new / old (red: a change beyond noise)")
        ax.set_title(f"{Path(old).name} -> {Path(new).name}", fontsize=9)
        ax.tick_params(axis="y", labelsize=6)
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        plt.close(fig)
    return table


def summary_line(table) -> str:
    """"3 faster, 1 slower, 58 within noise" over the table's cases and metrics."""
    counts = table["change"].value_counts()
    words = ["faster", "slower"] + [w for w in ("better", "worse") if counts.get(w, 0)] + ["within noise"]
    return ", ".join(f"{int(counts.get(w, 0))} {w}" for w in words)


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m bench.report", allow_abbrev=False,
                                description="Re-render a report folder, or compare two runs.")
    p.add_argument("folder", nargs="?", default=str(RESULTS), help="report folder to re-render (default results/bench)")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"),
                   help="two report CSVs or pytest-benchmark JSONs: per case, new / old and faster, slower or within noise")
    p.add_argument("--png", help="with --compare: also plot the ratios here")
    args = p.parse_args(argv)
    if args.compare:
        table = compare(Path(args.compare[0]), Path(args.compare[1]), png=Path(args.png) if args.png else None)
        if not len(table):
            print("no case in common")
            return 0
        print(table.to_markdown(index=False, floatfmt=".4g"))
        print(f"\ntest: {COMPARE_TEST}")
        print(summary_line(table))
        return 0
    folder = Path(args.folder)
    (render_train if (folder / "latest.csv").exists() and "setting" in open(folder / "latest.csv").readline()
     else render)(folder)
    print(f"rendered {folder}/latest.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
