"""Activation rematerialisation (``model.remat``): a layer class wrapped in ``jax.checkpoint``.

``none`` saves every activation (no remat); ``full`` saves nothing and recomputes the whole layer in the
backward pass; ``dots`` saves matmul outputs without batch dims (projections, MLP) and recomputes attention;
``save_*`` saves only the tensors the layers tag with ``checkpoint_name`` (the attention's q/k/v inputs, its output);
``offload_*`` keeps those tensors in pinned host memory between the forward and the backward pass.
The mode → policy table is ``bagel_jax.config.REMAT_POLICIES``, which config validation also reads.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from bagel_jax.config import REMAT_POLICIES


def checkpoint_policy(mode: str):
    """The ``jax.checkpoint`` policy of a ``model.remat`` mode other than ``none`` (None = save nothing)."""
    if mode not in REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of none|{'|'.join(REMAT_POLICIES)}, got {mode!r}")
    kind, names = REMAT_POLICIES[mode]
    policies = jax.checkpoint_policies
    if kind == "nothing_saveable":
        return None
    if kind == "save_names":
        return policies.save_only_these_names(*names)
    if kind == "offload_names":
        return policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=list(names),
            offload_src="device",
            offload_dst="pinned_host",
        )
    return getattr(policies, kind)


def remat(layer_cls: type[nn.Module], mode: str, **kwargs) -> type[nn.Module]:
    """``layer_cls`` under ``nn.remat`` with the policy of ``mode`` (``none``: unchanged); kwargs go to nn.remat."""
    if mode == "none":
        return layer_cls
    return nn.remat(layer_cls, policy=checkpoint_policy(mode), **kwargs)
