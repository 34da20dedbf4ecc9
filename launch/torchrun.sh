#!/usr/bin/env bash
# Launch dilo workers with torchrun: one worker per process, the global world spanning all nodes.
#
#   launch/torchrun.sh configs/quickstart.toml [--outer.lr=0.5 ...]       # one node
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh CONFIG   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh CONFIG   # on node1
#
# NPROC: ranks per node (default: GPUs on this node, or 2 without GPUs).
# ISLANDS: rank: every rank is a worker of its own (the default, unless the config sets
#   transport.island_ranks); node: the ranks of a node form one island that averages gradients
#   every step and takes part in the outer step as one worker (the usual choice for several
#   nodes of several GPUs).
# Each rank uses NCCL when it has a GPU and Gloo otherwise (transport.backend = "auto").
set -euo pipefail
CONFIG=${1:?usage: launch/torchrun.sh CONFIG [--section.key=value ...]}
shift
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  default_nproc=$(nvidia-smi -L | wc -l)
else
  default_nproc=2
fi
NPROC=${NPROC:-$default_nproc}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
islands=()
case "${ISLANDS:-}" in
  "") ;;
  rank) islands=(--transport.island_ranks=1) ;;
  node) islands=(--transport.island_ranks=node) ;;
  *) echo "ISLANDS must be rank or node, not ${ISLANDS}" >&2; exit 2 ;;
esac
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC" \
  --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
  -m dilo.train "$CONFIG" "${islands[@]}" "$@"
