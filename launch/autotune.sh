#!/usr/bin/env bash
# Batch-size autotuning on every GPU of this machine (one process per GPU, like training):
#   launch/autotune.sh launch/configs/smolvlm2-2.2b.yaml [--target-gb 24 --fraction 0.9] [key=value ...]
# then train with the tuned config it prints (OUTPUT_DIR/autotune/tuned.yaml).
set -euo pipefail
cfg=$1; shift
: "${NUM_GPUS:=2}"
exec deepspeed --num_gpus "$NUM_GPUS" --module dst_train.cli autotune --config "$cfg" "$@"
