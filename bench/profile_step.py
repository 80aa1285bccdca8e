"""Where a step's time goes: one configuration, per block and per op.

    python -m bench.profile_step [--backend l2] [--n 128] [--batch 2] [--bias-epsilon 1e-6] [--rounds 9]

At the original's README example by default (dim 64, depth 2, 8 heads x 64, dim_feat 64), float32.
Writes ``profile_{backend}_n{n}.{md,meta.json}`` into --out (default results/bench):

- the whole forward+backward step, median of ``rounds`` after 2 warm-ups;
- each block on its own (the first layer's attention, on proj_in's rank-1 factor; a later layer's
  attention; the feed-forward; one layer norm with its residual sum), forward+backward on a random
  input of the layer's shape with a random output gradient, median, and how many a step runs;
- the top ops by self CPU time over one step under ``torch.profiler`` (its overhead inflates small
  ops; the block times above are without it), with their input shapes;
- the step's FLOPs (FlopCounterMode) and the dense-GEMM peak measured in the same run.

Like the benchmark session, it runs with vnt's malloc settings (``vnt.MALLOC_TUNABLES``): started
without GLIBC_TUNABLES it re-executes itself with them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench import exec_with_malloc_tunables

OUT = Path(__file__).parents[1] / "results" / "bench"


def main(argv=None) -> int:
    from bench.cases import BACKENDS, README
    p = argparse.ArgumentParser(prog="python -m bench.profile_step", allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="l2", choices=BACKENDS)
    p.add_argument("--n", type=int, default=README["n"])
    p.add_argument("--batch", type=int, default=README["batch"])
    p.add_argument("--bias-epsilon", type=float, default=README["bias_epsilon"])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--top", type=int, default=15, help="ops listed")
    p.add_argument("--tiny", action="store_true", help="a tiny model (what the test suite runs)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.rounds < 1 or args.n < 1 or args.batch < 1:
        p.error("--rounds, --n and --batch must be positive")
    exec_with_malloc_tunables(["bench.profile_step", *(sys.argv[1:] if argv is None else argv)])

    import torch
    from torch.profiler import ProfilerActivity, profile

    from vnt import fast
    from torch.utils.flop_counter import FlopCounterMode

    from bench.cases import TINY, Case
    from bench.measure import build, gemm_peak_flops, step_fns, time_fn
    from bench.report import environment

    sizes = {**(TINY if args.tiny else README), "n": args.n, "batch": args.batch, "bias_epsilon": args.bias_epsilon}
    case = Case(backend=args.backend, group="profile", **sizes)
    model, coors, feats = build(case)
    _, step = step_fns(model, coors, feats, case, "cpu")
    step_ms = statistics.median(time_fn(step, rounds=args.rounds, warmup=2, device="cpu")) * 1e3

    attn, norm, ff, _ = model.encoder.layers[0]
    x = torch.randn(case.batch, case.n, model.config.dim_coor_total, case.dim, requires_grad=True)
    other = torch.randn_like(x)
    grad = torch.randn_like(x)
    # the first layer's attention runs on the input embedding's rank-1 factor, the later ones on x
    s = torch.randn(case.batch, case.n, model.config.dim_coor_total, 1)
    proj_in = model.encoder.proj_in
    embed = (lambda: fast.folded_attention(s, mask=None, embed=(proj_in.weight, proj_in.effective_bias()),
                                          **attn.folded_maps()))
    blocks_run = {
        "attention, first layer (on the embedding's rank-1 factor)": (embed, 1),
        "attention, a later layer": (lambda: attn(x), case.depth - 1),
        "feed-forward": (lambda: ff(x), case.depth),
        "layer norm + residual": (lambda: norm(x, residual=other), 2 * case.depth),
    }

    def block_step(fn):
        def run():
            fn().backward(grad)
            x.grad = None
            model.zero_grad(set_to_none=True)
        return run

    blocks = {name: statistics.median(time_fn(block_step(fn), rounds=args.rounds, warmup=2, device="cpu")) * 1e3
              for name, (fn, count) in blocks_run.items() if count}
    kernel = "+".join(sorted({str(k) for k in model.encoder.attention_kernels()}))
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    peak = gemm_peak_flops("float32")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=28, max_shapes_column_width=70)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"profile_{args.backend}_n{args.n}"
    meta = {**environment(), "command": "python -m bench.profile_step " + " ".join(argv if argv is not None else sys.argv[1:]),
            "case": case.to_dict(), "rounds": args.rounds, "warmup": 2, "attn_kernel": kernel,
            "step_ms": step_ms, "block_ms": blocks, "fwd_bwd_gflop": flops / 1e9,
            "gemm_peak_gflop_per_s": peak / 1e9}
    (out / f"{name}.meta.json").write_text(json.dumps(meta, indent=2))
    config = (f"dim {case.dim}, depth {case.depth}, {case.heads} heads x {case.dim_head}, dim_feat {case.dim_feat}, "
              f"n {case.n}, batch {case.batch}, bias_epsilon {case.bias_epsilon:g}, float32")
    lines = [f"# Where a `{args.backend}` step's time goes ({config})", "",
             *[f"- {k}: {v}" for k, v in meta.items() if k not in ("case", "block_ms")], "",
             f"## Forward+backward, medians of {args.rounds} after 2 warm-ups (ms)", "",
             "| part | ms | x per step | share of the step |", "|---|---:|---:|---:|",
             f"| whole step | {step_ms:.1f} | | 100% |",
             *[f"| {k} (one, alone) | {v:.1f} | {blocks_run[k][1]} | {100 * v * blocks_run[k][1] / step_ms:.0f}% |"
               for k, v in blocks.items()],
             "", (f"Achieved: {flops / 1e9:.1f} GFLOP in {step_ms:.0f} ms = {flops / step_ms / 1e6:.0f} GFLOP/s, "
                  f"{flops / step_ms / 1e6 / (peak / 1e9):.2f} of the dense-GEMM peak ({peak / 1e9:.0f} GFLOP/s)."), "",
             f"## Top {args.top} ops by self CPU time, one step under torch.profiler", "", "```", table.strip(), "```", ""]
    (out / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
