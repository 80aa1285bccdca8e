"""Paired speed of two vnt versions in one process: ``python -m bench.compare_versions --ref REF``.

The package at git ``REF`` is exported to a temporary folder and imported as ``vnt_ref`` next to
the working tree's ``vnt``. Both build the original's README example (dim 64, depth 2, 8 heads x
64, dim_feat 64, eps 1e-6, n 128, batch 2, float32) with the same weights and inputs; their
forward+backward steps alternate (ref, ours, ref, ...) after warm-up steps, and each backend's row
is the median of the per-round time ratios ref / ours with a 95% bootstrap interval over the rounds (``bench.stats``);
with the original package installed, each round also times it and the row gives both speed-ups.
An interval that contains 1 is "no measurable difference". Writes ``--out`` (Markdown).
"""
from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import stats

ROOT = Path(__file__).parents[1]
README = dict(dim=64, depth=2, heads=8, dim_head=64, dim_feat=64, bias_epsilon=1e-6)


def export(ref: str, dest: Path) -> None:
    """vnt at ``ref`` as the package ``vnt_ref`` under ``dest``."""
    archive = subprocess.run(["git", "archive", ref, "vnt"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    (dest / "vnt").rename(dest / "vnt_ref")
    for path in (dest / "vnt_ref").rglob("*.py"):
        text = re.sub(r"\b(from|import) vnt\b", r"\1 vnt_ref", path.read_text())
        path.write_text(re.sub(r"\bvnt\.(?=[a-z_]+\b)", "vnt_ref.", text))


def interval(ratios: list[float]) -> str:
    lo, hi = stats.interval(ratios)
    return f"{statistics.median(ratios):.2f} ({lo:.2f}-{hi:.2f})"


def compare(theirs, ours, Original, backend: str, args, *, ftz: bool) -> str:
    """One row: ref and new vnt (and the original, when installed) with the same weights and inputs,
    timed in alternating rounds."""
    import torch

    torch.manual_seed(0)
    old = theirs.VNTransformer(**README, attn_backend=backend)
    new = ours.VNTransformer(**README, attn_backend=backend)
    new.load_state_dict(old.state_dict())  # older state dicts load (proj_in moved into the encoder)
    models = [old, new]
    if Original is not None:
        torch.manual_seed(0)
        models.append(Original(**README, flash_attn=backend == "sdpa", l2_dist_attn=backend == "l2"))
    coors, feats = torch.randn(args.batch, args.n, 3), torch.randn(args.batch, args.n, 64)
    with torch.no_grad():
        diff = (old(coors, feats=feats)[0] - new(coors, feats=feats)[0]).abs().max().item()
    if diff > 1e-4:
        raise AssertionError(f"{backend}: the two versions differ by {diff}")

    def timed(model):
        t = time.perf_counter()
        out = model(coors, feats=feats)
        (out[0].pow(2).mean() + out[1].pow(2).mean()).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for _ in range(args.warmup):
        for m in models:
            timed(m)
    rounds = []
    for k in range(args.pairs):  # the original first, then ref and new in an order that alternates per round
        order = [2, 0, 1] if k % 2 == 0 else [2, 1, 0]
        times = {i: timed(models[i]) for i in order if i < len(models)}
        rounds.append([times[i] for i in range(len(models))])
    ratios = [r[0] / r[1] for r in rounds]
    lo, hi = stats.interval(ratios)
    verdict = stats.verdict(lo, hi, above="new faster", below="new slower")
    ms = lambda k: f"{statistics.median(r[k] for r in rounds) * 1e3:.1f}"
    row = (f"| {'on' if ftz else 'off'} | {backend} | {ms(0)} | {ms(1)} | {statistics.median(ratios):.3f} | "
           f"{lo:.3f}-{hi:.3f} | {verdict} |")
    if Original is None:
        return row + " not installed | | |"
    return row + (f" {ms(2)} | {interval([r[2] / r[0] for r in rounds])} | "
                  f"{interval([r[2] / r[1] for r in rounds])} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="git ref of the version to compare against")
    p.add_argument("--pairs", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--out", default=None, help="Markdown report (default: print only)")
    args = p.parse_args(argv)

    import torch

    tmp = Path(tempfile.mkdtemp())
    export(args.ref, tmp)
    sys.path.insert(0, str(tmp))
    ours, theirs = importlib.import_module("vnt"), importlib.import_module("vnt_ref")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    try:
        from VN_transformer import VNTransformer as Original  # the original package (the bench extra)
    except ImportError:
        Original = None
    lines = [f"# vnt at {args.ref} against vnt at {head} (+ working tree)", "",
             f"`python -m bench.compare_versions --ref {args.ref}`: the original's README example (eps 1e-6, "
             f"n {args.n}, batch {args.batch}, float32, forward+backward), {args.pairs} rounds "
             f"(the original, then ref and new in alternating order) after {args.warmup} warm-ups each, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, flush-to-zero off (PyTorch's default) and on. ref/new = ref time / "
             f"new time; speed-up = the original's time / vnt's. Medians of per-round ratios, 95% bootstrap "
             f"interval over the rounds; an interval containing 1 is no measurable difference.", "",
             "| ftz | backend | ref ms | new ms | ref/new | 95% interval | verdict | original ms | speed-up ref | speed-up new |",
             "|---|---|---:|---:|---:|---|---|---:|---|---|"]
    for ftz in (False, True):
        torch.set_flush_denormal(ftz)
        for backend in ("math", "sdpa", "l2"):
            lines.append(compare(theirs, ours, Original, backend, args, ftz=ftz))
            print(lines[-1], flush=True)
    torch.set_flush_denormal(False)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
