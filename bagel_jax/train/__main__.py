"""``python -m bagel_jax.train --config=... --workdir=...`` (see train.py): flags, config and paths are checked
before the trainer is imported."""
from bagel_jax.train.app import run

run("bagel_jax.train.train:train", example_config="configs/tiny_shapes.py",
    workdir_help="output directory: checkpoints, metrics, TensorBoard, config.json")
