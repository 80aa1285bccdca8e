"""The memory/length league: the longest sequence each network trains (one forward+backward step)
under an address-space cap, and its step time there.

    python -m bench.memory_league [--caps-gib 2,8] [--max-points 16384] [--probe-timeout-s 300]

Every probe is a fresh process: a warm step runs at 200 points with every fused kernel of vnt on
(bench.long_sequences.warm_step: they compile then, not in the measured step, and the peers build
their caches), the network and its inputs are built at the probe's length, then ``RLIMIT_AS`` caps the address space at its size then plus the cap, and one timed step runs.
An allocation past the cap fails there (``oom``); a step slower than ``--probe-timeout-s`` is
stopped (``time``). The search doubles from 1024 points (or halves, if 1024 fails), then bisects
between the last length that trained and the first that did not, ``--bisect`` times, in multiples
of 64, up to ``--max-points`` (the search's ceiling). ``limited_by`` says what stopped it: memory,
time, or the ceiling. The larger cap's search starts from the smaller cap's result.

Every probe's result is appended to ``--probes`` (results/memory/probes.jsonl), one JSON line; a
probe already there (same entry, cap and length) is read back, not rerun, so a stopped league goes
on where it stopped. ``--probes ''`` runs every probe afresh.

One matched size for every network (``SIZE``: width 32, depth 2, 4 heads of 16, 16 invariant
features per point, float32, batch 1, one point per atom); En-Transformer takes 4 heads of 32 (its
rotary embedding wants dim_head >= 32) and both peers attend to 32 nearest neighbours (their
sparse setting, kinder to their memory than full attention); Equiformer has degrees 0-1.
``params`` records each network's parameter count.

Writes results/memory/latest.{csv,md,meta.json} and memory_league.png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.long_sequences import last_line, run_child

ROOT = Path(__file__).parents[1]
OUT = ROOT / "results" / "memory"
SIZE = dict(dim=32, depth=2, heads=4, dim_head=16, dim_feat=16)
NEIGHBORS = 32
# (model, backend, activation checkpointing)
ENTRIES = [("vnt", b, ck) for b in ("math", "sdpa", "l2") for ck in (False, True)] + [
    ("VN-transformer 0.1.0", "math", False), ("VN-transformer 0.1.0", "sdpa", False),
    ("En-Transformer", "-", False), ("Equiformer", "-", False)]


def build(model: str, backend: str, checkpointing: bool, n: int):
    """(network, step function) of one entry at n points."""
    import torch
    torch.manual_seed(0)
    coors = torch.randn(1, n, 3)
    mask = torch.ones(1, n, dtype=torch.bool)
    if model == "vnt":
        from vnt import VNTransformer
        net = VNTransformer(**SIZE, attn_backend=backend, translation_invariant=True)
        if checkpointing:
            net.encoder.checkpoint_layers()
        feats = torch.randn(1, n, SIZE["dim_feat"])
        call = lambda: net(coors, feats=feats, mask=mask)[0]  # noqa: E731
    elif model == "VN-transformer 0.1.0":
        from VN_transformer import VNTransformer
        net = VNTransformer(**SIZE, flash_attn=backend == "sdpa", translation_invariant=True)
        feats = torch.randn(1, n, SIZE["dim_feat"])
        call = lambda: net(coors, feats=feats, mask=mask)[0]  # noqa: E731
    elif model == "En-Transformer":
        from en_transformer import EnTransformer
        net = EnTransformer(dim=SIZE["dim"], depth=SIZE["depth"], heads=SIZE["heads"], dim_head=32, neighbors=NEIGHBORS)
        feats = torch.randn(1, n, SIZE["dim"])
        # no mask: every point is real, and En-Transformer 1.6.6 fails on a mask when it has fewer
        # points than neighbours (the 8-point warm step)
        call = lambda: net(feats, coors)[1]  # noqa: E731
    elif model == "Equiformer":
        from equiformer_pytorch import Equiformer
        net = Equiformer(dim=SIZE["dim"], num_degrees=2, depth=SIZE["depth"], heads=SIZE["heads"],
                         dim_head=SIZE["dim_head"], num_neighbors=NEIGHBORS, reduce_dim_out=True)
        feats = torch.randn(1, n, SIZE["dim"])
        call = lambda: net(feats, coors, mask=mask).type1  # noqa: E731
    else:
        raise ValueError(f"unknown model {model!r}")

    def step():
        net.zero_grad(set_to_none=True)
        call().square().sum().backward()
    return net, step


def probe_child(entry_json: str, n: int, cap_bytes: int) -> None:
    """In the child: a warm step (bench.long_sequences.warm_step), cap the address space, one timed step at n; prints JSON."""
    from bench.long_sequences import WARM_POINTS, capped_step, warm_step
    model, backend, ck = json.loads(entry_json)
    warm_step(build(model, backend, ck, WARM_POINTS)[1])
    net, step = build(model, backend, ck, n)
    result = capped_step(step, cap_bytes)
    if result["status"] == "ok":
        result = {"status": "ok", "step_s": result["seconds"], "peak_mem_mib": result["peak_rss_mib"],
                  "params": sum(p.numel() for p in net.parameters())}
    print(json.dumps(result))


def probe(entry, n: int, cap_gib: float, timeout_s: float) -> dict:
    code = "import sys; from bench.memory_league import probe_child; probe_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))"
    try:
        result, proc = run_child(code, json.dumps(entry), str(n), str(int(cap_gib * 2 ** 30)), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "time"}
    if result is not None:
        return result
    err = last_line(proc.stderr)
    if proc.returncode < 0 or "memory" in err.lower() or "alloc" in err.lower():  # killed, or failed to allocate outside torch
        return {"status": "oom", "detail": err[:200]}
    raise RuntimeError(f"probe {entry} n={n} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")


def search(entry, cap_gib: float, *, start: int, max_points: int, bisect: int, timeout_s: float, log,
           done: dict | None = None) -> dict:
    """Doubling (or halving) from ``start``, then ``bisect`` bisections; the row of the longest that trained.
    ``done``: results of earlier probes, by (entry, cap_gib, n), used instead of running them again."""
    tried: dict[int, dict] = {}
    reused = []

    def run(n):
        key = (tuple(entry), float(cap_gib), n)
        if done is not None and key in done:
            tried[n] = done[key]
            reused.append(n)
        else:
            tried[n] = probe(entry, n, cap_gib, timeout_s)
            log(entry, cap_gib, n, tried[n])
        return tried[n]["status"] == "ok"

    n = min(start, max_points)
    if run(n):
        while n < max_points and run(min(2 * n, max_points)):
            n = min(2 * n, max_points)
        lo, hi = n, (min(2 * n, max_points) if n < max_points else None)
    else:
        hi = n
        while n > 64 and not run(n // 2):
            n //= 2
        lo, hi = (n // 2 if n > 64 else 0), n
    for _ in range(bisect if hi else 0):
        mid = (lo + hi) // 2 // 64 * 64
        if mid in (lo, hi):
            break
        if run(mid):
            lo = mid
        else:
            hi = mid
    best = tried.get(lo, {})
    limited_by = "ceiling" if hi is None else tried[hi]["status"].replace("oom", "memory")
    return {"max_points": lo, "step_s_at_max": best.get("step_s"), "peak_mem_mib": best.get("peak_mem_mib"),
            "params": best.get("params"), "limited_by": limited_by, "first_failed_points": hi,
            "probes": len(tried), "probes_reused": len(reused)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory_league", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--caps-gib", default="2,8")
    p.add_argument("--max-points", type=int, default=16384, help="the search's ceiling")
    p.add_argument("--start", type=int, default=1024)
    p.add_argument("--bisect", type=int, default=2)
    p.add_argument("--probe-timeout-s", type=float, default=300)
    p.add_argument("--models", default="", help="comma-separated model names (default: all)")
    p.add_argument("--backends", default="", help="comma-separated backends (default: all; peers' is -)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--probes", default=str(OUT / "probes.jsonl"), help="probe log, read back and appended to ('' for none)")
    args = p.parse_args(argv)
    import pandas as pd

    from bench.report import environment
    caps = [float(c) for c in args.caps_gib.split(",")]
    entries = [e for e in ENTRIES if (not args.models or e[0] in args.models.split(","))
               and (not args.backends or e[1] in args.backends.split(","))]
    rows = []
    probes = Path(args.probes) if args.probes else None
    done = {}
    if probes:
        probes.parent.mkdir(parents=True, exist_ok=True)
    if probes and probes.exists():
        for line in probes.read_text().splitlines():
            r = json.loads(line)
            done[(tuple(r.pop("entry")), float(r.pop("cap_gib")), r.pop("n"))] = r

    def log(entry, cap, n, result):
        line = json.dumps({"entry": entry, "cap_gib": cap, "n": n, **result})
        print(line, flush=True)
        if probes:
            with probes.open("a") as f:
                f.write(line + "\n")

    for entry in entries:
        start = args.start
        for cap in sorted(caps):
            row = search(entry, cap, start=start, max_points=args.max_points, bisect=args.bisect,
                         timeout_s=args.probe_timeout_s, log=log, done=done)
            rows.append({"model": entry[0], "backend": entry[1], "activation_checkpointing": entry[2],
                         "cap_mib": int(cap * 1024), **row})
            start = max(row["max_points"], 64)
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "latest.csv", index=False)
    meta = {**environment(), "command": "python -m bench.memory_league " + " ".join(argv if argv is not None else sys.argv[1:]),
            "size": SIZE, "neighbors_of_peers": NEIGHBORS, "max_points": args.max_points,
            "probe_timeout_s": args.probe_timeout_s, "bisect": args.bisect,
            "probe_log": args.probes, "flush_to_zero": "off (PyTorch's default) in every probe"}
    (out / "latest.meta.json").write_text(json.dumps(meta, indent=2))
    (out / "latest.md").write_text(render(df, meta))
    plot(df, out / "memory_league.png")
    return 0


def render(df, meta: dict) -> str:
    best_peer = {cap: df[(df.model != "vnt") & (df.cap_mib == cap)].max_points.max() for cap in df.cap_mib.unique()}
    shown = df.copy()
    shown["vs best peer"] = [f"{r.max_points / best_peer[r.cap_mib]:.1f}x" if r.model == "vnt" and best_peer[r.cap_mib]
                             else "" for r in df.itertuples()]
    cols = ["model", "backend", "activation_checkpointing", "cap_mib", "max_points", "limited_by", "step_s_at_max",
            "peak_mem_mib", "params", "vs best peer"]
    lines = ["# Memory/length league", "",
             f"`{meta['command']}`. The longest sequence that trains one forward+backward step under each "
             "address-space cap, in fresh processes (bench/memory_league.py says how). `limited_by`: memory (the next "
             f"length ran out of memory), time (the next took over {meta['probe_timeout_s']:g} s) or ceiling (the search "
             f"stops at {meta['max_points']} points). Size: {meta['size']}; peers attend to {meta['neighbors_of_peers']} "
             "nearest neighbours. `peak_mem_mib`: the probe process's peak RSS. Step times keep denormal floats "
             "(flush-to-zero off), where VN-transformer 0.1.0's saturated softmax is slow on some CPUs: the lengths, "
             "not the times, are the league.", "",
             *[f"- {k}: {v}" for k, v in meta.items() if k not in ("command",)], "",
             shown[cols].round(3).to_markdown(index=False), ""]
    return "\n".join(lines)


def plot(df, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r.model} {r.backend}{' +ckpt' if r.activation_checkpointing else ''}" for r in
              df.drop_duplicates(["model", "backend", "activation_checkpointing"]).itertuples()]
    width = 0.8 / df.cap_mib.nunique()
    for k, cap in enumerate(sorted(df.cap_mib.unique())):
        sub = df[df.cap_mib == cap]
        ax.bar([i + k * width for i in range(len(sub))], sub.max_points, width, label=f"{cap / 1024:g} GiB")
    ax.set_xticks([i + width / 2 for i in range(len(labels))], labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("longest sequence that trains (points)")
    ax.set_yscale("log", base=2)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
