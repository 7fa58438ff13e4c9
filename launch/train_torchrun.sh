#!/usr/bin/env bash
# torchrun instead of the deepspeed launcher (e.g. under SLURM or elastic launchers):
#   NPROC=2 launch/train_torchrun.sh launch/configs/smolvlm2-500m.yaml [key=value ...]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) on every node.
set -euo pipefail
cfg=$1; shift
# SIGUSR1 (SLURM's --signal warning) is for the training processes only: the launchers ignore it
trap '' USR1
exec torchrun --nproc_per_node "${NPROC:-2}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m dst_train.cli train --config "$cfg" "$@"
