#!/usr/bin/env bash
# Creates the TPU: a TPU VM (one slice), or a queued resource (--queued; one slice or --num-slices=N).
#
#   create.sh --zone=us-east5-a --name=bagel-v5p --accelerator=v5p-32 [--version=v2-alpha-tpuv5] [--spot]
#   create.sh --zone=us-east5-a --name=bagel-ms --accelerator=v5p-32 --version=v2-alpha-tpuv5 --num-slices=2
#
# A queued resource waits for capacity; follow it with
#   gcloud compute tpus queued-resources describe NAME --zone=ZONE   (state ACTIVE = ready).
# --version defaults to the image of the accelerator's generation (v4, v5p, v5litepod, v6e).
# Flags: see common.sh. --dry-run prints the gcloud command.

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
source "$HERE/common.sh"

parse_args "$@"
check_common
require ACCELERATOR
if [[ -z $RUNTIME ]]; then
  # The TPU software image that goes with each generation (Ubuntu 22.04 based).
  case $ACCELERATOR in
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) die "--version is required for accelerator $ACCELERATOR (or set BAGEL_RUNTIME)" ;;
  esac
fi
((${#TRAINER_ARGS[@]} == 0)) || die "create.sh takes no trainer arguments"
location_flags

capacity=()
if [[ -n $CAPACITY ]]; then capacity=("$CAPACITY"); fi

if ((QUEUED)); then
  if ((NUM_SLICES > 1)); then
    nodes=(--node-count="$NUM_SLICES" --node-prefix="$NAME")
  else
    nodes=(--node-id="$NAME")
  fi
  run gcloud compute tpus queued-resources create "$NAME" "${LOCATION[@]}" --accelerator-type="$ACCELERATOR" \
    --runtime-version="$RUNTIME" "${nodes[@]}" "${capacity[@]}"
else
  run gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" --accelerator-type="$ACCELERATOR" \
    --version="$RUNTIME" "${capacity[@]}"
fi
