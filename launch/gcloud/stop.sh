#!/usr/bin/env bash
# Stops the trainer on every host (before a restart: a running process holds the TPU chips).
#
#   stop.sh --zone=us-east5-a --name=bagel-v5p [--queued]
#
# Sends SIGTERM to the processes started by train.sh; checkpoints already written stay in the workdir.
# Flags: see common.sh. --dry-run prints the gcloud command.

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
source "$HERE/common.sh"

parse_args "$@"
check_common
on_hosts all all "pkill -TERM -f 'python -m bagel_jax[.]train' || true"
