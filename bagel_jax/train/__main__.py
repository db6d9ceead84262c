"""``python -m bagel_jax.train --config=... --workdir=...`` (see train.py)."""
from bagel_jax.train.train import main

main()
