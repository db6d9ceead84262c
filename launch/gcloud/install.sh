#!/usr/bin/env bash
# Ships this checkout to every host of every slice and installs it there in a venv (with libtpu).
#
#   install.sh --zone=us-east5-a --name=bagel-v5p [--queued] [--source=DIR] [--python=python3.11]
#
# On each worker: apt-installs the interpreter if missing, unpacks the tarball into ~/REMOTE_DIR
# (default bagel_jax), creates ~/REMOTE_DIR/.venv and runs pip install -e '.[tpu]'.
# Re-run after code changes; the venv is reused. Flags: see common.sh. --dry-run prints the commands.

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
source "$HERE/common.sh"

parse_args "$@"
check_common
((${#TRAINER_ARGS[@]} == 0)) || die "install.sh takes no trainer arguments"
SOURCE_DIR=${SOURCE_DIR:-$(cd "$HERE/../.." && pwd)}
[[ -f $SOURCE_DIR/setup.py ]] || die "--source=$SOURCE_DIR has no setup.py"

tarball=${TMPDIR:-/tmp}/bagel_jax_src.tar.gz
remote_tar=bagel_jax_src.tar.gz

# 1. Pack the checkout (without git history, venvs, caches).
run tar -czf "$tarball" -C "$SOURCE_DIR" --exclude=.git --exclude=.venv --exclude=__pycache__ \
  --exclude='*.egg-info' .
# 2. Copy it to all workers.
copy_to_all "$tarball" "$remote_tar"
# 3. Unpack and install on all workers, all at once.
shquote "$PYTHON_EXE"; py=$REPLY
shquote "$REMOTE_DIR"; dir=$REPLY
shquote "${PYTHON_EXE##*/}"; py_pkg=$REPLY
remote="set -e; if ! command -v $py >/dev/null; then sudo apt-get update -qq"
remote+=" && sudo apt-get install -y -qq $py_pkg $py_pkg-venv; fi"
remote+="; mkdir -p $dir && tar -xzf $remote_tar -C $dir && cd $dir"
remote+=" && { [ -x .venv/bin/python ] || $py -m venv .venv; }"
remote+=" && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[tpu]'"
remote+=" && .venv/bin/python -c 'import bagel_jax, jax; print(jax.__version__)'"
on_hosts all all "$remote"
