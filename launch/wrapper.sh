#!/usr/bin/env bash
# The wrapper of the main job (launch/train.sh hands its bash reading over to this file): it
# checks the options, then starts DeepSpeed's launcher on launch/train.sh. Every way of starting
# the job works as typed:
#
#   deepspeed launch/train.sh [trainer options]       # DeepSpeed's launcher runs it with python per rank
#   deepspeed --num_gpus 4 launch/train.sh ...        # ... with the launcher's own flags (--hostfile, --include, ...)
#   deepspeed --no_python launch/train.sh ...         # ... or with bash per rank: it becomes the trainer
#   bash launch/train.sh [trainer options]            # this wrapper: checks the options, starts the launcher
#   DRY_RUN=1 bash launch/train.sh                    # print the launch command only
#
# Environment of the bash wrapper (unset: DeepSpeed's own choice):
#   NUM_GPUS      processes per node [every GPU (CUDA_VISIBLE_DEVICES honoured); 2 without GPUs]
#   NUM_NODES     nodes of the hostfile to use          HOSTFILE   one "host slots=N" line per node
#   INCLUDE / EXCLUDE   the launcher's --include / --exclude (e.g. INCLUDE=localhost:0,2)
#   MASTER_ADDR   [127.0.0.1; with a hostfile its first host]   MASTER_PORT [a free port; 29500 with a hostfile]
#   NODE_RANK + NO_SSH=1   one launcher per node, no ssh (SLURM: launch/slurm.sbatch)
#   RUN_DIR [runs/<date>]  MAX_STEPS  PYTHON [python]  DRY_RUN [0]
#   LAUNCHER_ARGS  more launcher flags, e.g. "--bind_cores_to_rank --enable_each_rank_log runs/x/ranks"
# Further arguments go to the trainer (python -m vnt.train --help). Restarting with the same RUN_DIR
# resumes. Output goes to $RUN_DIR/launch.log (launch-node<NODE_RANK>.log with one launcher per node).
# Every rank runs with vnt's malloc settings (vnt/malloc.py) unless GLIBC_TUNABLES is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
die() { echo "launch/train.sh: $*" >&2; exit 2; }

# Started per rank by `deepspeed --no_python launch/train.sh`: be the trainer for this rank.
if [[ -n "${LOCAL_RANK:-}" && -n "${RANK:-}" && -n "${WORLD_SIZE:-}" ]]; then
  exec "$PYTHON" launch/train.sh "$@"
fi

HOSTFILE=${HOSTFILE:-}
NUM_NODES=${NUM_NODES:-}
NUM_GPUS=${NUM_GPUS:-}
INCLUDE=${INCLUDE:-}
EXCLUDE=${EXCLUDE:-}
NODE_RANK=${NODE_RANK:-}
NO_SSH=${NO_SSH:-0}
DRY_RUN=${DRY_RUN:-0}
read -r -a launcher_args <<< "${LAUNCHER_ARGS:-}"
# the run dir: RUN_DIR or --run-dir (not two different ones); the log goes there too
arg_run_dir=
for ((i = 1; i <= $#; i++)); do
  case "${!i}" in
    --run-dir|--run-run-dir) j=$((i + 1)); arg_run_dir=${!j:-} ;;
    --run-dir=*|--run-run-dir=*) arg_run_dir=${!i#*=} ;;
  esac
done
if [[ -n "$arg_run_dir" ]]; then
  [[ -n "${RUN_DIR:-}" && "$RUN_DIR" != "$arg_run_dir" ]] && die "RUN_DIR=$RUN_DIR and --run-dir $arg_run_dir disagree"
  RUN_DIR=$arg_run_dir
fi
if [[ "$NO_SSH" == 1 && -z "${RUN_DIR:-}" ]]; then
  die "NO_SSH=1 (one launcher per node) needs RUN_DIR, the same on every node"
fi
RUN_DIR=${RUN_DIR:-runs/$(date +%Y%m%d-%H%M%S)}

launcher=(deepspeed)
if [[ -n "$HOSTFILE" ]]; then
  [[ -f "$HOSTFILE" ]] || die "HOSTFILE=$HOSTFILE does not exist"
  launcher+=(--hostfile "$HOSTFILE")
  # every node must reach the master: the first host of the hostfile (DeepSpeed asks it over ssh
  # for its address when --master_addr is empty; without ssh we name it)
  if [[ -z "${MASTER_ADDR:-}" && "$NO_SSH" == 1 ]]; then
    MASTER_ADDR=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")
  fi
  MASTER_PORT=${MASTER_PORT:-29500}   # every node's launcher must use the same port
else
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')}
fi
[[ -n "$NUM_NODES" ]] && launcher+=(--num_nodes "$NUM_NODES")
# physical GPUs only (nvidia-smi -L also lists MIG devices)
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | grep -c . || true)
fi
if [[ -n "$INCLUDE$EXCLUDE" ]]; then
  [[ -n "$NUM_GPUS$NUM_NODES" ]] && die "INCLUDE/EXCLUDE and NUM_GPUS/NUM_NODES exclude each other (DeepSpeed's rule)"
  [[ -n "$INCLUDE" ]] && launcher+=(--include "$INCLUDE")
  [[ -n "$EXCLUDE" ]] && launcher+=(--exclude "$EXCLUDE")
elif [[ -n "$NUM_GPUS" ]]; then
  launcher+=(--num_gpus "$NUM_GPUS")
elif (( gpus > 0 )) && [[ -n "${CUDA_VISIBLE_DEVICES:-}" && -z "$HOSTFILE" ]]; then
  # the launcher would drop CUDA_VISIBLE_DEVICES; hand the same devices over as --include
  [[ "$CUDA_VISIBLE_DEVICES" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES:" \
    "the DeepSpeed launcher takes device indices; set INCLUDE=localhost:0,1 or NUM_GPUS instead"
  launcher+=(--include "localhost:$CUDA_VISIBLE_DEVICES")
elif (( gpus == 0 )) && [[ -z "$HOSTFILE" ]]; then
  launcher+=(--num_gpus 2)            # no GPU: two CPU processes
fi
[[ -n "${MASTER_ADDR:-}" ]] && launcher+=(--master_addr "$MASTER_ADDR")
launcher+=(--master_port "$MASTER_PORT")
if [[ "$NO_SSH" == 1 ]]; then
  [[ -n "$NODE_RANK" ]] || die "NO_SSH=1 needs NODE_RANK"
  launcher+=(--no_ssh --node_rank "$NODE_RANK")
fi
launcher+=("${launcher_args[@]}")

args=()
[[ -z "$arg_run_dir" ]] && args+=(--run-dir "$RUN_DIR")
[[ -n "${MAX_STEPS:-}" ]] && args+=(--max-steps "$MAX_STEPS")
args+=("$@")

# bad options fail here, before any process starts
"$PYTHON" launch/train.sh --check "${args[@]}" >/dev/null

cmd=("${launcher[@]}" launch/train.sh "${args[@]}")
if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
mkdir -p "$RUN_DIR"
log="$RUN_DIR/launch.log"
[[ -n "$NODE_RANK" ]] && log="$RUN_DIR/launch-node$NODE_RANK.log"
echo "launch: ${cmd[*]}" | tee -a "$log"
# A stop signal (SLURM's SIGTERM) reaches every process: the ranks save a checkpoint and exit. This
# shell and tee outlive them, so the log keeps every line and the job ends when the ranks do.
trap 'echo "launch/train.sh: stop signal: waiting for the ranks to save and exit" >&2' TERM INT
"${cmd[@]}" 2>&1 | (trap '' TERM INT; exec tee -a "$log")
