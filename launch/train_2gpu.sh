#!/usr/bin/env bash
# Two GPUs on one machine (the 2×24 GB recipe):
#   launch/train_2gpu.sh launch/configs/smolvlm2-2.2b.yaml data.root=/data/assembly101 output_dir=runs/x
# On a machine without GPUs this runs 2 CPU processes with gloo (the demo does that).
set -euo pipefail
cfg=$1; shift
# SIGUSR1 (SLURM's --signal warning) is for the training processes only: the launchers ignore it
trap '' USR1
exec deepspeed --num_gpus 2 --module dst_train.cli train --config "$cfg" "$@"
