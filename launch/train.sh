#!/usr/bin/env bash
# Main job: VN-Transformer backbone denoiser, data-parallel DeepSpeed.
#
#   bash launch/train.sh [trainer options]            # every device of this machine
#   NUM_GPUS=4 RUN_DIR=runs/x bash launch/train.sh --model-depth 4
#   DRY_RUN=1 bash launch/train.sh                    # print the launch command only
#   deepspeed --no_python launch/train.sh ...         # the launcher starts this script per rank
#
# Environment (defaults in brackets):
#   NUM_NODES [1]  NUM_GPUS [all GPUs; 2 CPU processes without GPUs]  HOSTFILE [none]
#   MASTER_ADDR [127.0.0.1]  MASTER_PORT [a free port]  NODE_RANK + NO_SSH=1 (one launcher per node)
#   RUN_DIR [runs/<date>]  MAX_STEPS [trainer default]  PYTHON [python]  DRY_RUN [0]
# Further arguments go to `python -m vnt.train` (see --help). Restarting with the same RUN_DIR resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

# Started by the deepspeed launcher itself (one copy per rank): be the trainer for this rank.
if [[ -n "${LOCAL_RANK:-}" && -n "${RANK:-}" && -n "${WORLD_SIZE:-}" ]]; then
  exec "$PYTHON" -m vnt.train "$@"
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  DEFAULT_GPUS=$(nvidia-smi -L | wc -l)
else
  DEFAULT_GPUS=2
fi
NUM_NODES=${NUM_NODES:-1}
NUM_GPUS=${NUM_GPUS:-$DEFAULT_GPUS}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')}
RUN_DIR=${RUN_DIR:-runs/$(date +%Y%m%d-%H%M%S)}
HOSTFILE=${HOSTFILE:-}
NODE_RANK=${NODE_RANK:-}
NO_SSH=${NO_SSH:-0}
DRY_RUN=${DRY_RUN:-0}

args=(--run-dir "$RUN_DIR")
[[ -n "${MAX_STEPS:-}" ]] && args+=(--max-steps "$MAX_STEPS")
args+=("$@")

# bad options fail here, before any process starts
"$PYTHON" -m vnt.train --check "${args[@]}" >/dev/null

launcher=(deepspeed --num_nodes "$NUM_NODES" --num_gpus "$NUM_GPUS"
          --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
[[ -n "$HOSTFILE" ]] && launcher+=(--hostfile "$HOSTFILE")
if [[ "$NO_SSH" == 1 ]]; then
  launcher+=(--no_ssh --node_rank "${NODE_RANK:?NO_SSH=1 needs NODE_RANK}")
fi
cmd=("${launcher[@]}" --module vnt.train "${args[@]}")

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
mkdir -p "$RUN_DIR"
echo "launch: ${cmd[*]}" | tee -a "$RUN_DIR/launch.log"
"${cmd[@]}" 2>&1 | tee -a "$RUN_DIR/launch.log"
