#!/usr/bin/env bash
# Streams the training log of one host (default: worker 0 of slice 0, which writes the metrics).
#
#   logs.sh --zone=us-east5-a --name=bagel-v5p [--worker=3] [--node=1 --queued]
#
# Ctrl-C stops following; training goes on. --worker=all prints every host's log, prefixed.
# Flags: see common.sh. --dry-run prints the gcloud command.

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
source "$HERE/common.sh"

parse_args "$@"
check_common
shquote "$REMOTE_DIR/logs/train.log"
on_hosts "$WORKER" "$NODE" "tail -n 200 -F $REPLY"
