#!/usr/bin/env bash
# Several nodes: run on the first host of HOSTFILE (passwordless ssh to the others, same paths,
# same venv). HOSTFILE lines look like launch/hostfile.example ("host slots=N").
#   HOSTFILE=launch/hostfile launch/train_multinode.sh launch/configs/smolvlm2-2.2b.yaml [key=value ...]
set -euo pipefail
cfg=$1; shift
: "${HOSTFILE:=launch/hostfile}"
: "${MASTER_PORT:=29500}"
exec deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT" \
  --module dst_train.cli train --config "$cfg" "$@"
