"""Learning rate × flow timestep shift for the tiny run (2 × 2 = 4 points, lr varying slowest).

Command:  python -m bagel_jax.sweep --config=configs/tiny_shapes.py --sweep=configs/sweeps/tiny_lr_shift.py \
              --workdir=/tmp/sweep_tiny [--limit=2]
Expected: one workdir per point under /tmp/sweep_tiny and a table of the final step's ce / mse per point.
``arg`` (optional) is a step count for short smoke sweeps: ``--sweep=configs/sweeps/tiny_lr_shift.py:5``.
"""

from bagel_jax.launch_utils import grid

LEARNING_RATES = (1e-3, 3e-3)
TIMESTEP_SHIFTS = (1.0, 3.0)


def get_sweep(arg=None):
    points = grid(train__lr=LEARNING_RATES, model__timestep_shift=TIMESTEP_SHIFTS)
    if arg:
        steps = int(arg)
        points = [dict(p, **{"train.steps": steps}) for p in points]
    return points
