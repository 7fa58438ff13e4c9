#!/usr/bin/env bash
# Several nodes. Every node needs the same code, venv, hostfile and data paths.
# HOSTFILE lines look like launch/hostfile.example ("host slots=N").
#
# With passwordless ssh between the nodes, one command on the first host starts every node:
#   HOSTFILE=launch/hostfile launch/train_multinode.sh launch/configs/smolvlm2-2.2b.yaml [key=value ...]
# Without ssh (most clusters), run it on every node with that node's rank (0 = the first host):
#   NODE_RANK=1 MASTER_ADDR=<first host's address> HOSTFILE=launch/hostfile \
#     launch/train_multinode.sh launch/configs/smolvlm2-2.2b.yaml [key=value ...]
# Under SLURM, launch/slurm.sbatch does that for you. Nodes that share no filesystem: add
# train.node_local_checkpoints=true (docs/training.md, "Scaling out").
set -euo pipefail
cfg=$1; shift
: "${HOSTFILE:=launch/hostfile}"
: "${MASTER_PORT:=29500}"
per_node=()
if [[ -n "${NODE_RANK:-}" ]]; then
  : "${MASTER_ADDR:?NODE_RANK is set: set MASTER_ADDR too (the address of node 0)}"
  per_node=(--no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
fi
# SIGUSR1 (SLURM's --signal warning) is for the training processes only: the launchers ignore it
trap '' USR1
exec deepspeed --hostfile "$HOSTFILE" "${per_node[@]}" --master_port "$MASTER_PORT" \
  --module dst_train.cli train --config "$cfg" "$@"
