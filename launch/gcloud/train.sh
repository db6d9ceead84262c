#!/usr/bin/env bash
# Starts training on every host of every slice (--worker=all; --node=all for queued resources).
#
#   train.sh --zone=us-east5-a --name=bagel-v5p --config=configs/bagel_7b_mot.py \
#            --workdir=gs://BUCKET/runs/exp1 [--env=KEY=VALUE] [--attach] -- --config.train.lr=1e-4
#
# Runs, in ~/REMOTE_DIR on each worker:
#   .venv/bin/python -m bagel_jax.train --config=CONFIG --workdir=WORKDIR [ARGS after --]
# in the background (nohup; output in ~/REMOTE_DIR/logs/train.log, follow it with logs.sh), or in the
# foreground with --attach (every worker's output streams here). Multi-host start-up needs nothing
# more: each process finds the others through the TPU metadata (bagel_jax.distributed).
# Every argument reaches the trainer verbatim: values with spaces or quotes are quoted for the remote
# shell. Flags: see common.sh. --dry-run prints the gcloud command.
# With --accelerator (or BAGEL_ACCELERATOR) the trainer gets that TPU generation's tuned libtpu flags as
# LIBTPU_INIT_ARGS (libtpu_flags.sh; --env=LIBTPU_INIT_ARGS=... replaces them); without it, libtpu's defaults.

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
source "$HERE/common.sh"
# shellcheck source-path=SCRIPTDIR
source "$HERE/libtpu_flags.sh"

parse_args "$@"
check_common
require CONFIG WORKDIR

if [[ -n $ACCELERATOR && " ${ENVS[*]} " != *" LIBTPU_INIT_ARGS="* ]]; then
  libtpu_flags "$ACCELERATOR"
  ENVS=("LIBTPU_INIT_ARGS=$REPLY" ${ENVS[@]+"${ENVS[@]}"})
fi

argv=(.venv/bin/python -m bagel_jax.train --config="$CONFIG" --workdir="$WORKDIR" "${TRAINER_ARGS[@]}")
if ((${#ENVS[@]})); then argv=(env "${ENVS[@]}" "${argv[@]}"); fi
quote_argv "${argv[@]}"
trainer=$REPLY
shquote "$REMOTE_DIR"
remote="cd $REPLY && mkdir -p logs && "
if ((ATTACH)); then
  remote+="$trainer 2>&1 | tee logs/train.log"
else
  remote+="nohup $trainer > logs/train.log 2>&1 < /dev/null &"
fi
on_hosts all all "$remote"
