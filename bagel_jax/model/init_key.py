"""The split of a run's seed key that every stage (BAGEL, VAE, ViT) uses, so a run's step-0 params can be remade
anywhere (the untrained baseline of the evals, a restart check): ``init_fn(split_init_key(PRNGKey(train.seed))[0])``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_init_key(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A run's seed key → (the params' init key, the state's base key): a fresh run's step-0 params are
    ``init_fn(split_init_key(PRNGKey(train.seed))[0])``."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)  # raw uint32 keys checkpoint as plain arrays
    init_rng, state_rng = jax.random.split(rng)
    return init_rng, state_rng
