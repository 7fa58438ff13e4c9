#!/usr/bin/env bash
# One GPU (or one CPU process):  launch/train_1gpu.sh launch/configs/smolvlm2-256m.yaml [key=value ...]
set -euo pipefail
cfg=$1; shift
# SIGUSR1 (SLURM's --signal warning) is for the training processes only: the launchers ignore it
trap '' USR1
exec deepspeed --num_gpus 1 --module dst_train.cli train --config "$cfg" "$@"
