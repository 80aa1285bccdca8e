"""Paired speed of two vnt versions in one process: ``python -m bench.compare_versions --ref REF``.

The package at git ``REF`` is exported to a temporary folder and imported as ``vnt_ref`` next to
the working tree's ``vnt``. Both build the original's README example (dim 64, depth 2, 8 heads x
64, dim_feat 64, eps 1e-6, n 128, batch 2, float32) with the same weights and inputs; their
forward+backward steps alternate (ref, ours, ref, ...) after warm-up steps, and each backend's row
is the median of the per-pair time ratios ref / ours with a 95% bootstrap interval over the pairs.
An interval that contains 1 is "no measurable difference". Writes ``--out`` (Markdown).
"""
from __future__ import annotations

import argparse
import importlib
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def bootstrap(ratios: list[float], *, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return meds[int(0.025 * draws)], meds[int(0.975 * draws) - 1]


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
    lines = [f"# vnt at {args.ref} against vnt at {head} (+ working tree)", "",
             f"`python -m bench.compare_versions --ref {args.ref}`: the original's README example (eps 1e-6, "
             f"n {args.n}, batch {args.batch}, float32, forward+backward), {args.pairs} alternating pairs after "
             f"{args.warmup} warm-ups each, torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"denormals as PyTorch's default. Ratio = ref time / new time; 95% bootstrap interval of the median.", "",
             "| backend | ref ms | new ms | ratio | 95% interval | verdict |", "|---|---:|---:|---:|---|---|"]
    for backend in ("math", "sdpa", "l2"):
        torch.manual_seed(0)
        old = theirs.VNTransformer(**README, attn_backend=backend)
        new = ours.VNTransformer(**README, attn_backend=backend)
        new.load_state_dict(old.state_dict())  # older state dicts load (proj_in moved into the encoder)
        coors, feats = torch.randn(args.batch, args.n, 3), torch.randn(args.batch, args.n, 64)
        with torch.no_grad():
            diff = (old(coors, feats=feats)[0] - new(coors, feats=feats)[0]).abs().max().item()
        if diff > 1e-4:
            raise AssertionError(f"{backend}: the two versions differ by {diff}")

        def step(model):
            out = model(coors, feats=feats)
            (out[0].pow(2).mean() + out[1].pow(2).mean()).backward()
            model.zero_grad(set_to_none=True)

        def timed(model):
            t = time.perf_counter()
            step(model)
            return time.perf_counter() - t

        for _ in range(args.warmup):
            step(old)
            step(new)
        pairs = [(timed(old), timed(new)) for _ in range(args.pairs)]
        ratios = [a / b for a, b in pairs]
        med, (lo, hi) = statistics.median(ratios), bootstrap(ratios)
        verdict = "no measurable difference" if lo <= 1 <= hi else ("new faster" if lo > 1 else "new slower")
        lines.append(f"| {backend} | {statistics.median(a for a, _ in pairs) * 1e3:.1f} | "
                     f"{statistics.median(b for _, b in pairs) * 1e3:.1f} | {med:.3f} | {lo:.3f}-{hi:.3f} | {verdict} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
