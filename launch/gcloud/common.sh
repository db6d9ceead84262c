# shellcheck shell=bash disable=SC2034  # the variables set here are read by the scripts
# Shared by the launch/gcloud scripts (source it; it does nothing on its own): flags, quoting, dry-run.
#
# Every script takes the same flags (each uses the ones it needs); defaults come from BAGEL_* variables:
#   --project=ID            GCP project                        (BAGEL_PROJECT; empty: gcloud's default)
#   --zone=ZONE             e.g. us-east5-a                     (BAGEL_ZONE, required)
#   --name=NAME             TPU VM name, or queued-resource id  (BAGEL_TPU, required)
#   --accelerator=TYPE      e.g. v5p-32, v6e-16                 (BAGEL_ACCELERATOR; create.sh)
#   --version=RUNTIME       TPU software version, e.g. v2-alpha-tpuv5 (BAGEL_RUNTIME; create.sh)
#   --num-slices=N          N > 1: multi-slice queued resource (N slices of --accelerator)
#   --queued                use a queued resource even for one slice (implied by --num-slices > 1)
#   --spot | --reserved     capacity type (create.sh)
#   --workdir=gs://…        trainer workdir: checkpoints and metrics (BAGEL_WORKDIR; train.sh)
#   --config=FILE[:ARG]     trainer config, relative to the repo (train.sh)
#   --env=KEY=VALUE         extra environment for the trainer, repeatable (train.sh)
#   --attach                train.sh: stay attached and stream every worker's output
#   --worker=W --node=N     logs.sh: which host's log to follow (default 0, 0)
#   --source=DIR            install.sh: local checkout to ship (default: this repository)
#   --python=EXE            install.sh: interpreter for the venv on the workers (default python3.11)
#   --remote-dir=DIR        checkout on the workers, relative to $HOME (default bagel_jax)
#   --dry-run               print the exact commands instead of running them
#   -- ARGS…                everything after -- goes to the trainer verbatim, e.g. --config.train.lr=1e-4

set -euo pipefail

PROJECT=${BAGEL_PROJECT:-}
ZONE=${BAGEL_ZONE:-}
NAME=${BAGEL_TPU:-}
ACCELERATOR=${BAGEL_ACCELERATOR:-}
RUNTIME=${BAGEL_RUNTIME:-}
WORKDIR=${BAGEL_WORKDIR:-}
CONFIG=""
NUM_SLICES=1
QUEUED=0
CAPACITY=""
ATTACH=0
WORKER=0
NODE=0
SOURCE_DIR=""
PYTHON_EXE=python3.11
REMOTE_DIR=bagel_jax
DRY_RUN=0
ENVS=()
TRAINER_ARGS=()

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

usage() {
  sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit "${1:-0}"
}

# shquote VALUE: sets REPLY to VALUE quoted for a POSIX shell (unchanged when it needs no quotes).
shquote() {
  local s=$1 q="'\\''"
  if [[ $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    REPLY=$s
  else
    REPLY="'${s//\'/$q}'"
  fi
}

# quote_argv ARG...: sets REPLY to the arguments as one shell line that splits back into them.
quote_argv() {
  local out="" arg
  for arg in "$@"; do
    shquote "$arg"
    out+="${out:+ }$REPLY"
  done
  REPLY=$out
}

# run CMD ARG...: with --dry-run prints the command line; otherwise echoes it to stderr and runs it.
run() {
  quote_argv "$@"
  if ((DRY_RUN)); then
    printf '%s\n' "$REPLY"
  else
    printf '+ %s\n' "$REPLY" >&2
    "$@"
  fi
}

parse_args() {
  local arg value
  while (($#)); do
    arg=$1
    shift
    if [[ $arg == -- ]]; then
      TRAINER_ARGS=("$@")
      return
    fi
    case $arg in
      --dry-run) DRY_RUN=1; continue ;;
      --queued) QUEUED=1; continue ;;
      --spot) CAPACITY=--spot; continue ;;
      --reserved) CAPACITY=--reserved; continue ;;
      --attach) ATTACH=1; continue ;;
      -h | --help) usage 0 ;;
      --*=*) value=${arg#*=}; arg=${arg%%=*} ;;
      --*)
        (($#)) || die "$arg needs a value"
        value=$1
        shift
        ;;
      *) die "unexpected argument '$arg' (trainer flags go after --)" ;;
    esac
    case $arg in
      --project) PROJECT=$value ;;
      --zone) ZONE=$value ;;
      --name) NAME=$value ;;
      --accelerator | --accelerator-type) ACCELERATOR=$value ;;
      --version | --runtime-version) RUNTIME=$value ;;
      --num-slices) NUM_SLICES=$value ;;
      --workdir) WORKDIR=$value ;;
      --config) CONFIG=$value ;;
      --env) [[ $value == [A-Za-z_]*=* ]] || die "--env wants KEY=VALUE, got '$value'"; ENVS+=("$value") ;;
      --worker) WORKER=$value ;;
      --node) NODE=$value ;;
      --source) SOURCE_DIR=$value ;;
      --python) PYTHON_EXE=$value ;;
      --remote-dir) REMOTE_DIR=$value ;;
      *) die "unknown flag $arg" ;;
    esac
  done
}

# require VAR...: dies naming the first empty one, with its flag and environment variable.
require() {
  local var flag env
  for var in "$@"; do
    [[ -z ${!var} ]] || continue
    case $var in
      NAME) flag=name env=BAGEL_TPU ;;
      RUNTIME) flag=version env=BAGEL_RUNTIME ;;
      *) flag=$(printf '%s' "$var" | tr '[:upper:]_' '[:lower:]-') env=BAGEL_$var ;;
    esac
    die "--$flag is required (or set $env)"
  done
}

check_common() {
  require ZONE NAME
  [[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got '$NUM_SLICES'"
  [[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a number or all, got '$WORKER'"
  [[ $NODE == all || $NODE =~ ^[0-9]+$ ]] || die "--node must be a number or all, got '$NODE'"
  if ((NUM_SLICES > 1)); then QUEUED=1; fi
}

# Flags every gcloud call gets: zone, and project when given.
location_flags() {
  LOCATION=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then LOCATION+=(--project="$PROJECT"); fi
}

# on_hosts WORKER NODE REMOTE_COMMAND: runs REMOTE_COMMAND over ssh on the chosen hosts.
# A queued resource addresses slices with --node (all slices: --node=all); a plain TPU VM has one slice.
on_hosts() {
  local worker=$1 node=$2 command=$3
  location_flags
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources ssh "$NAME" "${LOCATION[@]}" --node="$node" --worker="$worker" \
      --command="$command"
  else
    run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$worker" --command="$command"
  fi
}

# copy_to_all LOCAL REMOTE: scp a local file to every host of every slice.
copy_to_all() {
  local src=$1 dest=$2
  location_flags
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources scp "$src" "$NAME:$dest" "${LOCATION[@]}" --node=all --worker=all
  else
    run gcloud compute tpus tpu-vm scp "$src" "$NAME:$dest" "${LOCATION[@]}" --worker=all
  fi
}
