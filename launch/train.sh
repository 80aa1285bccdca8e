#!/usr/bin/env bash
''':'
# Main job: VN-Transformer backbone denoiser, data-parallel DeepSpeed (README "Training"). One file,
# two readings, so that `deepspeed launch/train.sh` and `bash launch/train.sh` both work as typed:
# bash hands over to the wrapper (launch/wrapper.sh: options, environment, the launcher); python,
# which DeepSpeed's launcher runs on every rank, is the trainer (vnt.train.main).
exec bash "$(dirname "$0")/wrapper.sh" "$@"
'''
# ---- the Python reading: `deepspeed launch/train.sh` starts this file with python on every rank ----
import os
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
# a rank runs with vnt's malloc settings (vnt/malloc.py), which glibc reads before torch loads; the
# wrapper's option check (--check) trains nothing and starts no second interpreter for them
if "GLIBC_TUNABLES" not in os.environ and "--check" not in sys.argv:
    settings = {}
    exec((root / "vnt" / "malloc.py").read_text(), settings)
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": settings["MALLOC_TUNABLES"]})
sys.path.insert(0, str(root))  # vnt from this checkout, installed or not
os.chdir(root)                 # relative paths mean the same as in the bash reading
from vnt.train import main     # noqa: E402

sys.exit(main(sys.argv[1:]))
