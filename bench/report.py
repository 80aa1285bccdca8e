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

RESULTS = Path(__file__).parents[1] / "results" / "bench"

COLUMNS = [  # the tidy schema; results/README.md explains each
    "kind", "group", "case_id", "impl", "backend", "bias_epsilon", "dtype", "n", "batch", "fusion", "dim", "depth", "heads",
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
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or platform.machine())
    cpu_model = ""
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {"device": device, "cpu": cpu_model, "cpu_flags": " ".join(cpu_flags()), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "torch": torch.__version__, "deepspeed": ds, "python": platform.python_version(),
            "git_commit": sha + ("+dirty" if dirty else ""), "date": datetime.datetime.now().isoformat(timespec="seconds")}


def to_frame(rows: list[dict]):
    import pandas as pd
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df:
            df[col] = pd.NA
    return df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]


def write(rows: list[dict], *, protocol: dict, out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    df = to_frame(rows)
    env = environment()
    meta = {**env, **protocol}
    df.to_csv(out_dir / "latest.csv", index=False)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    df.to_csv(out_dir / f"{stamp}.csv", index=False)
    (out_dir / "latest.meta.json").write_text(json.dumps(meta, indent=2))
    render(out_dir)
    return out_dir


def _table(df) -> str:
    return df.to_markdown() if len(df) else "(no rows)"


def _config(row) -> str:
    i = lambda k: int(row[k])  # noqa: E731  (CSV columns with NaN rows read back as floats)
    return (f"dim {i('dim')}, depth {i('depth')}, {i('heads')} heads x {i('dim_head')}, "
            f"dim_feat {i('dim_feat') if row['fusion'] else 'none'}, batch {i('batch')}")


def render(out_dir: Path = RESULTS) -> None:
    import pandas as pd
    df = pd.read_csv(out_dir / "latest.csv")
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
        lines += ["## Paired speed-up over the original (float32, forward+backward)", "",
                  "Steps of the two models alternate in one process; speed-up = median of the per-pair time "
                  "ratios original / vnt, with quartiles. `readme` is the original's README example (dim 64, "
                  "depth 2, 8 heads x 64, dim_feat 64, bias_epsilon 1e-6, n 128, batch 2); `readme-eps0` the same "
                  "at epsilon 0; `n512` the README example at n 512, batch 1.", "",
                  _table(paired.set_index(["paired_config", "backend"])[
                      ["bias_epsilon", "n", "batch", "original_ms", "fwd_bwd_ms", "speedup_paired", "speedup_q1",
                       "speedup_q3", "rounds"]].rename(columns={"fwd_bwd_ms": "vnt_ms"}).round(3)), ""]
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
        lines += [f"## Forward+backward time, {title} (ms; {_config(r)}, n {int(r['n'])}, float32, timed one "
                  f"model at a time)", "", _table(speed.round(2)), "",
                  "Fraction of the measured float32 GEMM peak:", "",
                  _table(rows_.pivot_table(index="backend", columns="impl", values="peak_fraction",
                                           aggfunc="first").round(3)), ""]
    compiled = df[(df["kind"] == "case") & (df["group"] == "compile")]
    if len(compiled):
        lines += ["## torch.compile (inductor) at the README example", "",
                  "Compile time is the first forward and forward+backward; the compiled output is checked against "
                  "the same weights run eagerly before timing. A build that fails is a row with its reason.", "",
                  _table(compiled.set_index("backend")[[c for c in ("status", "compile_s", "fwd_bwd_ms",
                                                                    "max_abs_diff_vs_eager") if c in compiled]]
                         .round(4)), ""]
    bf16 = ok[ok["group"] == "bf16"]
    if len(bf16):
        lines += [f"## bfloat16 autocast at the README example (CPU flags: {meta.get('cpu_flags', '?')})", "",
                  "`bf16_native`: the device multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16 on a CPU); "
                  "without it bf16 matmuls are emulated and slower than float32, which says nothing about vnt.", "",
                  _table(bf16.set_index("backend")[["bf16_native", "fwd_bwd_ms", "equiv_rel_err",
                                                    "equiv_floor_rel_err"]].round(4)), ""]
    alloc = df[df["kind"] == "allocator"]
    if len(alloc):
        lines += ["## Allocator: vnt's glibc malloc settings on and off (README example, fresh processes)", "",
                  _table(alloc.set_index("backend")[["system_malloc_ms", "fwd_bwd_ms", "malloc_speedup",
                                                     "malloc_speedup_q1", "malloc_speedup_q3", "rounds"]].round(3)), ""]
    compat = df[df["kind"] == "compat"]
    if len(compat):
        lines += ["## The original's layout: public encoder (b, n, dim, c) / vnt.layers encoder (b, n, c, dim)", "",
                  _table(compat.set_index("backend")[["fwd_bwd_ms", "layers_fwd_bwd_ms", "overhead_paired",
                                                      "overhead_q1", "overhead_q3", "rounds"]].round(3)), ""]
    if len(length):
        r = length.iloc[0]
        lines += [f"## Tokens/s (forward+backward) by backend and length ({_config(r)}, float32, eps 0)", "",
                  _table(length.pivot_table(index="n", columns="backend", values="tokens_per_s").round(0)), "",
                  "## Peak memory of one forward+backward by backend and length (MiB)", "",
                  _table(length.pivot_table(index="n", columns="backend", values="peak_mem_mib").round(1)), ""]
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
                  _table(scaling[["world_size", "steps_per_s", "scaling_efficiency", "status"]].set_index("world_size")
                         .round(3)), ""]
    skipped = df[df["status"] != "ok"]
    if len(skipped):
        lines += ["## Rows not measured", "", _table(skipped[["case_id", "status"]].set_index("case_id")), ""]
    (out_dir / "latest.md").write_text("\n".join(lines))
    plot(ok, out_dir)


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


if __name__ == "__main__":
    render(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS)
    print(f"rendered {Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS}/latest.md")
