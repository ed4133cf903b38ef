#!/usr/bin/env bash
# Pipeline training on one host: one process (stage) per GPU, or per CPU process with gloo.
#   launch/torchrun.sh NPROC RUN.yaml [key=value ...] [--resume|--overwrite]
# Several hosts: set NNODES, NODE_RANK and MASTER_ADDR (host of node 0) on each, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh 8 run.yaml
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC_PER_NODE RUN.yaml [key=value ...] [--resume|--overwrite]" >&2
  exit 2
fi
nproc=$1; shift
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || python=python3
# NVLink multicast (NVLS) stays off: the point-to-point traffic of a pipeline does not use it.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# torchrun itself, ending with 130 / 143 instead of a traceback when Ctrl-C or SIGTERM stops the run
exec "$python" -m mlora.runtime.torchrun_launch \
  --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29511}" \
  --nproc-per-node "$nproc" -m mlora train "$@"
