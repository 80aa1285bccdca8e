"""python -m vnt.data {summary,export} --source ...: inspect or export a protein source."""
from __future__ import annotations

import argparse
import json
import sys

from vnt.data.batching import ShardedBatchSampler, padding_fraction
from vnt.data.core import DataConfig
from vnt.data.sources import DownloadUnavailable, export_sidechainnet, load_proteins


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vnt.data", description=__doc__)
    p.add_argument("command", choices=("summary", "export"))
    p.add_argument("--source", default="embedded", choices=("embedded", "sidechainnet", "scn-pickle", "synthetic"))
    p.add_argument("--path", help="SidechainNet pickle for --source scn-pickle")
    p.add_argument("--casp-version", type=int, default=12)
    p.add_argument("--thinning", type=int, default=30)
    p.add_argument("--cache-dir")
    p.add_argument("--min-length", type=int, default=DataConfig.min_length)
    p.add_argument("--max-length", type=int, default=DataConfig.max_length)
    p.add_argument("--batch-size", type=int, default=DataConfig.batch_size)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--format", default="sidechainnet", choices=("sidechainnet",))
    p.add_argument("--out", help="output file for export")
    args = p.parse_args(argv)
    try:
        cfg = DataConfig(source=args.source, path=args.path, casp_version=args.casp_version, thinning=args.thinning,
                         cache_dir=args.cache_dir, min_length=args.min_length, max_length=args.max_length,
                         batch_size=args.batch_size)
    except ValueError as err:
        p.error(str(err))
    try:
        data = load_proteins(cfg, progress=not args.json)
    except DownloadUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "export":
        if not args.out:
            p.error("export needs --out FILE.pkl")
        export_sidechainnet(data, args.out)
        print(json.dumps({"wrote": args.out, "examples": len(data.examples)}))
        return 0
    summary = data.summary()
    train = data.split("train")
    lengths = [len(e) for e in train]
    padding = {}
    for bucket in (True, False):
        s = ShardedBatchSampler(lengths, batch_size=cfg.batch_size, max_length=cfg.max_length, bucket=bucket, seed=cfg.seed)
        padding["bucketed" if bucket else "random"] = round(padding_fraction(s.epoch_batches(0), s.lengths), 4)
    summary["train_padding_fraction"] = padding
    summary["batching"] = {"batch_size": cfg.batch_size, "max_length": cfg.max_length}
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:24s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
