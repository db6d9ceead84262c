"""Activation rematerialisation (``model.remat``): a layer class wrapped in ``jax.checkpoint``.

``none`` saves every activation (no remat); ``full`` saves nothing and recomputes the whole layer in the
backward pass; ``dots`` saves matmul outputs without batch dims (projections, MLP) and recomputes attention.
The mode → policy table is ``bagel_jax.config.REMAT_POLICIES``, which config validation also reads.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from bagel_jax.config import REMAT_POLICIES


def remat(layer_cls: type[nn.Module], mode: str, **kwargs) -> type[nn.Module]:
    """``layer_cls`` under ``nn.remat`` with the policy of ``mode`` (``none``: unchanged); kwargs go to nn.remat."""
    if mode == "none":
        return layer_cls
    if mode not in REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of none|{'|'.join(REMAT_POLICIES)}, got {mode!r}")
    policy = REMAT_POLICIES[mode]
    return nn.remat(layer_cls, policy=None if policy is None else getattr(jax.checkpoint_policies, policy), **kwargs)
