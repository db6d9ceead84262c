"""Trains BAGEL: ``python -m bagel_jax.train --config=configs/x.py[:arg] --workdir=DIR [--config.a.b=v ...]``.

Flags, the config and the paths it names are checked first (a bad one is one line on stderr, exit status 2); then
the loop of bagel_jax/train/train.py runs (resuming DIR's newest checkpoint). See configs/ for the configs.
"""

from bagel_jax.train.app import run

run(
    "bagel_jax.train.train:train",
    example_config="configs/tiny_shapes.py",
    workdir_help="output directory: checkpoints, metrics, TensorBoard, config.json",
)
