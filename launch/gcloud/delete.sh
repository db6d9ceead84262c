#!/usr/bin/env bash
# Deletes the TPU VM, or the queued resource with all its slices (--queued / --num-slices=N).
#
#   delete.sh --zone=us-east5-a --name=bagel-v5p
#   delete.sh --zone=us-east5-a --name=bagel-ms --queued
#
# Flags: see common.sh. --dry-run prints the gcloud command. Deletion does not ask for confirmation.

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
source "$HERE/common.sh"

parse_args "$@"
check_common
location_flags

if ((QUEUED)); then
  run gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
fi
