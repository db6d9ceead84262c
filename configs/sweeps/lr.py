"""A learning-rate sweep for any config: one run per value.

Command:  python launch/xm_launch.py --config=configs/bagel_7b_mot.py --sweep=configs/sweeps/lr.py:1e-5,3e-5 \
              --tpu=v5p:4x4x4 --workdir=gs://BUCKET/lr --dry_run
``arg`` is a comma-separated list of learning rates (default 1e-5, 3e-5, 1e-4).
"""

DEFAULT = (1e-5, 3e-5, 1e-4)


def get_sweep(arg=None):
    values = [float(v) for v in arg.split(",")] if arg else list(DEFAULT)
    return [{"train.lr": v} for v in values]
