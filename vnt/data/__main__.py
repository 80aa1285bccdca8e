"""python -m vnt.data {summary,export} [--source ...]: inspect or export a protein source.

Every DataConfig field is an option (--source, --path, --max-length, ...). SidechainNet files are
pickles, which run code when they are loaded: read only files from a source you trust.
"""
from __future__ import annotations

import json
import sys

from vnt import cli
from vnt.data.batching import ShardedBatchSampler, over_budget, padding_fraction
from vnt.data.core import DataConfig
from vnt.data.sources import DownloadUnavailable, export_sidechainnet, load_proteins


def main(argv=None) -> int:
    p = cli.Parser(prog="python -m vnt.data", description=__doc__)
    p.add_argument("command", choices=("summary", "export"), help="summary: counts, lengths, splits, skips; "
                   "export: the set as a SidechainNet pickle")
    dests = cli.add_options(p, DataConfig, DataConfig(), title="data")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--format", default="sidechainnet", choices=("sidechainnet",), help="export format")
    p.add_argument("--out", help="output file for export")
    args = p.parse_args(argv)
    if args.command == "export" and not args.out:
        p.error("export needs --out FILE.pkl")
    try:
        cfg = DataConfig(**cli.given(args, dests))
        data = load_proteins(cfg, progress=not args.json)
    except (ValueError, DownloadUnavailable) as err:  # DataError is a ValueError
        cli.fail(p, err)
    if args.command == "export":
        export_sidechainnet(data, args.out)
        print(json.dumps({"wrote": args.out, "examples": len(data.examples)}))
        return 0
    summary = data.summary()
    lengths = [len(e) for e in data.split("train")]
    padding = {}
    for bucket in (True, False):
        s = ShardedBatchSampler(lengths, batch_size=cfg.batch_size, max_length=cfg.max_length, bucket=bucket, seed=cfg.seed,
                                max_tokens=cfg.max_tokens)
        padding["bucketed" if bucket else "random"] = round(padding_fraction(s.epoch_batches(0), s.lengths), 4)
    summary["train_padding_fraction"] = padding
    summary["batching"] = {"batch_size": cfg.batch_size, "max_length": cfg.max_length, "max_tokens": cfg.max_tokens,
                           "batches_per_epoch": s.num_batches, "chains_over_token_budget": over_budget(s.lengths, cfg.max_tokens)}
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:24s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
